"""Preference batches on grain for reward models, the DPO family, RRHF/PRO and KTO.

    it = make_preference_iterator(["prefs.jsonl"], tok, {"truncation": "drop"}, kind="pair",
                                  seed=0, batch_size=8, seq_len=1024,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    batch = next(it)             # numpy, the contract below; it.get_state() / it.set_state(s)

Batch contract (B examples of this process, K responses each, one sequence per row, right-padded):

    tokens, positions,       int32   [B, K, T]  as alignjax.data.packing defines them (segment 1
    segment_ids, targets                        for real tokens, 0 padding; targets = next token)
    loss_mask                float32 [B, K, T]  1 where targets[t] is a response token (incl. EOS)
    valid                    bool    [B, K]     False for empty slots (ranked groups < K, filler)
    scores                   float32 [B, K]     ranked: the scores, best first; pairs: [1, 0];
                                                kto: [label, 0]
    margin                   float32 [B]        pairs: the record's margin (0 if absent)
    label                    float32 [B]        kto: 1 desirable, 0 undesirable; else 0
    example_valid            bool    [B]        False for filler rows (all-zero masks)

K = 2 for pairs (slot 0 chosen, slot 1 rejected); ``cfg["num_responses"]`` for ranked (fewer
responses -> invalid slots, more -> the top K by score, counted); 2 for KTO: slot 0 is prompt_i +
completion_i and slot 1 prompt_i + the completion of the next real example of the same batch
((i+1) mod n, cut on the right to fit; its own when it is alone), the mismatched pair of KTO's
KL reference point. Slot 1 is built when the batch is assembled, so it is deterministic,
checkpoint-safe and process-local. Trainers reshape [B, K, T] -> [B*K, T] for one forward pass;
the K rows of an example stay together. ``format_pair_batch`` builds K = 1 batches for scoring
texts; ``check_preference_batch`` asserts the contract.

Record formats and rendering: see ``alignjax.data.preference_format``. Config keys (dict or
ConfigDict; others ignored): ``format`` (auto | pairwise | transcripts | ranked | unpaired),
``chat_template`` (default: the tokenizer has one), ``num_responses`` (ranked, required),
``truncation`` (truncate_left_prompt | truncate_right | drop), ``min_response_tokens`` (1),
``skip_invalid`` (False), ``read_threads`` (4), ``prefetch`` (64), ``prefetch_batches`` (2) and
``cache_mb`` (512) as in ``alignjax.data.pipeline`` (batches built ahead in a thread; formatted
examples cached per process, so later epochs skip the tokenizer).

Never silent: truncated examples, examples dropped as too long, prompts that alone leave fewer
than ``min_response_tokens`` tokens, and ranked groups cut to K are counted in
``iterator.pref_stats`` and the first of each kind logs a warning with its file:line.
Bad records (missing keys, empty or identical chosen/rejected, ragged responses/scores, < 2
responses, a non-bool label, malformed JSON) raise ``DataError`` naming file:line and the
problem; with ``skip_invalid=True`` they are skipped, counted (``skipped_invalid``) and the
first is logged instead. Counters are taken when an example is formatted (ahead of the consumer
by the prefetch buffer) and are not part of the iterator state.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from alignjax.data import packing
from alignjax.data.formatting import TRUNCATIONS, Tokenized
from alignjax.data.mixture import Mixture, formatter_at, formatter_for
from alignjax.data.pipeline import (_ENTRY_OVERHEAD, ExampleCache, _check_args, _get, _is_kept,
                                    _read_options, example_cache, prefetch_batches, train_records)
from alignjax.data.preference_format import (InvalidRecord, PreferenceFormatter, PrefExample,
                                             fit_example)
from alignjax.data.ratings import rated_source
from alignjax.data.sources import DataError, open_sources, where

log = logging.getLogger(__name__)

KINDS = ("pair", "ranked", "kto")
_WARN = {"truncated": "truncated to seq_len", "dropped_too_long": "dropped (longer than seq_len)",
         "dropped_prompt_too_long": "dropped (prompt leaves fewer than min_response_tokens)",
         "skipped_invalid": "skipped as invalid", "ranked_top_k": "cut to the top num_responses"}


@dataclasses.dataclass
class PrefStats:
    """Counts of what happened to examples when they were formatted (thread-safe)."""

    examples: int = 0  # kept
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_prompt_too_long: int = 0
    skipped_invalid: int = 0
    ranked_top_k: int = 0  # ranked groups with more than num_responses responses
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def count(self, field: str, location: str, detail: str = "") -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)
            first = getattr(self, field) == 1
        if first and field in _WARN:
            log.warning("preference data: first example %s at %s%s (all such examples are "
                        "counted in pref_stats)", _WARN[field], location, detail)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if not f.name.startswith("_")}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


_STATUS_FIELD = {"truncated": "truncated", "dropped": "dropped_too_long",
                 "prompt_too_long": "dropped_prompt_too_long"}


class _FormatIndex:
    """grain map: global record index -> fitted ``PrefExample``, or None when skipped."""

    def __init__(self, source, formatter: PreferenceFormatter, seq_len: int, policy: str,
                 min_response_tokens: int, skip_invalid: bool, stats: PrefStats,
                 cache: ExampleCache | None = None):
        self.source, self.formatter, self.seq_len, self.policy = source, formatter, seq_len, policy
        self.min_response_tokens, self.skip_invalid = min_response_tokens, skip_invalid
        self.stats, self.cache = stats, cache

    def _read(self, index: int, location: str) -> Any:
        try:
            return self.source[index]
        except DataError as e:  # malformed JSON, not an object: a bad record like any other
            raise InvalidRecord(str(e)) from e
        except Exception as e:  # e.g. a storage error: say which record, never skip it
            raise DataError(f"{location}: cannot read record ({e})") from e

    def __call__(self, index: int) -> PrefExample | None:
        index = int(index)
        location = where(self.source, index)
        hit = self.cache.get(index) if self.cache is not None else None
        ex, counts = hit if hit is not None else self._format(index, location)
        for field, detail in counts:  # a cached example is counted again, as a re-formatted one
            self.stats.count(field, location, detail)
        if hit is None and self.cache is not None:
            arrays = [] if ex is None else [ex.prompt, *ex.responses]
            self.cache.put(index, (ex, counts), _ENTRY_OVERHEAD + sum(np.asarray(a).nbytes for a in arrays))
        return ex

    def _format(self, index: int, location: str) -> tuple[PrefExample | None, list]:
        """(fitted example or None, [(stats field, detail), ...] to count)."""
        try:
            formatter = formatter_at(self.formatter, index)  # a mixture's source may have its own
            ex = formatter(self._read(index, location), location)
        except InvalidRecord as e:
            if not self.skip_invalid:
                raise
            return None, [("skipped_invalid", f" ({e})")]
        counts = [("ranked_top_k", "")] if ex.dropped_responses else []
        ex, status = fit_example(ex, self.seq_len, self.policy, self.min_response_tokens)
        if status in _STATUS_FIELD:
            counts.append((_STATUS_FIELD[status], ""))
        if ex is not None:
            counts.append(("examples", ""))
            ex = dataclasses.replace(ex, index=index)
        return ex, counts


def _row(prompt_p: np.ndarray, response_r: np.ndarray, seq_len: int, pad_id: int) -> dict:
    """prompt + response -> one padded row; loss on the response tokens (targets), EOS included."""
    ids_l = np.concatenate([prompt_p, response_r]).astype(np.int32)
    mask_l = np.arange(len(ids_l)) >= len(prompt_p)
    ex = Tokenized(ids_l, mask_l, len(prompt_p), 0)
    return packing.pad_row(packing.shift_example(ex, pad_id), seq_len, pad_id)


# A row without an example. Not None: grain treats None elements of a map as filtered out.
FILLER = PrefExample(np.zeros(0, np.int32), (), np.zeros(0, np.float32))


class _Collate:
    """grain batch_fn: up to B ``PrefExample`` (``FILLER`` = no example) -> the batch contract."""

    def __init__(self, kind: str, num_slots: int, batch_size: int, seq_len: int, pad_id: int):
        self.kind, self.k, self.b, self.t = kind, num_slots, batch_size, seq_len
        self.pad_id = pad_id

    def _slots(self, ex: PrefExample, nxt: PrefExample) -> list[np.ndarray]:
        if self.kind != "kto":
            return list(ex.responses)
        # KL reference point: this prompt with another example's completion, cut to fit.
        return [ex.responses[0], nxt.responses[0][:self.t - len(ex.prompt)]]

    def __call__(self, examples: Sequence[PrefExample]) -> dict[str, np.ndarray]:
        examples = list(examples) + [FILLER] * (self.b - len(examples))
        real = [i for i, ex in enumerate(examples) if ex.responses]
        rank = {i: r for r, i in enumerate(real)}
        empty = packing.empty_row(self.t, self.pad_id)
        rows, out = [], {"valid": np.zeros((self.b, self.k), bool),
                         "scores": np.zeros((self.b, self.k), np.float32),
                         "margin": np.zeros(self.b, np.float32),
                         "label": np.zeros(self.b, np.float32),
                         "example_valid": np.zeros(self.b, bool),
                         "index": np.full(self.b, -1, np.int32)}
        for i, ex in enumerate(examples):
            slots = []
            if ex.responses:
                nxt = examples[real[(rank[i] + 1) % len(real)]]
                slots = self._slots(ex, nxt)
                out["valid"][i, :len(slots)] = True
                out["scores"][i, :len(ex.scores)] = ex.scores
                out["margin"][i], out["label"][i] = ex.margin, ex.label
                out["example_valid"][i], out["index"][i] = True, ex.index
            rows += [_row(ex.prompt, r, self.t, self.pad_id) for r in slots]
            rows += [empty] * (self.k - len(slots))
        for key in packing.ROW_KEYS:
            out[key] = np.stack([r[key] for r in rows]).reshape(self.b, self.k, self.t)
        return out


def format_pair_batch(tokenizer, prompts: Sequence[Any], responses: Sequence[str], seq_len: int,
                      cfg: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """N (prompt, response) pairs -> the batch contract with K = 1, formatted as in training.

    For scoring texts (e.g. with a reward model). Prompts are strings or message lists. Every
    text gets a row: a prompt longer than ``seq_len`` - 1 first loses its start (BOS kept), then
    ``cfg["truncation"]`` fits the rest ("drop" acts as truncate_right).
    """
    if len(prompts) != len(responses) or not prompts:
        raise DataError(f"need as many prompts as responses (>= 1), got {len(prompts)} and "
                        f"{len(responses)}")
    formatter = PreferenceFormatter(tokenizer, cfg, "pair")
    policy = _get(cfg, "truncation", "truncate_left_prompt")
    policy = "truncate_right" if policy == "drop" else policy
    examples = []
    for prompt, response in zip(prompts, responses):
        prompt_ids, (response_ids,), n_keep = formatter.encode(prompt, [response])
        if len(prompt_ids) >= seq_len:  # unlike training data, nothing may be skipped here
            prompt_ids = prompt_ids[:n_keep] + prompt_ids[len(prompt_ids) - seq_len + 1 + n_keep:]
        ex = PrefExample(np.asarray(prompt_ids, np.int32), (np.asarray(response_ids, np.int32),),
                         np.zeros(1, np.float32), n_keep=n_keep)
        examples.append(fit_example(ex, seq_len, policy)[0])
    pad_id = _check_args(tokenizer, len(examples), seq_len, 0, 1)
    return _Collate("pair", 1, len(examples), seq_len, pad_id)(examples)


def check_preference_batch(batch: Mapping[str, np.ndarray], pad_id: int) -> None:
    """Assert the contract (cheap; for tests and debugging): every slot obeys packing's rules."""
    b, k, t = batch["tokens"].shape
    packing.check_batch({key: batch[key].reshape(b * k, t) for key in packing.ROW_KEYS}, pad_id)
    assert batch["valid"].shape == batch["scores"].shape == (b, k) and batch["valid"].dtype == bool
    assert batch["scores"].dtype == batch["margin"].dtype == batch["label"].dtype == np.float32
    assert batch["example_valid"].shape == (b,) and batch["example_valid"].dtype == bool
    assert not batch["valid"][~batch["example_valid"]].any()
    assert np.all(batch["segment_ids"][~batch["valid"]] == 0)
    assert np.all(batch["loss_mask"].sum(-1)[batch["valid"]] > 0), "every valid slot has targets"


