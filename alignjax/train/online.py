"""What every online algorithm (PPO, GRPO/RLOO/REINFORCE++) shares around its own math.

    PromptStream   prompts in a seeded shuffled order, encoded when drawn; position checkpointed
    HostState      named host-side parts (prompt position, KL controller) the checkpoints carry
    SampleLog      a few prompt / response / score rows -> WORKDIR/samples/step_N.jsonl
    ToyEval        held-out greedy toy-checker accuracy of the policy every train.eval_every steps
    Producer       (state, frozen, step, rng) -> (update batch, metrics): draw prompts, roll out
                   with the trainer's own policy params, then the algorithm's `process` (its
                   advantages), plus timing, samples and evals
    check_rollout  the shape checks every online algorithm makes before its first step

An algorithm module supplies `process(batch) -> (update batch, scores, metrics)`, its settings
(which carry prompts_per_step, rows, seed, max_prompt_len, max_new_tokens, num_minibatches and
grad_accum_steps) and the name of its config section for error messages.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

import jax
import numpy as np

from alignjax import fs
from alignjax.errors import UserError
from alignjax.model.config import ConfigError


class PromptStream:
    """Prompts in a seeded shuffled order, epoch after epoch; its position is checkpointed.

    Prompts are encoded when drawn (`encode`: texts -> token ids); one longer than `max_len`
    stops the run with a one-line error naming its record in `source` and the setting `key`."""

    def __init__(self, texts, encode, seed: int, max_len: int, source: str = "data.train",
                 key: str = "ppo.max_prompt_len"):
        self.texts, self.encode, self.seed = list(texts), encode, int(seed)
        self.max_len, self.source, self.key = int(max_len), source, key
        self.epoch, self.position = 0, 0

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.texts))

    def take(self, n: int):
        picked = []
        while len(picked) < n:
            order = self._order()
            picked.append(int(order[self.position]))
            self.position += 1
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        texts = [self.texts[i] for i in picked]
        ids = self.encode(texts)
        for i, row in zip(picked, ids):
            if len(row) > self.max_len:
                raise UserError(f"{self.source}: prompt {i} has {len(row)} tokens with the chat "
                                f"template, more than {self.key}={self.max_len}; raise "
                                f"{self.key} or drop the longer prompts")
        return texts, ids

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class HostState:
    """Named parts with get_state/set_state (e.g. prompts=PromptStream, kl=KLController), saved
    and restored with the checkpoint as one dict {name: part state}."""

    def __init__(self, **parts):
        self.parts = parts

    def get_state(self) -> dict:
        return {name: part.get_state() for name, part in self.parts.items()}

    def set_state(self, state: dict) -> None:
        for name, part in self.parts.items():
            part.set_state(state[name])


class SampleLog:
    """A few prompt / response / score rows of a rollout -> WORKDIR/samples/step_N.jsonl at steps
    1, every + 1, ... (train.eval_every; 0 = never), as ToyEval: the model after N - 1 steps."""

    def __init__(self, workdir: str, every: int, rows: int = 8):
        self.workdir, self.every, self.rows = workdir, every, rows

    def __call__(self, step: int, info: dict, scores) -> None:
        if not self.every or (step - 1) % self.every or jax.process_index() != 0:
            return
        rows = list(zip(info["prompts"], info["completions"], scores))[:self.rows]
        fs.write_text(fs.join(self.workdir, "samples", f"step_{step}.jsonl"), "".join(
            json.dumps({"prompt": p, "response": c, "score": float(r)}, ensure_ascii=False) + "\n"
            for p, c, r in rows))


class ToyEval:
    """Held-out greedy checker accuracy of the policy on the toy suite (alignjax.eval.toy) at
    steps 1, every + 1, 2 every + 1, ...: the producer runs before its step's updates, so these
    measure the model after 0, every, 2 every, ... steps (`eval/toy_accuracy_step` says which).
    The trained model, after the last step, is measured by Producer.final_eval in that step's row
    (which this eval then leaves to it)."""

    def __init__(self, roller, every: int, n: int = 200, last: int = 0):
        from alignjax.model.generate import Generator
        self.every, self.n, self.roller, self.last = every, n, roller, last
        self.generator = Generator(roller.policy_module, roller.mesh, roller.rules,
                                   eos_ids=roller.eos_ids, pad_id=roller.pad_id)

    def __call__(self, step: int, policy_params) -> dict:
        if not self.every or (step - 1) % self.every or step == self.last:
            return {}
        return self.measure(step - 1, policy_params)

    def measure(self, trained_steps: int, policy_params) -> dict:
        from alignjax.eval.toy import toy_accuracy
        r = self.roller
        acc = toy_accuracy(r.policy_module, policy_params, r.mesh, r.rules, r.tokenizer, n=self.n,
                           generator=self.generator)
        return {"eval/toy_accuracy": acc["accuracy"], "eval/toy_accuracy_step": float(trained_steps)}


class Producer:
    """(state, frozen, step, rng) -> (update batch, rollout metrics). The batch is the global one
    on every process: they all draw the same prompts and sample them together.

    `process(batch) -> (update batch, scores, metrics)` is the algorithm's part (advantages)."""

    def __init__(self, roller, settings, prompts: PromptStream, process: Callable,
                 samples: Optional[SampleLog] = None, toy_eval: Optional[ToyEval] = None,
                 is_log_step=lambda step: True):
        self.roller, self.s, self.prompts, self.process = roller, settings, prompts, process
        self.samples, self.toy_eval, self.is_log_step = samples, toy_eval, is_log_step
        self.pending: dict = {}  # eval results wait for the next step the loop logs
        self.rollout_end: Optional[float] = None

    def __call__(self, state, frozen, step: int, rng=None):
        s = self.s
        # The previous step's updates run asynchronously: wait for them, so timing/rollout is
        # sampling alone and timing/update the wall time from the end of the last rollout to now
        # (its updates, logging and checkpointing).
        jax.block_until_ready(state["params"])
        start = time.perf_counter()
        update_time = start - self.rollout_end if self.rollout_end is not None else None
        texts, ids = self.prompts.take(s.prompts_per_step)
        # The seed depends only on (train.seed, step): a resumed run samples what this one would.
        seed = s.seed * 1_000_003 + int(step)
        batch, info = self.roller.rollout(state["params"], frozen, texts, ids, seed)
        t0 = time.perf_counter()
        update, scores, metrics = self.process(batch)
        roll_time = info["timing/rollout"]
        metrics.update({"timing/rollout": roll_time,
                        "timing/score": info["timing/score"] + time.perf_counter() - t0,
                        "rollout_tokens_per_s": info["rollout_tokens"] / max(roll_time, 1e-9),
                        "episode": float(step * s.rows)})
        if update_time is not None:
            metrics["timing/update"] = update_time
        if self.samples is not None:
            self.samples(int(step), info, scores)
        if self.toy_eval is not None:
            self.pending.update(self.toy_eval(int(step), state["params"]["policy"]))
        if self.pending and self.is_log_step(int(step)):
            metrics.update(self.pending)
            self.pending = {}
        self.rollout_end = time.perf_counter()
        return update, metrics

    def final_eval(self, state, step: int) -> dict:
        """The toy eval of the trained model after the last step (the producer's evals measure
        the model before each step's updates, so the last updates would go unmeasured)."""
        if self.toy_eval is None:
            return {}
        return self.toy_eval.measure(int(step), state["params"]["policy"])


