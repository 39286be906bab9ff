"""The SFT input pipeline on grain: sources -> shard -> shuffle -> epochs -> tokenize -> pack -> batch.

    it = make_sft_iterator(["train.jsonl"], tok, {"packing": "pack"}, seed=0, batch_size=8,
                           seq_len=2048, process_index=jax.process_index(),
                           process_count=jax.process_count())
    batch = next(it)                      # dict of numpy arrays, see alignjax.data.packing
    state = it.get_state()                # JSON-serialisable; store it with the checkpoint
    it2 = make_sft_iterator(...same args...); it2.set_state(state)   # continues exactly

All processes walk one global record order (shuffled with ``seed``, reshuffled every epoch) and
each takes every ``process_count``-th record of it, so the shards are disjoint, cover the data,
and with ``packing="pad"`` a step trains on the same records for any process count (packing
packs each process's own records, so packed rows depend on the process count). The returned object is grain's own ``DatasetIterator`` (so grain/orbax checkpoint
handlers work on it) with an extra ``sft_stats`` attribute counting truncated and dropped
examples; those counters are taken when an example is tokenized, which can run ahead of the
consumer by the prefetch buffer, and they are not part of the iterator state.

Config keys (dict or ConfigDict; others ignored): ``format`` (auto|text|prompt_completion|
messages), ``packing`` (pack|pad), ``truncation`` (truncate_left_prompt|truncate_right|drop),
``completion_only_loss`` (True), ``pack_bins`` (rows packed at once; 0 = 2 x batch_size),
``read_threads`` (4), ``prefetch`` (64 records), ``prefetch_batches`` (2: batches assembled
ahead of the training step by a background thread, so tokenising and packing overlap the step;
0 = off), ``cache_mb`` (512: tokenised examples are kept per process, up to this many MB, so
later epochs skip the tokenizer; 0 = off), ``worker_count`` (0 = no worker processes; with
workers the ``sft_stats`` of the main process stay at 0).

Prefetching keeps the iterator exactly resumable: ``get_state()`` describes the position after
the last batch handed out, not after what the thread has prepared. The cache holds the first
``cache_mb`` of examples met (not LRU: with a reshuffle every epoch any record is as likely
next); each process and each grain worker has its own.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from alignjax.data import packing
from alignjax.data.formatting import PACKINGS, FormatConfig, SFTFormatter, num_targets, truncate
from alignjax.data.mixture import Mixture, count_draws, formatter_at, formatter_for, is_weighted
from alignjax.data.sources import DataError, open_sources, where

log = logging.getLogger(__name__)

_STATUS_TEXT = {"truncated": "truncated to seq_len", "dropped": "dropped (longer than seq_len)",
                "no_loss": "dropped (no target token left)"}


@dataclasses.dataclass
class SFTStats:
    """Counts of what happened to examples at tokenization time (thread-safe)."""

    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_loss: int = 0  # nothing left to learn from (e.g. the completion was cut off)
    tokens: int = 0
    loss_tokens: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, status: str, n_tokens: int = 0, n_loss: int = 0, location: str = "") -> None:
        with self._lock:
            self.examples += 1
            self.tokens += n_tokens
            self.loss_tokens += n_loss
            if status == "truncated":
                self.truncated += 1
                first = self.truncated == 1
            elif status in ("dropped", "no_loss"):
                field = "dropped_too_long" if status == "dropped" else "dropped_no_loss"
                setattr(self, field, getattr(self, field) + 1)
                first = getattr(self, field) == 1
            else:
                first = False
        if first:
            log.warning("SFT data: first example %s at %s (all such examples are counted in "
                        "sft_stats)", _STATUS_TEXT[status], location)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if not f.name.startswith("_")}

    def __getstate__(self):  # the lock cannot be pickled into grain worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _get(cfg: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


class ExampleCache:
    """Bounded, thread-safe memo of record index -> tokenised example (grain's read threads share
    it). Keeps the first ``max_mb`` of entries; a record that does not fit is recomputed."""

    def __init__(self, max_mb: float):
        self.max_bytes, self.used = int(max_mb * 2**20), 0
        self._items: dict = {}
        self._lock = threading.Lock()

    def get(self, index: int):
        return self._items.get(index)  # a dict read is atomic under the GIL

    def put(self, index: int, value, nbytes: int) -> None:
        if self.used + nbytes > self.max_bytes:
            return
        with self._lock:
            if index not in self._items and self.used + nbytes <= self.max_bytes:
                self._items[index] = value
                self.used += nbytes

    def __len__(self) -> int:
        return len(self._items)

    def __getstate__(self):  # grain worker processes each start their own (empty) cache
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"] / 2**20)


def example_cache(cfg) -> ExampleCache | None:
    mb = float(_get(cfg, "cache_mb", 512))
    return ExampleCache(mb) if mb > 0 else None


# Python objects around each cached entry (dict, tuple, array headers), counted against cache_mb.
_ENTRY_OVERHEAD = 600


class _TokenizeIndex:
    """grain map: global record index -> shifted example dict, or None when dropped."""

    def __init__(self, source, formatter: SFTFormatter, seq_len: int, pad_id: int,
                 stats: SFTStats, keep_dropped: bool = False, cache: ExampleCache | None = None):
        self.source, self.formatter, self.seq_len, self.pad_id = source, formatter, seq_len, pad_id
        self.stats, self.keep_dropped, self.cache = stats, keep_dropped, cache

    def __call__(self, index: int) -> dict[str, np.ndarray] | None:
        index = int(index)
        hit = self.cache.get(index) if self.cache is not None else None
        if hit is not None:  # counted again, as a re-tokenised example would be
            example, status, n_tokens, n_loss = hit
            self.stats.add(status, n_tokens, n_loss)
            return example
        example, status, n_tokens, n_loss = self._tokenize(index)
        if self.cache is not None:
            nbytes = _ENTRY_OVERHEAD + sum(a.nbytes for a in (example or {}).values())
            self.cache.put(index, (example, status, n_tokens, n_loss), nbytes)
        return example

    def _tokenize(self, index: int):
        """(shifted example or None, status, tokens, loss tokens); counts the example in stats."""
        location = where(self.source, index)
        try:
            record = self.source[index]
        except DataError:
            raise
        except Exception as e:  # e.g. a storage error: say which record
            raise DataError(f"{location}: cannot read record ({e})") from e
        formatter = formatter_at(self.formatter, index)  # a mixture's source may have its own
        ex = formatter(record, location)
        ex, status = truncate(ex, self.seq_len, formatter.cfg.truncation)
        if ex is not None and num_targets(ex) == 0:
            ex, status = None, "no_loss"
        n_tokens, n_loss = (0, 0) if ex is None else (len(ex), num_targets(ex))
        self.stats.add(status, n_tokens, n_loss, location)
        shifted = None if ex is None else packing.shift_example(ex, self.pad_id)
        return shifted, status, n_tokens, n_loss


def _is_kept(example: Any) -> bool:
    return example is not None


def _check_args(tokenizer, batch_size: int, seq_len: int, process_index: int,
                process_count: int) -> int:
    if batch_size <= 0 or seq_len <= 1:
        raise DataError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, {process_count})")
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        raise DataError("tokenizer needs a pad token distinct from eos (use load_tokenizer or "
                        "alignjax.data.tokenizer.ensure_pad_token)")
    return int(pad_id)


def shard_records(source, *, seed: int, process_index: int, process_count: int, shuffle: bool,
                  num_epochs: int | None) -> grain.MapDataset:
    """Record indices this process reads: every `count`-th record, from `index` on, of the one
    global order (shuffled by seed, a new shuffle each epoch). The shards are disjoint and cover
    the data, and local batch k of every process together hold the same records as global batch k
    of a single process: the data of a step does not depend on the number of processes."""
    if len(source) < process_count:
        raise DataError(f"process {process_index}/{process_count} gets no records from "
                        f"{len(source)} in {source!r}")
    records = grain.MapDataset.range(len(source))
    if shuffle:
        records = records.shuffle(seed=seed)
    return records.repeat(num_epochs)[process_index::process_count]


def train_records(source, *, seed: int, process_index: int, process_count: int, shuffle: bool,
                  num_epochs: int | None, stats) -> grain.MapDataset:
    """This process's record indices: a weighted mixture's draws (alignjax.data.mixture), else
    `shard_records`; a mixture's draws are counted per source in ``stats.drawn``."""
    kwargs = dict(seed=seed, process_index=process_index, process_count=process_count,
                  shuffle=shuffle, num_epochs=num_epochs)
    records = (source.mixed_records(**kwargs) if is_weighted(source)
               else shard_records(source, **kwargs))
    return count_draws(records, source, stats, process_count)


