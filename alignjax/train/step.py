"""One optimizer step for any algorithm: gradient accumulation as a scan inside the jitted step.

An algorithm supplies `sums_fn(params, micro_batch, *frozen) -> (objective_sum, sums)` where
`sums["count"]` is what the objective is normalised by (target tokens for SFT, pairs for DPO).
Gradients and sums are added over micro-batches and divided once by the step's total count, so
4 micro-batches give exactly the update of one batch 4x the size.
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


def accumulate(sums_fn: Callable, params, batch, num_micro: int, *frozen):
    """(grads_sum, sums) over the micro-batches of `batch` (unnormalised)."""
    grad_fn = jax.value_and_grad(sums_fn, has_aux=True)
    if num_micro == 1:
        (objective, sums), grads = grad_fn(params, batch, *frozen)
        return grads, {**sums, "objective": objective}
    micro = split_microbatches(batch, num_micro)

    def body(acc, mb):
        (objective, sums), grads = grad_fn(params, mb, *frozen)
        return jax.tree_util.tree_map(jnp.add, acc, (grads, {**sums, "objective": objective})), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    zeros = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(lambda: (params, {**sums_fn(params, first, *frozen)[1],
                                                          "objective": jnp.float32(0)})))
    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params), zeros[1])
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    return grads, sums


def make_train_step(sums_fn: Callable, metrics_fn: Callable, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, num_micro: int = 1, ref_refresh: tuple = (0, 1.0)):
    """step(state, batch, *frozen) -> (state, metrics); metrics_fn(sums) -> dict of scalars.

    A state holding "ref_params" passes them to sums_fn before `frozen`; with
    ref_refresh=(every, alpha), every `every` steps they become alpha * params + (1 - alpha) *
    ref_params (TR-DPO).
    """
    every, alpha = int(ref_refresh[0]), float(ref_refresh[1])

    def step(state, batch, *frozen):
        if "ref_params" in state:
            frozen = (state["ref_params"],) + frozen
        grads, sums = accumulate(sums_fn, state["params"], batch, num_micro, *frozen)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics_fn(sums), grad_norm=optax.tree.norm(grads),
                       lr=schedule(state["step"]))
        new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        if "ref_params" in state and every > 0:
            new_state["ref_params"] = jax.lax.cond(
                new_state["step"] % every == 0, lambda: tree_lerp(alpha, params, state["ref_params"]),
                lambda: state["ref_params"])
        return new_state, metrics

    return step


def tree_lerp(alpha, new, old):
    """alpha * new + (1 - alpha) * old, leaf by leaf, in old's dtypes (TR-DPO's refresh)."""
    return jax.tree_util.tree_map(lambda n, o: (alpha * n + (1 - alpha) * o).astype(o.dtype), new, old)


def make_eval_step(sums_fn: Callable):
    """eval(params, batch, *frozen) -> sums (add over batches, then apply the metrics_fn)."""

    def evaluate(params, batch, *frozen):
        objective, sums = sums_fn(params, batch, *frozen)
        return {**sums, "objective": objective}

    return evaluate
