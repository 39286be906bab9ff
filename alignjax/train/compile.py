"""`alignjax compile`: the real sharded train step, compiled ahead of time for a TPU topology.

Runs on a CPU host with libtpu installed (no TPU needed): it builds abstract inputs only (no
parameter is allocated), lowers the same jitted step the trainer runs, and reads per-chip memory
and FLOPs from the compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from alignjax import sharding as shd
from alignjax.model.params import build_module
from alignjax.train.optim import make_optimizer
from alignjax.train.setup import model_config, rules
from alignjax.train.state import state_shardings
from alignjax.train.step import make_train_step

# Algorithm -> (head, batch layout builder, sums_fn builder, metrics_fn). Extended by later trainers.
STEP_BUILDERS = {}


def register(name):
    def deco(fn):
        STEP_BUILDERS[name] = fn
        return fn
    return deco


def token_batch(batch: int, seq_len: int) -> dict:
    i32 = jnp.int32
    return {k: jax.ShapeDtypeStruct((batch, seq_len), i32)
            for k in ("tokens", "positions", "segment_ids", "targets")} | {
        "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)}


@register("sft")
def _sft(config, module, mesh, rules_):
    from alignjax.train import sft
    batch = token_batch(int(config.train.batch_size), int(config.data.seq_len))
    return sft.make_sums_fn(module), sft.metrics, batch, ()


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
    algo = config.get("algorithm", "sft")
    if algo not in STEP_BUILDERS:
        raise ValueError(f"alignjax compile: algorithm {algo!r} has no step builder yet")
    module = build_module(model_config(config), "scalar" if algo == "reward" else "lm")
    progress(f"building the abstract {algo} train state ({module.config.num_params():,} "
             "parameters, nothing allocated)...")
    optimizer, schedule = make_optimizer(config.optimizer, int(config.train.steps))
    abstract_state, state_sh = state_shardings(module, optimizer, mesh, rules_)
    sums_fn, metrics_fn, batch, frozen = STEP_BUILDERS[algo](config, module, mesh, rules_)
    batch_sh = jax.tree_util.tree_map(lambda x: shd.batch_sharding(mesh, x.ndim, rules_), batch)
    batch = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   batch, batch_sh)
    refresh = (0, 1.0)
    if algo == "dpo":
        from alignjax.train.dpo import refresh_settings
        refresh = refresh_settings(config.dpo)
    if refresh[0] and frozen:  # TR-DPO: the refreshed reference lives in the state, as in training
        abstract_state = dict(abstract_state, ref_params=frozen[0])
        state_sh = dict(state_sh, ref_params=jax.tree_util.tree_map(lambda x: x.sharding, frozen[0]))
        frozen = ()
    step = make_train_step(sums_fn, metrics_fn, optimizer, schedule,
                           int(config.train.get("grad_accum_steps", 1)), refresh)
    frozen_sh = tuple(jax.tree_util.tree_map(lambda x: x.sharding, f) for f in frozen)
    with shd.mesh_context(mesh, rules_):
        return aot.compile_report(step, (abstract_state, batch) + tuple(frozen),
                                  in_shardings=(state_sh, batch_sh) + frozen_sh,
                                  out_shardings=(state_sh, NamedSharding(mesh, P())),
                                  spec=spec, donate_argnums=(0,), progress=progress)


def grouped_batch(batch: int, k: int, seq_len: int) -> dict:
    """Abstract preference batch [B, K, T] (see alignjax.data.preference)."""
    seq = {key: jax.ShapeDtypeStruct((batch, k, seq_len), jnp.int32)
           for key in ("tokens", "positions", "segment_ids", "targets")}
    return seq | {"loss_mask": jax.ShapeDtypeStruct((batch, k, seq_len), jnp.float32),
                  "valid": jax.ShapeDtypeStruct((batch, k), jnp.bool_),
                  "scores": jax.ShapeDtypeStruct((batch, k), jnp.float32),
                  "margin": jax.ShapeDtypeStruct((batch,), jnp.float32),
                  "label": jax.ShapeDtypeStruct((batch,), jnp.float32),
                  "example_valid": jax.ShapeDtypeStruct((batch,), jnp.bool_)}


@register("reward")
def _reward(config, module, mesh, rules_):
    from alignjax.train import reward
    batch = grouped_batch(int(config.train.batch_size), 2, int(config.data.seq_len))
    return reward.make_sums_fn(module, float(config.reward.center_coef)), reward.metrics, batch, ()


@register("dpo")
def _dpo(config, module, mesh, rules_):
    """The DPO step with its colocated reference (frozen params in dpo.ref_dtype) as an argument."""
    from alignjax.model.params import abstract_params
    from alignjax.train import dpo
    kind = dpo.data_kind(config.dpo.loss_type)
    k = int(config.data.get("num_responses", 4)) if kind == "ranked" else 2
    batch = grouped_batch(int(config.train.batch_size), k, int(config.data.seq_len))
    ref_module, frozen = None, ()
    precomputed = config.dpo.reference == "precomputed"
    if dpo.needs_reference(config.dpo.loss_type):
        ref_cfg = module.config.replace(dtype=config.dpo.ref_dtype, param_dtype=config.dpo.ref_dtype)
        ref_module = build_module(ref_cfg)
        if precomputed:
            batch["ref_logps"] = jax.ShapeDtypeStruct((int(config.train.batch_size), k), jnp.float32)
        else:
            frozen = (abstract_params(ref_module, mesh, rules_)[0],)
    return dpo.make_sums_fn(module, ref_module, config.dpo, precomputed), dpo.metrics, batch, frozen
