"""Every record of the training (and eval) data checked before the first step.

Without this, a malformed record deep in a file stops training only when the shuffled reader
reaches it, after hours of work. The check is the trainer's own formatter (parse, keys, types,
chat template, tokenization), run once over every record; all bad lines are reported at once
(the first 20 as file:line: reason, and the count). With ``data.skip_invalid`` they are left out
(counted, and the count printed) instead.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from alignjax.data.sources import DataError, open_sources, where

SHOWN = 20
PROGRESS_FROM = 5000  # records; smaller files are checked without a progress bar


class SkipSource:
    """A source without the records at `bad` indices; `where` still names the original line."""

    def __init__(self, source: Any, bad: Sequence[int]):
        bad = set(bad)
        self.source = source
        self.keep = [i for i in range(len(source)) if i not in bad]
        if not self.keep:
            raise DataError(f"{source!r}: every record is invalid; nothing left to train on")

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int):
        return self.source[self.keep[int(index)]]

    def where(self, index: int) -> str:
        return where(self.source, self.keep[int(index)])

    def __repr__(self) -> str:
        return f"SkipSource({self.source!r}, kept {len(self.keep)})"


def find_invalid(source: Any, check: Callable[[int], Any], desc: str) -> list[tuple[int, str]]:
    """(index, message) of each record that `check(index)` (the pipeline's own read-and-format
    step for that record) rejects with a DataError."""
    from tqdm import tqdm
    bad = []
    for i in tqdm(range(len(source)), desc=desc, unit="rec", disable=len(source) < PROGRESS_FROM,
                  file=sys.stderr):
        try:
            check(i)
        except DataError as e:  # the reader's and the formatter's errors name the line already
            location, message = where(source, i), str(e)
            bad.append((i, message if message.startswith(location) else f"{location}: {message}"))
    return bad


def validated_sources(specs: Sequence[Any], make_check: Callable[[Any], Callable[[int], Any]],
                      skip_invalid: bool, what: str, trusted: Sequence[Any] = ()) -> list:
    """Opens each spec and checks every record with `make_check(source)` (-> check(index)).

    Raises one DataError listing the bad records of all files (the first 20, and the count), or
    with `skip_invalid` returns sources without them and prints how many were skipped. Specs in
    `trusted` (records alignjax wrote itself) are passed through unchecked.
    """
    out, bad_all, total = [], [], 0
    for spec in specs:
        if spec in trusted:
            out.append(spec)
            continue
        source = open_sources(spec)
        bad = find_invalid(source, make_check(source), f"checking {what}")
        total += len(source)
        bad_all += [message for _, message in bad]
        out.append(SkipSource(source, [i for i, _ in bad]) if bad and skip_invalid else source)
    if bad_all and skip_invalid:
        print(f"alignjax: {what}: skipped {len(bad_all)} invalid records of {total} "
              f"(data.skip_invalid=True); first: {bad_all[0]}", file=sys.stderr)
    elif bad_all:
        shown = "\n  ".join(bad_all[:SHOWN])
        more = f"\n  ... and {len(bad_all) - SHOWN} more" if len(bad_all) > SHOWN else ""
        raise DataError(f"{what}: {len(bad_all)} invalid records of {total}, found before "
                        "training; fix them, or set --config.data.skip_invalid=True to skip "
                        f"them:\n  {shown}{more}")
    return out


def describe_counts(counts: dict, what: str, seq_len: int) -> str:
    """One line from SFTStats / PrefStats counters: what happens to the checked examples."""
    labels = {"truncated": f"truncated to seq_len {seq_len}",
              "dropped_too_long": "dropped (longer than seq_len)",
              "dropped_no_loss": "dropped (no target token left after truncation)",
              "dropped_prompt_too_long": "dropped (the prompt alone leaves no room)",
              "ranked_top_k": "ranked groups cut to num_responses"}
    parts = [f"{counts[k]} {label}" for k, label in labels.items() if counts.get(k)]
    return f"alignjax: {what}: " + (", ".join(parts) if parts else "no example truncated or dropped")
