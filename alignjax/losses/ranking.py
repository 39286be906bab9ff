"""Ranking and unpaired losses (docs/algorithms.md section 4): RRHF, PRO, KTO.

Ranked inputs are groups of K responses per prompt, [B, K]: `logps_bk` sums of policy log-probs,
`lengths_bk` completion token counts, `valid_bk` (a group may hold fewer than K responses; the
invalid slots may contain anything). The NLL terms are token means, -logp/|y|, like the RPO
`sft` term, so they are on the same scale as the length-normalised ranking scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses.logprobs import weighted_mean as _wmean


def _avg_logps(logps_bk, lengths_bk, valid_bk):
    # Invalid slots are zeroed so garbage there (NaN, -inf) can reach neither value nor gradient.
    p_bk = logps_bk.astype(jnp.float32) / jnp.maximum(lengths_bk.astype(jnp.float32), 1.0)
    return jnp.where(valid_bk, p_bk, 0.0)


def rrhf_loss(
    logps_bk: jax.Array,
    lengths_bk: jax.Array,
    scores_bk: jax.Array,
    valid_bk: jax.Array,
    sft_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RRHF: per group sum_{r_i < r_j} max(0, p_i - p_j) + sft_weight * NLL(best), p = avg logp.

    NLL(best) = -p of the highest-scored valid response (first one on ties); pairs with equal
    scores are not ranked. The loss is the mean over groups with at least one valid response.
    """
    valid_bk = valid_bk.astype(bool)
    p_bk = _avg_logps(logps_bk, lengths_bk, valid_bk)
    r_bk = jax.lax.stop_gradient(scores_bk.astype(jnp.float32))
    # pair_bij: response i is ranked below response j, both valid.
    pair_bij = (
        valid_bk[:, :, None] & valid_bk[:, None, :] & (r_bk[:, :, None] < r_bk[:, None, :])
    )
    hinge_bij = jax.nn.relu(p_bk[:, :, None] - p_bk[:, None, :])
    rank_b = jnp.sum(jnp.where(pair_bij, hinge_bij, 0.0), axis=(1, 2))
    best_b = jnp.argmax(jnp.where(valid_bk, r_bk, -jnp.inf), axis=1)
    nll_b = -jnp.take_along_axis(p_bk, best_b[:, None], axis=1)[:, 0]
    group_w_b = jnp.any(valid_bk, axis=1).astype(jnp.float32)
    n_pairs = jnp.maximum(jnp.sum(pair_bij), 1)
    ordered = jnp.sum(pair_bij & (p_bk[:, :, None] < p_bk[:, None, :])) / n_pairs
    loss = _wmean(rank_b + sft_weight * nll_b, group_w_b)
    metrics = {
        "loss": loss,
        "loss/rank": _wmean(rank_b, group_w_b),
        "loss/sft": _wmean(nll_b, group_w_b),
        "rank_accuracy": ordered,  # fraction of scored pairs whose avg logps are in order
    }
    return loss, metrics


def _rank_order(valid_bk, scores_bk):
    """Permutation putting valid responses first, best first (by score, else given order)."""
    k = valid_bk.shape[1]
    if scores_bk is None:
        key_bk = jnp.where(valid_bk, jnp.arange(k, dtype=jnp.float32), jnp.inf)
    else:
        key_bk = jnp.where(valid_bk, -scores_bk.astype(jnp.float32), jnp.inf)
    return jnp.argsort(key_bk, axis=1, stable=True)