def sft_formatter(source, tokenizer, cfg):
    """The SFT formatter, or one per source of a mixture whose sources set their own keys."""
    return formatter_for(source, cfg, lambda c: SFTFormatter(tokenizer, FormatConfig.from_config(c)))


def sft_epoch_size(sources, tokenizer, cfg, seq_len: int, sample: int = 256) -> tuple[int, int, bool]:
    """(records, rows, estimated) of one epoch of SFT data. Padded: a row per record. Packed:
    records x the mean tokens of up to `sample` seeded records / seq_len, an estimate."""
    source = open_sources(sources)
    n = source.epoch_records() if isinstance(source, Mixture) else len(source)
    if _get(cfg, "packing", "pack") != "pack":
        return n, n, False
    pad_id = int(tokenizer.pad_token_id)
    tokenize = _TokenizeIndex(source, sft_formatter(source, tokenizer, cfg), seq_len, pad_id,
                              SFTStats())
    picks = np.random.default_rng(0).permutation(len(source))[:sample]
    was, log.disabled = log.disabled, True  # the sample's warnings belong to the real pass
    try:
        mean = float(np.mean([tokenize._tokenize(int(i))[2] for i in picks]))
    finally:
        log.disabled = was
    return n, max(1, int(np.ceil(n * mean / seq_len))), True


