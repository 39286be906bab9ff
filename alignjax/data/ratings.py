"""Preference pairs and ranked groups from rated responses (several responses, a score each).

Rated record layouts (one JSON object per line, or the same columns in Parquet / datasets):
- UltraFeedback (openbmb/UltraFeedback): ``instruction`` (or ``prompt``) and ``completions``, a
  list of ``{"response": ..., "overall_score": ...}``; ``rating_key`` picks another numeric field
  of each completion, e.g. ``"fine-grained_score"`` (the mean of the four aspect ratings).
- plain: ``prompt`` and ``responses``, a list of ``{"text": ..., "score": ...}`` (``rating_key``
  renames ``score``), or a list of responses with a parallel ``scores`` list (the ranked format).
Prompts and responses are strings or messages, as in ``alignjax.data.preference_format``.

Rules (``RULES``), for one record with scores s:
- ``best_vs_worst``: chosen = the first response with the highest score, rejected = the first with
  the lowest.
- ``best_vs_random``: UltraFeedback's binarisation (Zephyr): chosen = the first highest, rejected
  = a uniformly random one of the other responses, drawn with
  ``numpy.random.default_rng([seed, record_key(record)]).integers(n - 1)`` over the others in
  record order; ``record_key`` hashes the record's prompt, responses and scores, so the choice is
  the same for a record wherever it sits in the file and whatever else is skipped.
- ``all_pairs``: every pair (a, b), a < b in record order, the better one chosen.
- ``ranked`` (for kind "ranked", RRHF/PRO): one ``{prompt, responses, scores}`` group per record.
A pair is kept when the chosen score minus the rejected one is > 0 and >= ``min_margin``; the
others are ties, dropped and counted. A ranked group whose scores are all equal is a tie too.
Each pair record carries ``margin`` = the score difference (the reward model's margin loss;
``margin_scale`` multiplies it when training, 0 = off).

Records with fewer than two responses, missing keys or non-numeric scores are ``InvalidRecord``
errors naming file:line (all found at once), or with ``skip_invalid`` are skipped and counted.
If every candidate pair is a tie the data is refused: there is nothing to learn from.

``RatedSource`` reads the rated source once at open and keeps an index of (record, i, j), so one
record can give several examples while grain keeps random access and exact resume; examples are
rebuilt from the record when read. ``write_from_ratings`` writes the built records to JSONL.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from alignjax.data.pipeline import _get  # one reader for dicts and ConfigDicts
from alignjax.data.preference_format import InvalidRecord, _number
from alignjax.data.sources import DataError, open_sources, where

log = logging.getLogger(__name__)

PAIR_RULES = ("best_vs_worst", "best_vs_random", "all_pairs")
RULES = PAIR_RULES + ("ranked",)
SHOWN = 20  # invalid records listed in one error


@dataclasses.dataclass(frozen=True)
class Rated:
    """One rated record: a prompt and its responses with their scores (record order)."""

    prompt: Any
    responses: tuple
    scores: tuple[float, ...]


@dataclasses.dataclass
class RatingStats:
    records: int = 0  # rated records read
    invalid: int = 0  # skipped (skip_invalid) as invalid
    examples: int = 0  # pairs (or ranked groups) built
    ties: int = 0  # candidate pairs (groups) dropped: score difference 0 or below min_margin


def _check_rule(rule: str, kind: str | None = None) -> None:
    if rule not in RULES:
        raise DataError(f"data.from_ratings={rule!r} unknown; choose from {RULES}")
    allowed = {"pair": PAIR_RULES, "ranked": ("ranked",)}.get(kind, ()) if kind else RULES
    if rule not in allowed:
        raise DataError(f"data.from_ratings={rule!r} does not fit preference kind {kind!r}; "
                        f"choose from {allowed or 'none (no rated data for this kind)'}")


def read_rated(record: Any, rating_key: str = "") -> Rated:
    """A rated record in either layout (module doc) -> ``Rated``; ValueError or TypeError if not."""
    if not isinstance(record, Mapping):
        raise TypeError(f"expected a dict record, got {type(record).__name__}")
    prompt = record.get("prompt", record.get("instruction"))
    if prompt is None:
        raise ValueError(f"record lacks 'prompt' (or UltraFeedback's 'instruction'); present: "
                         f"{sorted(record)}")
    if record.get("completions") is not None:
        items, text_key = record["completions"], "response"
        score_key = rating_key or "overall_score"
    elif record.get("responses") is not None:
        items, text_key, score_key = record["responses"], "text", rating_key or "score"
    else:
        raise ValueError("a rated record needs 'completions' (UltraFeedback: [{response, "
                         "overall_score}]) or 'responses' ([{text, score}], or a list with "
                         f"'scores'); present: {sorted(record)}")
    if not isinstance(items, list):
        raise TypeError(f"'completions' / 'responses' must be a list, got {type(items).__name__}")
    if record.get("scores") is not None and "completions" not in record:
        scores = record["scores"]
        if not isinstance(scores, list) or len(scores) != len(items):
            raise ValueError(f"'responses' has {len(items)} items but 'scores' "
                             f"{len(scores) if isinstance(scores, list) else scores!r:.40}")
        texts = items
    else:
        for n, item in enumerate(items):
            if not isinstance(item, Mapping) or text_key not in item or score_key not in item:
                raise ValueError(f"response {n} must be a dict with {text_key!r} and "
                                 f"{score_key!r}, got {item!r:.80}")
        texts, scores = [it[text_key] for it in items], [it[score_key] for it in items]
    if len(texts) < 2:
        raise ValueError(f"a rated record needs >= 2 responses, got {len(texts)}")
    return Rated(prompt, tuple(texts),
                 tuple(_number(s, f"score of response {n}") for n, s in enumerate(scores)))


def record_key(rated: Rated) -> int:
    """A stable 32-bit hash of the record's content (seeds ``best_vs_random``)."""
    text = json.dumps([rated.prompt, list(rated.responses), list(rated.scores)], sort_keys=True,
                      ensure_ascii=False, default=str)
    return zlib.crc32(text.encode("utf-8"))