def pro_loss(
    logps_bk: jax.Array,
    lengths_bk: jax.Array,
    valid_bk: jax.Array,
    scores_bk: jax.Array | None = None,
    sft_weight: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PRO (Preference Ranking Optimisation) over groups ranked y^1 > ... > y^n.

    L = -sum_{k=1}^{n-1} log[exp(s_k / T_k^k) / sum_{i>=k} exp(s_i / T_k^i)] + w NLL(y^1),
    s = avg logp, 1/T_k^i = R_k - R_i (i > k), 1/T_k^k = max_{i>k} 1/T_k^i (i.e. T_k^k = min T_k^i).
    With `scores_bk` the responses are ranked by score (stable on ties); without, the given order
    is the ranking and all T = 1 (plain Plackett-Luce). w = 0.05 (n-1)^2 per group unless
    `sft_weight` is given. The loss is the mean over groups with at least one valid response.
    """
    valid_bk = valid_bk.astype(bool)
    b, k = valid_bk.shape
    order_bk = _rank_order(valid_bk, scores_bk)
    s_bk = jnp.take_along_axis(_avg_logps(logps_bk, lengths_bk, valid_bk), order_bk, axis=1)
    n_b = jnp.sum(valid_bk, axis=1)
    idx = jnp.arange(k)
    ranked_valid_bk = idx[None, :] < n_b[:, None]  # valid slots are first after sorting

    if scores_bk is None:
        inv_t_bki = jnp.ones((b, k, k), jnp.float32)
    else:
        r_bk = jnp.take_along_axis(
            jax.lax.stop_gradient(scores_bk.astype(jnp.float32)), order_bk, axis=1
        )
        gap_bki = r_bk[:, :, None] - r_bk[:, None, :]  # >= 0 for valid i > k (sorted descending)
        later_bki = (idx[None, :, None] < idx[None, None, :]) & ranked_valid_bk[:, None, :]
        diag_bk = jnp.max(jnp.where(later_bki, gap_bki, 0.0), axis=2)
        inv_t_bki = jnp.where(idx[:, None] == idx[None, :], diag_bk[:, :, None], gap_bki)

    logits_bki = s_bk[:, None, :] * inv_t_bki
    # Candidates of step k: ranks i >= k that exist; the diagonal is always kept so that no row
    # is empty (rows k >= n-1 are dropped below, but must not produce NaN on the way).
    cand_bki = (idx[:, None] <= idx[None, :]) & (
        ranked_valid_bk[:, None, :] | (idx[:, None] == idx[None, :])
    )
    lse_bk = jax.nn.logsumexp(jnp.where(cand_bki, logits_bki, -jnp.inf), axis=2)
    step_bk = jnp.diagonal(logits_bki, axis1=1, axis2=2) - lse_bk
    steps_bk = idx[None, :] < (n_b[:, None] - 1)
    pl_b = -jnp.sum(jnp.where(steps_bk, step_bk, 0.0), axis=1)

    n_f = n_b.astype(jnp.float32)
    w_b = 0.05 * (n_f - 1.0) ** 2 if sft_weight is None else jnp.full_like(n_f, sft_weight)
    nll_b = -s_bk[:, 0]
    group_w_b = (n_b > 0).astype(jnp.float32)
    loss = _wmean(pl_b + w_b * nll_b, group_w_b)
    metrics = {
        "loss": loss,
        "loss/ranking": _wmean(pl_b, group_w_b),
        "loss/sft": _wmean(nll_b, group_w_b),
    }
    return loss, metrics


def kto_loss(
    policy_logps_b: jax.Array,
    ref_logps_b: jax.Array,
    desirable_b: jax.Array,
    kl_policy_logps_b: jax.Array,
    kl_ref_logps_b: jax.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    sample_weight_b: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO: desirable lambda_D (1 - sigma(beta (u - z0))), undesirable lambda_U (1 - sigma(beta (z0 - u))).

    u = policy - ref (sums); z0 = max(0, mean_b(kl_policy - kl_ref)), detached, where the kl_*
    log-probs are of mismatched prompt/completion pairs (a batch estimate of KL(pi || ref)).
    The loss is the (weighted) mean over all examples, as TRL does; `sample_weight_b` = 0 drops
    padding rows from the loss and from z0.
    """
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    w_b = jnp.ones_like(f32(policy_logps_b)) if sample_weight_b is None else f32(sample_weight_b)
    z0 = jax.lax.stop_gradient(
        jnp.maximum(0.0, _wmean(f32(kl_policy_logps_b) - f32(kl_ref_logps_b), w_b))
    )
    u_b = f32(policy_logps_b) - f32(ref_logps_b)
    desirable_b = desirable_b.astype(bool)
    loss_b = jnp.where(
        desirable_b,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (u_b - z0))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - u_b))),
    )
    loss = _wmean(loss_b, w_b)
    w_d, w_u = w_b * desirable_b, w_b * (~desirable_b)
    r_b = jax.lax.stop_gradient(beta * u_b)
    logps_b = jax.lax.stop_gradient(f32(policy_logps_b))
    metrics = {
        "loss": loss,
        "kl": z0,
        "rewards/chosen": _wmean(r_b, w_d),
        "rewards/rejected": _wmean(r_b, w_u),
        "rewards/margins": _wmean(r_b, w_d) - _wmean(r_b, w_u),
        "logps/chosen": _wmean(logps_b, w_d),
        "logps/rejected": _wmean(logps_b, w_u),
    }
    return loss, metrics
