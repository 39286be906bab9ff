"""Data checks before training: duplicate prompts, train/eval overlap, lengths under seq_len.

``alignjax data check`` (and ``data.check_overlap`` at training start-up) reports

- exact duplicates: prompts identical after ``normalise`` (lower case, whitespace runs -> one
  space);
- near duplicates: the Jaccard similarity of two prompts' word n-gram sets (``shingles``: word
  n-grams of ``words``, n = 3 by default) is >= ``threshold`` (0.8). Candidates come from MinHash
  LSH (``datasketch``, 128 permutations, bands chosen so that a pair at the threshold is a
  candidate with probability >= 0.999, higher above it), and every candidate is verified with the
  exact Jaccard of its shingle sets, so no reported pair is a hashing artefact;
- training prompts that equal (exact) or nearly equal (near) an evaluation prompt;
- token lengths of prompts and responses under the tokenizer, and how many records ``seq_len``
  truncates or drops, computed with the trainers' own formatters and truncation (SFT:
  ``formatting.SFTFormatter`` + ``truncate``; preference data: ``preference_format``).

The prompt of a record: ``prompt`` (a string, or the user turns of a message list); the user turns
of ``messages``; the whole ``text`` of a text record; for pairs given as whole conversations the
user turns before the last assistant message; for HH transcripts the Human turns of the shared
prefix; ``instruction`` (rated UltraFeedback records). A record without any of those is listed as
invalid, with its location; a file that cannot be read (missing, malformed JSON) is an error.
"""
from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from alignjax.data.sources import DataError, open_sources, where

log = logging.getLogger(__name__)

THRESHOLD = 0.8  # Jaccard over word n-grams at or above which two prompts are near duplicates
NGRAM = 3  # words per shingle
NUM_PERM = 128  # MinHash permutations
EXAMPLES = 10  # examples of each finding in the report
KINDS = ("auto", "sft", "pair", "ranked", "kto")
_WORD = re.compile(r"\w+")
_HH_HUMAN = re.compile(r"\n\nHuman:(.*?)(?=\n\nAssistant:|\n\nHuman:|\Z)", re.DOTALL)


# ----------------------------------------------------------------------------- pure functions


def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, no leading/trailing space."""
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    """Word tokens (runs of letters, digits, underscore) of the normalised text."""
    return _WORD.findall(normalise(text))


def shingles(text: str, n: int = NGRAM) -> frozenset[str]:
    """The set of word n-grams (joined by a space); a text of fewer than n words is one shingle."""
    w = words(text)
    if len(w) < n:
        return frozenset([" ".join(w)]) if w else frozenset()
    return frozenset(" ".join(w[i:i + n]) for i in range(len(w) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _user_turns(messages: Any) -> str:
    if not isinstance(messages, list):
        raise TypeError(f"expected a list of messages, got {type(messages).__name__}")
    turns = []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs 'role' and string 'content', got {m!r:.80}")
        if m["role"] == "user":
            turns.append(m["content"])
    return "\n".join(turns)


def _text_or_turns(value: Any) -> str:
    return value if isinstance(value, str) else _user_turns(value)


def record_prompt(record: Any) -> str:
    """The prompt of an SFT or preference record (see the module doc); ValueError (TypeError)
    when it has none."""
    if not isinstance(record, Mapping):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    chosen = record.get("chosen")
    if isinstance(chosen, list) and len(chosen) > 1:  # whole conversations bring their prompt
        return _user_turns(chosen[:-1])
    if record.get("prompt") is not None:
        return _text_or_turns(record["prompt"])
    if "messages" in record:
        return _user_turns(record["messages"])
    if chosen is not None and record.get("rejected") is not None:  # HH-RLHF transcripts
        from alignjax.data.preference_format import split_shared_prefix
        prompt, _, _ = split_shared_prefix(chosen, record["rejected"])
        if isinstance(prompt, list):
            return _user_turns(prompt)
        prompt = prompt if prompt.startswith("\n\n") else "\n\n" + prompt
        return "\n".join(t.strip() for t in _HH_HUMAN.findall(prompt) if t.strip())
    for key in ("text", "instruction"):
        if isinstance(record.get(key), str):
            return record[key]
    raise ValueError(f"no prompt: expected one of 'prompt', 'messages', 'chosen'+'rejected', "
                     f"'text' or 'instruction' (present: {sorted(record)})")


def exact_groups(prompts: Sequence[str | None]) -> dict[str, list[int]]:
    """Normalised prompt -> indices holding it, in order (None / empty prompts left out)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        if p:
            key = normalise(p)
            if key:
                groups.setdefault(key, []).append(i)
    return groups


