"""Built-in toy instruction suite: tiny, exactly checkable tasks that prove a trainer learns.

Every prompt is one short instruction over a closed vocabulary (24 lowercase words, their
uppercase forms, digits 0-9, a few instruction words) whose answer follows from the prompt
by one simple rule (copy, reverse, sort, map, count). A tiny Llama trained from scratch on
CPU can solve them, and `check` grades a response from the prompt text alone, so it is
also the reward function for PPO.

Adding a task is one entry in `TASKS`: templates, a sampler, a solver and its near misses
(plausible wrong answers); the parser is derived from the templates.

    python -m alignjax.data.toy --out data/toy   # writes every record format as JSONL
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import re
from typing import Callable, Iterable, Sequence

import numpy as np

WORDS = (
    "cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen",
    "red", "blue", "green", "pink", "sun", "moon", "star", "tree",
    "rock", "lake", "hat", "cup", "box", "pen", "key", "map",
)  # fmt: skip
UPPER_WORDS = tuple(w.upper() for w in WORDS)
DIGITS = tuple("0123456789")
_MAX_TRIES = 1000  # resamples before declaring a task out of distinct prompts

Rng = np.random.Generator
Words = list[str]


@dataclasses.dataclass(frozen=True)
class ToyExample:
    task: str
    prompt: str
    answer: str
    meta: dict  # parsed instruction: items (tuple of str), template index, n / which


@dataclasses.dataclass(frozen=True)
class Task:
    """One task. Templates use {items}, and optionally {n} (1-9) and {which} (first|last)."""

    templates: tuple[str, ...]
    sample: Callable[[Rng], dict]  # meta without "template"
    solve: Callable[[dict], Words]
    near_misses: Callable[[dict, Rng], list[Words]]  # plausible wrong answers (may hit the answer)
    digit_items: bool = False  # items are single digits rather than lowercase words


# ---------------------------------------------------------------- word-list helpers


def _join(words: Iterable[str]) -> str:
    return " ".join(words)


def _words(rng: Rng, lo: int, hi: int) -> tuple[str, ...]:
    """lo..hi distinct words, so 'reverse' or 'first/last' never has an ambiguous answer."""
    k = int(rng.integers(lo, hi + 1))
    return tuple(WORDS[i] for i in rng.choice(len(WORDS), size=k, replace=False))


def _digits(rng: Rng, lo: int, hi: int) -> tuple[str, ...]:
    """lo..hi digits, repeats allowed (sorting with duplicates is still well defined)."""
    return tuple(str(d) for d in rng.integers(0, 10, size=int(rng.integers(lo, hi + 1))))


def _drop_one(words: Words, rng: Rng) -> Words:
    i = int(rng.integers(len(words)))
    return words[:i] + words[i + 1 :]


def _swap_adjacent(words: Words, rng: Rng) -> Words:
    if len(words) < 2:
        return list(words)
    i = int(rng.integers(len(words) - 1))
    return words[:i] + [words[i + 1], words[i]] + words[i + 2 :]


def _replace_one(words: Words, rng: Rng) -> Words:
    """Change one token to another of the same kind (digit, UPPER, lower): still in vocabulary."""
    i = int(rng.integers(len(words)))
    w = words[i]
    pool = DIGITS if w.isdigit() else UPPER_WORDS if w.isupper() else WORDS
    new = str(rng.choice([p for p in pool if p != w]))
    return words[:i] + [new] + words[i + 1 :]


# ---------------------------------------------------------------- the tasks


def _near_reverse(m: dict, rng: Rng) -> list[Words]:
    ans = list(m["items"])[::-1]
    return [list(m["items"]), _swap_adjacent(ans, rng), _drop_one(ans, rng), _replace_one(ans, rng)]


def _near_sort(m: dict, rng: Rng) -> list[Words]:
    ans = sorted(m["items"])
    unsorted, descending = list(m["items"]), ans[::-1]
    return [unsorted, descending, _swap_adjacent(ans, rng), _drop_one(ans, rng), _replace_one(ans, rng)]


def _near_upper(m: dict, rng: Rng) -> list[Words]:
    low = list(m["items"])
    up = [w.upper() for w in low]
    return [low, up[:1] + low[1:], _drop_one(up, rng), _replace_one(up, rng)]


def _near_count(m: dict, rng: Rng) -> list[Words]:
    k = len(m["items"])
    return [[str(k - 1)], [str(k + 1)]]  # off by one; k+1 <= 7 stays a single digit


def _near_repeat(m: dict, rng: Rng) -> list[Words]:
    p, n = list(m["items"]), m["n"]
    return [p * (n + 1), p * (n - 1), _replace_one(p, rng) * n, _drop_one(p * n, rng)]


def _near_pick(m: dict, rng: Rng) -> list[Words]:
    items = list(m["items"])
    other = items[-1] if m["which"] == "first" else items[0]
    middle = items[int(rng.integers(1, len(items) - 1))] if len(items) > 2 else other
    return [[other], [middle], items]


TASKS: dict[str, Task] = {
    "reverse": Task(
        templates=("reverse: {items}", "reverse the list: {items}"),
        sample=lambda rng: {"items": _words(rng, 2, 5)},
        solve=lambda m: list(m["items"])[::-1],
        near_misses=_near_reverse,
    ),
    "sort": Task(
        templates=("sort: {items}", "sort the numbers: {items}"),
        sample=lambda rng: {"items": _digits(rng, 2, 5)},
        solve=lambda m: sorted(m["items"]),  # single digits: string order is numeric order
        near_misses=_near_sort,
        digit_items=True,
    ),
    "upper": Task(
        templates=("uppercase: {items}", "make uppercase: {items}"),
        sample=lambda rng: {"items": _words(rng, 1, 4)},
        solve=lambda m: [w.upper() for w in m["items"]],
        near_misses=_near_upper,
    ),
    "count": Task(
        templates=("count: {items}", "how many words: {items}"),
        sample=lambda rng: {"items": _words(rng, 1, 6)},
        solve=lambda m: [str(len(m["items"]))],
        near_misses=_near_count,
    ),
    "repeat": Task(
        # Phrases of 1-3 words (not single words) so the task has thousands of distinct prompts
        # and a held-out split exists.
        templates=("repeat {n} times: {items}",),
        sample=lambda rng: {"items": _words(rng, 1, 3), "n": int(rng.integers(1, 5))},
        solve=lambda m: list(m["items"]) * m["n"],
        near_misses=_near_repeat,
    ),
    "pick": Task(
        templates=("{which} word: {items}",),
        sample=lambda rng: {"items": _words(rng, 2, 5), "which": ("first", "last")[int(rng.integers(2))]},
        solve=lambda m: [m["items"][0] if m["which"] == "first" else m["items"][-1]],
        near_misses=_near_pick,
    ),
}


# ---------------------------------------------------------------- parsing and checking


def _template_regex(template: str, digit_items: bool) -> re.Pattern:
    item = r"[0-9]" if digit_items else r"[a-z]+"
    fields = {
        "items": rf"(?P<items>{item}(?: {item})*)",
        "n": r"(?P<n>[1-9])",
        "which": r"(?P<which>first|last)",
    }
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    body = "".join(fields[p] if i % 2 else re.escape(p) for i, p in enumerate(parts))
    # Lookarounds instead of anchors so an instruction inside a chat template is still found.
    return re.compile(rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])")


_PATTERNS = [
    (name, i, _template_regex(t, task.digit_items))
    for name, task in TASKS.items()
    for i, t in enumerate(task.templates)
]


def parse(prompt: str) -> tuple[str, dict]:
    """(task, meta) of a toy prompt. The prompt may be wrapped in a chat template; the last
    instruction in the text wins (the final user turn). Raises ValueError if none is found."""
    found = [(m.end(), -m.start(), name, i, m) for name, i, rx in _PATTERNS for m in rx.finditer(prompt)]
    if not found:
        raise ValueError(f"not a toy-suite prompt: {prompt!r}")
    # Last to end, then longest: "make uppercase: x" also contains the template "uppercase: x".
    *_, name, i, m = max(found, key=lambda f: f[:2])
    meta = {"items": tuple(m["items"].split(" ")), "template": i}
    if "n" in m.re.groupindex:
        meta["n"] = int(m["n"])
    if "which" in m.re.groupindex:
        meta["which"] = m["which"]
    return name, meta


def from_prompt(prompt: str) -> ToyExample:
    """Rebuild the example (with its reference answer) from prompt text alone."""
    name, meta = parse(prompt)
    return ToyExample(task=name, prompt=prompt, answer=_join(TASKS[name].solve(meta)), meta=meta)


def _answer(example_or_prompt: ToyExample | str) -> str:
    if isinstance(example_or_prompt, ToyExample):
        return example_or_prompt.answer
    return from_prompt(example_or_prompt).answer


def check(example_or_prompt: ToyExample | str, response: str) -> float:
    """1.0 iff the response is exactly the answer once surrounding whitespace is stripped."""
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    return float(response.strip() == _answer(example_or_prompt))


def score(example_or_prompt: ToyExample | str, response: str) -> float:
    """Graded reward in [0, 1]: 1.0 only when correct, else half the character similarity,
    so wrong answers are ranked by closeness (ties are rare, not impossible)."""
    if check(example_or_prompt, response):
        return 1.0
    sim = difflib.SequenceMatcher(None, response.strip(), _answer(example_or_prompt)).ratio()
    return 0.5 * sim


def reward_fn(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Checker rewards for a batch of generated responses: float32 [batch] of 0/1."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return np.asarray([check(p, r) for p, r in zip(prompts, responses)], dtype=np.float32)


# ---------------------------------------------------------------- generation


def _sample(name: str, rng: Rng) -> ToyExample:
    task = TASKS[name]
    meta = task.sample(rng)
    meta["template"] = int(rng.integers(len(task.templates)))
    prompt = task.templates[meta["template"]].format(
        items=_join(meta["items"]), n=meta.get("n"), which=meta.get("which")
    )
    return ToyExample(task=name, prompt=prompt, answer=_join(task.solve(meta)), meta=meta)


def make_examples(
    n: int, seed: int | Sequence[int], tasks: Sequence[str] | None = None, exclude: Iterable[str] = ()
) -> list[ToyExample]:
    """n examples with distinct prompts (none in `exclude`), tasks in round-robin order so
    every prefix is balanced. Deterministic in (n, seed, tasks, exclude)."""
    names = tuple(tasks) if tasks is not None else tuple(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    rng = np.random.default_rng(seed)
    seen, out = set(exclude), []
    for i in range(n):
        name = names[i % len(names)]
        for _ in range(_MAX_TRIES):
            ex = _sample(name, rng)
            if ex.prompt not in seen:
                break
        else:
            raise ValueError(f"task {name!r} ran out of distinct prompts after {len(out)} examples")
        seen.add(ex.prompt)
        out.append(ex)
    return out


def toy_splits(
    n_train: int = 20000, n_eval: int = 200, seed: int = 0, tasks: Sequence[str] | None = None
) -> dict[str, list[ToyExample]]:
    """Train and held-out eval splits; no prompt appears in both. The defaults are the splits the
    trainers (`data.train="toy"`), the demo and the toy evaluation use."""
    splits = _toy_splits(n_train, n_eval, seed, None if tasks is None else tuple(tasks))
    return {name: list(examples) for name, examples in splits.items()}


@functools.lru_cache(maxsize=4)  # 1.4 s a call: every run writes both splits; tests run many
def _toy_splits(n_train: int, n_eval: int, seed: int, tasks: tuple | None) -> dict[str, tuple]:
    # Eval is drawn first so that it follows the task distribution exactly; train avoids it.
    evals = make_examples(n_eval, [seed, 1], tasks)
    train = make_examples(n_train, [seed, 0], tasks, exclude={e.prompt for e in evals})
    assert not {e.prompt for e in train} & {e.prompt for e in evals}, "splits overlap"
    return {"train": tuple(train), "eval": tuple(evals)}


def wrong_answers(example: ToyExample, rng: Rng, k: int) -> list[str]:
    """k distinct responses that all fail the checker: near misses first, then random edits."""
    task = TASKS[example.task]
    near = [_join(w) for w in task.near_misses(example.meta, rng)]
    near = list(dict.fromkeys(c for c in near if c and c != example.answer))
    out = [near[i] for i in rng.permutation(len(near))[:k]]
    words = example.answer.split(" ")
    for t in range(_MAX_TRIES):
        if len(out) >= k:
            return out
        c = _join(_replace_one(words, rng) if t % 2 == 0 else words + [str(rng.choice(WORDS))])
        if c not in out:
            out.append(c)
    raise RuntimeError(f"could not find {k} wrong answers for {example.prompt!r}")


# data.train=toy_imperfect: the demonstrator is unreliable on two tasks: it miscounts and
# half-sorts 3 times in 4 (a near miss of the task), and is right on the other four tasks.
IMPERFECT_TASKS = {"count": 0.75, "sort": 0.75}


def imperfect(examples: Sequence[ToyExample], error_rates: dict = IMPERFECT_TASKS, seed: int = 7) -> list:
    """The examples with a seeded share of answers (per task, `error_rates`) replaced by a
    plausible wrong answer (`wrong_answer`): demonstrations with systematic errors, as real
    ones have. SFT imitates them (on these tasks its most likely answer is a wrong one); methods
    that use the checker or preferences can do better, since the right answer keeps some mass."""
    rng = np.random.default_rng(seed)
    out = []
    for e in examples:
        wrong = rng.random() < error_rates.get(e.task, 0.0)
        out.append(dataclasses.replace(e, answer=wrong_answer(e, rng)) if wrong else e)
    return out


def wrong_answer(example: ToyExample, rng: Rng) -> str:
    """One plausible wrong response (partial sort, a changed/missing word, off-by-one, ...)."""
    return wrong_answers(example, rng, 1)[0]


# ---------------------------------------------------------------- record builders


def sft_records(examples: Sequence[ToyExample], style: str = "prompt_completion") -> list[dict]:
    # No joining space in completions: the pipeline tokenises prompt and completion apart.
    if style == "prompt_completion":
        return [{"prompt": e.prompt, "completion": e.answer} for e in examples]
    if style == "messages":
        return [
            {"messages": [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}]}
            for e in examples
        ]
    raise ValueError(f"unknown style {style!r}; use 'prompt_completion' or 'messages'")


def preference_records(examples: Sequence[ToyExample], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": e.prompt, "chosen": e.answer, "rejected": wrong_answer(e, rng)} for e in examples]


def ranked_records(examples: Sequence[ToyExample], k: int = 4, seed: int = 0) -> list[dict]:
    """k distinct responses per prompt, best first (the correct answer, score 1.0)."""
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    rng = np.random.default_rng(seed)
    records = []
    for e in examples:
        scored = [(score(e, r), r) for r in [e.answer, *wrong_answers(e, rng, k - 1)]]
        scored.sort(key=lambda sr: -sr[0])  # stable: equal scores keep their sampled order
        records.append(
            {
                "prompt": e.prompt,
                "responses": [r for _, r in scored],
                "scores": [round(s, 4) for s, _ in scored],
            }
        )
    return records


def kto_records(examples: Sequence[ToyExample], seed: int = 0, desirable_fraction: float = 0.5) -> list[dict]:
    """Unpaired data: one record per example, correct (label True) or a wrong answer (False)."""
    rng = np.random.default_rng(seed)
    records = []
    for e in examples:
        good = bool(rng.random() < desirable_fraction)
        completion = e.answer if good else wrong_answer(e, rng)
        records.append({"prompt": e.prompt, "completion": completion, "label": good})
    return records


def all_texts(examples: Iterable[ToyExample]) -> Iterable[str]:
    """Texts to train a tokenizer on: prompts and answers, then the whole closed vocabulary
    (wrong answers may use words no sampled example contains)."""
    for e in examples:
        yield e.prompt
        yield e.answer
    yield _join(WORDS)
    yield _join(UPPER_WORDS)
    yield _join(DIGITS)


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the toy instruction suite in every record format.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    splits = toy_splits(args.n_train, args.n_eval, args.seed)
    for split, exs in splits.items():
        formats = {
            "sft": sft_records(exs),
            "messages": sft_records(exs, style="messages"),
            "preference": preference_records(exs, args.seed),
            "ranked": ranked_records(exs, seed=args.seed),
            "kto": kto_records(exs, args.seed),
        }
        for fmt, records in formats.items():
            write_jsonl(records, os.path.join(args.out, f"{fmt}_{split}.jsonl"))
    n_train, n_eval = len(splits["train"]), len(splits["eval"])
    print(f"wrote {n_train} train / {n_eval} eval examples x {len(formats)} formats to {args.out}")


if __name__ == "__main__":
    main()
