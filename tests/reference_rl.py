"""Independent NumPy (float64) transcription of docs/algorithms.md sections 6 and 7 (online RL).

Written from the spec with plain Python loops over rows and tokens; no jax, no import of
alignjax. Rows are responses, `mask` marks tokens up to and including EOS.
"""

from __future__ import annotations

import numpy as np


def valid_tokens(mask_row):
    return [t for t in range(len(mask_row)) if mask_row[t] > 0]


def masked_mean(x, mask):
    vals = [x[i, t] for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t] > 0]
    return float(np.mean(vals)) if vals else 0.0


def whiten(x, mask, shift_mean=True, unbiased=True, eps=1e-8):
    vals = np.array([x[i, t] for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t] > 0])
    mean = vals.mean()
    var = vals.var(ddof=1 if unbiased else 0)
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t] > 0:
                out[i, t] = (x[i, t] - mean) / np.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out


def kl(logp, ref, kind):
    d = np.asarray(logp, np.float64) - np.asarray(ref, np.float64)
    return {"k1": d, "k2": d ** 2 / 2, "k3": np.exp(-d) + d - 1}[kind]


def token_rewards(scores, kl_bt, mask, coef):
    r = np.zeros(kl_bt.shape)
    for i in range(r.shape[0]):
        idx = valid_tokens(mask[i])
        for t in idx:
            r[i, t] = -coef * kl_bt[i, t]
        if idx:
            r[i, idx[-1]] += scores[i]
    return r


def adaptive_kl(beta, kl_value, n, target, horizon):
    err = min(max(kl_value / target - 1, -0.2), 0.2)
    return beta * (1 + err * n / horizon)


def gae(rewards, values, mask, gamma, lam):
    adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for i in range(rewards.shape[0]):
        idx = valid_tokens(mask[i])
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = values[i, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[i, t] + gamma * next_v - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
            ret[i, t] = last + values[i, t]
    return adv, ret


def ppo_policy_loss(logp, old, adv, eps, dual_clip=None):
    rho = np.exp(logp - old)
    loss = np.maximum(-adv * rho, -adv * np.clip(rho, 1 - eps, 1 + eps))
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -dual_clip * adv), loss)
    clipfrac = (-adv * np.clip(rho, 1 - eps, 1 + eps) > -adv * rho).astype(float)
    return loss, clipfrac, 0.5 * (logp - old) ** 2


def ppo_value_loss(v, v_old, ret, clip):
    vc = np.clip(v, v_old - clip, v_old + clip)
    return 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)


def grpo_advantages(scores, g, scale):
    out = np.zeros(len(scores))
    for start in range(0, len(scores), g):
        grp = np.asarray(scores[start:start + g], np.float64)
        for k in range(g):
            a = grp[k] - grp.mean()
            if scale == "group":
                a /= grp.std(ddof=1) + 1e-4
            elif scale == "batch":
                a /= np.std(scores, ddof=1) + 1e-4
            out[start + k] = a
    return out


def grpo_token_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, sequence_ratio=False):
    loss = np.zeros(logp.shape)
    for i in range(logp.shape[0]):
        idx = valid_tokens(mask[i])
        seq = np.mean([logp[i, t] - old[i, t] for t in idx]) if idx else 0.0
        if sequence_ratio == "sum":
            seq = sum(logp[i, t] - old[i, t] for t in idx)
        for t in range(logp.shape[1]):
            rho = np.exp(seq if sequence_ratio else logp[i, t] - old[i, t])
            a = adv[i, t] if np.ndim(adv) == 2 else adv[i]  # per-token advantages (REINFORCE++)
            l = -min(rho * a, np.clip(rho, 1 - eps_low, 1 + eps_high) * a)
            x = ref[i, t] - logp[i, t]
            loss[i, t] = l + beta * (np.exp(x) - x - 1)
    return loss


