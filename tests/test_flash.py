"""attention_impl="flash": the Pallas TPU kernel equals the XLA attention (interpret mode on CPU)."""

import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from alignjax import sharding as shd
from alignjax.aot import libtpu_available
from alignjax.model.config import LlamaConfig
from alignjax.model.params import build_module, init_params

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def _batch(t=128):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 64, (4, t)).astype(np.int32)
    seg = np.ones((4, t), np.int32)
    seg[1, :40] = 0                     # left padding
    seg[2, 60:] = 2                     # two packed documents
    pos = np.where(seg == 2, np.arange(t) - 60, np.arange(t))
    pos[1] = np.maximum(np.arange(t) - 40, 0)
    return dict(t=tokens, p=pos.astype(np.int32), s=seg)


def _loss_fn(impl):
    m = build_module(CFG.replace(attention_impl=impl))

    def loss(p, b):
        logits = m.apply(p, b["t"], b["p"], b["s"])[0]
        return (logits * (b["s"] > 0)[..., None]).sum() / 1000.0, logits
    return loss


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_flash_equals_xla_on_a_sharded_mesh():
    mesh = shd.make_mesh({"data": 4, "tensor": 2})
    params = init_params(build_module(CFG), jax.random.PRNGKey(0), mesh)
    host = _batch()
    batch, real = shd.shard_batch(host, mesh), host["s"] > 0
    out = {}
    for impl in ("xla", "flash"):
        with shd.mesh_context(mesh), pltpu.force_tpu_interpret_mode():
            out[impl] = np.asarray(jax.jit(_loss_fn(impl))(params, batch)[1])
    np.testing.assert_allclose(out["flash"][real], out["xla"][real], atol=1e-5)


@pytest.mark.slow  # Pallas interpret mode, forward and backward
def test_flash_gradients_equal_xla():
    # Unsharded: Pallas' interpret mode deadlocks in a shard_mapped backward on fake CPU devices.
    one = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    params = jax.device_get(init_params(build_module(CFG), jax.random.PRNGKey(0), one))
    grads = {}
    for impl in ("xla", "flash"):
        with pltpu.force_tpu_interpret_mode():
            grads[impl] = jax.jit(jax.grad(lambda p, b: _loss_fn(impl)(p, b)[0]))(params, _batch())
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), grads["flash"],
                           grads["xla"])


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
@pytest.mark.skipif(not libtpu_available(), reason="libtpu (TPU compiler) not installed")
def test_flash_train_step_compiles_for_tpu(capsys):
    from alignjax.cli import main as cli_main
    cli_main(["compile", "--config", "configs/sft.py:tiny", "--topology", "v5p-8",
              "--config.model.attention_impl=flash", "--config.mesh.data=2", "--config.mesh.fsdp=2"])
    assert "FITS" in capsys.readouterr().out
