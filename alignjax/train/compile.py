"""`alignjax compile`: the real sharded train step, compiled ahead of time for a TPU topology.

Runs on a CPU host with libtpu installed (no TPU needed): it builds abstract inputs only (no
parameter is allocated), lowers the same jitted update the trainer runs (the algorithm's slots,
sums function and batch from alignjax.train.registry), and reads per-chip memory and FLOPs from
the compiled program. Online algorithms (PPO, GRPO) also compile their rollout program: sampling
(prefill + decode) and the scoring forwards, with the train state and every model resident.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from alignjax import sharding as shd
from alignjax.model.params import abstract_params, build_module
from alignjax.train import registry, slots as slots_lib
from alignjax.train.setup import model_config, rules
from alignjax.train.state import state_shardings
from alignjax.train.step import make_train_step


def _abstract_run(config, topology: str, progress):
    """The topology's mesh and the run's abstract train state and frozen models (with the models
    the algorithm keeps resident beside the step), as the trainer would build them."""
    from alignjax import aot
    spec = aot.parse_topology(topology)
    progress(f"loading the TPU compiler (libtpu) for {spec.name}...")
    mesh = aot.topology_mesh(spec, dict(config.mesh))
    rules_ = rules(config)
    algo = registry.get(config.algorithm)
    settings = algo.settings(config)
    slots = algo.slots(config, settings)
    resident = algo.resident(config, settings) if algo.resident else []
    trainable, moving = slots_lib.trainable(slots), slots_lib.followers(slots)
    fixed = slots_lib.fixed(slots) + resident
    cfg = model_config(config)
    modules = {s.name: slots_lib.slot_module(cfg, s) for s in slots + resident}
    modules[trainable[0].name] = build_module(cfg, trainable[0].head)
    progress(f"building the abstract {algo.name} train state ({cfg.num_params():,} parameters "
             f"per model, {len(modules)} model(s): {', '.join(modules)}; nothing allocated)...")
    optimizer, schedules = slots_lib.slot_optimizer(config, trainable, int(config.train.steps))
    state, state_sh = state_shardings({s.name: modules[s.name] for s in trainable}, optimizer,
                                      mesh, rules_, {s.name: modules[s.name] for s in moving})
    frozen = {s.name: abstract_params(modules[s.name], mesh, rules_)[0] for s in fixed}
    return types.SimpleNamespace(
        spec=spec, mesh=mesh, rules=rules_, algo=algo, settings=settings, model_config=cfg,
        modules=modules,
        moving=moving, optimizer=optimizer, schedules=schedules, state=state, state_sh=state_sh,
        frozen=frozen, frozen_sh=jax.tree_util.tree_map(lambda x: x.sharding, frozen))


def compile_programs(config, topology: str, progress=None) -> list:
    """[(name, CompileReport)] of `config`'s programs on `topology` (e.g. "v5p-64"): the update
    step, and for online algorithms (PPO, GRPO) also the rollout.

    `progress(message)` is told as each stage starts (loading libtpu, lowering, compiling).
    """
    progress = progress or (lambda message: None)
    r = _abstract_run(config, topology, progress)
    reports = [("update step", _compile_update(config, r, progress))]
    if hasattr(r.settings, "rollout"):  # online RL: sampling and scoring, every model resident
        reports.append(("rollout (sampling + scoring)", _compile_rollout(r, progress)))
    return reports


def _compile_update(config, r, progress):
    from alignjax import aot
    sums_fn, metrics_fn = r.algo.sums(config, r.settings, r.modules)
    batch = r.algo.abstract_batch(config, r.settings)
    batch_sh = jax.tree_util.tree_map(lambda x: shd.batch_sharding(r.mesh, x.ndim, r.rules), batch)
    batch = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   batch, batch_sh)
    step = make_train_step(sums_fn, metrics_fn, r.optimizer, r.schedules,
                           int(config.train.grad_accum_steps), {s.name: s.follows for s in r.moving})
    with shd.mesh_context(r.mesh, r.rules):
        return aot.compile_report(step, (r.state, batch, r.frozen),
                                  in_shardings=(r.state_sh, batch_sh, r.frozen_sh),
                                  out_shardings=(r.state_sh, NamedSharding(r.mesh, P())),
                                  spec=r.spec, donate_argnums=(0,), progress=progress,
                                  keep_unused=True)


def _compile_rollout(r, progress):
    """One rollout batch (train.batch_size responses) sampled with the KV cache, then the policy
    / reference log-probs, the values and the reward models' scores, with the whole train state
    resident (the trainer runs the same pieces as separate programs: alignjax.train.rollout)."""
    from alignjax import aot
    from alignjax.train.rollout import response_values, rollout_program
    s = r.settings
    program = rollout_program(r.modules["policy"], r.modules.get("reference"), r.modules.get("value"),
                              s.rollout, r.model_config.eos_token_ids or (0,), 0)
    rewards = [name for name in r.frozen if name.startswith("reward")]

    def rollout(state, frozen, query, query_mask, rng):
        out = program(state, frozen, query, query_mask, rng)
        for name in rewards:  # the score is read at the last token of these per-token outputs
            out[name] = response_values(r.modules[name], frozen[name], out)
        return out

    sh = shd.batch_sharding(r.mesh, 2, r.rules)
    query = jax.ShapeDtypeStruct((s.rows, s.max_prompt_len), jnp.int32, sharding=sh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(r.mesh, P()))
    with shd.mesh_context(r.mesh, r.rules):
        return aot.compile_report(rollout, (r.state, r.frozen, query, query, rng),
                                  in_shardings=(r.state_sh, r.frozen_sh, sh, sh, rng.sharding),
                                  spec=r.spec, progress=progress, keep_unused=True)
