"""The one training loop: restore-or-init, jitted update with donated state, metrics, eval, checkpoints.

`train(config, workdir)` runs the configured algorithm (alignjax.train.registry). Its `build`
hands the loop an `Algorithm`: the sums function (see alignjax.train.step), its metrics, and where
batches come from — a grain iterator (offline: SFT, DPO, reward) or a producer that makes each
step's batch from the current state (online: rollouts). A loop step takes one batch and runs
`epochs` x `num_minibatches` updates on it (offline: 1 x 1). Everything else is shared.
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

from alignjax import fs
from alignjax import sharding as shd
from alignjax.checkpoint import Checkpointer, has_checkpoint
from alignjax.errors import UserError
from alignjax.model.store import MODEL_FILE
from alignjax.train import budget, gen_eval
from alignjax.train import slots as slots_lib
from alignjax.train.metrics import MetricsWriter, peak_flops
from alignjax.train.setup import Run
from alignjax.train.signals import StopOnSignal
from alignjax.train.state import init_state, state_shardings
from alignjax.train.step import make_eval_step, make_train_step

KILL_ENV = "ALIGNJAX_KILL_AFTER_STEP"  # tests: hard-exit right after the checkpoint of this step
STATE_LAYOUT = 2  # checkpoints' meta; 1 (absent) = the single-model state before named slots


class NonFiniteError(UserError):
    pass


@dataclasses.dataclass
class Algorithm:
    name: str
    sums_fn: Callable            # (params: {slot: tree}, batch, frozen: {slot: tree}) -> (objective_sum, sums)
    metrics_fn: Callable         # sums -> dict of scalars
    # Offline: a grain DatasetIterator of process-local batches. Online: the iterator the producer
    # reads (prompts), or None; either way its position is checkpointed.
    train_iterator: Any = None
    # Online: (state, frozen, step, rng) -> (numpy batch, metrics dict). It reads state["params"]
    # in place (no copy); rng is the run's key folded with the step. Its batch is the whole
    # global one, the same on every process (the processes sample together): minibatches are
    # cut from it as from one process's batch, then each process places its own rows.
    producer: Optional[Callable] = None
    epochs: int = 1              # passes over each batch
    num_minibatches: int = 1     # shuffled minibatches per pass (seeded by step and epoch)
    eval_iterator: Optional[Callable] = None   # () -> fresh iterator over the eval split, or None
    # Extra host state saved with every checkpoint and restored on resume (e.g. a KL controller):
    # an object with get_state() -> JSON-able dict and set_state(dict).
    host_state: Any = None


def to_global(batch: dict, mesh, rules) -> dict:
    """Process-local numpy batch -> global jax.Arrays sharded over the batch axis."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(shd.batch_sharding(mesh, x.ndim, rules), x)
    return jax.tree_util.tree_map(put, batch)


def minibatch_order(seed: int, step: int, epoch: int, rows: int) -> np.ndarray:
    """The row order of one pass over a step's batch (process-local offline, global online)."""
    return np.random.default_rng([seed, step, epoch]).permutation(rows)


def minibatches(batch: dict, step: int, seed: int, epochs: int, num_minibatches: int):
    """The epochs x num_minibatches minibatches of one step's batch."""
    rows = len(np.asarray(batch[next(iter(batch))]))
    if rows % num_minibatches:
        raise UserError(f"a batch of {rows} rows does not divide into "
                        f"{num_minibatches} minibatches; change the batch size or the minibatch count")
    size = rows // num_minibatches
    for epoch in range(epochs):
        order = minibatch_order(seed, step, epoch, rows) if epochs * num_minibatches > 1 else None
        for i in range(num_minibatches):
            if order is None:
                yield batch
            else:
                idx = order[i * size:(i + 1) * size]
                yield {k: np.asarray(v)[idx] for k, v in batch.items()}


def write_model_file(workdir: str, run: Run, slot: str, extra: Optional[dict] = None):
    """Makes the workdir itself loadable as a model: slot `slot` of its latest checkpoint."""
    if jax.process_index() != 0:
        return
    meta = {"format": 1, "head": run.module.head, "model": run.model_config.to_json_dict(),
            "params": "checkpoints", "slot": slot, **(extra or {})}
    fs.write_text(fs.join(workdir, MODEL_FILE), json.dumps(meta, indent=2))