def _minhashes(texts: Sequence[str], n: int, num_perm: int) -> Iterable:
    from datasketch import MinHash
    sets = ([s.encode() for s in shingles(t, n)] for t in texts)
    return MinHash.generator(sets, num_perm=num_perm, seed=1)


LSH_RECALL = 0.999  # chance that a pair exactly at the threshold becomes a candidate


def lsh_params(threshold: float, num_perm: int = NUM_PERM, recall: float = LSH_RECALL
               ) -> tuple[int, int]:
    """(bands, rows per band) for MinHash LSH: the most rows per band (fewest candidates below the
    threshold) with which a pair at the threshold is a candidate with probability >= recall (a
    pair of Jaccard J is one with probability 1 - (1 - J^rows)^bands)."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def _lsh(threshold: float, num_perm: int):
    from datasketch import MinHashLSH
    # Tuned for recall; the exact Jaccard check then removes the candidates below the threshold.
    return MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm))


class _Verifier:
    """Exact Jaccard of two texts' shingle sets (recomputed on demand, a bounded cache)."""

    def __init__(self, n: int):
        self.shingles = functools.lru_cache(maxsize=1 << 16)(lambda t: shingles(t, n))

    def __call__(self, a: str, b: str) -> float:
        return jaccard(self.shingles(a), self.shingles(b))


def find_duplicates(prompts: Sequence[str | None], threshold: float = THRESHOLD, n: int = NGRAM,
                    num_perm: int = NUM_PERM) -> dict:
    """Duplicates among ``prompts``.

    Returns ``{"exact": [[i, j, ...], ...], "near": [(i, j, jaccard), ...]}``: groups of indices
    with the same normalised prompt (groups of 2 or more, in order of first index), and pairs of
    distinct normalised prompts whose exact Jaccard is >= threshold, one index per pair standing
    for its exact group (the first). Pairs are sorted by (i, j).
    """
    groups = exact_groups(prompts)
    keys = list(groups)
    lsh, verify, near = _lsh(threshold, num_perm), _Verifier(n), []
    for k, mh in enumerate(_minhashes(keys, n, num_perm)):
        for c in lsh.query(mh):  # every pair is found once: when its later member queries
            jac = verify(keys[c], keys[k])
            if jac >= threshold:
                near.append((groups[keys[c]][0], groups[keys[k]][0], jac))
        lsh.insert(k, mh, check_duplication=False)
    exact = [g for g in groups.values() if len(g) > 1]
    return {"exact": exact, "near": sorted(near)}


def find_overlaps(train: Sequence[str | None], evals: Sequence[str | None],
                  threshold: float = THRESHOLD, n: int = NGRAM, num_perm: int = NUM_PERM) -> dict:
    """Training prompts that repeat evaluation prompts.

    Returns ``{"exact": [(train i, eval j), ...], "near": [(train i, eval j, jaccard), ...]}``:
    every training index whose normalised prompt equals an evaluation prompt (paired with the
    first such evaluation index), and pairs of distinct normalised prompts with Jaccard >=
    threshold (the first index of each exact group stands for it).
    """
    train_groups, eval_groups = exact_groups(train), exact_groups(evals)
    exact = sorted((i, eval_groups[key][0]) for key, idx in train_groups.items()
                   if key in eval_groups for i in idx)
    eval_keys = list(eval_groups)
    lsh, verify, near = _lsh(threshold, num_perm), _Verifier(n), []
    with lsh.insertion_session() as session:
        for k, mh in enumerate(_minhashes(eval_keys, n, num_perm)):
            session.insert(k, mh, check_duplication=False)
    train_keys = [key for key in train_groups if key not in eval_groups]
    for key, mh in zip(train_keys, _minhashes(train_keys, n, num_perm)):
        for c in lsh.query(mh):
            jac = verify(key, eval_keys[c])
            if jac >= threshold:
                near.append((train_groups[key][0], eval_groups[eval_keys[c]][0], jac))
    return {"exact": exact, "near": sorted(near)}


