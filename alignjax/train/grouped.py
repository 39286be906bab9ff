"""Forward passes over grouped batches [B, K, T] (pairs K=2, ranked K=n, KTO K=2) in one pass.

The K sequences of an example are flattened onto the batch axis as [B*K, T] (row b*K + k), which
keeps every group on the device that holds example b under batch sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses.logprobs import sequence_logps, token_logps
from alignjax.model.llama import head_kernel

SEQ_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")


def flatten_groups(batch: dict) -> dict:
    """[B, K, T] sequence fields -> [B*K, T]."""
    return {k: batch[k].reshape((-1,) + batch[k].shape[2:]) for k in SEQ_KEYS}


def group_logps(module, params, batch: dict, chunk_size: int = 512, temperature: float = 1.0):
    """(sum of response-token log-probs [B, K], response lengths [B, K]) in float32."""
    flat = flatten_groups(batch)
    hidden, _ = module.apply(params, flat["tokens"], flat["positions"], flat["segment_ids"],
                             output="hidden")
    logps_nt, _ = token_logps(hidden, head_kernel(params, module.config), flat["targets"],
                              temperature=temperature, chunk_size=chunk_size)
    sums, lens, _ = sequence_logps(logps_nt, flat["loss_mask"])
    b, k = batch["tokens"].shape[:2]
    return sums.reshape(b, k), lens.reshape(b, k)


def last_token_index(segment_ids_nt):
    """Index of the last non-padding token of each row (right padding): the EOS of the response."""
    t = segment_ids_nt.shape[-1]
    return jnp.max(jnp.where(segment_ids_nt != 0, jnp.arange(t), 0), axis=-1)


def sequence_rewards(module, params, batch: dict):
    """Scalar-head rewards read at the last non-pad token of prompt+response, [B, K] float32."""
    flat = flatten_groups(batch)
    scores_nt, _ = module.apply(params, flat["tokens"], flat["positions"], flat["segment_ids"])
    idx = last_token_index(flat["segment_ids"])
    rewards = jnp.take_along_axis(scores_nt, idx[:, None], axis=-1)[:, 0]
    b, k = batch["tokens"].shape[:2]
    return rewards.reshape(b, k).astype(jnp.float32)


def means_to_sums(loss, metrics: dict, count) -> tuple:
    """A batch-mean loss and metrics -> sums (for accumulation), plus the count they average over."""
    sums = {k: v * count for k, v in metrics.items()}
    return loss * count, {**sums, "count": count}


def sums_to_means(sums: dict) -> dict:
    count = jnp.maximum(sums["count"], 1.0)
    out = {k: v / count for k, v in sums.items() if k not in ("count", "objective")}
    out["loss"] = sums["objective"] / count
    out["num_examples"] = sums["count"]
    return out


def example_weights(batch: dict):
    """1 for real examples, 0 for the filler rows of a last partial eval batch."""
    if "example_valid" in batch:
        return batch["example_valid"].astype(jnp.float32)
    return jnp.ones(batch["tokens"].shape[:1], jnp.float32)



def abstract_grouped_batch(batch: int, k: int, seq_len: int) -> dict:
    """Abstract preference batch [B, K, T] (see alignjax.data.preference), for `alignjax compile`."""
    seq = {key: jax.ShapeDtypeStruct((batch, k, seq_len), jnp.int32)
           for key in ("tokens", "positions", "segment_ids", "targets")}
    return seq | {"loss_mask": jax.ShapeDtypeStruct((batch, k, seq_len), jnp.float32),
                  "valid": jax.ShapeDtypeStruct((batch, k), jnp.bool_),
                  "scores": jax.ShapeDtypeStruct((batch, k), jnp.float32),
                  "margin": jax.ShapeDtypeStruct((batch,), jnp.float32),
                  "label": jax.ShapeDtypeStruct((batch,), jnp.float32),
                  "example_valid": jax.ShapeDtypeStruct((batch,), jnp.bool_)}
