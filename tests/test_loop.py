"""The loop's online seam without PPO: SFT wrapped as a producer, several updates per batch."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from alignjax import sharding as shd
from alignjax.config import load_config
from alignjax.model.params import init_params
from alignjax.train import loop, registry
from alignjax.train.optim import make_optimizer
from alignjax.train.setup import build_run

EPOCHS, MINIBATCHES = 2, 2
OVERRIDES = ["train.batch_size=16", "data.seq_len=48", "data.eval=", "train.log_every=1",
             "train.eval_every=0", "checkpoint.every=1", "checkpoint.async_save=False",
             "optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.lr=3e-3",
             "model.num_hidden_layers=1"]


class Episodes:
    """Host state of the producer: batches produced so far (checkpointed by the loop)."""

    def __init__(self):
        self.n = 0

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def online_sft():
    """The SFT algorithm with its batches handed out by a producer (as rollouts would be)."""
    base = registry.get("sft")

    def build(config, workdir, run, settings, modules, loader):
        algo = base.build(config, workdir, run, settings, modules, loader)
        it, host = algo.train_iterator, Episodes()

        def producer(state, frozen, step, rng):
            host.n += 1
            return next(it), {"episode": host.n}

        return dataclasses.replace(algo, producer=producer, epochs=EPOCHS, num_minibatches=MINIBATCHES,
                                   host_state=host)

    return dataclasses.replace(base, name="sft_online", build=build)


def _config(steps):
    return load_config("configs/sft.py:tiny", OVERRIDES + [f"train.steps={steps}"])


def _run(workdir, steps):
    out = loop.train(_config(steps), str(workdir), online_sft())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return jax.device_get(out["state"]["params"]["policy"]), {r["step"]: r for r in rows}


def _by_hand(workdir, steps):
    """The same updates written out: for each batch, EPOCHS passes over MINIBATCHES shuffled
    minibatches, one plain optax update each (no make_train_step, no loop)."""
    from alignjax.train import sft
    config = _config(steps)
    run = build_run(config, str(workdir))
    it = registry.get("sft").build(config, str(workdir), run, None, {"policy": run.module}, None).train_iterator
    tx, _ = make_optimizer(config.optimizer, steps * EPOCHS * MINIBATCHES)
    params = init_params(run.module, jax.random.PRNGKey(int(config.train.seed)), run.mesh, run.rules)
    opt_state = tx.init(params)
    sums_fn = sft.make_sums_fn(run.module)

    @jax.jit
    def update(params, opt_state, mb):
        def loss(p):
            nll, sums = sums_fn({"policy": p}, mb)
            return nll / sums["count"]
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = {}
    with shd.mesh_context(run.mesh, run.rules):
        for step in range(1, steps + 1):
            batch = next(it)
            rows = len(batch["tokens"])
            seen = []
            for epoch in range(EPOCHS):
                order = np.random.default_rng([int(config.train.seed), step, epoch]).permutation(rows)
                for part in np.split(order, MINIBATCHES):
                    mb = loop.to_global({k: v[part] for k, v in batch.items()}, run.mesh, run.rules)
                    params, opt_state, value = update(params, opt_state, mb)
                    seen.append(float(value))
            losses[step] = np.mean(seen)
    return jax.device_get(params), losses


@pytest.mark.slow  # several short training runs
def test_producer_epochs_minibatches_equal_updates_by_hand_and_resume_exactly(tmp_path):
    """Two loop steps of 2 epochs x 2 minibatches, stopped after step 1 and resumed, end where 8
    plain updates by hand do: the minibatches, their order, the optimizer state, the data position
    and the producer's host state all survive the restart."""
    _run(tmp_path / "run", 1)  # stops after step 1 (checkpointed)
    resumed, rows = _run(tmp_path / "run", 2)
    hand, hand_losses = _by_hand(tmp_path / "hand", 2)
    # Adam turns float-rounding differences of near-zero gradients into ~1e-5 weight differences
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(hand)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for step in (1, 2):  # the logged loss is the mean over the step's 4 updates
        np.testing.assert_allclose(rows[step]["loss"], hand_losses[step], rtol=1e-5)
    assert [rows[s]["episode"] for s in (1, 2)] == [1, 2]  # the host state came back


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_checkpoints_from_before_slots_still_load_as_models(tmp_path):
    """A workdir trained before named slots (state["params"] was the model) loads as a model
    (model.init_from), whether or not its alignjax_model.json has been rewritten with a slot."""
    from alignjax.checkpoint import Checkpointer
    from alignjax.model.config import LlamaConfig
    from alignjax.model.params import build_module
    from alignjax.model.store import MODEL_FILE, load_model
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    module, mesh = build_module(cfg), shd.make_mesh({"data": 8})
    params = init_params(module, jax.random.PRNGKey(3), mesh)
    ckpt = Checkpointer(str(tmp_path), every=1, async_save=False)
    ckpt.save(5, {"step": np.int32(5), "params": params}, None, {"step": 5}, force=True)  # old layout
    ckpt.close()
    meta = {"format": 1, "head": "lm", "model": cfg.to_json_dict(), "params": "checkpoints"}
    want = jax.tree_util.tree_leaves(jax.device_get(params))
    for extra in ({}, {"slot": "policy"}):
        (tmp_path / MODEL_FILE).write_text(json.dumps({**meta, **extra}))
        got = jax.tree_util.tree_leaves(jax.device_get(load_model(str(tmp_path), mesh).params))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