def summarize(values: Sequence[int]) -> dict | None:
    """min / mean / p50 / p95 / max of token counts (None for no values)."""
    if len(values) == 0:
        return None
    v = np.asarray(values, np.float64)
    return {"min": int(v.min()), "mean": round(float(v.mean()), 2),
            "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "max": int(v.max())}


def detect_kind(record: Any) -> str | None:
    """sft | pair | ranked | kto from a record's keys (None when it fits none)."""
    if not isinstance(record, Mapping):
        return None
    if "chosen" in record and "rejected" in record:
        return "pair"
    if "responses" in record and "scores" in record:
        return "ranked"
    if "label" in record and "completion" in record and "prompt" in record:
        return "kto"
    from alignjax.data.formatting import detect_format
    return "sft" if detect_format(record) else None


class LengthCounter:
    """Token lengths of records formatted as training formats them, and what seq_len does to them.

    SFT: ``SFTFormatter`` then ``truncate`` (and a kept example without a target token is
    dropped, as the pipeline does); preference kinds: ``PreferenceFormatter`` then
    ``fit_example``. Records the formatter rejects raise its DataError (naming the location).
    """

    def __init__(self, tokenizer, kind: str, cfg: Mapping[str, Any] | None, seq_len: int | None):
        from alignjax.data.pipeline import _get
        self.kind, self.seq_len = kind, seq_len
        self.policy = _get(cfg, "truncation", "truncate_left_prompt")
        self.min_response = int(_get(cfg, "min_response_tokens", 1))
        if kind == "sft":
            from alignjax.data.formatting import FormatConfig, SFTFormatter
            self.formatter = SFTFormatter(tokenizer, FormatConfig.from_config(cfg))
        else:
            from alignjax.data.preference_format import PreferenceFormatter
            self.formatter = PreferenceFormatter(tokenizer, cfg, kind)
        self.prompt, self.response, self.total = [], [], []
        self.status: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, record: Any, location: str) -> None:
        if self.kind == "sft":
            from alignjax.data.formatting import num_targets, truncate
            ex = self.formatter(record, location)
            self.prompt.append(ex.prompt_len)
            self.response.append(len(ex) - ex.prompt_len)
            self.total.append(len(ex))
            status = "ok"
            if self.seq_len is not None:
                kept, status = truncate(ex, self.seq_len, self.formatter.cfg.truncation)
                if kept is not None and num_targets(kept) == 0:
                    status = "no_loss"
        else:
            from alignjax.data.preference_format import fit_example
            ex = self.formatter(record, location)
            self.prompt.append(len(ex.prompt))
            self.response.extend(len(r) for r in ex.responses)
            self.total.append(len(ex.prompt) + max(len(r) for r in ex.responses))
            status = "ok"
            if self.seq_len is not None:
                _, status = fit_example(ex, self.seq_len, self.policy, self.min_response)
        if status != "ok":
            self.status[status] = self.status.get(status, 0) + 1
            self.first.setdefault(status, location)

    def report(self) -> dict:
        return {"kind": self.kind, "seq_len": self.seq_len,
                "truncation": (self.formatter.cfg.truncation if self.kind == "sft"
                               else self.policy),
                "records": len(self.total), "prompt_tokens": summarize(self.prompt),
                "response_tokens": summarize(self.response), "total_tokens": summarize(self.total),
                "truncated": self.status.get("truncated", 0),
                "dropped": sum(v for k, v in self.status.items() if k != "truncated"),
                "by_status": dict(sorted(self.status.items())), "first": self.first}


def length_stats(records: Iterable[tuple[Any, str]], tokenizer, kind: str,
                 cfg: Mapping[str, Any] | None = None, seq_len: int | None = None) -> dict:
    """Token-length statistics of (record, location) pairs; see ``LengthCounter``."""
    counter = LengthCounter(tokenizer, kind, cfg, seq_len)
    for record, location in records:
        counter.add(record, location)
    return counter.report()


