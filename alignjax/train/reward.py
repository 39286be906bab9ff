"""Reward model training (docs/algorithms.md section 2): Llama backbone + scalar head, Bradley-Terry.

The reward is read at the last non-pad token of prompt+response (the EOS). After training, the
mean and std of rewards on the eval pairs are stored with the model (`reward_stats`) so PPO can
normalise rewards; the model exports to HF as LlamaForSequenceClassification.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import fs
from alignjax.losses.reward import bradley_terry_loss
from alignjax.train.grouped import example_weights, means_to_sums, sequence_rewards, sums_to_means
from alignjax.train.registry import AlgorithmSpec, no_settings
from alignjax.train.slots import Slot


def make_sums_fn(module, center_coef: float = 0.0, slot: str = "policy"):
    def sums_fn(params, batch, frozen=None):
        r_bk = sequence_rewards(module, params[slot], batch)
        w = example_weights(batch)
        loss, m = bradley_terry_loss(r_bk[:, 0], r_bk[:, 1], batch.get("margin"), center_coef, w)
        m = {k: v for k, v in m.items() if k not in ("loss", "reward_min", "reward_max")}
        # Sums of rewards and squares give the reward mean/std over any number of micro-batches.
        r_valid = r_bk * w[:, None]
        m_sums = means_to_sums(loss, m, jnp.sum(w))
        return m_sums[0], {**m_sums[1], "reward_sum": jnp.sum(r_valid),
                           "reward_sq_sum": jnp.sum(r_valid * r_bk)}
    return sums_fn


def metrics(sums) -> dict:
    out = sums_to_means({k: v for k, v in sums.items() if k not in ("reward_sum", "reward_sq_sum")})
    n = 2 * jnp.maximum(sums["count"], 1.0)
    mean = sums["reward_sum"] / n
    out["reward_std"] = jnp.sqrt(jnp.maximum(sums["reward_sq_sum"] / n - mean**2, 0.0))
    return out


def slots(config, settings) -> list:
    """One trainable scalar-head model; from a language model it gets a new score head."""
    return [Slot("policy", "scalar", config.model.init_from)]


def sums(config, settings, modules):
    return make_sums_fn(modules["policy"], float(config.reward.center_coef)), metrics


def abstract_batch(config, settings) -> dict:
    from alignjax.train.grouped import abstract_grouped_batch
    return abstract_grouped_batch(int(config.train.batch_size), 2, int(config.data.seq_len))


def build(config, workdir: str, run, settings, modules, loader):
    from alignjax.data.preference import make_preference_eval_iterator, make_preference_iterator
    from alignjax.train.loop import Algorithm
    from alignjax.data.check import warn_overlap
    from alignjax.train.data_split import eval_iterators, open_split
    from alignjax.train.setup import eval_batch_size

    d, t = config.data, config.train
    pc, pi = jax.process_count(), jax.process_index()
    train_sources = open_split(config, workdir, run.tokenizer, "train", "pair")
    train_iter = make_preference_iterator(
        train_sources, run.tokenizer, d, kind="pair",
        seed=int(d.shuffle_seed), batch_size=int(t.batch_size) // pc, seq_len=int(d.seq_len),
        process_index=pi, process_count=pc)
    eval_sources = open_split(config, workdir, run.tokenizer, "eval", "pair")
    warn_overlap(d, train_sources, eval_sources)  # data.check_overlap

    def eval_iter(records=None):  # records: one eval source's, when there are several
        return make_preference_eval_iterator(
            eval_sources, run.tokenizer, d, kind="pair", batch_size=eval_batch_size(config),
            seq_len=int(d.seq_len), process_index=pi, process_count=pc, records=records)

    sums_fn, metrics_fn = sums(config, settings, modules)
    return Algorithm("reward", sums_fn, metrics_fn, train_iter,
                     eval_iterator=eval_iterators(eval_sources, eval_iter))


def finish(config, workdir: str, out: dict):
    m = out["metrics"]
    if "eval/reward_std" in m:  # statistics PPO uses to normalise this reward model's scores
        store_reward_stats(workdir, {"mean": m["eval/reward_mean"], "std": m["eval/reward_std"],
                                     "source": "eval pairs"})


SPEC = AlgorithmSpec("reward", no_settings, slots, sums, abstract_batch, build, finish)


def store_reward_stats(workdir: str, stats: dict):
    from alignjax.model.store import MODEL_FILE
    if jax.process_index() != 0:
        return
    path = fs.join(workdir, MODEL_FILE)
    meta = json.loads(fs.read_text(path))
    meta["reward_stats"] = stats
    fs.write_text(path, json.dumps(meta, indent=2))


def score_texts(model, tokenizer, prompts, responses, seq_len: int = 1024,
                chat_template: bool = True) -> np.ndarray:
    """Rewards for (prompt, response) pairs, formatted as in training (chat template by default)."""
    from alignjax import sharding as shd
    from alignjax.data.preference import format_pair_batch
    batch = format_pair_batch(tokenizer, prompts, responses, seq_len, {"chat_template": chat_template})
    batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask")}
    n = batch["tokens"].shape[0]
    pad = (-n) % shd.axis_size(model.mesh, dict(model.rules).get("batch"))
    if pad:  # fill the batch up to a multiple of the data-parallel size with copies
        batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
    fn = jax.jit(lambda p, b: sequence_rewards(model.module, p, b))
    with shd.mesh_context(model.mesh, model.rules):
        r = fn(model.params, shd.shard_batch(batch, model.mesh, model.rules))
    return shd.to_host(r)[:n, 0]