def train(config, workdir: str, spec=None, settings=None) -> dict:
    """Builds the run for the configured algorithm (or `spec`) and trains it; `settings`: the
    algorithm's settings when validation parsed them already."""
    from alignjax.train import registry
    from alignjax.train.setup import build_run
    spec = spec or registry.get(config.algorithm)
    settings = spec.settings(config) if settings is None else settings
    head = slots_lib.trainable(spec.slots(config, settings))[0].head
    run = build_run(config, workdir, head=head)
    out = train_loop(config, workdir, run, spec, settings)
    if spec.finish is not None:
        spec.finish(config, workdir, out)
    if jax.process_index() == 0:
        write_plots(workdir)
    return out


def write_plots(workdir: str) -> list[str]:
    """WORKDIR/plots/*.png of the headline metrics; a plotting failure is reported, never fatal
    (the run itself is saved)."""
    from alignjax.eval.plots import plot_headline
    try:
        written = plot_headline(workdir)
    except Exception as e:  # noqa: BLE001 - matplotlib / a font cache: the run is already saved
        print(f"warning: could not write {workdir}/plots ({type(e).__name__}: {e})")
        return []
    if written:
        print(f"plots: {len(written)} PNG(s) in {fs.join(workdir, 'plots')}")
    return written


def train_loop(config, workdir: str, run: Run, spec, settings) -> dict:
    """Runs (or resumes) `config.train.steps` loop steps. Returns the last logged metrics."""
    slots = spec.slots(config, settings)
    trainable, moving, fixed = (slots_lib.trainable(slots), slots_lib.followers(slots),
                                slots_lib.fixed(slots))
    modules = {s.name: slots_lib.slot_module(run.model_config, s) for s in slots}
    modules[trainable[0].name] = run.module
    # A saved step means a resume (restore_newest below raises if none restores): then only the
    # frozen slots that never change are read from their sources.
    resuming = has_checkpoint(workdir)
    loader = slots_lib.SlotLoader(config, run, fixed + ([] if resuming else trainable + moving))
    algo = spec.build(config, workdir, run, settings, modules, loader)
    steps = budget.train_steps(config, algo)  # train.steps, or train.epochs over data.train
    updates = algo.epochs * algo.num_minibatches
    optimizer, schedules = slots_lib.slot_optimizer(config, trainable, steps * updates)
    abstract, shardings = state_shardings({s.name: modules[s.name] for s in trainable}, optimizer,
                                          run.mesh, run.rules, {s.name: modules[s.name] for s in moving})
    ckpt = Checkpointer(workdir, int(config.checkpoint.every), int(config.checkpoint.keep),
                        bool(config.checkpoint.async_save))
    generation_eval = gen_eval.build(config, workdir, run, trainable[0].head)
    try:
        return _run_steps(config, workdir, run, algo, slots, modules, loader, optimizer, schedules,
                          abstract, shardings, ckpt, generation_eval, steps)
    finally:
        ckpt.close()