def pair_indices(rated: Rated, rule: str, min_margin: float = 0.0, seed: int = 0
                 ) -> tuple[list[tuple[int, int]], int]:
    """([(chosen index, rejected index), ...] kept, ties dropped) for one record (module doc)."""
    _check_rule(rule, "pair")
    s = np.asarray(rated.scores, np.float64)
    best = int(np.argmax(s))  # the first of equal highest scores
    if rule == "best_vs_worst":
        candidates = [(best, int(np.argmin(s)))]
    elif rule == "best_vs_random":
        others = [k for k in range(len(s)) if k != best]
        rng = np.random.default_rng([int(seed), record_key(rated)])
        candidates = [(best, others[int(rng.integers(len(others)))])]
    else:
        candidates = [(a, b) if s[a] >= s[b] else (b, a)
                      for a in range(len(s)) for b in range(a + 1, len(s))]
    kept = [(i, j) for i, j in candidates if s[i] - s[j] > 0 and s[i] - s[j] >= min_margin]
    return kept, len(candidates) - len(kept)


def pair_record(rated: Rated, i: int, j: int, margin_scale: float = 1.0) -> dict:
    """The pairwise record: response i chosen over j, margin = scale * (score i - score j)."""
    return {"prompt": rated.prompt, "chosen": rated.responses[i], "rejected": rated.responses[j],
            "margin": float(margin_scale) * (rated.scores[i] - rated.scores[j])}


def pairs_from_rated(record: Any, rule: str, min_margin: float = 0.0, seed: int = 0,
                     rating_key: str = "") -> tuple[list[dict], int]:
    """One rated record -> ([{prompt, chosen, rejected, margin}, ...], ties dropped)."""
    rated = read_rated(record, rating_key)
    kept, ties = pair_indices(rated, rule, min_margin, seed)
    return [pair_record(rated, i, j) for i, j in kept], ties


def ranked_from_rated(record: Any, rating_key: str = "") -> dict | None:
    """One rated record -> ``{prompt, responses, scores}`` (record order), or None (all tied)."""
    rated = read_rated(record, rating_key)
    if len(set(rated.scores)) < 2:
        return None
    return {"prompt": rated.prompt, "responses": list(rated.responses),
            "scores": list(rated.scores)}