def prefetch_batches(batches: grain.IterDataset, cfg) -> grain.IterDataset:
    """Batches assembled ahead by a background thread (grain's ThreadPrefetchIterDataset), so the
    host's data work overlaps the device step; checkpointable like its parent."""
    n = int(_get(cfg, "prefetch_batches", 2))
    if n <= 0:
        return batches
    from grain.experimental import ThreadPrefetchIterDataset
    return ThreadPrefetchIterDataset(batches, prefetch_buffer_size=n)


def _read_options(cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(_get(cfg, "read_threads", 4)),
                             prefetch_buffer_size=int(_get(cfg, "prefetch", 64)))


def make_sft_dataset(
    sources: str | Any | Sequence[str | Any], tokenizer, cfg: Mapping[str, Any] | None = None, *,
    seed: int, batch_size: int, seq_len: int, process_index: int = 0, process_count: int = 1,
    shuffle: bool = True, num_epochs: int | None = None,
) -> tuple[grain.IterDataset, SFTStats]:
    """The training pipeline as a grain ``IterDataset`` of batches, plus its stats counters."""
    pad_id = _check_args(tokenizer, batch_size, seq_len, process_index, process_count)
    mode = _get(cfg, "packing", "pack")
    if mode not in PACKINGS:
        raise DataError(f"packing {mode!r} unknown; choose from {PACKINGS}")
    if num_epochs is not None and num_epochs <= 0:
        raise DataError(f"num_epochs must be positive or None (forever), got {num_epochs}")
    source = open_sources(sources)
    formatter = sft_formatter(source, tokenizer, cfg)
    stats = SFTStats()

    records = train_records(source, seed=seed, process_index=process_index,
                            process_count=process_count, shuffle=shuffle, num_epochs=num_epochs,
                            stats=stats)
    examples = (records.map(_TokenizeIndex(source, formatter, seq_len, pad_id, stats,
                                           cache=example_cache(cfg)))
                .filter(_is_kept)
                .to_iter_dataset(_read_options(cfg)))
    if mode == "pack":
        bins = int(_get(cfg, "pack_bins", 0)) or 2 * batch_size
        rows = packing.pack_rows(examples, seq_len, pad_id, num_bins=bins, seed=seed)
    else:
        rows = examples.map(functools.partial(packing.pad_row, seq_len=seq_len, pad_id=pad_id))
    batches = rows.batch(batch_size, batch_fn=functools.partial(
        packing.stack_rows, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id))
    workers = int(_get(cfg, "worker_count", 0))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app.run
            flags.FLAGS.mark_as_parsed()  # nothing parsed them, so take the defaults
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    else:
        batches = prefetch_batches(batches, cfg)
    return batches, stats