def bad_setting(s, section: str) -> Callable:
    """bad(key, why) raises the one-line ConfigError `<section>.<key>=<value>: <why>`."""
    def bad(key, msg):
        raise ConfigError(f"{section}.{key}={getattr(s, key)!r}: {msg}")
    return bad


def check_settings(s, section: str) -> None:
    """The checks every RL trainer's settings share: counts >= 1, the reference dtype, the
    sampler's settings, and a rollout batch of whole prompts that divides into minibatches and
    those into micro-batches."""
    bad = bad_setting(s, section)
    for key in ("samples_per_prompt", "max_prompt_len", "max_new_tokens", "epochs", "num_minibatches"):
        if int(getattr(s, key)) < 1:
            bad(key, "must be >= 1")
    if s.temperature < 0:
        bad("temperature", "must be >= 0 (0 = greedy)")
    if not 0 < s.top_p <= 1:
        bad("top_p", "must be in (0, 1] (1 = off)")
    if s.top_k < 0:
        bad("top_k", "must be >= 0 (0 = off)")
    if s.rows < 1 or s.rows % s.samples_per_prompt:
        raise ConfigError(f"train.batch_size={s.rows}: the batch is the responses of one rollout; "
                          f"make it a multiple of {section}.samples_per_prompt={s.samples_per_prompt}")
    if s.ref_dtype not in ("float32", "bfloat16"):
        bad("ref_dtype", "choose float32 or bfloat16")
    if s.grad_accum_steps < 1:
        raise ConfigError(f"train.grad_accum_steps={s.grad_accum_steps}: must be >= 1")
    if s.rows % s.num_minibatches:
        bad("num_minibatches", f"a rollout batch of {s.rows} responses (train.batch_size) does "
            f"not divide into {s.num_minibatches} minibatches")
    mb = s.rows // s.num_minibatches
    if mb % s.grad_accum_steps:
        raise ConfigError(f"train.grad_accum_steps={s.grad_accum_steps}: a minibatch of {mb} "
                          f"responses does not divide into {s.grad_accum_steps} micro-batches")


