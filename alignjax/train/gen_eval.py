"""Generation-based evaluation during training (`train.eval_generate_every`), for every algorithm
that trains a language model (SFT, DPO and its family, PPO, GRPO, online DPO, ...).

Every `eval_generate_every` steps (and at the last step) the policy being trained answers the same
held-out prompts (`eval_generate_prompts`: `toy` or a data file with a `prompt` field; the first
`eval_generate_num`), greedily unless `eval_generate_temperature` > 0, and the run logs

    eval/reward_mean         mean reward of the responses (`eval_reward`: any reward spec of
                             alignjax.rewards: toy, a reward-model directory, python:FILE:FN, sums)
    eval/response_length     mean response length in tokens (EOS not counted)
    eval/win_rate_vs_start   adjusted win rate (wins + half the ties) against the starting model's
                             responses to the same prompts, judged by `eval_judge` (toy,
                             reward:DIR or llm:DIR as in `alignjax eval winrate`; empty: the
                             higher `eval_reward` wins)

The starting model's responses are generated before the first step and kept in
WORKDIR/eval_generate/start.jsonl, so a resumed run compares against the same texts; each
evaluation's responses go to WORKDIR/eval_generate/step_<N>.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np

from alignjax import fs
from alignjax.errors import UserError

START_FILE = "start.jsonl"


def _key(name: str) -> str:
    return f"train.{name}"


def mean_adjusted_win_rate(prefs: Sequence[Optional[float]]) -> float:
    """Mean preference over the decided pairs (1 win, 0.5 tie, 0 loss; probabilities as they
    are); an unparsed judgement (None) is left out, NaN when nothing was decided."""
    decided = [p for p in prefs if p is not None]
    return float(np.mean(decided)) if decided else float("nan")


class GenerationEval:
    """Samples the policy on held-out prompts and scores the responses (see the module doc)."""

    def __init__(self, config, workdir: str, run):
        from alignjax import rewards
        from alignjax.eval import judge as J
        from alignjax.model.generate import Generator, SamplingParams
        from alignjax.data.tokenizer import stop_token_ids
        from alignjax.train.rollout import encode_chat_prompts
        t = config.train
        self.every = int(t.eval_generate_every)
        reward_spec = str(t.eval_reward or "")
        if not reward_spec:
            raise UserError(f"{_key('eval_generate_every')}={self.every} needs "
                            f"{_key('eval_reward')}: toy, a reward-model directory or "
                            "python:FILE:FUNCTION (see alignjax.rewards)")
        self.texts = _prompts(str(t.eval_generate_prompts), int(t.eval_generate_num))
        self.prompt_ids = encode_chat_prompts(run.tokenizer, self.texts)
        self.tokenizer = run.tokenizer
        self.sampling = SamplingParams(max_new_tokens=int(t.eval_generate_max_new_tokens),
                                       temperature=float(t.eval_generate_temperature),
                                       seed=int(t.seed))
        self.batch_size = min(int(t.eval_generate_batch_size), len(self.texts))
        self.eos_ids = stop_token_ids(run.tokenizer)
        pad = run.tokenizer.pad_token_id
        self.generator = Generator(run.module, run.mesh, run.rules, eos_ids=self.eos_ids,
                                   pad_id=0 if pad is None else int(pad))
        self.reward = rewards.build_reward(reward_spec, mesh=run.mesh, rules=run.rules,
                                           policy_tokenizer=run.tokenizer,
                                           what=_key("eval_reward"))
        judge_spec = str(t.eval_judge or "")
        self.judge = (J.build_judge(judge_spec, mesh=run.mesh, rules=run.rules)
                      if judge_spec else J.ScoreJudge(self.reward, reward_spec))
        self.dir = fs.join(workdir, "eval_generate")
        self.start_texts: Optional[list[str]] = None

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or step % self.every == 0

    def respond(self, params) -> tuple[list[str], np.ndarray]:
        """(texts, token lengths) of the policy's responses to the eval prompts."""
        from alignjax.model.generate import completions_to_text
        texts, lengths = [], []
        for c, start in enumerate(range(0, len(self.prompt_ids), self.batch_size)):
            chunk = list(self.prompt_ids[start:start + self.batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)  # one shape: no recompiles
            sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed * 1_000_003 + c)
            out = self.generator.generate_ids(params, chunk, sampling)
            tokens, mask = np.asarray(out["tokens"][:real]), np.asarray(out["mask"][:real])
            texts += completions_to_text(self.tokenizer, tokens, mask, self.eos_ids)
            lengths += list(((mask > 0) & ~np.isin(tokens, self.eos_ids)).sum(axis=1))
        return texts, np.asarray(lengths, np.float64)

    def start(self, params, resuming: bool) -> dict:
        """The starting model's responses: read back on resume (returns {}), else generated and
        saved now (returns their step-0 metrics)."""
        path = fs.join(self.dir, START_FILE)
        if resuming and fs.exists(path):
            rows = [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]
            if [r["prompt"] for r in rows] == self.texts:
                self.start_texts = [r["response"] for r in rows]
                return {}
        if resuming:  # the saved start is missing or was made for other prompts
            print(f"eval_generate: no starting responses for these prompts in {path}; "
                  "eval/win_rate_vs_start is not logged in this run")
            return {}
        self.start_texts, lengths = self.respond(params)
        scores = self.reward.score(self.texts, self.start_texts)
        self._write(START_FILE, self.texts, self.start_texts, scores)
        return {"eval/reward_mean": float(np.mean(scores)),
                "eval/response_length": float(np.mean(lengths))}

    def __call__(self, params, step: int) -> dict:
        from alignjax.eval import judge as J
        texts, lengths = self.respond(params)
        scores = self.reward.score(self.texts, texts)
        self._write(f"step_{step}.jsonl", self.texts, texts, scores)
        row = {"eval/reward_mean": float(np.mean(scores)),
               "eval/response_length": float(np.mean(lengths))}
        if self.start_texts is not None:
            result = J.compare(self.judge, self.texts, texts, self.start_texts)
            row["eval/win_rate_vs_start"] = mean_adjusted_win_rate(result["prefs"])
        return row

    def _write(self, name: str, prompts, responses, scores=None) -> None:
        import jax
        if jax.process_index() != 0:
            return
        lines = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            rec = {"prompt": p, "response": r}
            if scores is not None:
                rec["reward"] = float(scores[i])
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        fs.write_text(fs.join(self.dir, name), "".join(lines))


def _prompts(spec: str, limit: int) -> list[str]:
    from alignjax.eval.run import load_prompts
    if not spec:
        raise UserError(f"{_key('eval_generate_prompts')} is empty: give toy or a data file with "
                        "a 'prompt' field")
    texts = load_prompts(spec, limit)
    if not texts:
        raise UserError(f"{_key('eval_generate_prompts')}={spec}: no prompts")
    return texts[:limit] if limit else texts


def build(config, workdir: str, run, head: str) -> Optional[GenerationEval]:
    """The run's generation eval, or None when `train.eval_generate_every` is 0."""
    every = int(config.train.get("eval_generate_every", 0) or 0)
    if every <= 0:
        return None
    if head != "lm":
        raise UserError(f"{_key('eval_generate_every')}={every}: this run trains a {head} model, "
                        "which does not generate; set it to 0")
    return GenerationEval(config, workdir, run)
