"""The train state (a plain dict pytree) and its shardings.

    state = {"step":      int32[],             optimizer updates done
             "params":    {slot: tree},         the trainable slots (SFT/DPO/reward: "policy")
             "opt_state": {slot: optax state},  one optimizer per trainable slot
             "frozen":    {slot: tree},         frozen slots that training changes (TR-DPO's reference)
             "rng":       uint32[2]}            the run's key (online methods fold in the step)

Optimizer moments take the sharding of the parameter they belong to; everything else is
replicated. Frozen slots that never change (reference, reward) are step arguments, not state;
a moving one is state, so checkpoints and resume carry it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignjax import sharding as shd
from alignjax.model.params import abstract_params


def state_shardings(modules: dict, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules=shd.DEFAULT_RULES, frozen_modules: dict | None = None):
    """(abstract state with shardings, shardings) without allocating anything.

    `modules`: {slot: module} of the trainable slots; `optimizer`: `slots.per_slot` over them;
    `frozen_modules`: {slot: module} of the frozen slots held in the state."""
    replicated = NamedSharding(mesh, P())

    def slots_of(mods):
        pairs = {k: abstract_params(m, mesh, rules) for k, m in (mods or {}).items()}
        return {k: a for k, (a, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}

    abstract_p, param_sh = slots_of(modules)
    abstract_f, frozen_sh = slots_of(frozen_modules)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_p)
    opt_sh = {k: optax.tree_map_params(tx, lambda _, s: s, abstract_opt[k], param_sh[k],
                                       transform_non_params=lambda _: replicated)
              for k, tx in optimizer.slots.items()}
    shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "frozen": frozen_sh,
                 "rng": replicated}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_p,
                "opt_state": abstract_opt, "frozen": abstract_f,
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def init_state(params: dict, optimizer: optax.GradientTransformation, shardings, seed: int,
               frozen: dict | None = None):
    """A fresh state around already-sharded {slot: params} (and moving frozen slots)."""

    def make(params, frozen):
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params), "frozen": frozen,
                "rng": jax.random.PRNGKey(seed)}

    return jax.jit(make, out_shardings=shardings)(params, frozen or {})
