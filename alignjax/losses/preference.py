"""Pairwise preference losses (docs/algorithms.md sections 3 and 4).

Every loss is a pure function `fn(x: PairLogps, hp: PrefHParams) -> loss_b` of per-sequence
log-prob sums and lengths, registered in `PAIR_LOSSES`; adding a loss is one function plus one
registry line. `preference_loss` combines one or several of them with weights and returns the
metrics under the names TRL users read.

Notation (docs/algorithms.md): u_w = logp_pi(y_w) - logp_ref(y_w), u_l likewise, h = u_w - u_l,
a = avg logp = logp / |y|, log sigma(z) = jax.nn.log_sigmoid(z) = -softplus(-z).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

from alignjax.losses.logprobs import weighted_mean as _wmean

log_sigmoid = jax.nn.log_sigmoid


class PairLogps(NamedTuple):
    """Per-pair inputs, all [B] float32. A NamedTuple is a pytree: it passes through jit/scan."""

    chosen: jax.Array  # sum of policy log-probs over completion tokens of y_w
    rejected: jax.Array
    chosen_len: jax.Array  # number of completion tokens (float)
    rejected_len: jax.Array
    ref_chosen: jax.Array | None = None  # reference sums; None for reference-free losses
    ref_rejected: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class PrefHParams:
    """Hyper-parameters of the preference family (frozen, hashable: usable as a jit static)."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # eps of cdpo / robust / aot / simpo (dpo = TRL's sigmoid: none)
    exo_eps: float = 1e-3  # eps of exo_pair (must be > 0)
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5  # SimPO margin (the SimPO paper pairs it with beta ~ 2)
    orpo_lambda: float = 0.1
    slic_delta: float = 1.0
    slic_lambda: float = 0.1  # spec: "tunable", no published default; 0.1 is our choice
    # The `sft` (RPO) term: False = mean over pairs of each chosen response's token-mean NLL;
    # True = TRL's convention, the mean NLL over all chosen tokens of the batch.
    sft_token_mean: bool = False

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 < self.exo_eps < 1.0:
            raise ValueError(f"exo_eps must be in (0, 1), got {self.exo_eps}")
        if self.discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")


# ----------------------------------------------------------------------------- helpers


def _ratios(x: PairLogps) -> tuple[jax.Array, jax.Array]:
    """(u_w, u_l); the reference-based losses cannot run without reference log-probs."""
    if x.ref_chosen is None or x.ref_rejected is None:
        raise ValueError("this loss is reference-based: PairLogps.ref_chosen/ref_rejected are None")
    return x.chosen - x.ref_chosen, x.rejected - x.ref_rejected


def _avg(logp_b: jax.Array, len_b: jax.Array) -> jax.Array:
    # max(len, 1): an empty completion gives avg 0 instead of NaN.
    return logp_b / jnp.maximum(len_b, 1.0)


def _smoothed_sigmoid(z_b: jax.Array, eps: float) -> jax.Array:
    """-(1-eps) log sigma(z) - eps log sigma(-z): BCE against the soft label 1-eps (cDPO)."""
    return -(1.0 - eps) * log_sigmoid(z_b) - eps * log_sigmoid(-z_b)


