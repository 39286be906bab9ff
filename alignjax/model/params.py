"""Creating parameters directly into their shardings (never whole on one host)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from alignjax import sharding as shd
from alignjax.model.config import LlamaConfig
from alignjax.model.llama import HEADS, Llama


def build_module(config: LlamaConfig, head: str = "lm") -> Llama:
    if head not in HEADS:
        raise ValueError(f"head={head!r}: use one of {HEADS}")
    return Llama(config, head=head)


def _dummy(batch: int = 1, length: int = 1):
    z = jnp.zeros((batch, length), jnp.int32)
    return z, z, jnp.ones((batch, length), jnp.int32)


def boxed_abstract(module: Llama):
    """Shape/dtype tree of the variables, still wrapped in flax's LogicallyPartitioned boxes."""
    try:
        return _boxed_abstract(module)
    except TypeError:  # an unhashable config field (a rope_scaling dict): traced every time
        return _boxed_abstract.__wrapped__(module)


@functools.lru_cache(maxsize=16)  # tracing the init takes ~0.4 s; a run asks several times
def _boxed_abstract(module: Llama):
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *_dummy())


def abstract_params(module: Llama, mesh: Mesh, rules=shd.DEFAULT_RULES):
    """(abstract params with shardings, shardings) — checks that every dimension divides the mesh."""
    boxed = boxed_abstract(module)
    shardings = shd.param_shardings(boxed, mesh, rules)
    unboxed = nn.meta.unbox(boxed)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unboxed, shardings)
    return abstract, shardings


def init_params(module: Llama, rng, mesh: Mesh, rules=shd.DEFAULT_RULES):
    """Random initialisation, computed under jit straight into the sharded layout."""
    _, shardings = abstract_params(module, mesh, rules)

    def init(rng):
        return nn.meta.unbox(module.init(rng, *_dummy()))

    # No mesh context here: flax would apply per-layer constraints inside the scanned init.
    return jax.jit(init, out_shardings=shardings)(rng)
