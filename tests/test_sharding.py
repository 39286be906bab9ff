"""Sharded forward passes equal the unsharded one, and parameters really are distributed."""

import time

import jax
import numpy as np
import pytest

from alignjax import sharding as shd
from alignjax.model.config import LlamaConfig
from alignjax.model.params import build_module, init_params

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=8, head_dim=8)


@pytest.fixture(scope="module")
def reference():
    """Params initialised on one device, and the single-device forward pass."""
    one = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    module = build_module(CFG)
    params = jax.device_get(init_params(module, jax.random.PRNGKey(0), one))
    rng = np.random.RandomState(0)
    batch = dict(tokens=rng.randint(0, 128, (8, 16)).astype(np.int32),
                 positions=np.tile(np.arange(16, dtype=np.int32), (8, 1)),
                 segment_ids=np.ones((8, 16), np.int32))
    batch["segment_ids"][3, :5] = 0  # some padding
    out = module.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])[0]
    return module, params, batch, np.asarray(out)


MESHES = [
    ({"data": 8}, {}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {"q": (2, 32, 4, 8), "gate": (2, 32, 64), "embed": (64, 32)}),
    ({"fsdp": 4, "tensor": 2}, {"q": (2, 16, 4, 8), "gate": (2, 16, 64), "embed": (64, 16)}),
    ({"tensor": 8}, {"q": (2, 64, 1, 8), "gate": (2, 64, 16), "embed": (16, 64)}),
]


@pytest.mark.parametrize("sizes,shard_shapes", MESHES, ids=lambda x: str(x))
def test_sharded_forward_equals_unsharded(reference, sizes, shard_shapes):
    module, host_params, batch, expected = reference
    mesh = shd.make_mesh(sizes)
    # Fresh sharded init with the same key must give the same numbers as the one-device init.
    params = init_params(module, jax.random.PRNGKey(0), mesh)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6),
                           params, host_params)
    p = params["params"]
    leaves = {"q": p["layers"]["attn"]["q"]["kernel"], "gate": p["layers"]["mlp"]["gate"]["kernel"],
              "embed": p["embed"]["embedding"]}
    for name, shape in shard_shapes.items():
        shards = leaves[name].addressable_shards
        assert len({s.device for s in shards}) == 8
        assert all(s.data.shape == shape for s in shards), (name, shards[0].data.shape)
    data = shd.shard_batch(batch, mesh)
    with shd.mesh_context(mesh):
        fwd = jax.jit(lambda p, b: module.apply(p, b["tokens"], b["positions"], b["segment_ids"])[0])
        out = fwd(params, data)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def test_indivisible_mesh_errors_name_the_dimension_and_key():
    gqa = CFG.replace(num_key_value_heads=2)
    with pytest.raises(shd.ShardingError, match=r"kv_heads=2.*'tensor' \(size 4\).*mesh.tensor"):
        init_params(build_module(gqa), jax.random.PRNGKey(0), shd.make_mesh({"fsdp": 2, "tensor": 4}))
    with pytest.raises(shd.ShardingError, match="data\\*fsdp\\*tensor = 6 but 8 devices"):
        shd.make_mesh({"data": 2, "tensor": 3})
    with pytest.raises(shd.ShardingError, match="unknown axes"):
        shd.make_mesh({"model": 8})
    mesh = shd.make_mesh({"data": 8})
    with pytest.raises(shd.ShardingError, match=r"batch: dimension 0 \(batch=6\)"):
        shd.shard_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)


def test_mesh_fill_axis():
    assert shd.mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2}


def _compile_seconds(layers: int) -> float:
    cfg = CFG.replace(num_hidden_layers=layers)
    module = build_module(cfg)
    mesh = shd.make_mesh({"data": 8})
    from alignjax.model.params import abstract_params
    abstract, _ = abstract_params(module, mesh)
    tokens = jax.ShapeDtypeStruct((8, 32), np.int32, sharding=shd.batch_sharding(mesh))

    def loss(p, t):
        return module.apply(p, t, t, t)[0].mean()

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(abstract, tokens).compile()
    return time.perf_counter() - start


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_compile_time_does_not_grow_with_depth():
    _compile_seconds(2)  # warm caches that are not about depth
    t4, t32 = _compile_seconds(4), _compile_seconds(32)
    assert t32 <= 3 * t4 + 0.5, (t4, t32)
