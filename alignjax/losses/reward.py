"""Bradley-Terry reward-model loss (docs/algorithms.md section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses.logprobs import weighted_mean as _wmean


def bradley_terry_loss(
    r_chosen_b: jax.Array,
    r_rejected_b: jax.Array,
    margin_b: jax.Array | None = None,
    center_coef: float = 0.0,
    sample_weight_b: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = mean_b[ -log sigma(r_w - r_l - m) + c (r_w + r_l)^2 ].

    m = per-pair margin (default 0); c = `center_coef` keeps rewards centred at zero (0.01 is the
    usual value when rewards drift). `sample_weight_b` (e.g. 0 for padding pairs) turns the
    means into weighted means and excludes zero-weight pairs from min/max.
    Metrics: accuracy [r_w > r_l], margin = mean(r_w - r_l), reward mean/min/max over both.
    """
    r_chosen_b = r_chosen_b.astype(jnp.float32)
    r_rejected_b = r_rejected_b.astype(jnp.float32)
    m_b = 0.0 if margin_b is None else margin_b.astype(jnp.float32)
    w_b = (
        jnp.ones_like(r_chosen_b)
        if sample_weight_b is None
        else sample_weight_b.astype(jnp.float32)
    )
    diff_b = r_chosen_b - r_rejected_b
    # log sigma(z) = -softplus(-z): finite for any z, unlike log(sigmoid(z)).
    loss_b = -jax.nn.log_sigmoid(diff_b - m_b) + center_coef * (r_chosen_b + r_rejected_b) ** 2
    valid_b = w_b > 0
    both = jnp.concatenate([r_chosen_b, r_rejected_b])
    both_valid = jnp.concatenate([valid_b, valid_b])
    metrics = {
        "accuracy": _wmean((diff_b > 0).astype(jnp.float32), w_b),
        "margin": _wmean(diff_b, w_b),
        "reward_mean": _wmean(0.5 * (r_chosen_b + r_rejected_b), w_b),
        "reward_min": jnp.min(jnp.where(both_valid, both, jnp.inf)),
        "reward_max": jnp.max(jnp.where(both_valid, both, -jnp.inf)),
        "rewards/chosen": _wmean(r_chosen_b, w_b),
        "rewards/rejected": _wmean(r_rejected_b, w_b),
    }
    loss = _wmean(loss_b, w_b)
    metrics["loss"] = loss
    return loss, metrics
