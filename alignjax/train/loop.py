"""The one training loop: restore-or-init, jitted step with donated state, metrics, eval, checkpoints.

Each algorithm hands the loop an `Algorithm`: its sums function (see alignjax.train.step), its
metrics, its data iterators and any frozen models. Everything else is shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from alignjax import sharding as shd
from alignjax.checkpoint import Checkpointer
from alignjax.errors import UserError
from alignjax.model.store import MODEL_FILE
from alignjax.train.metrics import MetricsWriter, peak_flops
from alignjax.train.optim import make_optimizer
from alignjax.train.setup import Run, initial_params
from alignjax.train.signals import StopOnSignal
from alignjax.train.state import init_state, state_shardings
from alignjax.train.step import make_eval_step, make_train_step

KILL_ENV = "ALIGNJAX_KILL_AFTER_STEP"  # tests: hard-exit right after the checkpoint of this step


class NonFiniteError(UserError):
    pass


@dataclasses.dataclass
class Algorithm:
    name: str
    sums_fn: Callable            # (params, batch, *frozen) -> (objective_sum, sums)
    metrics_fn: Callable         # sums -> dict of scalars
    train_iterator: Any          # grain DatasetIterator of process-local batches
    eval_iterator: Optional[Callable] = None   # () -> fresh iterator over the eval split, or None
    frozen: tuple = ()           # frozen models' params (reference, reward), not trained
    # A reference that training refreshes (TR-DPO) lives in the train state instead: its initial
    # params, its module, and (every, alpha) of ref <- alpha * policy + (1 - alpha) * ref.
    reference: Any = None
    ref_module: Any = None
    ref_refresh: tuple = (0, 1.0)
    tokens_per_example: Optional[Callable] = None  # batch -> number of tokens processed
    extra_meta: dict = dataclasses.field(default_factory=dict)


def to_global(batch: dict, mesh, rules) -> dict:
    """Process-local numpy batch -> global jax.Arrays sharded over the batch axis."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(shd.batch_sharding(mesh, x.ndim, rules), x)
    return jax.tree_util.tree_map(put, batch)


