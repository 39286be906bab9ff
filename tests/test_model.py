"""The Flax Llama computes what transformers' LlamaForCausalLM computes (float32, <= 1e-4)."""

import numpy as np
import pytest
import torch

from alignjax import sharding as shd
from alignjax.model.store import load_model
from hf_models import STYLES, make_hf_model

TOL = 1e-4


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _apply(m, tokens, positions, segments):
    out, _ = m.module.apply(m.params, np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
                            np.asarray(segments, np.int32))
    return np.asarray(out)


@pytest.fixture(scope="module", params=sorted(STYLES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path)
    return hf, load_model(str(path), shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))


def test_logits_match_transformers(pair):
    hf, m = pair
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 160, (2, 24))
    positions = np.tile(np.arange(24), (2, 1))
    assert not m.module.scans  # 2 layers: layer_loop="auto" unrolls
    for module in (m.module, m.module.clone(scan_layers=True)):
        ours = np.asarray(module.apply(m.params, tokens.astype(np.int32), positions.astype(np.int32),
                                       np.ones_like(tokens, np.int32))[0])
        for b in range(2):
            np.testing.assert_allclose(ours[b], _hf_logits(hf, tokens[b].tolist()), atol=TOL, rtol=0)


def test_left_padded_batch_matches_unpadded_rows(pair):
    hf, m = pair
    rng = np.random.RandomState(1)
    lengths, width = [24, 9, 15, 1], 24
    tokens = np.zeros((4, width), np.int64)
    positions = np.zeros((4, width), np.int64)
    segments = np.zeros((4, width), np.int64)
    rows = [rng.randint(3, 160, n) for n in lengths]
    for i, ids in enumerate(rows):
        tokens[i, width - len(ids):] = ids
        positions[i, width - len(ids):] = np.arange(len(ids))
        segments[i, width - len(ids):] = 1
    ours = _apply(m, tokens, positions, segments)
    assert np.isfinite(ours).all()
    for i, ids in enumerate(rows):
        np.testing.assert_allclose(ours[i, width - len(ids):], _hf_logits(hf, ids.tolist()), atol=TOL, rtol=0)


def test_packed_segments_equal_separate_runs(pair):
    hf, m = pair
    rng = np.random.RandomState(2)
    a, b = rng.randint(3, 160, 11), rng.randint(3, 160, 7)
    width = 24
    tokens = np.zeros((2, width), np.int64)
    tokens[0, :11], tokens[0, 11:18] = a, b
    positions = np.zeros_like(tokens)
    positions[0, :11], positions[0, 11:18] = np.arange(11), np.arange(7)
    segments = np.zeros_like(tokens)
    segments[0, :11], segments[0, 11:18] = 1, 2
    # Row 1: same documents, b first, to check nothing depends on the slot a segment starts at.
    tokens[1, :7], tokens[1, 7:18] = b, a
    positions[1, :7], positions[1, 7:18] = np.arange(7), np.arange(11)
    segments[1, :7], segments[1, 7:18] = 1, 2
    ours = _apply(m, tokens, positions, segments)
    ref_a, ref_b = _hf_logits(hf, a.tolist()), _hf_logits(hf, b.tolist())
    np.testing.assert_allclose(ours[0, :11], ref_a, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[0, 11:18], ref_b, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[1, :7], ref_b, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[1, 7:18], ref_a, atol=TOL, rtol=0)


def test_rope_scaling_is_exercised():
    """Guards the llama3 style: positions beyond original_max_position_embeddings change logits."""
    from alignjax.model.config import LlamaConfig
    from alignjax.model.llama import rope_inv_freq
    base = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0)
    scaled = base.replace(rope_scaling=dict(STYLES["llama31"]["rope_scaling"]))
    assert not np.allclose(rope_inv_freq(base), rope_inv_freq(scaled))
    linear = base.replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    np.testing.assert_allclose(rope_inv_freq(linear), rope_inv_freq(base) / 2.0, rtol=1e-6)


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_remat_and_bfloat16_compute_run():
    """Remat policies give identical values; bf16 compute stays close to f32."""
    import jax
    from alignjax.model.config import LlamaConfig
    from alignjax.model.params import build_module, init_params
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    mesh = shd.make_mesh({"data": 8})
    params = init_params(build_module(cfg), jax.random.PRNGKey(0), mesh)
    tokens = np.random.RandomState(0).randint(0, 64, (8, 8)).astype(np.int32)
    pos, seg = np.tile(np.arange(8), (8, 1)), np.ones_like(tokens)

    def loss(cfg_):  # jitted: op by op on 8 devices takes half a minute
        mod = build_module(cfg_)
        return jax.jit(jax.value_and_grad(lambda p: mod.apply(p, tokens, pos, seg)[0].mean()))(params)

    l0, g0 = loss(cfg)
    for remat in (cfg.replace(remat_policy="full"), cfg.replace(remat_policy="dots", layer_loop="scan")):
        l1, g1 = loss(remat)
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
    forward = lambda cfg_: jax.jit(lambda p: build_module(cfg_).apply(p, tokens, pos, seg)[0])(params)
    out16 = forward(cfg.replace(dtype="bfloat16"))
    assert out16.dtype == np.dtype("bfloat16")
    out32 = forward(cfg)
    assert np.abs(np.asarray(out16, np.float32) - np.asarray(out32)).max() < 0.1


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_scanned_and_unrolled_layers_agree_in_value_and_gradient():
    """layer_loop only changes how the forward walks the (always stacked) layer params."""
    import jax
    from alignjax.model.config import LlamaConfig
    from alignjax.model.params import build_module, init_params
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    assert not cfg.scans_layers and cfg.replace(layer_loop="scan").scans_layers
    assert LlamaConfig(num_hidden_layers=32).scans_layers  # auto scans deep models
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = init_params(build_module(cfg), jax.random.PRNGKey(0), mesh)
    assert params["params"]["layers"]["attn"]["q"]["kernel"].shape[0] == 3
    tokens = np.random.RandomState(0).randint(0, 64, (8, 8)).astype(np.int32)
    pos, seg = np.tile(np.arange(8), (8, 1)), np.ones_like(tokens)

    def loss(loop):
        mod = build_module(cfg.replace(layer_loop=loop))
        with shd.mesh_context(mesh):
            return jax.jit(jax.value_and_grad(lambda p: mod.apply(p, tokens, pos, seg)[0].std()))(params)

    (l0, g0), (l1, g1) = loss("scan"), loss("unroll")
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
