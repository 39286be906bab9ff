"""AOT compilation for Cloud TPU slices on a CPU host (alignjax.aot).

Parsing and peak-FLOP tables always run; everything that compiles needs libtpu (the TPU
compiler, `pip install "jax[tpu]==<jax version>"`) and is skipped without it. The 7B check
(~25-50 s of compile on 2 CPU cores) is marked slow.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from alignjax import aot
from alignjax.errors import UserError
from alignjax.model.config import LlamaConfig

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason=f'libtpu (TPU compiler) not installed: pip install "jax[tpu]=={jax.__version__}"')

GiB = 1024**3
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16", remat_policy="full")


def _n_params(config) -> int:
    from flax import linen as nn

    from alignjax.model.params import boxed_abstract, build_module

    abstract = nn.meta.unbox(boxed_abstract(build_module(config)))
    return sum(x.size for x in jax.tree_util.tree_leaves(abstract))


def _assert_default_backend_untouched():
    """Compiling for a TPU slice must not turn a JAX_PLATFORMS=cpu session into a TPU one."""
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        assert jax.default_backend() == "cpu"
        assert all(d.platform == "cpu" for d in jax.devices())


@pytest.mark.parametrize("name, generation, chips, topology, hbm_gib", [
    ("v4-8", "v4", 4, "2x2x1", 32),
    ("v4-32", "v4", 16, "2x2x4", 32),
    ("v4-4096", "v4", 2048, "8x16x16", 32),
    ("v5p-8", "v5p", 4, "2x2x1", 95),
    ("v5p-64", "v5p", 32, "2x4x4", 95),
    ("v5p-128", "v5p", 64, "4x4x4", 95),
    ("V5P-1536", "v5p", 768, "8x8x12", 95),
    ("v5e-1", "v5e", 1, "1x1", 16),
    ("v5litepod-16", "v5e", 16, "4x4", 16),
    ("v5e-8", "v5e", 8, "2x4", 16),
    ("v6e-256", "v6e", 256, "16x16", 32),
    ("v5p-128:2x4x8", "v5p", 64, "2x4x8", 95),
])
def test_parse_topology(name, generation, chips, topology, hbm_gib):
    spec = aot.parse_topology(name)
    assert (spec.generation, spec.chips, spec.topology) == (generation, chips, topology)
    assert spec.hbm_bytes_per_chip == hbm_gib * GiB
    assert len(spec.dims) == (3 if generation in ("v4", "v5p") else 2)
    assert spec.peak_bf16_flops_per_chip == {"v4": 275e12, "v5p": 459e12, "v5e": 197e12,
                                             "v6e": 918e12}[generation]


@pytest.mark.parametrize("name", ["v3-8", "v5p-12", "v4-8192", "v5e-2", "v6e-512", "v5p",
                                  "v5p-64:4x4x4", "v5e-8:2x2x2", "tpu"])
def test_parse_topology_rejects(name):
    with pytest.raises(UserError, match="v5litepod-N|must have"):
        aot.parse_topology(name)


@needs_libtpu
def test_topology_mesh_is_one_device_per_chip():
    mesh = aot.topology_mesh("v4-8", {"data": 2, "fsdp": -1})  # megacore: 4 chips, not 8 cores
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    assert {d.platform for d in mesh.devices.flat} == {"tpu"}
    _assert_default_backend_untouched()
    with pytest.raises(UserError):
        aot.topology_mesh("v5p-8", {"data": 3, "fsdp": -1})


@needs_libtpu
def test_compile_report_generic_matmul_flops():
    from jax.sharding import NamedSharding, PartitionSpec as P

    spec = aot.parse_topology("v5p-8")
    mesh = aot.topology_mesh(spec, {"fsdp": -1})
    rows = NamedSharding(mesh, P("fsdp", None))
    x = jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16, sharding=rows)
    w = jax.ShapeDtypeStruct((8, 2048, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def f(x, w):  # a scanned stack: XLA's cost_analysis counts the loop body once
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    report = aot.compile_report(f, (x, w), None, rows, spec=spec, donate_argnums=0)
    assert report.flops_per_step == 8 * 2 * 1024 * 2048 * 2048
    assert report.flops_per_chip == report.flops_per_step / 4
    assert report.xla_flops_per_chip < report.flops_per_chip / 4
    assert report.argument_bytes == 1024 * 2048 * 2 // 4 + 8 * 2048 * 2048 * 2
    assert report.alias_bytes == 1024 * 2048 * 2 // 4  # x donated into the output
    assert report.fits and "FITS" in aot.format_report(report)


@needs_libtpu
def test_small_llama_fits_on_v5p_8():
    report = aot.forward_backward_report(LlamaConfig(**TINY), "v5p-8", {"fsdp": -1}, batch=8,
                                         seq_len=128)
    assert report.num_devices == 4
    assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
    assert report.generated_code_bytes > 0
    assert report.total_bytes_per_chip == (report.argument_bytes + report.output_bytes
                                           - report.alias_bytes + report.temp_bytes
                                           + report.generated_code_bytes)
    n_params = _n_params(LlamaConfig(**TINY))
    # float32 gradients come out sharded like the params, over 4 chips (norm scales replicated).
    assert report.output_bytes >= 4 * n_params // 4
    # ~8 N tokens (forward, remat forward, backward) plus attention; certainly more than 6 N.
    assert report.flops_per_step > 6 * n_params * 8 * 128
    assert report.fits
    text = aot.format_report(report)
    assert "FITS" in text and "DOES NOT FIT" not in text and "v5p-8" in text
    _assert_default_backend_untouched()


@needs_libtpu
def test_unsharded_wide_model_does_not_fit_on_v5e_4():
    # ~3.9 B float32 params replicated on every chip (pure data parallelism): params + grads alone
    # are ~29 GiB per chip against 16 GiB of HBM. Two layers keep the compile short.
    big = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                      num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8,
                      dtype="bfloat16", remat_policy="full")
    report = aot.forward_backward_report(big, "v5e-4", {"data": -1}, batch=4, seq_len=128)
    assert "Ran out of memory" in report.compiler_error  # the TPU compiler's own verdict
    n_params = _n_params(big)
    assert report.argument_bytes == pytest.approx(4 * n_params, rel=1e-3)  # replicated float32
    assert report.output_bytes == pytest.approx(4 * n_params, rel=1e-3)  # + grads
    assert report.total_bytes_per_chip > report.argument_bytes + report.output_bytes
    assert not report.fits and report.total_bytes_per_chip > 16 * GiB
    assert report.flops_per_step > 0
    assert "DOES NOT FIT" in aot.format_report(report)


@needs_libtpu
def test_huge_batch_does_not_fit_and_donation_is_accounted():
    from jax.sharding import NamedSharding, PartitionSpec as P

    report = aot.forward_backward_report(LlamaConfig(**TINY), "v5e-4", {"data": -1}, batch=1024,
                                         seq_len=2048)
    assert not report.fits and report.temp_bytes > 16 * GiB  # activations, not weights
    assert report.argument_bytes < GiB

    spec = aot.parse_topology("v5e-4")
    mesh = aot.topology_mesh(spec, {"data": -1})
    rows, full = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((4096, 65536), jnp.bfloat16)  # 128 MiB per chip in row shards
    w = jax.ShapeDtypeStruct((65536, 65536), jnp.bfloat16)  # 8 GiB on every chip

    def f(x, w):  # x and w are donated into the first two outputs; w + 1 needs 8 GiB more
        return x @ w, w, w + 1

    report = aot.compile_report(f, (x, w), (rows, full), (rows, full, full), spec=spec,
                                donate_argnums=(0, 1))
    assert not report.fits and "Ran out of memory" in report.compiler_error
    assert report.argument_bytes == 8 * GiB + 128 * 2**20
    assert report.output_bytes == 16 * GiB + 128 * 2**20
    assert report.alias_bytes == report.argument_bytes  # both donated buffers match an output
    assert 16 * GiB < report.total_bytes_per_chip < 17 * GiB  # the compiler's figure