def _setup(sources, tokenizer, cfg, kind: str, batch_size: int, seq_len: int,
           process_index: int, process_count: int):
    """(source, format-one-index map, batch_fn, stats) shared by the train and eval pipelines."""
    pad_id = _check_args(tokenizer, batch_size, seq_len, process_index, process_count)
    if kind not in KINDS:
        raise DataError(f"preference kind {kind!r} unknown; choose from {KINDS}")
    formatter = PreferenceFormatter(tokenizer, cfg, kind)
    num_slots = 2
    if kind == "ranked":
        if formatter.num_responses is None:
            raise DataError("ranked data needs cfg['num_responses'] (K, the static group size)")
        num_slots = int(formatter.num_responses)
    policy = _get(cfg, "truncation", "truncate_left_prompt")
    if policy not in TRUNCATIONS:  # fail here, not later in a prefetch thread
        raise DataError(f"truncation {policy!r} unknown; choose from {TRUNCATIONS}")
    min_response = int(_get(cfg, "min_response_tokens", 1))
    # data.from_ratings: pairs / ranked groups built from rated responses (alignjax.data.ratings)
    source = open_sources(sources)
    if isinstance(source, Mixture):  # rated per source (draws index its records), own formats
        mixture = source
        source = mixture.map_sources(lambda s, k: rated_source(s, mixture.cfg_for(cfg, k), kind))
        formatter = formatter_for(source, cfg, lambda c: PreferenceFormatter(tokenizer, c, kind))
    else:
        source = rated_source(source, cfg, kind)
    stats = PrefStats()
    fmt_index = _FormatIndex(source, formatter, seq_len, policy, min_response,
                             bool(_get(cfg, "skip_invalid", False)), stats, example_cache(cfg))
    collate = _Collate(kind, num_slots, batch_size, seq_len, pad_id)
    return source, fmt_index, collate, stats


