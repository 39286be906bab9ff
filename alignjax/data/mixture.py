"""Several data sources in one run: weighted mixtures, per-source formats, per-source eval.

    data.train="a.jsonl:0.7,b.parquet:0.2,hf://org/name:train:0.1"       # weights (any scale)
    data.train='[{"path": "a.jsonl", "weight": 0.7, "format": "messages"},
                 {"path": "b.jsonl", "weight": 0.3, "format": "prompt_completion"}]'
    data.train="a.jsonl,b.jsonl"                                         # concatenation, as ever

A trailing ``:<number>`` is a weight; ``dir:split`` and ``hf://name:split`` keep their split (the
last colon field is a weight only when it parses as a number). Either every source has a weight
or none: without weights the sources are concatenated and shuffled together, exactly as before.

With weights every source is an endless stream of its own record indices (shuffled with the
seed, reshuffled every epoch) offset into one ``ConcatSource`` (the ``Mixture``); grain's
``MapDataset.mix`` interleaves the streams in proportion to the weights (deterministically: any
window of draws holds each source's share to within a draw or so; grain rounds the proportions
to integers with the smallest at 100), then the pipeline's per-process sharding, tokenizing and
packing run unchanged. The position is grain's iterator state, so a restored iterator continues
the same sequence of (source, record) draws. One epoch of a mixture = as many draws as its
weighted sources hold records. Draws are counted per source (``stats.drawn``; the loop logs
``data/drawn/<name>``); eval sources are evaluated and logged one by one (``eval/<name>/...``).

Per-source keys (the dict form): ``path`` (required), ``weight``, ``name`` (the short name in
metric keys; default the file stem) and overrides of ``PER_SOURCE_KEYS``.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import operator
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import grain
import numpy as np

from alignjax.data.sources import ConcatSource, DataError, open_sources

PER_SOURCE_KEYS = ("format", "chat_template", "completion_only_loss", "truncation")
_ENTRY_KEYS = ("path", "weight", "name")
TOY_SPECS = ("toy", "toy_imperfect")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of data.train / data.eval."""

    spec: str                      # what alignjax.data.sources.open_source reads (or "toy")
    weight: float | None = None
    overrides: tuple = ()          # ((key, value), ...) of PER_SOURCE_KEYS
    name: str = ""


# ----------------------------------------------------------------------------- parsing


def _number(field: str) -> float | None:
    try:
        return float(field)
    except ValueError:
        return None


def split_weight(spec: str, key: str = "data.train") -> tuple[str, float | None]:
    """'a.jsonl:0.7' -> ('a.jsonl', 0.7); 'dir:split' and 'hf://name:split' keep their split."""
    spec = spec.strip()
    if spec in TOY_SPECS or os.path.exists(spec) or ":" not in spec:
        return spec, None
    head, field = spec.rsplit(":", 1)
    weight = _number(field)
    if weight is not None:
        return head, weight
    if spec.startswith("hf://") and spec.count(":") == 2:  # hf://name:split (the scheme's colon)
        return spec, None
    if os.path.isdir(head):  # a save_to_disk DatasetDict and its split
        return spec, None
    raise DataError(f"{key}: {spec!r}: malformed weight {field!r}; a weight is a number "
                    f"({head}:0.5), and a ':<split>' only follows a save_to_disk directory or "
                    "hf://name")


def _check_weight(weight: Any, spec: str, key: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, str)):
        raise DataError(f"{key}: {spec!r}: malformed weight {weight!r}; use a number >= 0")
    value = _number(weight) if isinstance(weight, str) else float(weight)
    if value is None or not math.isfinite(value):
        raise DataError(f"{key}: {spec!r}: malformed weight {weight!r}; use a number >= 0")
    if value < 0:
        raise DataError(f"{key}: {spec!r}: negative weight {value:g}; weights are >= 0")
    return value


