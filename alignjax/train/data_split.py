"""data.train / data.eval for the offline trainers (SFT, DPO family, reward): each source checked
before training (setup.checked_sources), then a plain concatenation as ever, or a
``Mixture`` (alignjax.data.mixture) when sources carry weights or their own settings, or when
several eval sources are to be logged one by one."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from alignjax.data.mixture import (
    Mixture,
    SourceSpec,
    eval_record_ranges,
    parse_sources,
    unique_names,
    with_overrides,
)
from alignjax.data.sources import DataError, open_sources

KIND_NAMES = {"sft": "SFT", "pair": "preference pairs", "ranked": "ranked groups",
              "kto": "KTO (unpaired, labelled)"}


def open_split(config, workdir: str, tokenizer, split: str, kind: str = "sft") -> Any:
    """The checked sources of `data.<split>` ("train" | "eval"): a list (one concatenation), a
    Mixture, or None for an empty data.eval. `kind`: "sft" or a preference kind."""
    from alignjax.train.setup import checked_sources
    d, key = config.data, f"data.{split}"
    value = d.train if split == "train" else d.eval
    if split == "eval" and (not value or (isinstance(value, str) and not value.strip())):
        return None
    specs = parse_sources(value, key)

    def check(spec: str, cfg, shown: list[SourceSpec]):
        try:
            return checked_sources(spec, workdir, split, tokenizer, cfg, kind)
        except DataError as e:  # every record rejected? say what the file holds instead
            for s in shown:
                wrong = format_mismatch(s.spec, cfg, kind, key)
                if wrong:
                    raise DataError(wrong) from e
            raise

    plain = all(s.weight is None and not s.overrides for s in specs)
    if plain and (split == "train" or len(specs) == 1):  # as before: one checked concatenation
        return check(",".join(s.spec for s in specs), d, specs)
    parts = [open_sources(check(s.spec, with_overrides(d, dict(s.overrides)), [s])) for s in specs]
    weighted = split == "train" and specs[0].weight is not None  # eval: each source in full
    return Mixture(parts, unique_names(specs), [s.weight for s in specs] if weighted else None,
                   [dict(s.overrides) for s in specs])


def format_mismatch(spec: str, cfg, kind: str, key: str) -> str | None:
    """A message when the first record of `spec` is in another algorithm's format (an SFT file
    given to DPO, preference pairs given to SFT), else None."""
    from alignjax.data.formatting import FORMAT_KEYS as SFT_KEYS
    from alignjax.data.formatting import detect_format
    from alignjax.data.pipeline import _get
    from alignjax.data.preference_format import FORMAT_KEYS as PREF_KEYS
    from alignjax.data.preference_format import KIND_FORMATS
    if kind != "sft" and _get(cfg, "from_ratings", ""):
        return None  # rated records have their own shape (alignjax.data.ratings)
    try:
        record = open_sources(spec)[0]
    except Exception:  # noqa: BLE001 - unreadable: the original error says why
        return None
    if not isinstance(record, dict):
        return None
    prefs = [f for f, keys in PREF_KEYS.items() if all(k in record for k in keys)]
    sft = detect_format(record)
    if kind == "sft":
        if sft is not None or not prefs:
            return None
        holds = f"preference records ({prefs[0]})"
        wants = " or ".join(str(list(k)) for k in SFT_KEYS.values())
    else:
        if any(f in prefs for f in KIND_FORMATS[kind]) or not (prefs or sft):
            return None
        holds = f"{prefs[0]} preference records" if prefs else f"SFT records ({sft})"
        wants = " or ".join(str(list(PREF_KEYS[f])) for f in KIND_FORMATS[kind])
    return (f"{key}: {spec} holds {holds} (first record's keys: {sorted(record)}), but this "
            f"algorithm reads {KIND_NAMES[kind]} data: records with keys {wants}")


def eval_iterators(sources: Any, make: Callable[[range | None], Any]):
    """`Algorithm.eval_iterator`: () -> iterator over all of data.eval, or, with several eval
    sources, {short name: () -> iterator over that source's records} (logged apart)."""
    if sources is None:
        return None
    ranges = eval_record_ranges(sources if isinstance(sources, Mixture) else None)
    if ranges is None:
        return partial(make, None)
    return {name: partial(make, r) for name, r in ranges.items()}


def map_eval(eval_iterator, wrap: Callable[[Any], Any]):
    """`eval_iterators`' result with every iterator it makes passed through `wrap`."""
    if eval_iterator is None:
        return None
    if isinstance(eval_iterator, dict):
        return {name: _Wrapped(make, wrap) for name, make in eval_iterator.items()}
    return _Wrapped(eval_iterator, wrap)


class _Wrapped:
    def __init__(self, make, wrap):
        self.make, self.wrap = make, wrap

    def __call__(self):
        return self.wrap(self.make())
