"""Independent NumPy (float64) transcription of docs/algorithms.md sections 1-4.

Written from the spec, not from alignjax: plain loops where the formula is a sum over
responses, no jax, no import of the implementation. Inputs are 1-D arrays per pair (or lists of
per-group arrays for the ranking losses); outputs are per-pair losses or batch scalars.
"""

from __future__ import annotations

import numpy as np


def logsig(z):
    """log sigma(z) = -softplus(-z) = -log(1 + e^-z)."""
    return -np.logaddexp(0.0, -np.asarray(z, np.float64))


def sig(z):
    return np.exp(logsig(z))


# ------------------------------------------------------------------ 0. log-prob kernel


def token_logps(hidden_bte, kernel_ev, targets_bt, temperature=1.0):
    logits = np.einsum("bte,ev->btv", hidden_bte.astype(np.float64), kernel_ev.astype(np.float64))
    logits = logits / temperature
    m = logits.max(-1, keepdims=True)
    logz = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    logp_all = logits - logz[..., None]
    logps = np.take_along_axis(logp_all, targets_bt[..., None], -1)[..., 0]
    p = np.exp(logp_all)
    entropy = -(p * logp_all).sum(-1)
    return logps, entropy


# --------------------------------------------------------------------------- 1. SFT


def sft_loss(logps_bt, mask_bt):
    """Sum of token NLL / number of target tokens."""
    return -(logps_bt * mask_bt).sum() / max(mask_bt.sum(), 1.0)


# ---------------------------------------------------------------- 2. Bradley-Terry


def bradley_terry(r_w, r_l, m=None, c=0.0):
    m = np.zeros_like(r_w) if m is None else m
    per_pair = -logsig(r_w - r_l - m) + c * (r_w + r_l) ** 2
    return per_pair.mean()


# ------------------------------------------------------- 3. reference-based pairs
# Each takes a dict with keys pw, pl (policy sums), rw, rl (reference sums), nw, nl (lengths).


def _u(d):
    return d["pw"] - d["rw"], d["pl"] - d["rl"]


def dpo(d, beta=0.1, **_):
    uw, ul = _u(d)
    return -logsig(beta * (uw - ul))


def cdpo(d, beta=0.1, eps=0.0, **_):
    uw, ul = _u(d)
    h = uw - ul
    return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)


def robust(d, beta=0.1, eps=0.0, **_):
    uw, ul = _u(d)
    h = uw - ul
    return (-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)


def ipo(d, beta=0.1, **_):
    uw, ul = _u(d)
    h_avg = uw / d["nw"] - ul / d["nl"]
    return (h_avg - 1 / (2 * beta)) ** 2


def hinge(d, beta=0.1, **_):
    uw, ul = _u(d)
    return np.maximum(0.0, 1 - beta * (uw - ul))


def sigmoid_norm(d, beta=0.1, **_):
    uw, ul = _u(d)
    return -logsig(beta * (uw / d["nw"] - ul / d["nl"]))


def exo_pair(d, beta=0.1, exo_eps=1e-3, **_):
    uw, ul = _u(d)
    z = beta * (uw - ul)
    e = exo_eps
    return sig(z) * (logsig(z) - np.log(1 - e)) + sig(-z) * (logsig(-z) - np.log(e))


def nca_pair(d, beta=0.1, **_):
    uw, ul = _u(d)
    return -logsig(beta * uw) - 0.5 * logsig(-beta * uw) - 0.5 * logsig(-beta * ul)


def bco_pair(d, beta=0.1, **_):
    uw, ul = _u(d)
    return -logsig(beta * uw) - logsig(-beta * ul)


def sppo_hard(d, beta=0.1, **_):
    uw, ul = _u(d)
    return (uw - 1 / (2 * beta)) ** 2 + (ul + 1 / (2 * beta)) ** 2


def _smooth(dd, beta, eps):
    return -(1 - eps) * logsig(beta * dd) - eps * logsig(-beta * dd)


def aot(d, beta=0.1, eps=0.0, **_):
    dd = np.sort(d["pw"] - d["pl"]) - np.sort(d["rw"] - d["rl"])
    return _smooth(dd, beta, eps)


