"""The trainable state (a plain dict pytree) and its shardings.

    state = {"step": int32[], "params": {...}, "opt_state": optax state, "rng": uint32[2]}
    (+ "ref_params": a reference model that training refreshes, TR-DPO)

Optimizer moments take the sharding of the parameter they belong to; everything else is
replicated. Frozen models (reference, reward) are step arguments, not part of this state; a
refreshed reference is, so checkpoints and resume carry it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignjax import sharding as shd
from alignjax.model.params import abstract_params


def state_shardings(module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules=shd.DEFAULT_RULES, ref_module=None):
    """(abstract state with shardings, shardings) without allocating anything. With `ref_module`,
    the state also holds that module's params as "ref_params" (a refreshed reference)."""
    abstract_p, param_sh = abstract_params(module, mesh, rules)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(optimizer.init, abstract_p)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "rng": replicated}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                "params": abstract_p, "opt_state": abstract_opt,
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    if ref_module is not None:
        abstract["ref_params"], shardings["ref_params"] = abstract_params(ref_module, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def init_state(params, optimizer: optax.GradientTransformation, shardings, seed: int,
               ref_params=None):
    """A fresh state around already-sharded `params` (random init or converted weights)."""

    def make(params, ref_params):
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": optimizer.init(params), "rng": jax.random.PRNGKey(seed)}
        return state if ref_params is None else dict(state, ref_params=ref_params)

    return jax.jit(make, out_shardings=shardings)(params, ref_params)
