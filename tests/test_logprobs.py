"""The chunked log-prob kernel vs a direct unchunked computation and a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    import reference_losses as ref
except ImportError:
    from tests import reference_losses as ref
from alignjax.losses import sequence_logps, token_logps, token_stats

B, T, E, V = 2, 37, 16, 50  # T is not a multiple of any chunk size used below


def direct(hidden_bte, kernel_ev, targets_bt, temperature):
    """Unchunked: the whole [B, T, V] float32 logits at once."""
    logits = (hidden_bte @ kernel_ev).astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logps = jnp.take_along_axis(logp_all, targets_bt[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logps, entropy


def inputs(seed=0):
    rng = np.random.RandomState(seed)
    hidden = rng.normal(0, 1, (B, T, E)).astype(np.float32)
    kernel = rng.normal(0, 0.5, (E, V)).astype(np.float32)
    targets = rng.randint(0, V, (B, T)).astype(np.int32)
    return jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets)


@pytest.mark.parametrize("chunk_size,temperature", [(8, 1.0), (16, 0.7), (512, 1.3)])
def test_values_match_direct_and_numpy(chunk_size, temperature):
    h, k, t = inputs()
    logps, ent = jax.jit(
        lambda h, k, t: token_logps(h, k, t, temperature=temperature, chunk_size=chunk_size)
    )(h, k, t)
    assert logps.shape == ent.shape == (B, T) and logps.dtype == ent.dtype == jnp.float32
    d_logps, d_ent = direct(h, k, t, temperature)
    np.testing.assert_allclose(logps, d_logps, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ent, d_ent, atol=1e-5, rtol=1e-5)
    n_logps, n_ent = ref.token_logps(np.asarray(h), np.asarray(k), np.asarray(t), temperature)
    np.testing.assert_allclose(logps, n_logps, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ent, n_ent, atol=1e-5, rtol=1e-5)


def test_gradients_match_direct():
    h, k, t = inputs(1)
    w_bt = jnp.asarray(np.random.RandomState(2).normal(size=(B, T)).astype(np.float32))

    def objective(fn):
        # a weighted sum of both outputs, so both backward paths are checked
        def f(h, k):
            logps, ent = fn(h, k)
            return jnp.sum(w_bt * logps) + 0.3 * jnp.sum(w_bt * ent)
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    g_chunk = objective(lambda h, k: token_logps(h, k, t, temperature=0.8, chunk_size=8))(h, k)
    g_direct = objective(lambda h, k: direct(h, k, t, 0.8))(h, k)
    for a, b in zip(g_chunk, g_direct):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunks_are_checkpointed_and_logits_never_whole():
    """The jaxpr holds a remat'd per-chunk body and no [B, T, V]-sized intermediate."""
    h, k, t = inputs()
    jaxpr = jax.make_jaxpr(
        jax.grad(lambda h: jnp.sum(token_logps(h, k, t, chunk_size=8)[0]))
    )(h)
    text = str(jaxpr)
    assert "remat" in text or "checkpoint" in text
    padded_t, n_chunks = 40, 5
    # neither the whole logits nor the per-chunk logits stacked over chunks (saved residuals)
    for bad in (f"{B},{T},{V}]", f"{B},{padded_t},{V}]", f"{n_chunks},{B},8,{V}]"):
        assert bad not in text.replace(" ", ""), bad


def test_token_stats_correct_and_bf16_compute():
    h, k, t = inputs(3)
    logits = np.asarray(h) @ np.asarray(k)
    t = jnp.asarray(np.where(np.arange(T)[None] % 2 == 0, logits.argmax(-1), np.asarray(t)))
    stats = token_stats(h, k, t, chunk_size=16)
    np.testing.assert_array_equal(stats.correct, np.asarray(t) == logits.argmax(-1))
    lp16, _ = token_logps(h, k, t, chunk_size=16, compute_dtype=jnp.bfloat16)
    assert lp16.dtype == jnp.float32
    np.testing.assert_allclose(lp16, stats.logps, atol=0.1)  # bf16 matmul, float32 softmax


def test_sequence_logps():
    rng = np.random.RandomState(4)
    logps = -rng.exponential(1.0, (3, 6)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 0, 0], [1] * 6, [0] * 6], np.float32)
    logps[0, 5] = -np.inf  # a masked position with a non-finite value must not leak
    s, c, m = sequence_logps(jnp.asarray(logps), jnp.asarray(mask))
    exp_s = np.array([logps[0, 1:4].sum(), logps[1].sum(), 0.0])
    np.testing.assert_allclose(s, exp_s, rtol=1e-6)
    np.testing.assert_allclose(c, [3, 6, 0])
    np.testing.assert_allclose(m, exp_s / np.array([3, 6, 1]), rtol=1e-6)
