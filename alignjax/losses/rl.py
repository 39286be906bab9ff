"""Online-RL math as pure functions: PPO (docs/algorithms.md section 6) and critic-free RL (section 7).

Shapes: `_bt` arrays are [B, T] over the response tokens only (T = max_new_tokens); `mask_bt` marks
the tokens up to and including the EOS (1) and the padding after it (0). `_b` arrays are per
sequence. Groups (GRPO/RLOO) are consecutive rows: rows [g*G, (g+1)*G) hold the G samples of
prompt g. Every function is jit-able and has a NumPy transcription in tests/reference_rl.py.

Conventions that differ from a peer are noted where they occur; each is a choice of the spec,
not an accident:
- the sequence score is added at the last valid token (the EOS), where TRL's PPO adds it one
  token later (the first pad) when there is room;
- GAE treats the step after the last valid token as terminal (its value is 0); TRL lets the
  value of the first pad token bootstrap.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
GRPO_SCALES = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ------------------------------------------------------------------------ masked statistics


def masked_sum(x, mask):
    # where, not multiply: a masked position may hold inf/NaN (pad logits) and 0 * inf = NaN.
    return jnp.sum(jnp.where(mask > 0, x, 0.0))


def masked_mean(x, mask):
    """sum(x m) / sum(m); 0 when nothing is masked in."""
    return masked_sum(x, mask) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def masked_var(x, mask, unbiased: bool = True):
    """Variance over the masked entries; `unbiased` applies Bessel's n / (n - 1) (as TRL does)."""
    n = jnp.sum(mask.astype(jnp.float32))
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / jnp.maximum(n - 1.0, 1.0) if unbiased else var