# ----------------------------------------------------------------------------- orchestration


def _excerpt(text: str | None, width: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 3] + "..."


def read_split(source: Any, counter: LengthCounter | None = None) -> tuple[list, list, list]:
    """(prompts, locations, invalid) of every record; invalid: "file:line: reason" for records
    without a prompt or that the formatter rejects (their prompt is None). A record that cannot be
    read (malformed JSON) raises the source's DataError, naming file:line."""
    from tqdm import tqdm
    prompts, locations, invalid = [], [], []
    for i in tqdm(range(len(source)), desc="data check", unit="rec", disable=len(source) < 5000,
                  file=sys.stderr):
        location = where(source, i)
        record = source[i]
        try:
            prompt = record_prompt(record)
            if counter is not None:
                counter.add(record, location)
        except (ValueError, TypeError) as e:  # DataError (a ValueError) names the location
            message = str(e)
            invalid.append(message if message.startswith(location) else f"{location}: {message}")
            prompt = None
        prompts.append(prompt)
        locations.append(location)
    return prompts, locations, invalid


def _count_rated(source: Any, cfg: Mapping[str, Any], kind: str, counter: LengthCounter,
                 invalid: Sequence[str]) -> list[str]:
    """Add the examples ``data.from_ratings`` builds from ``source`` to ``counter``; returns the
    invalid rated records not already in ``invalid``."""
    from alignjax.data.ratings import rated_source
    rated = rated_source(source, cfg, kind, skip_invalid=True)
    bad = []
    for n in range(len(rated)):
        try:
            counter.add(rated[n], rated.where(n))
        except (ValueError, TypeError) as e:
            bad.append(f"{rated.where(n)}: {e}")
    seen = {m.split(": ", 1)[0] for m in invalid}
    return [m for m in rated.invalid + bad if m.split(": ", 1)[0] not in seen]


def check_data(train: Any, evals: Any = None, tokenizer=None, cfg: Mapping[str, Any] | None = None,
               seq_len: int | None = None, kind: str = "auto", threshold: float = THRESHOLD,
               n: int = NGRAM, examples: int = EXAMPLES) -> dict:
    """The whole check as a JSON-ready dict. ``train`` / ``evals``: source specs or open sources
    (``open_sources``); without a tokenizer there are no length statistics."""
    if kind not in KINDS:
        raise DataError(f"kind {kind!r} unknown; choose from {KINDS}")
    if not 0.0 < threshold <= 1.0 or n < 1:
        raise DataError(f"need 0 < threshold <= 1 and n >= 1, got threshold={threshold}, n={n}")
    splits = {"train": open_sources(train)}
    if evals is not None and (not isinstance(evals, (list, tuple)) or evals):
        splits["eval"] = open_sources(evals)
    if kind == "auto":
        kind = detect_kind(splits["train"][0]) or "auto"
    report: dict[str, Any] = {
        "settings": {"threshold": threshold, "ngram": n, "num_perm": NUM_PERM, "kind": kind,
                     "seq_len": seq_len, "examples": examples},
        "splits": {}, "lengths": {}}
    data = {}
    from alignjax.data.pipeline import _get
    rule = _get(cfg, "from_ratings", "") or ""
    if rule and kind == "auto":
        kind = "ranked" if rule == "ranked" else "pair"
    for name, source in splits.items():
        counter = None
        if tokenizer is not None and kind != "auto":
            counter = LengthCounter(tokenizer, kind, cfg, seq_len)
        # Rated records (data.from_ratings): prompts and duplicates are the records', lengths
        # are those of the pairs (or ranked groups) training builds from them.
        prompts, locations, invalid = read_split(source, None if rule else counter)
        if rule and counter is not None:
            invalid += _count_rated(source, cfg, kind, counter, invalid)
        data[name] = (prompts, locations)
        report["splits"][name] = {
            "source": repr(source), "records": len(prompts),
            "empty_prompts": sum(1 for p in prompts if p is not None and not normalise(p)),
            "invalid": len(invalid), "invalid_examples": invalid[:examples]}
        if counter is not None:
            report["lengths"][name] = dict(counter.report(), from_ratings=rule)
    if tokenizer is None:
        report["lengths_note"] = "no tokenizer given (--tokenizer or --config): no length statistics"
    elif kind == "auto":
        report["lengths_note"] = ("the first training record fits no SFT or preference format: no "
                                  "length statistics (give --kind)")

    prompts, locations = data["train"]
    dup = find_duplicates(prompts, threshold, n)
    report["duplicates"] = {
        "exact": {"groups": len(dup["exact"]),
                  "records": sum(len(g) - 1 for g in dup["exact"]),  # copies beyond the first
                  "examples": [{"locations": [locations[i] for i in g],
                                "prompt": _excerpt(prompts[g[0]])} for g in dup["exact"][:examples]]},
        "near": {"pairs": len(dup["near"]),
                 "prompts": len({i for p in dup["near"] for i in p[:2]}),
                 "examples": [{"a": locations[i], "b": locations[j], "jaccard": round(jac, 4),
                               "prompt_a": _excerpt(prompts[i]), "prompt_b": _excerpt(prompts[j])}
                              for i, j, jac in dup["near"][:examples]]}}
    if "eval" in data:
        eval_prompts, eval_locations = data["eval"]
        over = find_overlaps(prompts, eval_prompts, threshold, n)
        eval_groups = exact_groups(eval_prompts)
        report["overlap"] = {
            "exact": {"train_records": len(over["exact"]),
                      "eval_records": sum(len(eval_groups[normalise(eval_prompts[j])])
                                          for j in {j for _, j in over["exact"]}),
                      "examples": [{"train": locations[i], "eval": eval_locations[j],
                                    "prompt": _excerpt(prompts[i])}
                                   for i, j in over["exact"][:examples]]},
            "near": {"pairs": len(over["near"]),
                     "train_prompts": len({i for i, _, _ in over["near"]}),
                     "eval_prompts": len({j for _, j, _ in over["near"]}),
                     "examples": [{"train": locations[i], "eval": eval_locations[j],
                                   "jaccard": round(jac, 4), "train_prompt": _excerpt(prompts[i]),
                                   "eval_prompt": _excerpt(eval_prompts[j])}
                                  for i, j, jac in over["near"][:examples]]}}
    return report


