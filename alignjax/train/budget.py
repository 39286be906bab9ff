"""The step budget: `train.steps`, or `train.epochs` passes over data.train.

An offline trainer's iterator tells the size of one epoch (`iterator.epoch_size()` -> (records,
rows, estimated)): preference data one row per record (pair, ranked group, KTO example); SFT
with padding one row per record; SFT with packing an estimate, records x the mean token count of
a seeded sample / seq_len. Steps = ceil(epochs x rows / train.batch_size). The data and the
seed fix the number, so a resumed run computes the same budget.
"""

from __future__ import annotations

import math
from typing import Any

from alignjax.model.config import ConfigError


def epoch_size(iterator: Any):
    """The iterator's `epoch_size` callable (through wrappers such as dpo.WithReference)."""
    while iterator is not None:
        size = getattr(iterator, "epoch_size", None)
        if size is not None:
            return size
        iterator = getattr(iterator, "iterator", None)
    return None


def train_steps(config, algo, log=print) -> int:
    """Loop steps of this run; logs how they relate to the data."""
    t = config.train
    epochs = float(t.get("epochs", 0) or 0)
    batch = int(t.batch_size)
    size = epoch_size(algo.train_iterator) if algo.producer is None else None
    if epochs < 0:
        raise ConfigError(f"train.epochs={epochs:g}: must be >= 0 (0 = use train.steps)")
    if epochs:
        if size is None:
            raise ConfigError(f"train.epochs={epochs:g} needs offline data (sft, dpo, reward); "
                              f"{algo.name} makes its batches during training: set train.steps")
        records, rows, estimated = size()
        steps = max(1, math.ceil(epochs * rows / batch))
        how = (f"an estimate: ~{rows} packed rows of seq_len from the mean length of sampled "
               f"records" if estimated else f"{rows} rows")
        log(f"train.epochs={epochs:g}: {steps} steps of batch {batch} over data.train's "
            f"{records} records ({how})")
        warmup = int(config.optimizer.warmup_steps)
        if warmup >= steps:
            raise ConfigError(f"optimizer.warmup_steps={warmup} must be < the {steps} steps that "
                              f"train.epochs={epochs:g} gives; lower it or raise train.epochs")
        return steps
    steps = int(t.steps)
    if size is not None:
        records, rows, estimated = size()
        covered = steps * batch / max(rows, 1)
        log(f"train.steps={steps} covers {'about ' if estimated else ''}{covered:.2f} epochs of "
            f"data.train ({records} records" + (f", ~{rows} packed rows, an estimate)"
                                                 if estimated else ")"))
    return steps