class RatedSource:
    """Random-access source of the pair (or ranked) records built from a rated source.

    Example n is (record r, i, j): response i of record r chosen over response j (ranked: the
    whole group, i = j = -1). ``where(n)`` names the rated record's file:line.
    """

    def __init__(self, source: Any, rule: str, *, min_margin: float = 0.0, seed: int = 0,
                 rating_key: str = "", margin_scale: float = 1.0, skip_invalid: bool = False):
        _check_rule(rule)
        if min_margin < 0:
            raise DataError(f"data.min_margin must be >= 0, got {min_margin}")
        self.source, self.rule, self.min_margin, self.seed = source, rule, float(min_margin), seed
        self.rating_key, self.margin_scale = rating_key, float(margin_scale)
        self.stats = RatingStats(records=len(source))
        index, starts, bad = [], [], []
        for r in range(len(source)):
            starts.append(len(index))
            try:
                rated = self._rated(r)
            except InvalidRecord as e:
                bad.append(str(e))
                continue
            if rule == "ranked":
                kept, ties = ([(-1, -1)], 0) if len(set(rated.scores)) > 1 else ([], 1)
            else:
                kept, ties = pair_indices(rated, rule, self.min_margin, seed)
            index += [(r, i, j) for i, j in kept]
            self.stats.ties += ties
        starts.append(len(index))
        self._index = np.asarray(index, np.int64).reshape(-1, 3)
        self._starts = np.asarray(starts, np.int64)
        self.stats.examples = len(index)
        if bad and not skip_invalid:
            shown = "\n  ".join(bad[:SHOWN])
            more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
            raise InvalidRecord(f"{source!r}: {len(bad)} invalid rated records of "
                                f"{len(source)}; fix them, or set data.skip_invalid=True to "
                                f"skip them:\n  {shown}{more}")
        self.stats.invalid = len(bad)
        self.invalid = bad  # "file:line: reason" of each skipped record
        if bad:
            log.warning("ratings: skipped %d invalid rated records of %d (skip_invalid); first: %s",
                        len(bad), len(source), bad[0])
        if not index:
            raise DataError(
                f"{source!r}: data.from_ratings={rule!r} built no example from {len(source)} "
                f"rated records: all {self.stats.ties} candidate pairs are ties (score difference "
                f"0 or below data.min_margin={self.min_margin:g})"
                + (f" and {len(bad)} records are invalid" if bad else "")
                + "; lower data.min_margin, pick another rule or check the scores")
        if self.stats.ties:
            log.warning("ratings: %s from %s: %d examples built, %d ties dropped (score "
                        "difference 0 or below min_margin=%g)", rule, source, len(index),
                        self.stats.ties, self.min_margin)

    def _rated(self, r: int) -> Rated:
        location = where(self.source, r)
        try:
            return read_rated(self.source[r], self.rating_key)
        except DataError as e:  # malformed JSON: a bad record like any other
            message = str(e)
            raise InvalidRecord(message if message.startswith(location)
                                else f"{location}: {message}") from e
        except (ValueError, TypeError) as e:
            raise InvalidRecord(f"{location}: bad rated record: {e}") from e

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, n: int) -> dict:
        r, i, j = (int(x) for x in self._index[int(n)])
        rated = self._rated(r)
        if self.rule == "ranked":
            return {"prompt": rated.prompt, "responses": list(rated.responses),
                    "scores": list(rated.scores)}
        return pair_record(rated, i, j, self.margin_scale)

    def where(self, n: int) -> str:
        r, i, j = (int(x) for x in self._index[int(n)])
        location = where(self.source, r)
        return location if i < 0 else f"{location} (response {i} over {j})"

    def examples_of(self, r: int) -> range:
        """Example indices built from rated record r (empty for ties and invalid records)."""
        return range(int(self._starts[r]), int(self._starts[r + 1]))

    def __repr__(self) -> str:
        return f"RatedSource({self.source!r}, {self.rule}, {len(self)} examples)"


def rated_source(source: Any, cfg: Mapping[str, Any] | None, kind: str,
                 skip_invalid: bool | None = None) -> Any:
    """``source`` unchanged, or wrapped in a ``RatedSource`` when ``cfg["from_ratings"]`` is set.

    Keys: ``from_ratings`` ("" | a rule), ``min_margin`` (0), ``rating_key`` (""),
    ``rating_seed`` (0), ``rating_margin_scale`` (0: pairs carry margin 0), ``skip_invalid``
    (unless the argument overrides it, as `data check` does to list bad records).
    """
    rule = _get(cfg, "from_ratings", "") or ""
    if not rule:
        return source
    _check_rule(rule, kind)
    return RatedSource(source, rule, min_margin=float(_get(cfg, "min_margin", 0.0)),
                       seed=int(_get(cfg, "rating_seed", 0)),
                       rating_key=_get(cfg, "rating_key", "") or "",
                       margin_scale=float(_get(cfg, "rating_margin_scale", 0.0)),
                       skip_invalid=(bool(_get(cfg, "skip_invalid", False)) if skip_invalid is None
                                     else skip_invalid))


def record_check(source: Any, check):
    """The pre-training check of rated record r: ``check`` (an example index -> formatted
    example) on every example built from r. ``check`` unchanged when ``source`` is not rated."""
    if not isinstance(source, RatedSource):
        return check

    def check_record(r: int):
        return [check(n) for n in source.examples_of(int(r))]
    return check_record


def write_from_ratings(sources: Any, out_path: str, rule: str, *, min_margin: float = 0.0,
                       seed: int = 0, rating_key: str = "", skip_invalid: bool = False
                       ) -> RatingStats:
    """Build the pair (or ranked) records from rated sources and write them to JSONL.

    Pairs carry ``margin`` = the score difference. Returns the counters.
    """
    rated = RatedSource(open_sources(sources), rule, min_margin=min_margin, seed=seed,
                        rating_key=rating_key, margin_scale=1.0, skip_invalid=skip_invalid)
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rated[n], ensure_ascii=False) + "\n" for n in range(len(rated)))
    return rated.stats
