"""The one log-prob kernel every loss is fed from (docs/algorithms.md, "All log-probs").

Per-token log-probs of given target tokens, computed from the final hidden states and the
LM-head kernel in chunks of the time axis, so the float32 [B, T, V] logits are never all alive
at once (for Llama-3, V = 128256: B=8, T=4096 would be 16 GiB of float32 logits).

Why chunk time rather than vocabulary or flattened B*T: the batch axis is the sharded one
(data/fsdp), so keeping it whole in every chunk leaves each chunk's sharding identical to the
input's and adds no collectives; the vocabulary axis stays whole so log-softmax is one exact
reduction (with a tensor-sharded kernel XLA inserts the reductions over the vocab shards).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenStats(NamedTuple):
    """Per-token outputs of the kernel, all [B, T]."""

    logps: jax.Array  # float32 log p(target_t | ...) under softmax(logits / temperature)
    entropy: jax.Array  # float32 entropy of softmax(logits / temperature)
    correct: jax.Array  # bool, target_t is the argmax of the logits (token accuracy)


def _chunk_stats(hidden_bce, kernel_ev, targets_bc, temperature, compute_dtype):
    """Exact stats for one chunk; logits exist only inside this function."""
    logits_bcv = jnp.einsum(
        "bce,ev->bcv",
        hidden_bce.astype(compute_dtype),
        kernel_ev.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )
    # Upcast before the softmax: bf16 log-softmax loses ~3 significant digits.
    logits_bcv = logits_bcv.astype(jnp.float32) / temperature
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    # A select-and-sum, not a gather: its gradient is an elementwise select that fuses with the
    # softmax's, where a gather's is a scatter (slow on CPU, serialised on TPU).
    is_target_bcv = jnp.arange(logits_bcv.shape[-1]) == targets_bc[..., None]
    target_logit_bc = jnp.sum(jnp.where(is_target_bcv, logits_bcv, 0.0), axis=-1)
    logps_bc = target_logit_bc - lse_bc
    probs_bcv = jnp.exp(logits_bcv - lse_bc[..., None])
    # H = log Z - E_p[z]; written this way it needs no log of small probabilities.
    entropy_bc = lse_bc - jnp.sum(probs_bcv * logits_bcv, axis=-1)
    correct_bc = target_logit_bc >= jnp.max(logits_bcv, axis=-1)
    return logps_bc, entropy_bc, correct_bc


def token_stats(
    hidden_bte: jax.Array,
    head_kernel_ev: jax.Array,
    targets_bt: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    compute_dtype=jnp.float32,
) -> TokenStats:
    """log-probs, entropy and argmax-correctness of `targets_bt`.

    logits = hidden @ kernel / temperature (float32), logp_t = logits[target_t] - logsumexp(logits).
    T is padded up to a multiple of `chunk_size` and sliced back; with more than one chunk, each
    is rematerialised in the backward pass (`jax.checkpoint`) so the gradient is chunked too.
    """
    b, t, e = hidden_bte.shape
    if t <= chunk_size:  # one chunk: rematerialising it would only redo the head matmul
        return TokenStats(*_chunk_stats(hidden_bte, head_kernel_ev, targets_bt, temperature,
                                        compute_dtype))
    chunk = max(1, min(chunk_size, t))
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    if pad:
        hidden_bte = jnp.pad(hidden_bte, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    # [n, B, C, ...]: lax.map walks the leading axis, the batch (sharded) axis stays intact.
    hidden_nbce = hidden_bte.reshape(b, n_chunks, chunk, e).swapaxes(0, 1)
    targets_nbc = targets_bt.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    def one_chunk(args):
        hidden_bce, targets_bc = args
        return _chunk_stats(hidden_bce, head_kernel_ev, targets_bc, temperature, compute_dtype)

    outs = jax.lax.map(jax.checkpoint(one_chunk), (hidden_nbce, targets_nbc))
    logps_bt, entropy_bt, correct_bt = (
        o.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t] for o in outs
    )
    return TokenStats(logps_bt, entropy_bt, correct_bt)


def token_logps(
    hidden_bte: jax.Array,
    head_kernel_ev: jax.Array,
    targets_bt: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """(logps_bt, entropy_bt), both float32; see `token_stats` (unused outputs are DCE'd)."""
    stats = token_stats(
        hidden_bte,
        head_kernel_ev,
        targets_bt,
        temperature=temperature,
        chunk_size=chunk_size,
        compute_dtype=compute_dtype,
    )
    return stats.logps, stats.entropy


def sequence_logps(logps_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sequence (sum_b, count_b, mean_b) of log-probs over masked tokens.

    sum = sum_t logp_t m_t ("logp(y)"), count = sum_t m_t (|y|, float32),
    mean = sum / max(count, 1) ("avg logp"; 0 for an empty completion instead of NaN).
    """
    mask_bt = mask_bt.astype(jnp.float32)
    # where, not multiply: a masked position may hold -inf/NaN (e.g. pad logits) and 0 * inf = NaN.
    sum_b = jnp.sum(jnp.where(mask_bt > 0, logps_bt * mask_bt, 0.0), axis=-1)
    count_b = jnp.sum(mask_bt, axis=-1)
    mean_b = sum_b / jnp.maximum(count_b, 1.0)
    return sum_b, count_b, mean_b


def weighted_mean(x_b: jax.Array, w_b: jax.Array) -> jax.Array:
    """sum(x w) / sum(w): a batch mean where filler rows (w = 0) count for nothing."""
    return jnp.sum(x_b * w_b) / jnp.maximum(jnp.sum(w_b), 1e-12)
