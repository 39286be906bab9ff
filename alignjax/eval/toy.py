"""Checker accuracy of greedy answers on the toy suite's held-out split (learning, not just loss)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from alignjax.data import toy
from alignjax.model.generate import Generator, SamplingParams
from alignjax.model.tokenize import encode_prompts


def toy_eval_examples(n: int = 200):
    """The same held-out split the trainers' `data.eval="toy"` uses."""
    return toy.toy_splits(n_train=0)["eval"][:n]


def generate_answers(module, params, mesh, rules, tokenizer, prompts, max_new_tokens: int = 24,
                     batch_size: int = 64, generator: Optional[Generator] = None, **sampling):
    """Greedy (or sampled) chat answers, as text, for a list of prompt strings."""
    from alignjax.data.tokenizer import stop_token_ids
    gen = generator or Generator(module, mesh, rules, eos_ids=stop_token_ids(tokenizer),
                                 pad_id=tokenizer.pad_token_id)
    sp = SamplingParams(max_new_tokens=max_new_tokens, **{"temperature": 0.0, **sampling})
    return gen.generate_texts(params, tokenizer, encode_prompts(tokenizer, prompts, chat=True), sp,
                              batch_size)


def toy_accuracy(module, params, mesh, rules, tokenizer, n: int = 200, **kw) -> dict:
    """{'accuracy', 'by_task', 'samples'} of greedy answers judged by the toy checker."""
    examples = toy_eval_examples(n)
    answers = generate_answers(module, params, mesh, rules, tokenizer, [e.prompt for e in examples], **kw)
    scores = np.array([toy.check(e, a) for e, a in zip(examples, answers)], np.float32)
    by_task = {}
    for e, s in zip(examples, scores):
        by_task.setdefault(e.task, []).append(s)
    return {"accuracy": float(scores.mean()),
            "by_task": {k: float(np.mean(v)) for k, v in sorted(by_task.items())},
            "samples": [(e.prompt, a, bool(s)) for e, a, s in list(zip(examples, answers, scores))[:6]]}