def check_rollout(s, section: str, mesh, rules, max_positions: int) -> None:
    """One-line ConfigErrors naming `<section>.<key>`: prompt + new tokens beyond the model's
    positions, or a micro-batch of an update that does not split over the data-parallel devices."""
    from alignjax import sharding as shd
    if s.max_prompt_len + s.max_new_tokens > max_positions:
        raise ConfigError(f"{section}.max_prompt_len={s.max_prompt_len} + {section}.max_new_tokens="
                          f"{s.max_new_tokens} exceeds the model's max_position_embeddings "
                          f"{max_positions}; lower one of them")
    n = shd.axis_size(mesh, dict(rules).get("batch"))
    micro = s.rows // s.num_minibatches // s.grad_accum_steps
    if micro % n:
        raise ConfigError(
            f"{section}.num_minibatches={s.num_minibatches}: a micro-batch of {micro} responses "
            f"(train.batch_size {s.rows} / {section}.num_minibatches / train.grad_accum_steps "
            f"{s.grad_accum_steps}) does not split over the {n} data-parallel devices; make it a "
            f"multiple of {n}")


def reward_model_paths(s, section: str) -> list:
    """The reward-model directories `<section>.reward` names ([] while it is still empty)."""
    from alignjax.rewards import parse_spec
    if not s.reward.strip():
        return []
    return [t.target for t in parse_spec(s.reward, f"{section}.reward") if t.kind == "model"]


def reward_models(config, s) -> list:
    """The reward-model slots a run holds on its mesh beside the step, for `alignjax compile`
    (which builds them with the policy's architecture): those `s.reward` names or, while it is
    still empty (the big presets leave it to the user), one; none for toy and python rewards."""
    from alignjax.train.slots import Slot
    paths = reward_model_paths(s, config.algorithm) if s.reward.strip() else [""]
    return [Slot(f"reward{i or ''}", "scalar", p, trains=False, dtype=s.ref_dtype)
            for i, p in enumerate(paths)]


def reward_and_prompts(s, section: str, run):
    """After check_rollout: the run's reward (`<section>.reward`, on the training mesh) and its
    prompt stream (`<section>.prompts`, chat-encoded when drawn)."""
    from alignjax.rewards import build_reward
    from alignjax.sampling import read_prompts
    from alignjax.train.rollout import encode_chat_prompts
    check_rollout(s, section, run.mesh, run.rules, run.model_config.max_position_embeddings)
    reward = build_reward(s.reward, mesh=run.mesh, rules=run.rules, policy_tokenizer=run.tokenizer,
                          normalize=s.reward_normalize, what=f"{section}.reward",
                          seq_len=s.max_prompt_len + s.max_new_tokens + 1,
                          runtime={"dtype": s.ref_dtype, "param_dtype": s.ref_dtype})
    prompts = PromptStream(read_prompts(s.prompts), lambda t: encode_chat_prompts(run.tokenizer, t),
                           s.seed, s.max_prompt_len, key=f"{section}.max_prompt_len")
    return reward, prompts


def build_producer(config, workdir: str, roller, s, prompts: PromptStream, process: Callable,
                   ) -> Producer:
    """The Producer with the run's sample log, toy eval (toy prompts) and log steps."""
    every = int(config.train.get("eval_every", 0) or 0)
    log_every, steps = int(config.train.log_every), int(config.train.steps)
    toy_eval = ToyEval(roller, every, last=steps) if s.prompts == "toy" and every else None
    return Producer(roller, s, prompts, process, SampleLog(workdir, every), toy_eval,
                    lambda step: step % log_every == 0 or step == steps)
