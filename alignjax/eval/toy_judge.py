"""Gold-labelled judge pairs from the toy suite, for `alignjax eval judge --pairs toy`.

Each record is {prompt, output_a, output_b, label ("A"/"B": the correct output), subset}; the
correct output is the checker's exact answer and the other one fails the checker. Subsets:

- natural: the wrong output is a near miss (a swapped, dropped or changed item, off by one).
- longer:  the wrong output is the answer plus one more item: longer, and wrong.
- surface: the wrong output copies the prompt's own items in the prompt's order (closer to the
           prompt's surface form, e.g. the unsorted list for a sort).
- fluent:  the wrong output is a near miss in a polite full sentence, the right one is bare.

Positions are balanced: in each subset the correct output is A for even and B for odd indices.
The prompts are the toy held-out split's (the ones `data.eval="toy"` uses), unless `seed` says
otherwise; use another seed for judge training data.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from alignjax.data import toy

SUBSETS = ("natural", "longer", "surface", "fluent")


def _wrong(subset: str, e: toy.ToyExample, rng: np.random.Generator) -> Optional[str]:
    """The subset's wrong output for one example, or None when the rule gives no wrong answer
    for it (e.g. a sort prompt whose items are already sorted, for `surface`)."""
    if subset == "natural":
        out = toy.wrong_answer(e, rng)
    elif subset == "longer":
        out = e.answer + " " + e.answer.split(" ")[-1]
    elif subset == "surface":
        out = " ".join(e.meta["items"])
    elif subset == "fluent":
        out = f"Sure! Here is the result you asked for: {toy.wrong_answer(e, rng)}."
    else:
        raise ValueError(f"unknown subset {subset!r}; choose from {SUBSETS}")
    return None if toy.check(e, out) else out


def judge_pairs(n_per_subset: int = 100, seed: int = 0, subsets=SUBSETS) -> list[dict]:
    """`n_per_subset` pairs per subset, positions balanced (see the module docstring)."""
    rng = np.random.default_rng([seed, 13])
    # more prompts than needed: `surface` skips prompts whose items already are the answer
    examples = toy.make_examples(2 * n_per_subset + 20, seed=[seed, 1])
    out = []
    for subset in subsets:
        rows = []
        for e in examples:
            if len(rows) == n_per_subset:
                break
            wrong = _wrong(subset, e, rng)
            if wrong is None:
                continue
            right_first = len(rows) % 2 == 0
            a, b = (e.answer, wrong) if right_first else (wrong, e.answer)
            rows.append(dict(prompt=e.prompt, output_a=a, output_b=b,
                             label="A" if right_first else "B", subset=subset, task=e.task))
        if len(rows) < n_per_subset:
            raise ValueError(f"only {len(rows)} toy pairs for subset {subset}")
        out += rows
    return out