def _run_steps(config, workdir, run, algo, slots, modules, loader, optimizer, schedules, abstract,
               shardings, ckpt, generation_eval=None, steps=None):
    t = config.train
    steps = int(t.steps) if steps is None else steps
    accum, seed = int(t.grad_accum_steps), int(t.seed)
    trainable, moving, fixed = (slots_lib.trainable(slots), slots_lib.followers(slots),
                                slots_lib.fixed(slots))
    latest, restored = ckpt.restore_newest(
        lambda s: _restore(ckpt, s, abstract, algo, trainable[0].name))
    if latest is None:
        params = {s.name: loader.load(s, modules[s.name]) for s in trainable}
        frozen_state = {s.name: loader.load(s, modules[s.name]) for s in moving}
        state = init_state(params, optimizer, shardings, seed, frozen_state)
        start = 0
    else:
        state, start = restored, int(latest)
        print(f"resuming {workdir} from step {start}")
    frozen = {s.name: loader.load(s, modules[s.name]) for s in fixed}
    write_model_file(workdir, run, trainable[0].name)

    replicated = NamedSharding(run.mesh, P())
    step_fn = jax.jit(make_train_step(algo.sums_fn, algo.metrics_fn, optimizer, schedules, accum,
                                      {s.name: s.follows for s in moving}),
                      out_shardings=(shardings, replicated), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(algo.sums_fn), out_shardings=replicated)

    writer = MetricsWriter(workdir, start, steps, desc=algo.name)
    peak, peak_source = peak_flops(run.model_config.dtype)  # all devices of the run together
    flops_per_token = run.model_config.flops_per_token(int(config.data.seq_len))
    # Every trainable model runs forward and backward; frozen ones forward only (about a third).
    flops_per_token *= len(trainable) + (len(fixed) + len(moving)) / 3
    log_every, eval_every = int(t.log_every), int(t.eval_every)
    policy = trainable[0].name
    last, compiles, tokens_since, clock = {}, None, 0, time.perf_counter()
    waited, steps_since = 0.0, 0  # data_wait: seconds getting each step's batch (incl. rollouts)
    try:
        with shd.mesh_context(run.mesh, run.rules), StopOnSignal() as stop:
            if algo.eval_iterator and start == 0 and t.eval_on_start:
                last = evaluate(eval_fn, state, frozen, algo, run, config)  # the starting model
            if generation_eval is not None:  # the starting model's responses (read back on resume)
                last.update(generation_eval.start(state["params"][policy], resuming=start > 0))
            if last:
                writer.write(0, last)
                clock = time.perf_counter()
            for step in range(start + 1, steps + 1):
                wait_start = time.perf_counter()
                if algo.producer is not None:
                    rng = jax.random.fold_in(state["rng"], step)
                    batch, produced = algo.producer(state, frozen, step, rng)  # global
                    tokens_since += _batch_tokens(batch) * algo.epochs
                else:
                    batch, produced = next(algo.train_iterator), {}  # process-local
                    tokens_since += _batch_tokens(batch) * algo.epochs * jax.process_count()
                waited, steps_since = waited + time.perf_counter() - wait_start, steps_since + 1
                step_metrics = []
                for mb in minibatches(batch, step, seed, algo.epochs, algo.num_minibatches):
                    if algo.producer is not None:  # a global minibatch: this process's rows of it
                        own = shd.process_rows(len(next(iter(mb.values()))), run.mesh, run.rules)
                        mb = {k: v[own] for k, v in mb.items()}
                    state, metrics = step_fn(state, to_global(mb, run.mesh, run.rules), frozen)
                    step_metrics.append(metrics)
                    if compiles is None:
                        compiles = step_fn._cache_size()
                    elif step_fn._cache_size() != compiles:
                        raise RuntimeError("the train step recompiled inside the loop (a batch changed "
                                           "shape or dtype); this is a bug, please report it")
                row = {}
                if step % log_every == 0 or step == steps:
                    got = jax.device_get(step_metrics)  # the mean over the step's updates
                    row = {k: float(np.mean([m[k] for m in got])) for k in got[0]}
                    row.update({k: float(v) for k, v in jax.device_get(produced).items()})
                    _check_finite(row, step, config, ckpt)
                    elapsed, clock = time.perf_counter() - clock, time.perf_counter()
                    tps, tokens_since = tokens_since / elapsed, 0
                    row.update(tokens_per_s=tps, mfu=tps * flops_per_token / peak,
                               data_wait=waited / steps_since, **data_metrics(algo.train_iterator))
                    waited, steps_since = 0.0, 0
                if algo.eval_iterator and (step == steps or (eval_every and step % eval_every == 0)):
                    row.update(evaluate(eval_fn, state, frozen, algo, run, config))
                    clock = time.perf_counter()  # eval time is not training throughput
                if step == steps and hasattr(algo.producer, "final_eval"):  # online: the trained model
                    row.update(algo.producer.final_eval(state, step))
                    clock = time.perf_counter()
                if generation_eval is not None and generation_eval.due(step, steps):
                    row.update(generation_eval(state["params"][policy], step))
                    clock = time.perf_counter()
                if row:
                    last.update(row)
                    writer.write(step, row)
                writer.advance()
                _save(ckpt, step, state, algo, config, peak_source, force=step == steps)
                if os.environ.get(KILL_ENV) == str(step):
                    ckpt.wait()
                    os._exit(3)  # simulate a preempted host: no cleanup, no final save
                if stop.signum and step < steps:  # Ctrl-C / preemption: save where we are
                    ckpt.wait()
                    if ckpt.latest_step() != step:
                        _save(ckpt, step, state, algo, config, peak_source, force=True)
                        ckpt.wait()
                    stop.stop(f"at step {step}: saved checkpoint {step} in {workdir}; run the "
                              "same command to resume")
    finally:
        writer.close()
    return {"state": state, "metrics": last}


