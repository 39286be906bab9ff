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


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict:
    """Resolves mesh sizes; one axis may be -1 and takes what is left of the devices."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"mesh: unknown axes {sorted(unknown)}; use {MESH_AXES}")
    shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in shape.items() if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"mesh: only one axis may be -1, got {fill}")
    fixed = math.prod(s for s in shape.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ShardingError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                                f"(product {fixed}); change mesh.{'/mesh.'.join(MESH_AXES)}")
        shape[fill[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ShardingError(
            f"mesh: data*fsdp*tensor = {math.prod(shape.values())} but {num_devices} devices are "
            f"available{_over_processes()}; set mesh.data/mesh.fsdp/mesh.tensor (config) or --mesh "
            "(model commands) so the product matches, or use -1 for one axis")
    return shape


def _over_processes() -> str:
    """' in total over P processes' on a multi-host run (jax.devices() counts every host's)."""
    return f" in total over {jax.process_count()} processes" if jax.process_count() > 1 else ""


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; default is pure data parallelism over all devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes or {"data": -1}, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(dims, devices)
    except Exception:  # CPU / uncommon topologies: plain reshape is fine
        arr = np.asarray(devices).reshape(dims)
    return Mesh(arr, MESH_AXES)


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
    """Places a host batch (dict of numpy arrays, global shapes) on the mesh, batch-sharded."""

    def put(x):
        x = np.asarray(x)
        check_divisible(x.shape[:1], ("batch",), mesh, rules, what="batch")
        return jax.device_put(x, batch_sharding(mesh, x.ndim, rules))

    return jax.tree_util.tree_map(put, batch)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=DEFAULT_RULES):
    """Mesh + logical rules in scope, so activation constraints inside jitted code take effect."""
    set_mesh = getattr(jax, "set_mesh", None)
    with (set_mesh(mesh) if set_mesh else mesh), nn.logical_axis_rules(rules):
        yield
