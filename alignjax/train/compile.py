"""`alignjax compile`: the real sharded train step, compiled ahead of time for a TPU topology.

Runs on a CPU host with libtpu installed (no TPU needed): it builds abstract inputs only (no
parameter is allocated), lowers the same jitted update the trainer runs (the algorithm's slots,
sums function and batch from alignjax.train.registry), and reads per-chip memory and FLOPs from
the compiled program.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from alignjax import sharding as shd
from alignjax.model.params import abstract_params, build_module
from alignjax.train import registry, slots as slots_lib
from alignjax.train.setup import model_config, rules
from alignjax.train.state import state_shardings
from alignjax.train.step import make_train_step


def compile_train_step(config, topology: str, progress=None):
    """CompileReport (alignjax.aot) of `config`'s train step on `topology` (e.g. "v5p-64").

    `progress(message)` is told as each stage starts (loading libtpu, lowering, compiling).
    """
    from alignjax import aot
    progress = progress or (lambda message: None)
    spec = aot.parse_topology(topology)
    progress(f"loading the TPU compiler (libtpu) for {spec.name}...")
    mesh = aot.topology_mesh(spec, dict(config.mesh))
    rules_ = rules(config)
    algo = registry.get(config.algorithm)
    settings = algo.settings(config)
    slots = algo.slots(config, settings)
    trainable, moving, fixed = (slots_lib.trainable(slots), slots_lib.followers(slots),
                                slots_lib.fixed(slots))
    cfg = model_config(config)
    modules = {s.name: slots_lib.slot_module(cfg, s) for s in slots}
    modules[trainable[0].name] = build_module(cfg, trainable[0].head)
    progress(f"building the abstract {algo.name} train state ({cfg.num_params():,} parameters "
             f"per model, {len(slots)} model(s): {', '.join(modules)}; nothing allocated)...")
    optimizer, schedules = slots_lib.slot_optimizer(config, trainable, int(config.train.steps))
    abstract_state, state_sh = state_shardings({s.name: modules[s.name] for s in trainable},
                                               optimizer, mesh, rules_,
                                               {s.name: modules[s.name] for s in moving})
    frozen = {s.name: abstract_params(modules[s.name], mesh, rules_)[0] for s in fixed}
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    sums_fn, metrics_fn = algo.sums(config, settings, modules)
    batch = algo.abstract_batch(config, settings)
    batch_sh = jax.tree_util.tree_map(lambda x: shd.batch_sharding(mesh, x.ndim, rules_), batch)
    batch = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   batch, batch_sh)
    step = make_train_step(sums_fn, metrics_fn, optimizer, schedules,
                           int(config.train.grad_accum_steps), {s.name: s.follows for s in moving})
    with shd.mesh_context(mesh, rules_):
        return aot.compile_report(step, (abstract_state, batch, frozen),
                                  in_shardings=(state_sh, batch_sh, frozen_sh),
                                  out_shardings=(state_sh, NamedSharding(mesh, P())),
                                  spec=spec, donate_argnums=(0,), progress=progress)