def aggregate(loss, mask, loss_type, max_len):
    b = loss.shape[0]
    if loss_type == "grpo":
        rows = []
        for i in range(b):
            idx = valid_tokens(mask[i])
            rows.append(sum(loss[i, t] for t in idx) / max(len(idx), 1))
        return float(np.mean(rows))
    total = sum(loss[i, t] for i in range(b) for t in valid_tokens(mask[i]))
    if loss_type in ("bnpo", "dapo"):
        return total / mask.sum()
    return total / (b * max_len)  # dr_grpo


def rloo_advantages(scores, seq_kl, g, beta):
    r = np.asarray(scores, np.float64) - beta * np.asarray(seq_kl, np.float64)
    out = np.zeros(len(r))
    for start in range(0, len(r), g):
        for k in range(g):
            others = [r[start + j] for j in range(g) if j != k]
            out[start + k] = r[start + k] - np.mean(others)
    return out


def reinforce_pp(scores, kl_bt, mask, beta, g=None):
    scores = np.asarray(scores, np.float64).copy()
    if g is not None:
        for start in range(0, len(scores), g):
            scores[start:start + g] -= scores[start:start + g].mean()
    r = token_rewards(scores, kl_bt, mask, beta)
    ret = np.zeros(r.shape)
    for i in range(r.shape[0]):
        acc = 0.0
        for t in reversed(valid_tokens(mask[i])):
            acc += r[i, t]
            ret[i, t] = acc
    return whiten(ret, mask, unbiased=False)


def overlong(n, max_len, buf, factor):
    return -min(max(n - (max_len - buf), 0), buf) / buf * factor


# ---- PPO composed (section 6, steps 3-6), as alignjax.train.ppo runs it ------------------------

def shape_scores(scores, has_eos, clip=None, penalty=None, eos_score=None):
    out = []
    for s, e in zip(np.asarray(scores, np.float64), has_eos):
        if clip is not None:
            s = min(max(s, -clip), clip)
        if not e:
            if eos_score is not None:
                s = eos_score
            elif penalty is not None:
                s = s - penalty
        out.append(s)
    return np.array(out)


def ppo_advantages(scores, has_eos, logp, refl, values, mask, kl_coef, estimator="k1",
                   kl_in="reward", gamma=1.0, lam=0.95, whiten_rewards=False, whiten_adv=True,
                   clip=None, penalty=None, eos_score=None):
    """(advantages, returns, token rewards, shaped scores, per-token KL) of one rollout."""
    s = shape_scores(scores, has_eos, clip, penalty, eos_score)
    k = kl(logp, refl, estimator) * (mask > 0)
    r = token_rewards(s, k, mask, kl_coef if kl_in == "reward" else 0.0)
    if whiten_rewards:
        r = whiten(r, mask, shift_mean=False)
    adv, ret = gae(r, np.asarray(values, np.float64), mask, gamma, lam)
    if whiten_adv:
        adv = whiten(adv, mask)
    return adv, ret, r, s, k


def log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ppo_update_sums(logits, targets, v_new, old, v_old, adv, ret, mask, temperature, eps, vf_clip,
                    vf_coef, ent_coef=0.0, dual_clip=None, refl=None, kl_coef_rows=None,
                    estimator="k1"):
    """Objective and metric sums of one PPO minibatch, summed over the masked tokens.

    `logits` [R, N, V] are the policy's logits at the positions that predict `targets`."""
    logp_all = log_softmax(np.asarray(logits, np.float64) / temperature)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    pg, clipped, approx = ppo_policy_loss(logp, old, adv, eps, dual_clip)
    vf = ppo_value_loss(v_new, v_old, ret, vf_clip)
    vc = np.clip(v_new, v_old - vf_clip, v_old + vf_clip)
    vf_clipped = ((vc - ret) ** 2 > (v_new - ret) ** 2).astype(float)
    rho = np.exp(logp - old)
    per_token = pg + vf_coef * vf - ent_coef * entropy
    k = np.zeros_like(pg)
    if refl is not None:
        k = kl(logp, refl, estimator)
        per_token = per_token + np.asarray(kl_coef_rows)[:, None] * k
    m = mask > 0

    def total(x):
        return float(np.sum(np.where(m, x, 0.0)))

    sums = {"loss/policy_avg": total(pg), "loss/value_avg": total(vf),
            "policy/approxkl_avg": total(approx), "policy/clipfrac_avg": total(clipped),
            "policy/entropy_avg": total(entropy), "val/clipfrac_avg": total(vf_clipped),
            "val/ratio": total(rho), "val/ratio_sq": total(rho ** 2), "val/vpred": total(v_new),
            "loss/kl_avg": total(k), "count": float(m.sum())}
    return total(per_token), sums