def masked_whiten(x, mask, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over the masked entries; with shift_mean=False the mean is
    added back (reward whitening rescales without moving the rewards' level). Masked-out
    entries come back as 0."""
    mean = masked_mean(x, mask)
    white = (x - mean) * jax.lax.rsqrt(masked_var(x, mask, unbiased) + eps)
    if not shift_mean:
        white = white + mean
    return jnp.where(mask > 0, white, 0.0)


def last_token_index(mask_bt):
    """Index of each row's last valid token (0 for an empty row)."""
    t = mask_bt.shape[-1]
    return jnp.max(jnp.where(mask_bt > 0, jnp.arange(t), 0), axis=-1)


def reverse_cumsum(x_bt, mask_bt, gamma: float = 1.0):
    """G_t = sum_{t' >= t} gamma^(t'-t) x_t' over masked tokens (returns-to-go)."""
    x_tb = jnp.where(mask_bt > 0, x_bt, 0.0).T

    def step(acc_b, x_b):
        acc_b = x_b + gamma * acc_b
        return acc_b, acc_b

    _, out_tb = jax.lax.scan(step, jnp.zeros_like(x_tb[0]), x_tb, reverse=True)
    return jnp.where(mask_bt > 0, out_tb.T, 0.0)


# ----------------------------------------------------------------------- scores and KL


def kl_estimate(logp_bt, ref_logp_bt, kind: str = "k1"):
    """Per-token KL(pi || ref) estimate with d = logp_pi - logp_ref: k1 = d, k2 = d^2 / 2,
    k3 = exp(-d) + d - 1 (non-negative, unbiased)."""
    d = logp_bt - ref_logp_bt
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return jnp.exp(-d) + d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}")


def shape_scores(scores_b, has_eos_b, *, reward_mean: float = 0.0, reward_std: float = 1.0,
                 clip: float | None = None, missing_eos_penalty: float | None = None,
                 missing_eos_score: float | None = None):
    """Reward-model scores -> the scores RL trains on, in this order: normalise with the reward
    model's stored statistics, clip to [-clip, clip], then treat responses without EOS
    (truncated): `missing_eos_score` replaces their score, or `missing_eos_penalty` is subtracted
    (TRL's convention)."""
    s = (scores_b - reward_mean) / reward_std
    if clip is not None:
        s = jnp.clip(s, -clip, clip)
    if missing_eos_score is not None:
        s = jnp.where(has_eos_b, s, missing_eos_score)
    elif missing_eos_penalty is not None:
        s = jnp.where(has_eos_b, s, s - missing_eos_penalty)
    return s


def overlong_penalty(length_b, max_len: int, buffer: int, factor: float = 1.0):
    """DAPO's soft overlong punishment, added to the score: 0 up to max_len - buffer, then
    -min(n - (max_len - buffer), buffer) / buffer * factor."""
    over = jnp.clip(length_b.astype(jnp.float32) - (max_len - buffer), 0.0, float(buffer))
    return -over / buffer * factor


def token_rewards(scores_b, kl_bt, mask_bt, kl_coef):
    """r_t = -kl_coef * kl_t on every response token, plus the score at the last valid token."""
    last = jax.nn.one_hot(last_token_index(mask_bt), mask_bt.shape[-1], dtype=jnp.float32)
    r = -kl_coef * kl_bt + scores_b[:, None] * last
    return jnp.where(mask_bt > 0, r, 0.0)


def adaptive_kl_coef(kl_coef, kl, n_samples, target: float, horizon: float):
    """Ziegler et al.'s controller: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon),
    with `kl` the batch's mean sequence KL and n the number of samples in the batch."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n_samples / horizon)


# -------------------------------------------------------------------------------- PPO


def gae(rewards_bt, values_bt, mask_bt, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation -> (advantages_bt, returns_bt), both 0 off the mask.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V;
    the step after the last valid token is terminal (V = 0, A = 0).
    """
    valid = mask_bt > 0
    r_tb = jnp.where(valid, rewards_bt, 0.0).T
    v_tb = jnp.where(valid, values_bt, 0.0).T
    next_v_tb = jnp.concatenate([v_tb[1:], jnp.zeros_like(v_tb[:1])], axis=0)

    def step(next_adv_b, xs):
        r_b, v_b, nv_b = xs
        adv_b = r_b + gamma * nv_b - v_b + gamma * lam * next_adv_b
        return adv_b, adv_b

    _, adv_tb = jax.lax.scan(step, jnp.zeros_like(r_tb[0]), (r_tb, v_tb, next_v_tb), reverse=True)
    adv_bt = jnp.where(valid, adv_tb.T, 0.0)
    return adv_bt, jnp.where(valid, adv_bt + values_bt, 0.0)


class PolicyLossStats(NamedTuple):
    """Per-token diagnostics of a clipped policy loss (average them with the mask)."""

    clipped: jax.Array  # 1 where the clipped branch is the active one (policy/clipfrac)
    approxkl: jax.Array  # 0.5 (logp_new - logp_old)^2 (policy/approxkl)
    ratio: jax.Array


def ppo_policy_loss(logp_bt, old_logp_bt, adv_bt, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None, dual_clip: float | None = None):
    """Per-token max(-A rho, -A clip(rho, 1 - eps, 1 + eps_high)), rho = exp(logp - logp_old).

    `dual_clip` = c > 1 also caps the loss of negative-advantage tokens at -c A (Ye et al.).
    Returns (loss_bt, PolicyLossStats); reduce with `masked_mean` or `aggregate_token_loss`.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logp_bt - old_logp_bt
    ratio = jnp.exp(log_ratio)
    unclipped = -adv_bt * ratio
    clipped = -adv_bt * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(adv_bt < 0, jnp.minimum(loss, -dual_clip * adv_bt), loss)
    stats = PolicyLossStats((clipped > unclipped).astype(jnp.float32), 0.5 * log_ratio ** 2, ratio)
    return loss, stats


def ppo_value_loss(values_bt, old_values_bt, returns_bt, clip: float = 0.2):
    """Per-token 0.5 max((V - R)^2, (clip(V, V_old -+ clip) - R)^2) -> (loss_bt, clipped_bt)."""
    v_clipped = jnp.clip(values_bt, old_values_bt - clip, old_values_bt + clip)
    plain, clipped = (values_bt - returns_bt) ** 2, (v_clipped - returns_bt) ** 2
    return 0.5 * jnp.maximum(plain, clipped), (clipped > plain).astype(jnp.float32)


# ------------------------------------------------------------------------ critic-free RL


def _groups(x_b, group_size: int):
    if x_b.shape[0] % group_size:
        raise ValueError(f"{x_b.shape[0]} rows do not split into groups of {group_size}")
    return x_b.reshape(-1, group_size)


def grpo_advantages(scores_b, group_size: int, scale: str = "group", eps: float = 1e-4):
    """A_i = (r_i - mean_group r) / (std + eps): std over the group ("group"), over the whole
    batch ("batch"), or no division ("none", Dr. GRPO). std is the unbiased one, as TRL's."""
    if group_size < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt: the group std is undefined")
    r_gk = _groups(scores_b, group_size)
    centred = (r_gk - r_gk.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "group":
        std = jnp.repeat(jnp.std(r_gk, axis=1, ddof=1), group_size)
    elif scale == "batch":
        std = jnp.std(scores_b, ddof=1)
    elif scale == "none":
        return centred
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}; choose one of {GRPO_SCALES}")
    return centred / (std + eps)


def grpo_token_loss(logp_bt, old_logp_bt, adv_b, mask_bt, *, eps_low: float = 0.2,
                    eps_high: float = 0.2, ref_logp_bt=None, beta: float = 0.0,
                    sequence_ratio: bool | str = False):
    """Per-token -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3_t.

    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1; beta = 0 needs no reference.
    `adv_b`: one advantage per row [B] (GRPO, RLOO) or per token [B, T] (REINFORCE++).
    `sequence_ratio`: True or "mean" (GSPO): rho = exp(masked mean_t (logp - logp_old)) for every
    token of a row; "sum" (TRL's RLOO): rho = exp(masked sum_t (logp - logp_old)), the ratio of
    the whole sequence's probabilities.
    Returns (loss_bt, dict of per-token low/high/region clip indicators and k3).
    """
    log_ratio = logp_bt - old_logp_bt
    if sequence_ratio:
        if sequence_ratio == "sum":
            seq = jnp.sum(jnp.where(mask_bt > 0, log_ratio, 0.0), axis=-1)
        else:
            seq = masked_row_mean(log_ratio, mask_bt)
        log_ratio = jnp.broadcast_to(seq[:, None], log_ratio.shape)
    ratio = jnp.exp(log_ratio)
    a = adv_b[:, None] if adv_b.ndim == 1 else adv_b
    loss = -jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a)
    k3 = jnp.zeros_like(loss)
    if beta:
        if ref_logp_bt is None:
            raise ValueError("beta > 0 needs reference log-probs")
        k3 = kl_estimate(logp_bt, ref_logp_bt, "k3")
        loss = loss + beta * k3
    low = ((ratio < 1.0 - eps_low) & (a < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + eps_high) & (a > 0)).astype(jnp.float32)
    return loss, dict(clip_low=low, clip_high=high, clip_region=jnp.maximum(low, high), k3=k3)