def _entries(value: Any, key: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        raise DataError(f"{key}={value!r}: give a string of sources or a list of them")
    text = value.strip()
    if not text.startswith("["):
        return [s.strip() for s in text.split(",") if s.strip()]
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(text)
            break
        except (ValueError, SyntaxError):
            continue
    else:
        raise DataError(f"{key}: cannot read {text!r} as a list; write e.g. "
                        '[{"path": "a.jsonl", "weight": 0.7}, {"path": "b.jsonl", "weight": 0.3}]')
    if not isinstance(parsed, list):
        raise DataError(f"{key}: {text!r} is not a list of sources")
    return parsed


def parse_sources(value: Any, key: str = "data.train") -> list[SourceSpec]:
    """data.train / data.eval (a string, a list written as a string, or a list) -> SourceSpecs."""
    out = []
    for entry in _entries(value, key):
        if isinstance(entry, str):
            spec, weight = split_weight(entry, key)
            out.append(SourceSpec(spec, None if weight is None else _check_weight(weight, entry, key)))
            continue
        if hasattr(entry, "to_dict"):  # a ConfigDict entry of a list in a config file
            entry = entry.to_dict()
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
            raise DataError(f"{key}: {entry!r}: a source is a string or a dict with a 'path'")
        spec = entry["path"].strip()
        unknown = sorted(set(entry) - set(_ENTRY_KEYS) - set(PER_SOURCE_KEYS))
        if unknown:
            raise DataError(f"{key}: {spec!r}: unknown keys {unknown}; a source takes "
                            f"{list(_ENTRY_KEYS + PER_SOURCE_KEYS)}")
        weight = entry.get("weight")
        out.append(SourceSpec(
            spec, None if weight is None else _check_weight(weight, spec, key),
            tuple((k, entry[k]) for k in PER_SOURCE_KEYS if k in entry), str(entry.get("name", ""))))
    if not out:
        raise DataError(f"{key}: no data sources given")
    weighted = [s.weight is not None for s in out]
    if any(weighted) and not all(weighted):
        missing = [s.spec for s in out if s.weight is None]
        raise DataError(f"{key}: {missing} have no weight; give every source a weight "
                        "(a mixture) or none (a concatenation)")
    if all(weighted) and sum(s.weight for s in out) <= 0:
        raise DataError(f"{key}: all weights are zero ({', '.join(s.spec for s in out)}); "
                        "give at least one source a weight > 0")
    return out


def short_name(spec: str) -> str:
    """A readable metric-key name: the file stem ('data/a.jsonl' -> 'a'), 'hf://org/x:test' ->
    'x_test'."""
    if spec.startswith("hf://"):
        base, _, split = spec[len("hf://"):].partition(":")
        name = base.rstrip("/").rsplit("/", 1)[-1] + (f"_{split}" if split and split != "train" else "")
    else:
        path, split = spec, ""
        if not os.path.exists(spec) and ":" in spec and os.path.isdir(spec.rsplit(":", 1)[0]):
            path, split = spec.rsplit(":", 1)
        name = os.path.basename(os.path.normpath(path))
        for ext in (".jsonl", ".parquet"):
            if name.lower().endswith(ext):
                name = name[:-len(ext)]
        name += f"_{split}" if split else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "source"


def unique_names(specs: Sequence[SourceSpec]) -> list[str]:
    names, seen = [], {}
    for s in specs:
        name = s.name or short_name(s.spec)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def with_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """The data config with one source's overrides (a ConfigDict stays a ConfigDict)."""
    if not overrides:
        return cfg
    if hasattr(cfg, "to_dict"):
        import ml_collections
        return ml_collections.ConfigDict({**cfg.to_dict(), **dict(overrides)})
    return {**dict(cfg or {}), **dict(overrides)}


# ----------------------------------------------------------------------------- the mixture


class Mixture(ConcatSource):
    """Named sources concatenated (a ``ConcatSource``), with weights (None: a plain concatenation
    that keeps per-source settings and names) and per-source config overrides."""

    def __init__(self, sources: Sequence[Any], names: Sequence[str],
                 weights: Sequence[float] | None = None,
                 overrides: Sequence[Mapping[str, Any]] | None = None):
        super().__init__([open_sources(s) for s in sources])
        self.names = list(names)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.overrides = [dict(o) for o in (overrides or [{}] * len(self.sources))]
        starts = [0] + self._ends[:-1]
        self.ranges = [range(a, b) for a, b in zip(starts, self._ends)]

    def cfg_for(self, cfg: Any, k: int) -> Any:
        return with_overrides(cfg, self.overrides[k])

    def component(self, index: int) -> int:
        import bisect
        return bisect.bisect_right(self._ends, int(index))

    def map_sources(self, fn: Callable[[Any, int], Any]) -> Mixture:
        """A mixture of ``fn(source, k)`` for each source (e.g. rated pairs built per source)."""
        return Mixture([fn(s, k) for k, s in enumerate(self.sources)], self.names, self.weights,
                       self.overrides)

    def epoch_records(self) -> int:
        """Draws in one epoch: the records of the sources with a weight > 0."""
        if self.weights is None:
            return len(self)
        return sum(len(r) for r, w in zip(self.ranges, self.weights) if w > 0)

    def mixed_records(self, *, seed: int, process_index: int, process_count: int, shuffle: bool,
                      num_epochs: int | None) -> grain.MapDataset:
        """This process's global record indices: grain mixes one endless, shuffled stream per
        weighted source, then takes every ``process_count``-th draw from ``process_index`` on."""
        streams, weights = [], []
        for k, (r, w) in enumerate(zip(self.ranges, self.weights)):
            if w <= 0:  # grain refuses zero proportions; such a source is never drawn
                continue
            stream = grain.MapDataset.range(len(r))
            if shuffle:
                stream = stream.shuffle(seed=component_seed(seed, k))
            streams.append(stream.repeat(None).map(partial(operator.add, r.start)))
            weights.append(w)
        mixed = grain.MapDataset.mix(streams, weights)
        if num_epochs is not None:
            mixed = mixed[:num_epochs * self.epoch_records()]
        if len(mixed) < process_count:
            raise DataError(f"process {process_index}/{process_count} gets no records from "
                            f"{len(mixed)} draws of {self!r}")
        return mixed[process_index::process_count]

    def __repr__(self) -> str:
        return f"Mixture({dict(zip(self.names, self.weights or [None] * len(self.names)))})"


def component_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


def is_weighted(source: Any) -> bool:
    return isinstance(source, Mixture) and source.weights is not None


class ByComponent:
    """One formatter per source of a mixture (the source's own format / chat-template keys)."""

    def __init__(self, mixture: Mixture, make: Callable[[Any], Any], cfg: Any, key: str = "data"):
        self.mixture, self.items = mixture, []
        for k, spec_name in enumerate(mixture.names):
            try:
                self.items.append(make(mixture.cfg_for(cfg, k)))
            except DataError as e:
                raise DataError(f"{key}: source {spec_name!r} ({mixture.sources[k]!r}): {e}") from e
        self.cfg = self.items[0].cfg if hasattr(self.items[0], "cfg") else None

    def pick(self, index: int):
        return self.items[self.mixture.component(index)]


def formatter_at(formatter: Any, index: int):
    """The formatter of record ``index``: its source's own in a mixture, else ``formatter``."""
    return formatter.pick(index) if isinstance(formatter, ByComponent) else formatter


def formatter_for(source: Any, cfg: Any, make: Callable[[Any], Any]):
    """``make(cfg)``, or one per source (``ByComponent``) for a mixture with its own settings."""
    if isinstance(source, Mixture) and any(source.overrides):
        return ByComponent(source, make, cfg)
    return make(cfg)


class DrawCounts:
    """Draws per source of a mixture. ``as_dict(state)``: exact, from the position in grain's
    iterator state (records handed to the batcher; with several processes, positions x
    process_count, all processes together), so it survives a resume. Without a position (worker
    processes, an unweighted mixture): counted when read, ahead of the consumer by the prefetch
    buffer, since this process started."""

    def __init__(self, mixture: Mixture, process_count: int = 1):
        self.names, self.process_count = list(mixture.names), int(process_count)
        self._weighted = [(k, w) for k, w in enumerate(mixture.weights or []) if w > 0]
        self.counts = dict.fromkeys(self.names, 0)
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def as_dict(self, state: Any = None) -> dict[str, int]:
        position = _next_index(state)
        if position is None or not self._weighted:
            with self._lock:
                return dict(self.counts)
        out = dict.fromkeys(self.names, 0)
        per_stream = drawn_per_stream(position * self.process_count, [w for _, w in self._weighted])
        for (k, _), n in zip(self._weighted, per_stream):
            out[self.names[k]] = n
        return out

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def drawn_per_stream(positions: int, weights: Sequence[float]) -> list[int]:
    """How many of the first `positions` draws of grain's MapDataset.mix come from each stream:
    the count its selection map (transformations/mix.py) gives, in closed form."""
    from grain._src.python.dataset.transformations.mix import _float_to_int_proportions
    proportions = _float_to_int_proportions(list(weights))
    remaining, current, out = sum(proportions), int(positions), []
    for p in proportions:
        following = current * (remaining - p) // remaining
        out.append(current - following)
        remaining, current = remaining - p, following
    return out


def _next_index(state: Any) -> int | None:
    """The record position in a (nested) grain iterator state, if there is one."""
    while isinstance(state, dict):
        if isinstance(state.get("next_index"), int):
            return state["next_index"]
        state = state.get("parent")
    return None


class CountDraw:
    """grain map: global record index -> itself, counted for its source."""

    def __init__(self, mixture: Mixture, counts: DrawCounts):
        self.mixture, self.counts = mixture, counts

    def __call__(self, index: int) -> int:
        self.counts.add(self.mixture.names[self.mixture.component(index)])
        return index


def count_draws(records: grain.MapDataset, source: Any, stats: Any,
                process_count: int = 1) -> grain.MapDataset:
    """Counts the draws of each source of a mixture into ``stats.drawn`` (a ``DrawCounts``)."""
    if not isinstance(source, Mixture) or len(source.names) < 2:
        return records
    stats.drawn = DrawCounts(source, process_count)
    return records.map(CountDraw(source, stats.drawn))


def eval_record_ranges(source: Any) -> dict[str, range] | None:
    """name -> the records of each source, when an eval split has several (else None)."""
    if isinstance(source, Mixture) and len(source.names) > 1:
        return dict(zip(source.names, source.ranges))
    return None
