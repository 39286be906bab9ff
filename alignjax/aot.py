"""Ahead-of-time compilation for a Cloud TPU topology on any host (a CPU laptop is enough).

`compile_report` compiles a sharded step with the real TPU compiler (from libtpu) for a named
slice such as `v5p-64` and reads back what XLA planned per chip: argument, output, temporary and
code bytes, plus the step's matmul FLOPs. So "does this config fit on that slice?" is answered
before a TPU is rented, and the answer is the compiler's own, not an estimate.

How it works without a TPU, also under JAX_PLATFORMS=cpu:
  * `jax.experimental.topologies.get_topology_desc("v5p:2x4x4", "tpu")` loads libtpu as a PJRT
    plugin on demand (jax._src.xla_bridge.make_pjrt_tpu_topology), whatever `jax_platforms`
    says, and returns *compile-only* devices. No TPU backend is registered: `jax.devices()` and
    the default backend stay CPU, so the rest of a CPU test session is unaffected.
  * A Mesh over those devices makes NamedShardings whose client is the compile-only TPU client;
    `jax.jit(...).lower(abstract args).compile()` then runs the TPU compiler. Nothing can be
    executed (there is no device), but `memory_analysis()` and `cost_analysis()` work.
  * Environment, set before libtpu is first loaded and only when no TPU chip is attached (on a
    TPU VM these would be wrong): TPU_SKIP_MDS_QUERY=1 (no GCE metadata-server lookups; jax's
    own cloud_tpu_init also sets it on such hosts), and TPU_WORKER_HOSTNAMES=localhost plus
    TPU_ACCELERATOR_TYPE=<the slice asked for>, which only silence libtpu's "could not determine
    TPU worker hostnames / accelerator type" errors on stderr: the compile target comes from the
    topology name (checked: identical memory and FLOPs with a mismatched TPU_ACCELERATOR_TYPE).
  * v4 and v5p are compiled with chip_config_name="megacore": one JAX device per chip, as on real
    v4/v5p slices (libtpu's default for v4 is one device per TensorCore). Every number below is
    therefore per chip. v5p compile-only devices report device_kind "TPU v5".
  * libtpu must match jax: `pip install "jax[tpu]==<jax version>"` pins it (jax 0.10.2 ->
    libtpu 0.0.42.*); the project extra is `alignjax[tpu]`.

Memory accounting: total = arguments + outputs - aliased (donated inputs reused as outputs)
+ temporaries + generated code. The TPU compiler itself refuses a program above the *usable* HBM
(15.75 GiB of a v5e's 16), so "FITS" means the compiler accepted it; DOES NOT FIT reports then
come from the refusal message plus shapes (see `_compile`). The runtime may still need a little
headroom on hardware.

FLOPs: counted from the jaxpr (`matmul_flops`), not from `cost_analysis()`, which counts a scanned
layer stack as one layer (for Llama-2-7B: 2.1e12 instead of 1.1e14 FLOPs per chip).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignjax import sharding as shd
from alignjax.errors import UserError

GiB = 1024**3


# ---- topologies ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What a Cloud TPU name means for one generation."""

    generation: str  # canonical: v4 | v5p | v5e | v6e
    ndim: int  # 3 = 3D torus (v4, v5p), 2 = 2D (v5e, v6e)
    name_counts_cores: bool  # v4-N / v5p-N count TensorCores (2 per chip); v5e/v6e count chips
    hbm_bytes_per_chip: int
    peak_bf16_flops_per_chip: float
    max_chips: int
    sizes: tuple = ()  # the only chip counts offered (2D generations); () = any valid 3D shape
    chip_config: str = "default"  # libtpu chip_config_name