def _stats_row(name: str, s: dict | None) -> str:
    if s is None:
        return f"| {name} | - | - | - | - | - |"
    return f"| {name} | {s['min']} | {s['mean']:.1f} | {s['p50']:g} | {s['p95']:g} | {s['max']} |"


def render(report: dict) -> str:
    """The report as Markdown (what ``alignjax data check`` prints)."""
    s = report["settings"]
    out = ["# Data check", ""]
    for name, sp in report["splits"].items():
        out.append(f"- {name}: {sp['records']} records ({sp['source']})"
                   + (f"; {sp['empty_prompts']} empty prompts" if sp["empty_prompts"] else "")
                   + (f"; {sp['invalid']} invalid records" if sp["invalid"] else ""))
        out += [f"  - {m}" for m in sp["invalid_examples"]]
    near_def = f"Jaccard >= {s['threshold']:g} over word {s['ngram']}-grams"
    d = report["duplicates"]
    out += ["", "## Duplicate training prompts", "",
            (f"- exact (same text after case/whitespace normalisation): {d['exact']['groups']} "
             f"groups, {d['exact']['records']} extra copies")]
    out += [f"  - {', '.join(e['locations'][:5])}"
            + (f" (+{len(e['locations']) - 5})" if len(e["locations"]) > 5 else "")
            + f": \"{e['prompt']}\"" for e in d["exact"]["examples"]]
    out.append(f"- near ({near_def}): {d['near']['pairs']} pairs over {d['near']['prompts']} prompts")
    out += [f"  - {e['a']} ~ {e['b']} (J={e['jaccard']:.2f}): \"{e['prompt_a']}\" ~ "
            f"\"{e['prompt_b']}\"" for e in d["near"]["examples"]]
    if "overlap" in report:
        o = report["overlap"]
        out += ["", "## Training prompts that overlap evaluation prompts", "",
                (f"- exact: {o['exact']['train_records']} training records repeat "
                 f"{o['exact']['eval_records']} evaluation records")]
        out += [f"  - {e['train']} = {e['eval']}: \"{e['prompt']}\"" for e in o["exact"]["examples"]]
        out.append(f"- near ({near_def}): {o['near']['pairs']} pairs, "
                   f"{o['near']['train_prompts']} training / {o['near']['eval_prompts']} "
                   "evaluation prompts")
        out += [f"  - {e['train']} ~ {e['eval']} (J={e['jaccard']:.2f}): \"{e['train_prompt']}\" ~ "
                f"\"{e['eval_prompt']}\"" for e in o["near"]["examples"]]
    if report["lengths"]:
        out += ["", "## Token lengths", ""]
        for name, ln in report["lengths"].items():
            fit = ("no seq_len given" if ln["seq_len"] is None else
                   f"seq_len {ln['seq_len']} ({ln['truncation']}): {ln['truncated']} truncated, "
                   f"{ln['dropped']} dropped")
            detail = ", ".join(f"{k} {v} (first {ln['first'][k]})" for k, v in ln["by_status"].items())
            built = (f", built by data.from_ratings={ln['from_ratings']}"
                     if ln.get("from_ratings") else "")
            out += [f"{name} ({ln['kind']}{built}, {ln['records']} records formatted): {fit}"
                    + (f" [{detail}]" if detail else ""), "",
                    "| tokens | min | mean | p50 | p95 | max |", "|---|---|---|---|---|---|",
                    _stats_row("prompt", ln["prompt_tokens"]),
                    _stats_row("response", ln["response_tokens"]),
                    _stats_row("total", ln["total_tokens"]), ""]
    if "lengths_note" in report:
        out += ["", f"Token lengths: {report['lengths_note']}."]
    return "\n".join(out).rstrip() + "\n"


