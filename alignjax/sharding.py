"""Device mesh, logical-axis rules, and placing pytrees on the mesh.

Every weight and activation names its axes logically (embed, heads, mlp, ...); a rule table maps
logical names to mesh axes (data, fsdp, tensor). Changing the parallelism is a config change.
"""

from __future__ import annotations

from alignjax.errors import UserError

import contextlib
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("score", None),
    ("cache_length", None),
)


class ShardingError(UserError):
    """A parallelism setting that cannot work; the message says which config key to change."""


DCN_AXES = tuple(f"dcn_{a}" for a in MESH_AXES)  # multislice: how many slices each axis spans


def parse_mesh_flag(text: str | None) -> dict:
    """--mesh 'data=2,fsdp=2,tensor=2' -> dict; empty means all devices on `data`."""
    if not text:
        return {"data": -1}
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise UserError(f"--mesh {text!r}: expected axis=size pairs such as "
                            "data=2,fsdp=2,tensor=2") from None
    return out


def mesh_plan(sizes: Mapping[str, int], num_devices: int) -> tuple[dict, dict]:
    """(per-slice ICI sizes, DCN sizes) of a mesh: every axis spans `ici * dcn` devices.

    `mesh.dcn_data=2` (MaxText's dcn_data_parallelism) lays the data axis over two slices joined
    by the data-center network; mesh.data/fsdp/tensor stay the sizes inside one slice, and one of
    them may be -1 (the rest of a slice's devices). Without dcn_* keys there is one slice.
    """
    unknown = set(sizes) - set(MESH_AXES) - set(DCN_AXES)
    if unknown:
        raise ShardingError(f"mesh: unknown axes {sorted(unknown)}; use {MESH_AXES} "
                            f"(and {DCN_AXES} for multislice)")
    dcn = {a: int(sizes.get(f"dcn_{a}", 1)) for a in MESH_AXES}
    bad = [f"mesh.dcn_{a}={v}" for a, v in dcn.items() if v < 1]
    if bad:
        raise ShardingError(f"mesh: {', '.join(bad)}: a dcn_* size is a number of slices (>= 1)")
    slices = math.prod(dcn.values())
    if num_devices % slices:
        raise ShardingError(f"mesh: {num_devices} devices do not split into {slices} slices "
                            f"(mesh.dcn_data*dcn_fsdp*dcn_tensor); change the mesh.dcn_* sizes")
    per_slice = num_devices // slices
    ici = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in ici.items() if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"mesh: only one axis may be -1, got {fill}")
    fixed = math.prod(s for s in ici.values() if s != -1)
    where = f"{per_slice} devices per slice ({slices} slices)" if slices > 1 else f"{num_devices} devices"
    if fill:
        if per_slice % fixed:
            raise ShardingError(f"mesh: {where} are not divisible by the fixed axes "
                                f"(product {fixed}); change mesh.{'/mesh.'.join(MESH_AXES)}")
        ici[fill[0]] = per_slice // fixed
    if math.prod(ici.values()) != per_slice:
        available = (f"{per_slice} devices are in each of {slices} slices" if slices > 1 else
                     f"{num_devices} devices are available{_over_processes()}")
        raise ShardingError(
            f"mesh: data*fsdp*tensor = {math.prod(ici.values())} but {available}; set "
            "mesh.data/mesh.fsdp/mesh.tensor (config) or --mesh (model commands) so the product "
            "matches, or use -1 for one axis")
    return ici, dcn


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict:
    """Each axis' total size (ICI x DCN); one axis may be -1 and takes what is left of the devices."""
    ici, dcn = mesh_plan(sizes, num_devices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def device_grid(devices: Sequence, ici: Mapping[str, int], dcn: Mapping[str, int],
                allow_split_physical_axes: bool = False) -> np.ndarray:
    """Devices arranged as a (data, fsdp, tensor) array: each axis is dcn slices x ici devices.

    One slice: mesh_utils' physical placement (rings follow the torus), else a plain reshape
    (CPU, uncommon shapes). Several: mesh_utils.create_hybrid_device_mesh on devices that know
    their slice; devices that do not (CPU) take consecutive blocks as slices, process by process.
    """
    from jax.experimental import mesh_utils
    ici_dims, dcn_dims = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
    slices = math.prod(dcn_dims)
    if slices == 1:
        for split in (False, True) if allow_split_physical_axes else (False,):
            try:
                return mesh_utils.create_device_mesh(ici_dims, devices,
                                                     allow_split_physical_axes=split)
            except Exception:  # CPU / uncommon topologies: plain reshape is fine
                pass
        return np.asarray(devices, dtype=object).reshape(ici_dims)
    found = {getattr(d, "slice_index", None) for d in devices}
    if None not in found:
        if len(found) != slices:
            raise ShardingError(f"mesh: the mesh.dcn_* sizes ask for {slices} slices, but the "
                                f"devices are on {len(found)}; change mesh.dcn_data/dcn_fsdp/dcn_tensor")
        return mesh_utils.create_hybrid_device_mesh(ici_dims, dcn_dims, devices,
                                                    allow_split_physical_axes=allow_split_physical_axes)
    blocks = np.asarray(devices, dtype=object).reshape(dcn_dims + ici_dims)
    # (dcn_d, dcn_f, dcn_t, ici_d, ici_f, ici_t) -> (dcn_d, ici_d, dcn_f, ici_f, ...) -> totals
    return blocks.transpose(0, 3, 1, 4, 2, 5).reshape([i * d for i, d in zip(ici_dims, dcn_dims)])


def _over_processes() -> str:
    """' in total over P processes' on a multi-host run (jax.devices() counts every host's)."""
    return f" in total over {jax.process_count()} processes" if jax.process_count() > 1 else ""


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; default is pure data parallelism over all devices. `sizes`
    may hold mesh.dcn_* sizes (multislice, see mesh_plan)."""
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = mesh_plan(sizes or {"data": -1}, len(devices))
    return Mesh(device_grid(devices, ici, dcn), MESH_AXES)


def rules_from_config(rules) -> tuple:
    """Accepts a sequence of (logical, mesh-axes) pairs (lists from a config are fine)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out.append((logical, mesh_axes))
    return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], rules=DEFAULT_RULES) -> P:
    """PartitionSpec for logical axis names; an unknown logical name is an error."""
    table = dict(rules)
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ShardingError(f"logical axis {name!r} has no sharding rule; add it to sharding.rules")
        spec.append(table[name])
    return P(*spec)