def _batch_tokens(batch: dict) -> int:
    """Token positions a batch trains on: "tokens" offline; query + response of an online one."""
    keys = ("tokens",) if "tokens" in batch else ("query", "response")
    return sum(np.asarray(batch[k]).size for k in keys if k in batch)


def _save(ckpt, step, state, algo: Algorithm, config, peak_source, force: bool):
    meta = {"step": step, "algorithm": algo.name, "state_layout": STATE_LAYOUT,
            "config": json.loads(config.to_json_best_effort()), "peak_flops_source": peak_source}
    host = algo.host_state.get_state() if algo.host_state is not None else None
    ckpt.save(step, state, algo.train_iterator, meta, force=force, host=host)


def _restore(ckpt: Checkpointer, step: int, abstract, algo: Algorithm, slot: str):
    """The state of checkpoint `step` (and the iterator and host state, in place). A checkpoint
    written before named slots (one "params" tree) is read into slot `slot`."""
    layout = ckpt.restore_meta(step).get("state_layout", 1)
    if layout == 1:
        legacy = {"step": abstract["step"], "params": abstract["params"][slot],
                  "opt_state": abstract["opt_state"][slot], "rng": abstract["rng"]}
        if abstract["frozen"]:
            legacy["ref_params"] = next(iter(abstract["frozen"].values()))
        old, _ = ckpt.restore(step, legacy, algo.train_iterator)
        frozen = {k: old["ref_params"] for k in abstract["frozen"]}
        return {"step": old["step"], "params": {slot: old["params"]},
                "opt_state": {slot: old["opt_state"]}, "frozen": frozen, "rng": old["rng"]}
    out = ckpt.restore(step, abstract, algo.train_iterator, host=algo.host_state is not None)
    if algo.host_state is not None:
        algo.host_state.set_state(out[2])
    return out[0]


def evaluate(eval_fn, state, frozen: dict, algo: Algorithm, run: Run, config) -> dict:
    """One pass over the eval split (at most `train.eval_batches` batches) -> eval/... metrics.
    Several eval sources (a dict of iterators, alignjax.train.data_split): each is evaluated on
    its own (`eval/<source>/...`, at most eval_batches each) and eval/... pools their sums."""
    limit = int(config.train.eval_batches)
    frozen = {**frozen, **state["frozen"]}
    makers = algo.eval_iterator if isinstance(algo.eval_iterator, dict) else {"": algo.eval_iterator}
    out, pooled = {}, None
    for name, make in makers.items():
        total = None
        for i, local in enumerate(make()):
            if limit and i >= limit:
                break
            sums = jax.device_get(eval_fn(state["params"], to_global(local, run.mesh, run.rules),
                                          frozen))
            total = sums if total is None else jax.tree_util.tree_map(np.add, total, sums)
        if total is None:
            continue
        pooled = total if pooled is None else jax.tree_util.tree_map(np.add, pooled, total)
        if name:
            out.update({f"eval/{name}/{k}": float(v) for k, v in algo.metrics_fn(total).items()})
    if pooled is None:
        return {}
    return {**{f"eval/{k}": float(v) for k, v in algo.metrics_fn(pooled).items()}, **out}


def data_metrics(iterator) -> dict:
    """data/drawn/<source>: records drawn from each source of a mixture so far, read from the
    iterator's position (alignjax.data.mixture.DrawCounts)."""
    while iterator is not None and not hasattr(iterator, "sft_stats") and not hasattr(
            iterator, "pref_stats"):
        iterator = getattr(iterator, "iterator", None)  # e.g. dpo.WithReference
    stats = getattr(iterator, "sft_stats", None) or getattr(iterator, "pref_stats", None)
    drawn = getattr(stats, "drawn", None)
    if drawn is None:
        return {}
    return {f"data/drawn/{k}": float(v) for k, v in drawn.as_dict(iterator.get_state()).items()}


def _check_finite(metrics: dict, step: int, config, ckpt: Checkpointer):
    if not config.train.nan_guard:
        return
    bad = [k for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])]
    if bad:
        last = ckpt.latest_step()
        raise NonFiniteError(
            f"non-finite {', '.join(bad)} at step {step} ({ {k: metrics[k] for k in bad} }); stopped "
            f"without saving it. Last good checkpoint: step {last}. Lower optimizer.lr, raise "
            "optimizer.warmup_steps or set optimizer.grad_clip, then run the same command again")