# ---- critic-free RL composed (section 7), as alignjax.train.grpo runs it ------------------------

def critic_free_advantages(method, scores, has_eos, logp, refl, mask, g, beta, scale="group",
                           penalty=None, overlong_buffer=0, overlong_factor=1.0, max_len=None):
    """(per-token advantages [R, N], shaped scores) of one rollout. `refl` None: no KL (beta 0)."""
    s = shape_scores(scores, has_eos, penalty=penalty)
    if overlong_buffer:
        s = s + np.array([overlong(n, max_len, overlong_buffer, overlong_factor) for n in mask.sum(1)])
    k = np.zeros(mask.shape) if refl is None else kl(logp, refl, "k1") * (mask > 0)
    if method == "grpo":
        adv = grpo_advantages(s, g, scale)[:, None] * (mask > 0)
    elif method == "rloo":
        adv = rloo_advantages(s, k.sum(1), g, beta)[:, None] * (mask > 0)
    else:
        adv = reinforce_pp(s, k, mask, beta, g if method == "reinforce_pp_baseline" else None)
    return adv, s


def critic_free_update(logits, targets, old, adv, mask, temperature, eps_low, eps_high, beta,
                       refl, ratio, loss_type, max_len):
    """(loss, token means of entropy / clip indicators / k3) of one critic-free update batch.
    ratio: token | gspo | sequence; `logits` [R, N, V] predict `targets`."""
    logp_all = log_softmax(np.asarray(logits, np.float64) / temperature)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    refl = np.zeros_like(logp) if refl is None else np.asarray(refl, np.float64)
    mode = {"token": False, "gspo": True, "sequence": "sum"}[ratio]
    loss = grpo_token_loss(logp, old, refl, adv, mask, eps_low, eps_high, beta, mode)
    low, high = np.zeros(logp.shape), np.zeros(logp.shape)
    for i in range(logp.shape[0]):
        idx = valid_tokens(mask[i])
        d = [logp[i, t] - old[i, t] for t in idx]
        seq = {"token": None, "gspo": np.mean(d) if d else 0.0, "sequence": sum(d)}[ratio]
        for t in idx:
            rho = np.exp(logp[i, t] - old[i, t] if seq is None else seq)
            low[i, t] = rho < 1 - eps_low and adv[i, t] < 0
            high[i, t] = rho > 1 + eps_high and adv[i, t] > 0
    x = refl - logp
    means = {"entropy": masked_mean(entropy, mask), "clip_ratio/low_mean": masked_mean(low, mask),
             "clip_ratio/high_mean": masked_mean(high, mask),
             "clip_ratio/region_mean": masked_mean(np.maximum(low, high), mask),
             "kl": masked_mean(np.exp(x) - x - 1, mask)}
    return aggregate(loss, mask, loss_type, max_len), means


def online_dpo_pairs(scores, has_eos, penalty):
    """TRL OnlineDPOTrainer's pair construction, in its own layout: the batch's first half holds
    every prompt's first sample, the second half the second; penalise missing EOS; first wins ties.
    Returns (chosen, rejected) indices into that layout and the penalised scores."""
    r = np.asarray(scores, np.float64) - penalty * ~np.asarray(has_eos, bool)
    b = len(r) // 2
    first_wins = r[:b] >= r[b:]
    idx = np.arange(b)
    return idx + (~first_wins) * b, idx + first_wins * b, r