def findings(report: dict) -> int:
    """How many duplicate / overlap findings the report holds (0 = clean)."""
    d, o = report["duplicates"], report.get("overlap")
    total = d["exact"]["groups"] + d["near"]["pairs"]
    return total + (o["exact"]["train_records"] + o["near"]["pairs"] if o else 0)


def write_report(report: dict, out_dir: str) -> str:
    import json
    import os
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path


# ----------------------------------------------------------------------------- training start-up


def warn_overlap(data_cfg: Mapping[str, Any], train: Any, evals: Any = None,
                 shown: int = 3) -> dict | None:
    """``data.check_overlap``: the duplicate and overlap checks over the training (and eval)
    sources, logged as one warning with the counts and the first locations. Never raises on a
    finding; returns the report (None when the key is off)."""
    from alignjax.data.pipeline import _get
    if not _get(data_cfg, "check_overlap", False):
        return None
    import jax
    if jax.process_index() != 0:  # one warning per run, not one per host
        return None
    report = check_data(train, evals or None, examples=shown)
    if not findings(report):
        log.info("data.check_overlap: no duplicate training prompts and no train/eval overlap")
        return report
    d, o, parts = report["duplicates"], report.get("overlap"), []
    if o and (o["exact"]["train_records"] or o["near"]["pairs"]):
        firsts = [f"{e['train']} = {e['eval']}" for e in o["exact"]["examples"]]
        firsts += [f"{e['train']} ~ {e['eval']}" for e in o["near"]["examples"]]
        parts.append(f"{o['exact']['train_records']} training records repeat an evaluation "
                     f"prompt exactly and {o['near']['train_prompts']} nearly (first: "
                     f"{'; '.join(firsts[:shown])})")
    if d["exact"]["groups"] or d["near"]["pairs"]:
        firsts = [" = ".join(e["locations"][:2]) for e in d["exact"]["examples"]]
        firsts += [f"{e['a']} ~ {e['b']}" for e in d["near"]["examples"]]
        parts.append(f"{d['exact']['records']} exact duplicate and {d['near']['pairs']} "
                     f"near-duplicate pairs of training prompts (first: {'; '.join(firsts[:shown])})")
    log.warning("data.check_overlap (near = Jaccard >= %g over word %d-grams): %s. Training "
                "continues; `alignjax data check` lists them all.", THRESHOLD, NGRAM,
                "; ".join(parts))
    return report
