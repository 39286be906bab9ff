"""Supervised fine-tuning loss (docs/algorithms.md section 1).

Loss = sum of token NLL / number of target tokens in the whole optimizer step. A trainer that
accumulates micro-batches sums `sft_loss_sums` over them and divides once at the end
(`sft_metrics_from_sums`); a mean of per-micro-batch means would overweight short batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sft_loss_sums(
    logps_bt: jax.Array, loss_mask_bt: jax.Array, correct_bt: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nll_sum, token_count, correct_count) over masked tokens, all float32 scalars.

    nll_sum = -sum(logp * m), token_count = sum(m), correct_count = sum(correct * m);
    `correct_bt` is `TokenStats.correct` (target is the argmax).
    """
    mask_bt = loss_mask_bt.astype(jnp.float32)
    nll_sum = -jnp.sum(jnp.where(mask_bt > 0, logps_bt * mask_bt, 0.0))
    token_count = jnp.sum(mask_bt)
    correct_count = jnp.sum(correct_bt.astype(jnp.float32) * mask_bt)
    return nll_sum, token_count, correct_count


def sft_metrics_from_sums(
    nll_sum: jax.Array, token_count: jax.Array, correct_count: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """loss = nll_sum / max(token_count, 1); metrics: loss, perplexity = exp(loss), token accuracy."""
    denom = jnp.maximum(token_count, 1.0)
    loss = nll_sum / denom
    metrics = {"loss": loss, "perplexity": jnp.exp(loss), "num_tokens": token_count}
    if correct_count is not None:
        metrics["mean_token_accuracy"] = correct_count / denom
    return loss, metrics


def sft_loss(
    logps_bt: jax.Array, loss_mask_bt: jax.Array, correct_bt: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-normalised NLL over the whole batch: -sum(logp * m) / max(sum(m), 1).

    Metrics: loss, perplexity, num_tokens, and mean_token_accuracy when `correct_bt` is given.
    """
    if correct_bt is None:
        nll_sum, token_count, _ = sft_loss_sums(logps_bt, loss_mask_bt, jnp.zeros_like(loss_mask_bt))
        return sft_metrics_from_sums(nll_sum, token_count)
    return sft_metrics_from_sums(*sft_loss_sums(logps_bt, loss_mask_bt, correct_bt))