def write_model_file(workdir: str, run: Run, extra: Optional[dict] = None):
    """Makes the workdir itself loadable as a model (params from its latest checkpoint)."""
    if jax.process_index() != 0:
        return
    meta = {"format": 1, "head": run.module.head, "model": run.model_config.to_json_dict(),
            "params": "checkpoints", **(extra or {})}
    with open(os.path.join(workdir, MODEL_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def train_loop(config, workdir: str, run: Run, algo: Algorithm) -> dict:
    """Runs (or resumes) `config.train.steps` optimizer steps. Returns the last logged metrics."""
    t = config.train
    steps, accum = int(t.steps), int(t.get("grad_accum_steps", 1))
    optimizer, schedule = make_optimizer(config.optimizer, steps)
    abstract, shardings = state_shardings(run.module, optimizer, run.mesh, run.rules,
                                          algo.ref_module if algo.reference is not None else None)
    ckpt = Checkpointer(workdir, int(config.checkpoint.every), int(config.checkpoint.keep),
                        bool(config.checkpoint.async_save))
    latest, restored = ckpt.restore_newest(lambda s: ckpt.restore(s, abstract, algo.train_iterator))
    if latest is None:
        state = init_state(initial_params(config, run.module, run.mesh, run.rules), optimizer,
                           shardings, int(t.seed), algo.reference)
        start = 0
    else:
        state, _ = restored
        start = int(latest)
        print(f"resuming {workdir} from step {start}")
    if algo.reference is not None:  # the state holds (or restored) its own copy
        jax.tree_util.tree_map(lambda x: x.delete(), algo.reference)
        algo.reference = None
    write_model_file(workdir, run, algo.extra_meta)

    replicated = NamedSharding(run.mesh, P())
    step_fn = jax.jit(make_train_step(algo.sums_fn, algo.metrics_fn, optimizer, schedule, accum,
                                      algo.ref_refresh),
                      out_shardings=(shardings, replicated), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(algo.sums_fn), out_shardings=replicated)

    writer = MetricsWriter(workdir, start, steps, desc=algo.name)
    peak, peak_source = peak_flops(run.model_config.dtype)  # all devices of the run together
    flops_per_token = run.model_config.flops_per_token(int(config.data.seq_len))
    forward_only = len(algo.frozen) + ("ref_params" in state)
    if forward_only:  # frozen models run forward only: about a third of a training token each
        flops_per_token *= 1 + forward_only / 3
    log_every, eval_every = int(t.log_every), int(t.get("eval_every", 0) or 0)
    last, compiles, tokens_since, clock = {}, None, 0, time.perf_counter()
    waited, steps_since = 0.0, 0  # data_wait: seconds in next(train_iterator) per step
    try:
        with shd.mesh_context(run.mesh, run.rules), StopOnSignal() as stop:
            if algo.eval_iterator and start == 0 and t.get("eval_on_start", False):
                last = evaluate(eval_fn, state, algo, run, config)  # the starting model, as step 0
                writer.write(0, last)
                clock = time.perf_counter()
            for step in range(start + 1, steps + 1):
                wait_start = time.perf_counter()
                local = next(algo.train_iterator)
                waited, steps_since = waited + time.perf_counter() - wait_start, steps_since + 1
                tokens_since += _count_tokens(local, algo) * jax.process_count()
                state, metrics = step_fn(state, to_global(local, run.mesh, run.rules), *algo.frozen)
                if compiles is None:
                    compiles = step_fn._cache_size()
                elif step_fn._cache_size() != compiles:
                    raise RuntimeError("the train step recompiled inside the loop (a batch changed "
                                       "shape or dtype); this is a bug, please report it")
                row = {}
                if step % log_every == 0 or step == steps:
                    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    _check_finite(row, step, config, ckpt)
                    elapsed, clock = time.perf_counter() - clock, time.perf_counter()
                    tps, tokens_since = tokens_since / elapsed, 0
                    row.update(tokens_per_s=tps, mfu=tps * flops_per_token / peak,
                               data_wait=waited / steps_since)
                    waited, steps_since = 0.0, 0
                if algo.eval_iterator and (step == steps or (eval_every and step % eval_every == 0)):
                    row.update(evaluate(eval_fn, state, algo, run, config))
                    clock = time.perf_counter()  # eval time is not training throughput
                if row:
                    last.update(row)
                    writer.write(step, row)
                writer.advance()
                ckpt.save(step, state, algo.train_iterator, _meta(config, step, peak_source, algo),
                          force=step == steps)
                if os.environ.get(KILL_ENV) == str(step):
                    ckpt.wait()
                    os._exit(3)  # simulate a preempted host: no cleanup, no final save
                if stop.signum and step < steps:  # Ctrl-C / preemption: save where we are
                    ckpt.wait()
                    if ckpt.latest_step() != step:
                        ckpt.save(step, state, algo.train_iterator,
                                  _meta(config, step, peak_source, algo), force=True)
                        ckpt.wait()
                    stop.stop(f"at step {step}: saved checkpoint {step} in {workdir}; run the "
                              "same command to resume")
    finally:
        writer.close()
        ckpt.close()
    return {"state": state, "metrics": last}


def evaluate(eval_fn, state, algo: Algorithm, run: Run, config) -> dict:
    """One pass over the eval split (at most `train.eval_batches` batches) -> eval/... metrics."""
    limit = int(config.train.get("eval_batches", 0) or 0)
    frozen = ((state["ref_params"],) if "ref_params" in state else ()) + tuple(algo.frozen)
    total = None
    for i, local in enumerate(algo.eval_iterator()):
        if limit and i >= limit:
            break
        sums = jax.device_get(eval_fn(state["params"], to_global(local, run.mesh, run.rules), *frozen))
        total = sums if total is None else jax.tree_util.tree_map(np.add, total, sums)
    if total is None:
        return {}
    return {f"eval/{k}": float(v) for k, v in algo.metrics_fn(total).items()}


def _count_tokens(batch, algo: Algorithm) -> int:
    if algo.tokens_per_example is not None:
        return int(algo.tokens_per_example(batch))
    return int(np.asarray(batch["tokens"]).size)


def _meta(config, step, peak_source, algo: Algorithm) -> dict:
    return {"step": step, "algorithm": algo.name, "config": json.loads(config.to_json_best_effort()),
            "peak_flops_source": peak_source, **algo.extra_meta}


def _check_finite(metrics: dict, step: int, config, ckpt: Checkpointer):
    if not config.train.get("nan_guard", True):
        return
    bad = [k for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])]
    if bad:
        last = ckpt.latest_step()
        raise NonFiniteError(
            f"non-finite {', '.join(bad)} at step {step} ({ {k: metrics[k] for k in bad} }); stopped "
            f"without saving it. Last good checkpoint: step {last}. Lower optimizer.lr, raise "
            "optimizer.warmup_steps or set optimizer.grad_clip, then run the same command again")
