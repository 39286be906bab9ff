"""Supervised fine-tuning: token NLL on completion tokens, normalised by the step's target tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses.logprobs import token_stats
from alignjax.losses.sft import sft_loss_sums, sft_metrics_from_sums
from alignjax.model.llama import head_kernel
from alignjax.train.registry import AlgorithmSpec, no_settings
from alignjax.train.slots import Slot


def make_sums_fn(module, chunk_size: int = 512, slot: str = "policy"):
    """sums_fn(params, batch, frozen) -> (nll_sum, {count, correct}) for `alignjax.train.step`."""

    def sums_fn(params, batch, frozen=None):
        p = params[slot]
        hidden, _ = module.apply(p, batch["tokens"], batch["positions"], batch["segment_ids"],
                                 output="hidden")
        stats = token_stats(hidden, head_kernel(p, module.config), batch["targets"],
                            chunk_size=chunk_size)
        nll_sum, count, correct = sft_loss_sums(stats.logps, batch["loss_mask"], stats.correct)
        return nll_sum, {"count": count, "correct": correct}

    return sums_fn


def metrics(sums) -> dict:
    _, m = sft_metrics_from_sums(sums["objective"], sums["count"], sums["correct"])
    return m


def slots(config, settings) -> list:
    return [Slot("policy", "lm", config.model.init_from)]


def sums(config, settings, modules):
    return make_sums_fn(modules["policy"]), metrics


def token_batch(batch: int, seq_len: int) -> dict:
    """Abstract token batch [B, T] (see alignjax.data.pipeline)."""
    i32 = jnp.int32
    return {k: jax.ShapeDtypeStruct((batch, seq_len), i32)
            for k in ("tokens", "positions", "segment_ids", "targets")} | {
        "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)}


def abstract_batch(config, settings) -> dict:
    return token_batch(int(config.train.batch_size), int(config.data.seq_len))


def build(config, workdir: str, run, settings, modules, loader):
    """The SFT `Algorithm` for the shared loop: data iterators over the configured sources."""
    from alignjax.data.pipeline import make_sft_eval_iterator, make_sft_iterator
    from alignjax.train.loop import Algorithm
    from alignjax.data.check import warn_overlap
    from alignjax.train.data_split import eval_iterators, open_split
    from alignjax.train.setup import eval_batch_size

    d, t = config.data, config.train
    pc, pi = jax.process_count(), jax.process_index()
    train_sources = open_split(config, workdir, run.tokenizer, "train")  # a list or a Mixture
    train_iter = make_sft_iterator(train_sources, run.tokenizer, d,
                                   seed=int(d.shuffle_seed), batch_size=int(t.batch_size) // pc,
                                   seq_len=int(d.seq_len), process_index=pi, process_count=pc)
    eval_sources = open_split(config, workdir, run.tokenizer, "eval")
    warn_overlap(d, train_sources, eval_sources)  # data.check_overlap

    def eval_iter(records=None):  # records: one eval source's, when there are several
        return make_sft_eval_iterator(eval_sources, run.tokenizer, d,
                                      batch_size=eval_batch_size(config),
                                      seq_len=int(d.seq_len), process_index=pi, process_count=pc,
                                      records=records)

    sums_fn, metrics_fn = sums(config, settings, modules)
    return Algorithm("sft", sums_fn, metrics_fn, train_iter,
                     eval_iterator=eval_iterators(eval_sources, eval_iter))


SPEC = AlgorithmSpec("sft", no_settings, slots, sums, abstract_batch, build)
