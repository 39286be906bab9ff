"""One optimizer update for any algorithm: gradient accumulation as a scan inside the jitted step.

An algorithm supplies `sums_fn(params, micro_batch, frozen) -> (objective_sum, sums)`: `params` is
the {slot: tree} dict of the trainable slots (gradients are taken w.r.t. all of it), `frozen` the
{slot: tree} dict of the frozen ones, and `sums["count"]` what the objective is normalised by
(target tokens for SFT, pairs for DPO). Gradients and sums are added over micro-batches and divided
once by the step's total count, so 4 micro-batches give exactly the update of one batch 4x the size.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


def split_microbatches(batch, num_micro: int):
    """[B, ...] -> [A, B/A, ...]; micro-batch a takes rows a, a+A, ... so each device keeps its share."""

    def split(x):
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree_util.tree_map(split, batch)


def accumulate(sums_fn: Callable, params, batch, num_micro: int, frozen: dict):
    """(grads_sum, sums) over the micro-batches of `batch` (unnormalised)."""
    grad_fn = jax.value_and_grad(sums_fn, has_aux=True)
    if num_micro == 1:
        (objective, sums), grads = grad_fn(params, batch, frozen)
        return grads, {**sums, "objective": objective}
    micro = split_microbatches(batch, num_micro)

    def body(acc, mb):
        (objective, sums), grads = grad_fn(params, mb, frozen)
        return jax.tree_util.tree_map(jnp.add, acc, (grads, {**sums, "objective": objective})), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: {**sums_fn(params, first, frozen)[1], "objective": jnp.float32(0)})
    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
             jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    return grads, sums


def make_train_step(sums_fn: Callable, metrics_fn: Callable, optimizer: optax.GradientTransformation,
                    schedules: dict, num_micro: int = 1, follows: dict | None = None):
    """step(state, batch, frozen) -> (state, metrics); metrics_fn(sums) -> dict of scalars.

    `schedules`: {slot: lr schedule} of the trainable slots (the first is reported as `lr`, others
    as `lr/<slot>`). `follows`: {frozen slot held in state["frozen"]: slots.Follow}; such a slot
    is handed to sums_fn with the other frozen ones and moves toward its trainable slot every
    `every` updates (TR-DPO's reference refresh).
    """
    follows = follows or {}

    def step(state, batch, frozen):
        frozen = {**frozen, **state["frozen"]}
        grads, sums = accumulate(sums_fn, state["params"], batch, num_micro, frozen)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics_fn(sums), grad_norm=optax.tree.norm(grads))
        for i, (name, schedule) in enumerate(schedules.items()):
            metrics["lr" if i == 0 else f"lr/{name}"] = schedule(state["step"])
            if len(schedules) > 1:
                metrics[f"grad_norm/{name}"] = optax.tree.norm(grads[name])
        new_step = state["step"] + 1
        moved = {name: _refresh(f, new_step, params[f.slot], state["frozen"][name])
                 for name, f in follows.items()}
        new_state = dict(state, step=new_step, params=params, opt_state=opt_state,
                         frozen={**state["frozen"], **moved})
        return new_state, metrics

    return step


def _refresh(follow, step, new, old):
    """optax.periodic_update of the lerp, with the lerp inside the branch (no full-size temporary
    on the steps that keep the old tree)."""
    if follow.every <= 0:
        return old
    return jax.lax.cond(step % follow.every == 0, lambda: tree_lerp(follow.alpha, new, old),
                        lambda: old)


def tree_lerp(alpha, new, old):
    """alpha * new + (1 - alpha) * old, leaf by leaf, in old's dtypes (TR-DPO's refresh)."""
    return jax.tree_util.tree_map(lambda n, o: (alpha * n + (1 - alpha) * o).astype(o.dtype), new, old)


def make_eval_step(sums_fn: Callable):
    """eval(params, batch, frozen) -> sums (add over batches, then apply the metrics_fn)."""

    def evaluate(params, batch, frozen):
        objective, sums = sums_fn(params, batch, frozen)
        return {**sums, "objective": objective}

    return evaluate