def axis_size(mesh: Mesh, mesh_axes) -> int:
    """Number of devices a logical rule's mesh axes (a name, a tuple or None) spans."""
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
    return math.prod(mesh.shape[a] for a in mesh_axes)


def check_divisible(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                    rules=DEFAULT_RULES, what: str = "array"):
    """Raises a ShardingError naming the dimension, the mesh axis and the config keys to change."""
    table = dict(rules)
    for dim, (size, name) in enumerate(zip(shape, logical_axes)):
        mesh_axes = table.get(name) if name else None
        n = axis_size(mesh, mesh_axes)
        if size % n:
            axes = mesh_axes if isinstance(mesh_axes, str) else "*".join(mesh_axes)
            raise ShardingError(
                f"{what}: dimension {dim} ({name}={size}) is not divisible by mesh axis "
                f"'{axes}' (size {n}). Change mesh.{axes.split('*')[0]} so it divides {size}, or map "
                f"'{name}' to another mesh axis in sharding.rules")


def param_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of flax LogicallyPartitioned boxes, checking divisibility."""

    def one(path, leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            names, shape = leaf.names, leaf.value.shape
        else:
            names, shape = (None,) * len(leaf.shape), leaf.shape
        check_divisible(shape, names, mesh, rules, what="parameter " + jax.tree_util.keystr(path))
        return NamedSharding(mesh, logical_to_spec(names, rules))

    return jax.tree_util.tree_map_with_path(
        one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_axes_tree(abstract_boxed):
    """Pytree of logical-axis tuples for the leaves of a boxed flax variables tree."""
    return jax.tree_util.tree_map(
        lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else (None,) * x.ndim,
        abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading axis over the batch rule (data x fsdp by default), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
    """Places a host batch (dict of numpy arrays, global shapes) on the mesh, batch-sharded.
    With several processes each passes the same whole batch and places its own devices' rows."""

    def put(x):
        x = np.asarray(x)
        check_divisible(x.shape[:1], ("batch",), mesh, rules, what="batch")
        return jax.device_put(x, batch_sharding(mesh, x.ndim, rules))

    return jax.tree_util.tree_map(put, batch)


def to_host(tree):
    """jax.Arrays -> numpy, every row on every process: an array spread over several processes
    is all-gathered (`jax.device_get` alone fails on rows held by another process)."""
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(get, tree)


def process_rows(rows: int, mesh: Mesh, rules=DEFAULT_RULES) -> np.ndarray:
    """The rows of a global batch of `rows` that this process's devices hold under the batch
    sharding, in order: the process-local part that `make_array_from_process_local_data`
    expects back (all of them with one process)."""
    spans = batch_sharding(mesh, 1, rules).addressable_devices_indices_map((rows,)).values()
    starts = sorted({index[0].indices(rows)[:2] for index in spans})
    return np.concatenate([np.arange(a, b) for a, b in starts]) if starts else np.arange(0)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=DEFAULT_RULES):
    """Mesh + logical rules in scope, so activation constraints inside jitted code take effect."""
    set_mesh = getattr(jax, "set_mesh", None)
    with (set_mesh(mesh) if set_mesh else mesh), nn.logical_axis_rules(rules):
        yield
