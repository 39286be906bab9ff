"""Supervised fine-tuning: token NLL on completion tokens, normalised by the step's target tokens."""

from __future__ import annotations

from alignjax.losses.logprobs import token_stats
from alignjax.losses.sft import sft_loss_sums, sft_metrics_from_sums
from alignjax.model.llama import head_kernel


def make_sums_fn(module, chunk_size: int = 512):
    """sums_fn(params, batch) -> (nll_sum, {count, correct}) for `alignjax.train.step`."""

    def sums_fn(params, batch):
        hidden, _ = module.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                 output="hidden")
        stats = token_stats(hidden, head_kernel(params, module.config), batch["targets"],
                            chunk_size=chunk_size)
        nll_sum, count, correct = sft_loss_sums(stats.logps, batch["loss_mask"], stats.correct)
        return nll_sum, {"count": count, "correct": correct}

    return sums_fn


def metrics(sums) -> dict:
    _, m = sft_metrics_from_sums(sums["objective"], sums["count"], sums["correct"])
    return m


def build(config, workdir: str, run):
    """The SFT `Algorithm` for the shared loop: data iterators over the configured sources."""
    import jax
    from alignjax.data.pipeline import make_sft_eval_iterator, make_sft_iterator
    from alignjax.train.loop import Algorithm
    from alignjax.train.setup import checked_sources

    d, t = config.data, config.train
    pc, pi = jax.process_count(), jax.process_index()
    train_iter = make_sft_iterator(checked_sources(d.train, workdir, "train", run.tokenizer, d),
                                   run.tokenizer, d,
                                   seed=int(d.shuffle_seed), batch_size=int(t.batch_size) // pc,
                                   seq_len=int(d.seq_len), process_index=pi, process_count=pc)
    eval_sources = checked_sources(d.eval, workdir, "eval", run.tokenizer, d) if d.eval else None

    def eval_iter():
        return make_sft_eval_iterator(eval_sources, run.tokenizer, d,
                                      batch_size=int(t.batch_size) // int(t.get("grad_accum_steps", 1)) // pc,
                                      seq_len=int(d.seq_len), process_index=pi, process_count=pc)

    return Algorithm("sft", make_sums_fn(run.module), metrics, train_iter,
                     eval_iter if eval_sources else None)


def train(config, workdir: str) -> dict:
    from alignjax.train.loop import train_loop
    from alignjax.train.setup import build_run
    run = build_run(config, workdir)
    return train_loop(config, workdir, run, build(config, workdir, run))