def masked_row_mean(x_bt, mask_bt):
    """Per-row mean over masked tokens, [B] (0 for an empty row)."""
    m = mask_bt.astype(jnp.float32)
    return jnp.sum(jnp.where(m > 0, x_bt, 0.0), axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def aggregate_token_loss(loss_bt, mask_bt, loss_type: str, max_len: int | None = None):
    """(loss_sum, normaliser) of a batch; the loss is loss_sum / normaliser.

    grpo: mean over rows of each row's token mean -> (sum of row means, B)
    bnpo / dapo: token mean over the batch -> (sum of m l, sum of m). The two differ only across
      gradient-accumulation micro-batches: dapo divides by the tokens of the whole step, bnpo
      by each micro-batch's own (the trainer applies that split).
    dr_grpo: (sum of m l, B * max_len), a constant normaliser (Dr. GRPO).
    Returning a sum and its normaliser lets a step add micro-batches exactly.
    """
    b = loss_bt.shape[0]
    if loss_type == "grpo":
        return jnp.sum(masked_row_mean(loss_bt, mask_bt)), jnp.float32(b)
    total = masked_sum(loss_bt, mask_bt)
    if loss_type in ("bnpo", "dapo"):
        return total, jnp.sum(mask_bt.astype(jnp.float32))
    if loss_type == "dr_grpo":
        return total, jnp.float32(b * (max_len or loss_bt.shape[1]))
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")


def rloo_advantages(scores_b, seq_kl_b, group_size: int, beta: float = 0.05):
    """R_i = r_i - beta * KL_i (sequence-level k1, summed over tokens), A_i = R_i minus the mean
    of the other G - 1 samples of its prompt (leave-one-out). Returns (advantages_b, R_b)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt for the leave-one-out baseline")
    r_gk = _groups(scores_b - beta * seq_kl_b, group_size)
    baseline = (r_gk.sum(axis=1, keepdims=True) - r_gk) / (group_size - 1)
    return (r_gk - baseline).reshape(-1), r_gk.reshape(-1)


def reinforce_pp_advantages(scores_b, kl_bt, mask_bt, beta: float = 0.01,
                            group_size: int | None = None):
    """REINFORCE++: token rewards -beta kl_t plus the score at the last valid token, returns-to-go
    (gamma 1), whitened over every response token of the batch (biased variance, as OpenRLHF).
    With `group_size` (REINFORCE++-baseline) the group mean score is subtracted first."""
    if group_size is not None:
        r_gk = _groups(scores_b, group_size)
        scores_b = (r_gk - r_gk.mean(axis=1, keepdims=True)).reshape(-1)
    returns = reverse_cumsum(token_rewards(scores_b, kl_bt, mask_bt, beta), mask_bt)
    return masked_whiten(returns, mask_bt, unbiased=False)