TOPOLOGIES: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", 3, True, 32 * GiB, 275e12, max_chips=2048, chip_config="megacore"),
    "v5p": TpuGeneration("v5p", 3, True, 95 * GiB, 459e12, max_chips=8960, chip_config="megacore"),
    "v5e": TpuGeneration("v5e", 2, False, 16 * GiB, 197e12, max_chips=256,
                         sizes=(1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": TpuGeneration("v6e", 2, False, 32 * GiB, 918e12, max_chips=256,
                         sizes=(1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}

ACCEPTED_FORMS = (
    "v4-N (N = TensorCores, 8..4096, chips = N/2), v5p-N (N = TensorCores, 8..17920, chips = N/2), "
    "v5e-N or v5litepod-N (N = chips: 1, 4, 8, 16, 32, 64, 128, 256), "
    "v6e-N (N = chips: 1, 4, 8, ..., 256); optionally with an explicit shape, e.g. v5p-128:4x4x4 "
    "or v5e-8:2x4")

_NAME_RE = re.compile(r"^\s*(?:tpu[-_ ]?)?(v4|v5p|v5e|v5litepod|v5lite|v6e|v6litepod)-(\d+)"
                      r"(?::(\d+(?:x\d+){1,2}))?\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    name: str  # canonical Cloud name, e.g. "v5p-64"
    generation: str
    chips: int
    topology: str  # "2x4x4" (3D) or "8x8" (2D)
    hbm_bytes_per_chip: int
    peak_bf16_flops_per_chip: float

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.topology.split("x"))

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{self.topology}"


def _most_even_shape(chips: int, ndim: int) -> tuple[int, ...] | None:
    """The most cube/square-like shape (ascending) for `chips`, as Cloud TPU slices are laid out.

    2D: a <= b, a*b = chips (1x1, 2x2, 2x4, 4x4, ...). 3D: a <= b <= c with a, b even (hosts hold
    2x2x1 chips), a single host is 2x2x1; e.g. 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 768 -> 8x8x12.
    """
    best = None
    if ndim == 2:
        for a in range(1, math.isqrt(chips) + 1):
            if chips % a == 0:
                best = (a, chips // a)
        return best
    if chips == 4:
        return (2, 2, 1)
    for a in range(2, round(chips ** (1 / 3)) + 2, 2):
        if chips % a:
            continue
        for b in range(a, math.isqrt(chips // a) + 1):
            if b % 2 or (chips // a) % b:
                continue
            c = chips // a // b
            key = (c / a, c)
            if best is None or key < best[0]:
                best = (key, (a, b, c))
    return best[1] if best else None


def parse_topology(name: str | TopologySpec) -> TopologySpec:
    """`v5p-64` -> TopologySpec(chips=32, topology="2x4x4", ...); see ACCEPTED_FORMS."""
    if isinstance(name, TopologySpec):
        return name
    m = _NAME_RE.match(str(name))
    if not m:
        raise UserError(f"TPU topology {name!r} is not recognised; accepted forms: {ACCEPTED_FORMS}")
    gen = TOPOLOGIES[_ALIASES.get(m.group(1).lower(), m.group(1).lower())]
    n = int(m.group(2))
    canonical = f"{gen.generation}-{n}"
    if gen.name_counts_cores:
        if n % 8 or not 8 <= n <= 2 * gen.max_chips:
            raise UserError(f"TPU topology {name!r}: {gen.generation}-N counts TensorCores (2 per "
                            f"chip); N must be a multiple of 8 from 8 to {2 * gen.max_chips}. "
                            f"Accepted forms: {ACCEPTED_FORMS}")
        chips = n // 2
    else:
        if n not in gen.sizes:
            raise UserError(f"TPU topology {name!r}: {gen.generation} slices have "
                            f"{', '.join(map(str, gen.sizes))} chips. Accepted forms: {ACCEPTED_FORMS}")
        chips = n
    if m.group(3):
        dims = tuple(int(d) for d in m.group(3).lower().split("x"))
        if len(dims) != gen.ndim or math.prod(dims) != chips:
            raise UserError(f"TPU topology {name!r}: shape {m.group(3)} must have {gen.ndim} "
                            f"dimensions whose product is {chips} chips")
    else:
        dims = _most_even_shape(chips, gen.ndim)
        if dims is None:
            raise UserError(f"TPU topology {name!r}: {chips} chips have no {gen.ndim}D slice shape; "
                            f"give one explicitly ({canonical}:AxBxC). Accepted forms: {ACCEPTED_FORMS}")
    return TopologySpec(canonical, gen.generation, chips, "x".join(map(str, dims)),
                        gen.hbm_bytes_per_chip, gen.peak_bf16_flops_per_chip)


# ---- compile-only devices and meshes -------------------------------------------------------

def libtpu_available() -> bool:
    """True when the TPU compiler can be loaded (libtpu installed or TPU_LIBRARY_PATH set)."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def _prepare_libtpu_env(spec: TopologySpec):
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return  # a real TPU VM: its own environment is right
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", spec.name)
    # libtpu's lockfile guards real chips; without any, it only stops a second compile process.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@functools.lru_cache(maxsize=None)
def _devices_for(libtpu_name: str, chip_config: str, host_bounds: tuple | None, num_slices: int = 1):
    from jax.experimental import topologies

    kwargs = {"chip_config_name": chip_config}
    if host_bounds:
        kwargs["chips_per_host_bounds"] = host_bounds
    if num_slices > 1:  # multislice: each device knows its slice_index
        kwargs["num_slices"] = num_slices
    return tuple(topologies.get_topology_desc(libtpu_name, "tpu", **kwargs).devices)


def topology_devices(spec: TopologySpec | str, num_slices: int = 1) -> list:
    """Compile-only TPU devices of `num_slices` such slices (one per chip), in libtpu's order."""
    spec = parse_topology(spec)
    if not libtpu_available():
        raise UserError(f"AOT compilation for {spec.name} needs the TPU compiler: "
                        f'pip install "jax[tpu]=={jax.__version__}" (or alignjax[tpu])')
    _prepare_libtpu_env(spec)
    # A slice smaller than one 2x2x1 host (v5e-1, v6e-1) needs explicit host bounds.
    host_bounds = (1, 1, 1) if spec.chips == 1 else None
    try:
        devices = _devices_for(spec.libtpu_name, TOPOLOGIES[spec.generation].chip_config, host_bounds,
                               num_slices)
    except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
        raise UserError(f"libtpu rejected topology {spec.name} ({spec.libtpu_name}): {e}") from e
    if len(devices) != spec.chips * num_slices:
        raise UserError(f"libtpu made {len(devices)} devices for {num_slices} x {spec.name}, "
                        f"expected {spec.chips * num_slices}")
    return list(devices)


def topology_mesh(spec: TopologySpec | str, mesh_sizes: Mapping[str, int] | None = None) -> Mesh:
    """A (data, fsdp, tensor) Mesh over the slice's compile-only devices; -1 takes the rest.

    mesh.dcn_* sizes in `mesh_sizes` ask for several slices (multislice): their product is the
    number of slices, each of `spec`'s size. Physical placement follows mesh_utils (the fsdp/tensor
    rings follow the torus) where it can; shapes it cannot map fall back to a split of physical
    axes, then to libtpu's device order.
    """
    spec = parse_topology(spec)
    sizes = dict(mesh_sizes or {"fsdp": -1})
    num_slices = math.prod(int(sizes.get(a, 1)) for a in shd.DCN_AXES)
    devices = topology_devices(spec, num_slices)
    ici, dcn = shd.mesh_plan(sizes, len(devices))
    return Mesh(shd.device_grid(devices, ici, dcn, allow_split_physical_axes=True), shd.MESH_AXES)


# ---- compiling and reporting ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What the TPU compiler planned for one chip (bytes), and the step's FLOPs."""

    topology: str
    num_devices: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    total_bytes_per_chip: int  # argument + output - alias + temp + generated code
    hbm_bytes_per_chip: int
    flops_per_step: float  # matmul FLOPs of the whole step, all chips (see matmul_flops)
    flops_per_chip: float  # flops_per_step / num_devices (even split; replicated work not counted twice)
    xla_flops_per_chip: float  # cost_analysis()["flops"]: scanned loop bodies counted once
    bytes_accessed_per_chip: float  # cost_analysis(), same loop caveat
    peak_flops_per_chip: float
    lower_seconds: float
    compile_seconds: float
    fits: bool  # the TPU compiler accepted it and the total is within nominal HBM
    # The compiler's out-of-memory message when it refused the program. Then arguments, outputs
    # and aliasing come from shapes and shardings, the total from the message, temporaries are the
    # difference, generated code and XLA's cost numbers are unknown (0).
    compiler_error: str | None = None

    @property
    def free_bytes_per_chip(self) -> int:
        return self.hbm_bytes_per_chip - self.total_bytes_per_chip

    @property
    def min_step_seconds(self) -> float:
        """Step time at 100% of peak bf16 FLOP/s (a lower bound; MFU = this / measured time)."""
        return self.flops_per_chip / self.peak_flops_per_chip if self.peak_flops_per_chip else 0.0


def _shape_prod(shape) -> int:
    return math.prod(int(d) for d in shape)


def _sub_jaxprs(params) -> list:
    from jax._src import core

    return [j.jaxpr if isinstance(j, core.ClosedJaxpr) else j for j in core.jaxprs_in_params(params)]


def matmul_flops(jaxpr) -> float:
    """Global FLOPs of the dot_generals/convolutions in a (closed) jaxpr, loops expanded.

    Why not cost_analysis(): XLA's HloCostAnalysis counts a while-loop body once, whatever its
    trip count, so a model whose layers are scanned reports about one layer's FLOPs (measured:
    identical "flops" for 1, 2 and 4 scanned layers; a 16-step scan of a matmul reports the FLOPs
    of one step). Here a scan body counts `length` times; rematerialised forward passes are in
    the gradient's jaxpr and count too (hardware FLOPs, not 6*N*tokens model FLOPs). A
    while_loop of unknown trip count counts once. Elementwise work is not counted.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (lhs_contract, _), _ = params["dimension_numbers"]
            k = math.prod(int(eqn.invars[0].aval.shape[d]) for d in lhs_contract)
            total += 2.0 * _shape_prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * _shape_prod(eqn.outvars[0].aval.shape) * _shape_prod(rhs) / out_features
        elif name == "scan":
            total += params["length"] * matmul_flops(params["jaxpr"])
        elif name == "cond":
            total += max((matmul_flops(b) for b in params["branches"]), default=0.0)
        elif name == "shard_map":  # the body sees per-shard shapes
            mesh, axes = params.get("mesh"), params.get("manual_axes") or ()
            shards = math.prod(mesh.shape[a] for a in axes) if mesh is not None else 1
            total += shards * matmul_flops(params["jaxpr"])
        else:  # pjit, checkpoint/remat, custom_jvp/vjp calls, while (once), ...
            total += sum(matmul_flops(j) for j in _sub_jaxprs(params))
    return total


_OOM_RE = re.compile(r"memory required for [^(]*\(([\d.]+)\s*([KMGT]?)i?B?\)\s*exceeds available "
                     r"HBM \(([\d.]+)\s*([KMGT]?)i?B?\)")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _compile(lowered):
    """(compiled, None), or (None, the compiler's out-of-memory message).

    The TPU compiler refuses a program that needs more than the usable HBM, in about a second:
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries
    (31.65G) exceeds available HBM (15.75G)" (G = GiB; usable is a little below nominal).
    Deliberately no second compile with libtpu's xla_tpu_no_crash_on_oom to get the full plan:
    measured on libtpu 0.0.42.1, that took 20-40 s, sometimes failed with "Invalid TPU program",
    and once killed the process with a stack overflow (SIGSEGV) inside the TPU emitter.
    """
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).strip()


def _shard_bytes(aval, sharding) -> int:
    shape = tuple(aval.shape)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        shape = sharding.shard_shape(shape)
    return math.prod(shape) * np.dtype(aval.dtype).itemsize


def _per_chip_args(abstract_args, in_shardings) -> list[tuple[Any, Any]]:
    """[(aval, sharding)] of the flattened arguments; in_shardings may be a tree prefix."""
    from jax.sharding import Sharding

    args = tuple(abstract_args)
    if in_shardings is None:
        return [(a, getattr(a, "sharding", None)) for a in jax.tree_util.tree_leaves(args)]
    is_leaf = lambda x: x is None or isinstance(x, Sharding)  # noqa: E731
    prefix = jax.tree_util.tree_structure(in_shardings, is_leaf=is_leaf)
    leaves = jax.tree_util.tree_leaves(in_shardings, is_leaf=is_leaf)
    out = []
    for sharding, subtree in zip(leaves, prefix.flatten_up_to(args)):
        for a in jax.tree_util.tree_leaves(subtree):
            out.append((a, sharding if sharding is not None else getattr(a, "sharding", None)))
    return out


def _memory_from_shapes(lowered, abstract_args, in_shardings, message: str) -> dict:
    """Per-chip memory of a program the compiler refused: arguments and outputs from shapes and
    shardings, donated arguments aliased to equal outputs (as jax pairs them), the total from
    the compiler's message, temporaries = total - arguments - outputs + aliased."""
    args = _per_chip_args(abstract_args, in_shardings)
    donated = [i.donated for i in jax.tree_util.tree_leaves(lowered.args_info)]
    outs = [(o, o.sharding) for o in jax.tree_util.tree_leaves(lowered.out_info)]
    arg = sum(_shard_bytes(a, s) for a, s in args)
    out_sizes = [(tuple(o.shape), np.dtype(o.dtype), _shard_bytes(o, s)) for o, s in outs]
    alias = 0
    for (a, s), d in zip(args, donated):
        key = (tuple(a.shape), np.dtype(a.dtype), _shard_bytes(a, s))
        if d and key in out_sizes:
            out_sizes.remove(key)
            alias += key[2]
    out = sum(_shard_bytes(o, s) for o, s in outs)
    m = _OOM_RE.search(message)
    required = int(float(m.group(1)) * _UNITS[m.group(2)]) if m else arg + out - alias
    return dict(argument_bytes=arg, output_bytes=out, alias_bytes=alias,
                temp_bytes=max(0, required - arg - out + alias), generated_code_bytes=0,
                total_bytes_per_chip=max(required, arg + out - alias))


def _cost_dict(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _num_devices(compiled, abstract_args, default: int) -> int:
    shardings = []
    try:
        shardings = jax.tree_util.tree_leaves(compiled.input_shardings)
    except Exception:  # None (the compiler refused it) or an executable without shardings
        pass
    shardings += [getattr(a, "sharding", None) for a in jax.tree_util.tree_leaves(abstract_args)]
    for s in shardings:
        if s is not None and hasattr(s, "device_set"):
            return len(s.device_set)
    return default


def compile_report(fn: Callable, abstract_args: Sequence[Any], in_shardings=None,
                   out_shardings=None, *, spec: TopologySpec | str,
                   donate_argnums: Sequence[int] | int = (), static_argnums=(),
                   progress: Callable[[str], None] | None = None,
                   keep_unused: bool = False) -> CompileReport:
    """Compiles `fn(*abstract_args)` for the slice and reports per-chip memory and FLOPs.

    `abstract_args` are jax.ShapeDtypeStruct pytrees (shardings may ride on them, in which case
    in_shardings can be None); shardings must be over `topology_mesh(spec, ...)`. `fn` may be a
    plain function (jitted here with the shardings and donation) or an already jitted one (then
    in/out shardings and donation must be None/() and it is lowered as is). Tracing happens
    here, so enter `sharding.mesh_context(mesh, rules)` around the call when `fn` uses logical
    activation constraints. `progress(message)` is told as each stage starts (the CLI prints it:
    a 7B compile is silent for about a minute otherwise). `keep_unused`: arguments the program
    does not read stay resident (and counted), as models held beside it in training are.
    """
    progress = progress or (lambda message: None)
    spec = parse_topology(spec)
    if hasattr(fn, "lower") and in_shardings is None and out_shardings is None and not donate_argnums:
        jitted = fn
    else:
        kwargs: dict = {"donate_argnums": donate_argnums, "static_argnums": static_argnums,
                        "keep_unused": keep_unused}
        if in_shardings is not None:
            kwargs["in_shardings"] = in_shardings
        if out_shardings is not None:
            kwargs["out_shardings"] = out_shardings
        jitted = jax.jit(fn, **kwargs)
    t0 = time.perf_counter()
    progress("tracing and lowering the step...")
    traced = jitted.trace(*abstract_args)
    lowered = traced.lower()
    t1 = time.perf_counter()
    progress(f"lowered in {t1 - t0:.1f} s; compiling for {spec.name} with the TPU compiler...")
    compiled, compiler_error = _compile(lowered)
    t2 = time.perf_counter()
    progress(f"compiled in {t2 - t1:.1f} s")

    if compiled is not None:
        mem = compiled.memory_analysis()
        memory = dict(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                      temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                      generated_code_bytes=mem.generated_code_size_in_bytes)
        memory["total_bytes_per_chip"] = (memory["argument_bytes"] + memory["output_bytes"]
                                          - memory["alias_bytes"] + memory["temp_bytes"]
                                          + memory["generated_code_bytes"])
        cost = _cost_dict(compiled)
    else:
        memory, cost = _memory_from_shapes(lowered, abstract_args, in_shardings, compiler_error), {}
    n = _num_devices(compiled, abstract_args, spec.chips)
    flops = matmul_flops(traced.jaxpr)
    total = memory["total_bytes_per_chip"]
    slices = max(1, n // spec.chips)
    return CompileReport(
        topology=spec.name if slices == 1 else f"{slices} x {spec.name} (multislice)", num_devices=n, **memory, hbm_bytes_per_chip=spec.hbm_bytes_per_chip,
        flops_per_step=flops, flops_per_chip=flops / n,
        xla_flops_per_chip=float(cost.get("flops", 0.0)),
        bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
        peak_flops_per_chip=spec.peak_bf16_flops_per_chip, lower_seconds=t1 - t0,
        compile_seconds=t2 - t1, fits=compiler_error is None and total <= spec.hbm_bytes_per_chip,
        compiler_error=compiler_error)


def format_report(report: CompileReport) -> str:
    """A small human table in GiB, ending in FITS / DOES NOT FIT."""
    def gib(b):
        return f"{b / GiB:10.3f} GiB"

    rows = [
        ("arguments", report.argument_bytes),
        ("outputs", report.output_bytes),
        ("aliased (donated, not double counted)", -report.alias_bytes),
        ("temporaries", report.temp_bytes),
        ("generated code", report.generated_code_bytes),
        ("total per chip", report.total_bytes_per_chip),
        ("HBM per chip", report.hbm_bytes_per_chip),
        ("headroom", report.free_bytes_per_chip),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"AOT compile for {report.topology} ({report.num_devices} chips): "
             f"lower {report.lower_seconds:.1f} s, compile {report.compile_seconds:.1f} s"]
    lines += [f"  {label:<{width}}  {gib(value)}" for label, value in rows]
    xla = f"{report.xla_flops_per_chip:.4g}" if report.xla_flops_per_chip else "n/a"
    lines.append(f"  {'matmul FLOPs per step':<{width}}  {report.flops_per_step:.4g} "
                 f"({report.flops_per_chip:.4g} per chip; XLA cost_analysis, which counts loop "
                 f"bodies once: {xla})")
    if report.peak_flops_per_chip:
        lines.append(f"  {'step time at peak bf16':<{width}}  {report.min_step_seconds * 1e3:.4g} ms "
                     f"({report.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip)")
    if report.compiler_error:
        lines.append(f"  compiler refused it: {report.compiler_error}")
        lines.append("  (arguments/outputs from shapes, total from the compiler; code size unknown)")
    used = report.total_bytes_per_chip / report.hbm_bytes_per_chip
    lines.append(f"  {'FITS' if report.fits else 'DOES NOT FIT'} ({used:.0%} of HBM per chip)")
    return "\n".join(lines)


# ---- a real model: Llama loss + gradient ---------------------------------------------------

def abstract_batch(mesh: Mesh, batch: int, seq_len: int, rules=shd.DEFAULT_RULES) -> dict:
    """ShapeDtypeStructs of a packed training batch (alignjax.data.packing.ROW_KEYS), batch-sharded."""
    shd.check_divisible((batch,), ("batch",), mesh, rules, what="batch")
    sharding = shd.batch_sharding(mesh, 2, rules)
    dtypes = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
              "targets": jnp.int32, "loss_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct((batch, seq_len), d, sharding=sharding) for k, d in dtypes.items()}


def forward_backward_report(config, topology: str | TopologySpec, mesh_sizes: Mapping[str, int],
                            batch: int, seq_len: int, *, rules=shd.DEFAULT_RULES,
                            logits_dtype=jnp.float32, chunk_size: int = 512) -> CompileReport:
    """Compiles loss and gradient of the token-mean NLL (no optimizer) of a Llama for a slice.

    The forward pass is the trainer's: hidden states from the scanned model, then the chunked
    log-prob kernel (float32 logits by default, never [B, T, V] at once) and sft_loss.
    """
    from alignjax.losses.logprobs import token_stats
    from alignjax.losses.sft import sft_loss
    from alignjax.model.llama import head_kernel
    from alignjax.model.params import abstract_params, build_module

    spec = parse_topology(topology)
    mesh = topology_mesh(spec, mesh_sizes)
    module = build_module(config)
    params, param_shardings = abstract_params(module, mesh, rules)
    batch_args = abstract_batch(mesh, batch, seq_len, rules)

    def loss_fn(params, batch):
        hidden_bte, _ = module.apply(params, batch["tokens"], batch["positions"],
                                     batch["segment_ids"], output="hidden")
        stats = token_stats(hidden_bte, head_kernel(params, config), batch["targets"],
                            chunk_size=chunk_size, compute_dtype=logits_dtype)
        loss, _ = sft_loss(stats.logps, batch["loss_mask"])
        return loss

    grad_fn = jax.value_and_grad(loss_fn)
    in_shardings = (param_shardings, jax.tree_util.tree_map(lambda a: a.sharding, batch_args))
    out_shardings = (NamedSharding(mesh, P()), param_shardings)
    with shd.mesh_context(mesh, rules):
        return compile_report(grad_fn, (params, batch_args), in_shardings, out_shardings, spec=spec)


LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, dtype="bfloat16", remat_policy="full")


if __name__ == "__main__":  # python -m alignjax.aot [topology] [batch] [seq_len]
    import sys

    from alignjax.model.config import LlamaConfig

    topo = sys.argv[1] if len(sys.argv) > 1 else "v5p-64"
    b = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    t = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    print(format_report(forward_backward_report(LlamaConfig(**LLAMA2_7B), topo, {"fsdp": -1}, b, t)))