def log1mexp(a: jax.Array) -> jax.Array:
    """log(1 - e^a) for a < 0, accurate at both ends (Maechler 2012).

    Near 0 use log(-expm1(a)), far from 0 use log1p(-exp(a)); a is clamped to <= -1e-6 because
    a float32 avg log-prob of a very confident model is exactly 0, where the value is -inf.
    """
    a = jnp.minimum(a, -1e-6)
    return jnp.where(a > -math.log(2.0), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


# ------------------------------------------------------------ reference-based (section 3)


def dpo(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """-log sigma(beta h) (TRL's `sigmoid`; label smoothing is cdpo's, not this loss's)."""
    u_w, u_l = _ratios(x)
    return -log_sigmoid(hp.beta * (u_w - u_l))


def cdpo(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """Conservative DPO: -(1-eps) log sigma(beta h) - eps log sigma(-beta h), eps = label_smoothing."""
    u_w, u_l = _ratios(x)
    return _smoothed_sigmoid(hp.beta * (u_w - u_l), hp.label_smoothing)


def robust(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """[-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps) (unbiased under noise)."""
    u_w, u_l = _ratios(x)
    z, eps = hp.beta * (u_w - u_l), hp.label_smoothing
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """(h_avg - 1/(2 beta))^2, h_avg = u_w/|y_w| - u_l/|y_l| (token-averaged log-ratios)."""
    u_w, u_l = _ratios(x)
    h_avg = _avg(u_w, x.chosen_len) - _avg(u_l, x.rejected_len)
    return (h_avg - 1.0 / (2.0 * hp.beta)) ** 2


def hinge(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """max(0, 1 - beta h) (SLiC / RSO hinge-norm)."""
    u_w, u_l = _ratios(x)
    return jax.nn.relu(1.0 - hp.beta * (u_w - u_l))


def sigmoid_norm(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """-log sigma(beta (u_w/|y_w| - u_l/|y_l|)) (RSO sigmoid-norm, length-normalised)."""
    u_w, u_l = _ratios(x)
    return -log_sigmoid(hp.beta * (_avg(u_w, x.chosen_len) - _avg(u_l, x.rejected_len)))


def exo_pair(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """sigma(z)[log sigma(z) - log(1-eps)] + sigma(-z)[log sigma(-z) - log eps], z = beta h.

    The reverse KL from the model's pair distribution to the eps-smoothed label; eps = exo_eps.
    """
    u_w, u_l = _ratios(x)
    z, eps = hp.beta * (u_w - u_l), hp.exo_eps
    return jax.nn.sigmoid(z) * (log_sigmoid(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        log_sigmoid(-z) - math.log(eps)
    )


def nca_pair(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """-log sigma(beta u_w) - 0.5 log sigma(-beta u_w) - 0.5 log sigma(-beta u_l)."""
    u_w, u_l = _ratios(x)
    r_w, r_l = hp.beta * u_w, hp.beta * u_l
    return -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)


def bco_pair(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """-log sigma(beta u_w) - log sigma(-beta u_l)."""
    u_w, u_l = _ratios(x)
    return -log_sigmoid(hp.beta * u_w) - log_sigmoid(-hp.beta * u_l)


def sppo_hard(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """(u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2."""
    u_w, u_l = _ratios(x)
    half = 1.0 / (2.0 * hp.beta)
    return (u_w - half) ** 2 + (u_l + half) ** 2


def _sort_valid(v_b: jax.Array, valid_b: jax.Array | None) -> jax.Array:
    """Ascending sort of the valid entries; padding rows sort last (a large finite value, so
    differences of two such columns are 0, not inf - inf)."""
    return jnp.sort(v_b if valid_b is None else jnp.where(valid_b, v_b, _SORT_PAD))


_SORT_PAD = 1e30


def aot(x: PairLogps, hp: PrefHParams, valid_b: jax.Array | None = None) -> jax.Array:
    """d = sort(logp_w - logp_l) - sort(ref_w - ref_l) over the batch; smoothed -log sigma(beta d).

    Sorting couples the pairs of a batch: entry k of the result belongs to the k-th smallest
    ratios, not to pair k. Padding rows (valid_b False, e.g. an eval batch's fillers) are left
    out of the sort: they fill the last ranks, which `preference_loss` weighs 0.
    """
    _ratios(x)  # only to raise the reference-required error early
    d = (_sort_valid(x.chosen - x.rejected, valid_b)
         - _sort_valid(x.ref_chosen - x.ref_rejected, valid_b))
    return _smoothed_sigmoid(hp.beta * d, hp.label_smoothing)


def aot_unpaired(x: PairLogps, hp: PrefHParams, valid_b: jax.Array | None = None) -> jax.Array:
    """d = sort(u_w) - sort(u_l) over the batch; same form (and padding rule) as `aot`."""
    u_w, u_l = _ratios(x)
    d = _sort_valid(u_w, valid_b) - _sort_valid(u_l, valid_b)
    return _smoothed_sigmoid(hp.beta * d, hp.label_smoothing)


def apo_zero(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """(1 - sigma(beta u_w)) + sigma(beta u_l): push chosen up, rejected down."""
    u_w, u_l = _ratios(x)
    return (1.0 - jax.nn.sigmoid(hp.beta * u_w)) + jax.nn.sigmoid(hp.beta * u_l)


def apo_down(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """sigma(beta u_w) + (1 - sigma(beta h)): both down, rejected more."""
    u_w, u_l = _ratios(x)
    return jax.nn.sigmoid(hp.beta * u_w) + (1.0 - jax.nn.sigmoid(hp.beta * (u_w - u_l)))


def discopop(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """z = beta h, m = sigma(z/tau): (1-m)(-log sigma(z)) + m exp(-z).

    m exp(-z) is evaluated as exp(log sigma(z/tau) - z): for very negative z, exp(-z) alone
    overflows and 0 * inf would give NaN in the value and the gradient.
    """
    u_w, u_l = _ratios(x)
    z, tau = hp.beta * (u_w - u_l), hp.discopop_tau
    m = jax.nn.sigmoid(z / tau)
    return (1.0 - m) * (-log_sigmoid(z)) + jnp.exp(log_sigmoid(z / tau) - z)


def sft(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """Token-mean NLL of y_w, -logp(y_w)/|y_w| (the RPO term; combine with weight 1.0)."""
    del hp
    return -_avg(x.chosen, x.chosen_len)


# --------------------------------------------------------------- reference-free (section 4)


def simpo(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """-log sigma(z), z = beta (a_w - a_l) - gamma, a = avg logp, gamma = simpo_gamma; with
    label_smoothing eps the smoothed form -(1-eps) log sigma(z) - eps log sigma(-z) (as TRL's CPO)."""
    a_w, a_l = _avg(x.chosen, x.chosen_len), _avg(x.rejected, x.rejected_len)
    return _smoothed_sigmoid(hp.beta * (a_w - a_l) - hp.simpo_gamma, hp.label_smoothing)


def orpo(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """-a_w - lambda log sigma(log_odds), log_odds = (a_w - a_l) - (log(1-e^a_w) - log(1-e^a_l)).

    -a_w is the token-mean NLL of y_w; log(1-e^a) via `log1mexp`.
    """
    a_w, a_l = _avg(x.chosen, x.chosen_len), _avg(x.rejected, x.rejected_len)
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    return -a_w - hp.orpo_lambda * log_sigmoid(log_odds)


def slic(x: PairLogps, hp: PrefHParams) -> jax.Array:
    """max(0, delta - logp(y_w) + logp(y_l)) - lambda logp(y_ref), sums; y_ref = y_w here.

    With pairs the best candidate is y_w, so the regulariser is lambda * NLL(y_w) (summed).
    """
    return jax.nn.relu(hp.slic_delta - x.chosen + x.rejected) - hp.slic_lambda * x.chosen


LossFn = Callable[[PairLogps, PrefHParams], jax.Array]

PAIR_LOSSES: dict[str, LossFn] = {
    "dpo": dpo,
    "sigmoid": dpo,
    "cdpo": cdpo,
    "robust": robust,
    "ipo": ipo,
    "hinge": hinge,
    "sigmoid_norm": sigmoid_norm,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sft": sft,
    "simpo": simpo,
    "orpo": orpo,
    "slic": slic,
}

# Losses that never read the reference; when a combination uses only these, the logged
# "rewards" are beta * avg logp (SimPO's implicit reward) instead of beta * u.
REFERENCE_FREE = frozenset({"sft", "simpo", "orpo", "slic"})
# Losses whose entries are ranks of the batch (sorted), not pairs: padding rows are sorted out and
# only the first n_valid ranks count; other sample weights do not apply to them.
RANK_COUPLED = frozenset({"aot", "aot_unpaired"})
# The losses that read label_smoothing (eps).
SMOOTHED = frozenset({"cdpo", "robust", "aot", "aot_unpaired", "simpo"})

LossSpec = Union[str, Sequence[tuple[str, float]]]


def _parse(loss_type: LossSpec) -> list[tuple[str, float]]:
    if isinstance(loss_type, str):
        return _parse([(loss_type, 1.0)])
    terms = [(name, float(weight)) for name, weight in loss_type]
    if not terms:
        raise ValueError("loss_type is an empty list")
    for name, _ in terms:
        if name not in PAIR_LOSSES:
            valid = ", ".join(sorted(PAIR_LOSSES))
            raise ValueError(f"unknown preference loss {name!r}; valid: {valid}")
    return terms


def preference_loss(
    x: PairLogps,
    loss_type: LossSpec,
    hp: PrefHParams = PrefHParams(),
    sample_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean over pairs of sum_k weight_k * loss_k; `loss_type` = name or [(name, weight)].

    `sample_weight` [B] (0 for padding pairs) makes every mean a weighted mean.
    Metrics: loss, loss/<name> per term (when combined), rewards/chosen = mean beta r_w,
    rewards/rejected, rewards/accuracies = mean[r_w > r_l], rewards/margins = mean beta(r_w - r_l),
    logps/chosen, logps/rejected (sums; averages for SimPO/ORPO), where r = u for
    reference-based combinations and r = avg logp when every term is reference-free (as
    SimPO/CPO/ORPO log them); ORPO scales its rewards by orpo_lambda instead of beta, as TRL.
    """
    terms = _parse(loss_type)
    x = PairLogps(*(None if v is None else jnp.asarray(v, jnp.float32) for v in x))
    w_b = jnp.ones_like(x.chosen)
    if sample_weight is not None:
        w_b = jnp.asarray(sample_weight, jnp.float32)

    metrics: dict[str, jax.Array] = {}
    loss = jnp.zeros((), jnp.float32)
    for name, weight in terms:
        if name in RANK_COUPLED:  # per rank, not per pair: the first n_valid ranks count
            valid_b = w_b > 0
            rank_w = (jnp.arange(w_b.shape[0]) < jnp.sum(valid_b)).astype(jnp.float32)
            term = _wmean(PAIR_LOSSES[name](x, hp, valid_b), rank_w)
        elif name == "sft" and hp.sft_token_mean:  # TRL: one mean over all chosen tokens
            term = -_wmean(x.chosen, w_b) / jnp.maximum(_wmean(x.chosen_len, w_b), 1e-12)
        else:
            term = _wmean(PAIR_LOSSES[name](x, hp), w_b)
        if len(terms) > 1:
            metrics[f"loss/{name}"] = term
        loss = loss + weight * term
    metrics["loss"] = loss

    names = {name for name, _ in terms}
    reference_free = names <= REFERENCE_FREE
    if reference_free:
        r_w, r_l = _avg(x.chosen, x.chosen_len), _avg(x.rejected, x.rejected_len)
    else:
        r_w, r_l = _ratios(x)
    # As TRL logs them: ORPO's rewards are lambda * avg logp (its "beta" is lambda); SimPO and
    # ORPO log average log-probs, every other loss summed ones.
    scale = hp.orpo_lambda if "orpo" in names and names <= {"orpo", "sft"} else hp.beta
    logps_w, logps_l = x.chosen, x.rejected
    if reference_free and names & {"simpo", "orpo"}:
        logps_w, logps_l = r_w, r_l
    # Metrics are for logging only: no gradient should flow through them.
    r_w, r_l, logps_w, logps_l = (jax.lax.stop_gradient(v) for v in (r_w, r_l, logps_w, logps_l))
    metrics.update(
        {
            "rewards/chosen": _wmean(scale * r_w, w_b),
            "rewards/rejected": _wmean(scale * r_l, w_b),
            "rewards/accuracies": _wmean((r_w > r_l).astype(jnp.float32), w_b),
            "rewards/margins": _wmean(scale * (r_w - r_l), w_b),
            "logps/chosen": _wmean(logps_w, w_b),
            "logps/rejected": _wmean(logps_l, w_b),
        }
    )
    return loss, metrics