def aot_unpaired(d, beta=0.1, eps=0.0, **_):
    uw, ul = _u(d)
    return _smooth(np.sort(uw) - np.sort(ul), beta, eps)


def apo_zero(d, beta=0.1, **_):
    uw, ul = _u(d)
    return (1 - sig(beta * uw)) + sig(beta * ul)


def apo_down(d, beta=0.1, **_):
    uw, ul = _u(d)
    return sig(beta * uw) + (1 - sig(beta * (uw - ul)))


def discopop(d, beta=0.1, tau=0.05, **_):
    uw, ul = _u(d)
    z = beta * (uw - ul)
    m = sig(z / tau)
    return (1 - m) * (-logsig(z)) + m * np.exp(-z)


def sft_term(d, **_):
    return -d["pw"] / d["nw"]


def sft_term_token_mean(d, **_):
    """TRL's RPO term: the mean NLL over every chosen token of the batch (one number)."""
    return -d["pw"].sum() / d["nw"].sum()


# ------------------------------------------------------------ 4. reference-free pairs


def simpo(d, beta=0.1, gamma=0.5, eps=0.0, **_):
    aw, al = d["pw"] / d["nw"], d["pl"] / d["nl"]
    z = beta * (aw - al) - gamma
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def orpo(d, lam=0.1, **_):
    aw, al = d["pw"] / d["nw"], d["pl"] / d["nl"]
    # log(1 - e^a) directly in float64 (inputs keep a well below 0).
    log_odds = (aw - al) - (np.log(1 - np.exp(aw)) - np.log(1 - np.exp(al)))
    return -aw - lam * logsig(log_odds)


def slic(d, delta=1.0, lam=0.1, **_):
    # y_ref = y_w (the best candidate of a pair).
    return np.maximum(0.0, delta - d["pw"] + d["pl"]) - lam * d["pw"]


PAIR = {
    "dpo": dpo, "sigmoid": dpo, "cdpo": cdpo, "robust": robust, "ipo": ipo, "hinge": hinge,
    "sigmoid_norm": sigmoid_norm, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero, "apo_down": apo_down, "discopop": discopop, "sft": sft_term,
    "simpo": simpo, "orpo": orpo, "slic": slic,
}


# -------------------------------------------------------------------- 4. ranking


def rrhf_group(logps, lens, scores):
    """One group (only its valid responses). Ranking term + token-mean NLL of the best."""
    p = [lp / n for lp, n in zip(logps, lens)]
    k = len(p)
    rank = 0.0
    for i in range(k):
        for j in range(k):
            if scores[i] < scores[j]:
                rank += max(0.0, p[i] - p[j])
    best = int(np.argmax(scores))
    return rank + (-p[best])


def pro_group(logps, lens, scores=None, w=None):
    """One group (valid responses only). Ranked by score descending, else the given order."""
    s = np.array([lp / n for lp, n in zip(logps, lens)], np.float64)
    n = len(s)
    if scores is not None:
        order = sorted(range(n), key=lambda i: -scores[i])  # Python sort is stable
        s = s[order]
        R = np.array(scores, np.float64)[order]
    total = 0.0
    for k in range(n - 1):
        if scores is None:
            T = {i: 1.0 for i in range(k, n)}
        else:
            T = {}
            for i in range(k + 1, n):
                gap = R[k] - R[i]
                T[i] = 1.0 / gap if gap > 0 else np.inf
            T[k] = min(T[i] for i in range(k + 1, n))
        terms = np.array([s[i] / T[i] for i in range(k, n)])
        total += -(terms[0] - np.log(np.exp(terms - terms.max()).sum()) - terms.max())
    if w is None:
        w = 0.05 * (n - 1) ** 2
    return total + w * (-s[0])


def kto(pol, ref, desirable, kl_pol, kl_ref, beta=0.1, lam_d=1.0, lam_u=1.0):
    z0 = max(0.0, float(np.mean(kl_pol - kl_ref)))
    u = pol - ref
    losses = []
    for ui, di in zip(u, desirable):
        if di:
            losses.append(lam_d * (1 - sig(beta * (ui - z0))))
        else:
            losses.append(lam_u * (1 - sig(beta * (z0 - ui))))
    return float(np.mean(losses)), z0