def make_sft_iterator(
    sources: str | Any | Sequence[str | Any], tokenizer, cfg: Mapping[str, Any] | None = None, *,
    seed: int, batch_size: int, seq_len: int, process_index: int = 0, process_count: int = 1,
    shuffle: bool = True, num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """Checkpointable iterator of SFT batches (see the module doc). ``num_epochs=None``: forever.

    With a finite ``num_epochs`` the last batch is completed with empty rows (segment 0, no
    loss), so every batch has the static shape [batch_size, seq_len].
    """
    dataset, stats = make_sft_dataset(
        sources, tokenizer, cfg, seed=seed, batch_size=batch_size, seq_len=seq_len,
        process_index=process_index, process_count=process_count, shuffle=shuffle,
        num_epochs=num_epochs)
    iterator = iter(dataset)
    iterator.sft_stats = stats
    # (records, rows, estimated) of one epoch, for train.epochs (alignjax.train.budget)
    iterator.epoch_size = functools.partial(sft_epoch_size, sources, tokenizer, cfg, seq_len)
    return iterator


class _EvalRow:
    """grain map: local slot j -> one padded row with ``valid`` (False for filler / dropped)."""

    def __init__(self, tokenize: _TokenizeIndex, process_index: int, process_count: int,
                 n_records: int, seq_len: int, pad_id: int):
        self.tokenize, self.pi, self.pc, self.n = tokenize, process_index, process_count, n_records
        self.seq_len, self.pad_id = seq_len, pad_id

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        index = self.pi + int(slot) * self.pc
        example = self.tokenize(index) if index < self.n else None
        if example is None:
            row = packing.empty_row(self.seq_len, self.pad_id)
            row["valid"] = np.bool_(False)
            return row
        return packing.pad_row({**example, "valid": np.bool_(True)}, self.seq_len, self.pad_id)


def make_sft_eval_iterator(
    sources: str | Any | Sequence[str | Any], tokenizer, cfg: Mapping[str, Any] | None = None, *,
    batch_size: int, seq_len: int, process_index: int = 0, process_count: int = 1,
    records: range | None = None,
) -> grain.DatasetIterator:
    """One ordered pass, one example per row, plus ``valid`` [B] bool. ``records``: only these
    (e.g. one source of a mixture, alignjax.data.mixture.eval_record_ranges); default all.

    Rows that hold no example (the last partial batch, shard remainders, dropped examples) are
    empty with ``valid=False`` and zero loss_mask. Every process yields the same number of
    batches (ceil(ceil(N / process_count) / batch_size)), so multi-host eval loops stay in step.
    ``packing`` is ignored here: one row per example keeps per-example metrics simple.
    """
    pad_id = _check_args(tokenizer, batch_size, seq_len, process_index, process_count)
    source = open_sources(sources)
    stats = SFTStats()
    tokenize = _TokenizeIndex(source, sft_formatter(source, tokenizer, cfg), seq_len, pad_id, stats)
    records = range(len(source)) if records is None else records
    slots = -(-len(records) // process_count)
    rows = (grain.MapDataset.range(slots)  # slot j: record start + process_index + j * count
            .map(_EvalRow(tokenize, records.start + process_index, process_count, records.stop,
                          seq_len, pad_id))
            .to_iter_dataset(_read_options(cfg)))
    batches = rows.batch(batch_size, batch_fn=functools.partial(
        packing.stack_rows, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id))
    iterator = iter(batches)
    iterator.sft_stats = stats
    return iterator