def make_preference_iterator(
    sources: str | Any | Sequence[str | Any], tokenizer, cfg: Mapping[str, Any] | None = None, *,
    kind: str, seed: int, batch_size: int, seq_len: int, process_index: int = 0,
    process_count: int = 1, shuffle: bool = True, num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """Checkpointable iterator of preference batches (module doc). ``num_epochs=None``: forever.

    Process ``i`` reads every ``process_count``-th record, from ``i`` on, of one global order
    (shuffled with ``seed``, reshuffled every epoch): disjoint shards, and a step trains on the same
    records for any process count (alignjax.data.pipeline.shard_records). With a finite ``num_epochs`` the last batch is completed
    with filler rows (``example_valid=False``). ``iterator.pref_stats`` holds the counters.
    """
    source, fmt_index, collate, stats = _setup(sources, tokenizer, cfg, kind, batch_size, seq_len,
                                               process_index, process_count)
    if num_epochs is not None and num_epochs <= 0:
        raise DataError(f"num_epochs must be positive or None (forever), got {num_epochs}")
    records = train_records(source, seed=seed, process_index=process_index,
                            process_count=process_count, shuffle=shuffle, num_epochs=num_epochs,
                            stats=stats)
    examples = (records.map(fmt_index).filter(_is_kept)
                .to_iter_dataset(_read_options(cfg)))
    iterator = iter(prefetch_batches(examples.batch(batch_size, batch_fn=collate), cfg))
    iterator.pref_stats = stats
    # (records, rows, estimated) of one epoch, for train.epochs (alignjax.train.budget)
    n = source.epoch_records() if isinstance(source, Mixture) else len(source)
    iterator.epoch_size = lambda: (n, n, False)
    return iterator


class _EvalIndex:
    """grain map: local slot j -> the example of record ``process_index + j * process_count``."""

    def __init__(self, fmt_index: _FormatIndex, process_index: int, process_count: int, n: int):
        self.fmt_index, self.pi, self.pc, self.n = fmt_index, process_index, process_count, n

    def __call__(self, slot: int) -> PrefExample:
        index = self.pi + int(slot) * self.pc
        ex = self.fmt_index(index) if index < self.n else None
        return FILLER if ex is None else ex


def make_preference_eval_iterator(
    sources: str | Any | Sequence[str | Any], tokenizer, cfg: Mapping[str, Any] | None = None, *,
    kind: str, batch_size: int, seq_len: int, process_index: int = 0, process_count: int = 1,
    records: range | None = None,
) -> grain.DatasetIterator:
    """One ordered pass over this process's records ``[i::process_count]`` (of ``records``, e.g.
    one source of a mixture; default all). Example indices stay global.

    Rows without an example (the last partial batch, shard remainders, skipped records) have
    ``example_valid=False`` and zero masks; every process yields ceil(ceil(N / count) / B)
    batches, so multi-host eval loops stay in step.
    """
    source, fmt_index, collate, stats = _setup(sources, tokenizer, cfg, kind, batch_size, seq_len,
                                               process_index, process_count)
    records = range(len(source)) if records is None else records
    slots = grain.MapDataset.range(-(-len(records) // process_count))
    examples = (slots.map(_EvalIndex(fmt_index, records.start + process_index, process_count,
                                     records.stop))
                .to_iter_dataset(_read_options(cfg)))
    iterator = iter(examples.batch(batch_size, batch_fn=collate))
    iterator.pref_stats = stats
    return iterator
