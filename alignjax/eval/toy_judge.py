"""Gold-labelled judge pairs from the toy suite, for `alignjax eval judge --pairs toy`.

Each record is {prompt, output_a, output_b, label ("A"/"B": the correct output), subset}; the
correct output is the checker's exact answer and the other one fails the checker. Subsets:

- natural: the wrong output is a near miss (a swapped, dropped or changed item, off by one).
- longer:  the wrong output is the answer plus one more item: longer, and wrong.
- surface: the wrong output copies the prompt's own items in the prompt's order (closer to the
           prompt's surface form, e.g. the unsorted list for a sort).
- fluent:  the wrong output is a near miss in a polite full sentence, the right one is bare.

Positions are balanced: within each subset and task the correct output alternates between A and
B (from a random start), so neither the position nor the task predicts the label.
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


def judge_pairs(n_per_subset: int = 100, seed: int = 0, subsets=SUBSETS,
                exclude=()) -> list[dict]:
    """`n_per_subset` pairs per subset, positions balanced (see the module docstring); no prompt
    in `exclude`."""
    rng = np.random.default_rng([seed, 13])
    # more prompts than needed: `surface` skips prompts whose items already are the answer
    examples = toy.make_examples(2 * n_per_subset + 20, seed=[seed, 1], exclude=exclude)
    out = []
    for subset in subsets:
        rows = []
        # The right answer's position alternates per task from a random start: with one global
        # alternation over round-robin tasks, each task would always have the same label (a
        # shortcut a judge learns: verdict from the task alone).
        start = {t: int(rng.integers(2)) for t in toy.TASKS}
        seen = {t: 0 for t in toy.TASKS}
        for e in examples:
            if len(rows) == n_per_subset:
                break
            wrong = _wrong(subset, e, rng)
            if wrong is None:
                continue
            right_first = (seen[e.task] + start[e.task]) % 2 == 0
            seen[e.task] += 1
            a, b = (e.answer, wrong) if right_first else (wrong, e.answer)
            rows.append(dict(prompt=e.prompt, output_a=a, output_b=b,
                             label="A" if right_first else "B", subset=subset, task=e.task))
        if len(rows) < n_per_subset:
            raise ValueError(f"only {len(rows)} toy pairs for subset {subset}")
        out += rows
    return out


def reference_notes(answer: str) -> str:
    """The first-stage notes a good judge writes for a toy instruction (the two-stage template's
    format): one question and the reference answer."""
    return ("Questions:\n1. Does the output give exactly what the instruction asks, nothing more "
            f"and nothing less?\nReference answer: {answer}")


def _chat(user: str, assistant: str) -> dict:
    # messages: the trainer renders the chat template, as the judge reads its prompts
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


def sft_records(n: int, template: str = "vanilla", seed: int = 1, subsets=("natural",)) -> list[dict]:
    """Judge training data: a user turn with the judge prompt, answered by the gold label (chat
    `messages` records, so training sees the chat template the judge is read with), from `n`
    pairs per subset whose prompts avoid the evaluation pairs' (seed 0) prompts.

    `template` may name several, comma-separated (one judge for several prompting strategies):
    each pair is written once per template. A two-stage template (rules_metrics_reference) adds,
    per pair, a first-stage record (its notes prompt answered by `reference_notes`) and judges
    with those gold notes."""
    from alignjax.data import toy
    from alignjax.eval.judge import get_template
    templates = [get_template(name.strip()) for name in template.split(",") if name.strip()]
    held_out = {p["prompt"] for p in judge_pairs(100, seed=0)}
    pairs = judge_pairs(n, seed=seed, subsets=subsets, exclude=held_out)
    answers = {e.prompt: e.answer for e in toy.make_examples(2 * n + 20, seed=[seed, 1],
                                                              exclude=held_out)}
    out = []
    for t in templates:
        for p in pairs:
            notes = ""
            if t.notes_prompt:
                notes = reference_notes(answers[p["prompt"]])
                out.append(_chat(t.notes_prompt.format(instruction=p["prompt"]), notes))
            out.append(_chat(t.render(p["prompt"], p["output_a"], p["output_b"], notes), p["label"]))
    return out


def main(argv=None) -> None:
    import argparse
    import json
    import os
    ap = argparse.ArgumentParser(description="Write toy judge data: pairs.jsonl (gold pairs for "
                                             "`alignjax eval judge`) and train.jsonl (SFT records "
                                             "for training a judge).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=4000, help="training pairs per subset")
    ap.add_argument("--n-eval", type=int, default=100, help="gold pairs per subset")
    ap.add_argument("--template", default="vanilla",
                    help="judge template(s) of the training prompts, comma-separated")
    ap.add_argument("--train-subsets", default="natural")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("pairs.jsonl", judge_pairs(args.n_eval)),
                       ("train.jsonl", sft_records(args.n_train, args.template,
                                                   subsets=tuple(args.train_subsets.split(","))))):
        with open(os.path.join(args.out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} records to {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
