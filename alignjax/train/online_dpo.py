"""Online DPO (docs/algorithms.md section 7; Guo et al. 2024, TRL's OnlineDPOTrainer): every
step samples two responses per prompt from the current policy, a reward picks the chosen one, and
the policy takes a DPO-family step on those fresh pairs.

    alignjax train --config configs/online_dpo.py:tiny --workdir runs/odpo --config.model.init_from=runs/sft
    alignjax train ... --config.dpo.loss_type=ipo          # any pairwise loss of the DPO family
    alignjax train ... --config.online_dpo.reward=runs/rm  # a reward model instead of the checker

One loop step = one rollout of 2 x train.batch_size responses (train.batch_size prompts, each
sampled twice) + one optimizer step on the train.batch_size pairs:

    producer   sample with the trainer's own policy params, score, online_pairs (pure), then the
               pairs as a grouped [B, 2, P+N] preference batch, chosen first
    sums_fn    alignjax.train.dpo's: the loss named by dpo.loss_type (dpo.beta, ...) with the
               colocated reference (the start model; dpo.ref_refresh_every gives TR-DPO)

Pairs follow TRL: a response without a stop token loses online_dpo.missing_eos_penalty from its
score, and the first sample is chosen when the scores tie (first >= second);
`online_dpo.skip_ties=True` leaves tied pairs out instead (with a 0/1 checker most pairs tie).
Log-probs are
under the raw logits (temperature 1), as TRL's and offline DPO's.

Metrics: the DPO family's (loss, rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected) plus TRL's objective/scores,
objective/scores_margin, val/contain_eos_token, the GRPO names completions/mean_length and
completions/clipped_ratio, timing/* as PPO, and eval/toy_accuracy on the toy prompts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alignjax.model.config import ConfigError
from alignjax.train import dpo, online
from alignjax.train.grouped import abstract_grouped_batch
from alignjax.train.registry import AlgorithmSpec
from alignjax.train.rollout import RolloutSettings


@dataclasses.dataclass(frozen=True)
class OnlineDPOSettings:
    dpo: dpo.DPOSettings                 # the loss: config.dpo, as offline DPO reads it
    reward: str = "toy"                  # rewards.py spec: toy | RM dir | python:f.py:fn | sums
    reward_normalize: bool = False
    max_prompt_len: int = 512
    max_new_tokens: int = 256
    temperature: float = 0.9             # TRL's OnlineDPOConfig
    top_p: float = 1.0
    top_k: int = 0
    missing_eos_penalty: float = 0.0     # subtracted from the score of a response without EOS
    skip_ties: bool = False              # True: pairs whose scores tie get weight 0 (TRL trains
                                         # on them, the first sample as chosen)
    ref_dtype: str = "float32"
    # from the shared keys:
    pairs: int = 32                      # train.batch_size: prompts (= pairs) per step
    grad_accum_steps: int = 1
    seed: int = 0
    prompts: str = "toy"
    # what the shared online machinery (online.py) reads
    samples_per_prompt: int = 2
    epochs: int = 1
    num_minibatches: int = 1

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def prompts_per_step(self) -> int:
        return self.pairs

    @property
    def rollout(self) -> RolloutSettings:
        return RolloutSettings(self.max_prompt_len, self.max_new_tokens, 2, self.temperature,
                               self.top_p, self.top_k)


OWN_KEYS = ("reward", "reward_normalize", "max_prompt_len", "max_new_tokens", "temperature", "top_p",
            "top_k", "missing_eos_penalty", "skip_ties")


def settings(config) -> OnlineDPOSettings:
    """`config.online_dpo` + `config.dpo` (the loss) + shared keys, checked; ConfigErrors name the key."""
    o = config.online_dpo
    unknown = sorted(set(o.keys()) - set(OWN_KEYS))
    if unknown:
        raise ConfigError(f"online_dpo.{unknown[0]}: unknown setting; known: {', '.join(OWN_KEYS)}")
    loss = dpo.settings(config)
    if loss.kind != "pair":
        raise ConfigError(f"dpo.loss_type={config.dpo.loss_type!r}: online DPO trains on pairs; use a "
                          "pairwise loss (dpo, ipo, cdpo, simpo, ...)")
    if loss.needs_reference and loss.reference != "colocated":
        raise ConfigError("dpo.reference=precomputed: online pairs are new every step, so the "
                          "reference must be colocated")
    s = OnlineDPOSettings(dpo=loss, **{k: o[k] for k in OWN_KEYS}, ref_dtype=loss.ref_dtype,
                          pairs=int(config.train.batch_size),
                          grad_accum_steps=int(config.train.grad_accum_steps),
                          seed=int(config.train.seed), prompts=str(config.data.train))

    def bad(key, msg):
        raise ConfigError(f"online_dpo.{key}={getattr(s, key)!r}: {msg}")

    for key in ("max_prompt_len", "max_new_tokens"):
        if int(getattr(s, key)) < 1:
            bad(key, "must be >= 1")
    if s.temperature <= 0:
        bad("temperature", "must be > 0: two greedy samples of a prompt are the same response")
    if not 0 < s.top_p <= 1:
        bad("top_p", "must be in (0, 1] (1 = off)")
    if s.top_k < 0 or s.top_k == 1:
        bad("top_k", "must be 0 (off) or >= 2: one candidate makes both samples the same")
    if s.missing_eos_penalty < 0:
        bad("missing_eos_penalty", "must be >= 0 (0 = off)")
    if s.pairs < 1 or s.pairs % s.grad_accum_steps:
        raise ConfigError(f"train.batch_size={s.pairs} (pairs per step) must be a positive multiple of "
                          f"train.grad_accum_steps={s.grad_accum_steps}")
    return s


# ---- pair construction (pure) -------------------------------------------------------------------

def online_pairs(scores_r, contains_eos_r, missing_eos_penalty: float = 0.0):
    """(chosen rows [B], rejected rows [B], shaped scores [R]) for R = 2B rows where prompt b's two
    samples are rows 2b and 2b + 1. A response without a stop token loses the penalty; the first
    sample wins ties (TRL: first_half >= second_half)."""
    scores = np.asarray(scores_r, np.float32) - np.float32(missing_eos_penalty) * (
        ~np.asarray(contains_eos_r, bool)).astype(np.float32)
    first = np.arange(0, scores.shape[0], 2)
    first_wins = scores[first] >= scores[first + 1]
    chosen = np.where(first_wins, first, first + 1)
    rejected = np.where(first_wins, first + 1, first)
    return chosen, rejected, scores


def pair_batch(batch: dict, chosen, rejected, valid) -> dict:
    """The rollout's rows as a grouped preference batch [B, 2, P+N] (chosen first), in the
    layout of alignjax.data.preference: left-padded prompt then response, padding in segment 0,
    positions counting real tokens, targets = next token, loss on the response tokens;
    `example_valid` [B] = `valid` (pairs with weight 0 are left out of every mean)."""
    from alignjax.train.rollout import sequence_inputs  # the layout the rollout's forwards use
    tokens, positions, mask = (np.asarray(x, np.int32) for x in sequence_inputs(
        batch["query"], batch["query_mask"], batch["response"], batch["response_mask"]))
    p = batch["query"].shape[1]
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, p - 1:-1] = batch["response_mask"]  # column c predicts the token at c + 1
    rows = np.stack([chosen, rejected], axis=1)  # [B, 2]
    out = dict(tokens=tokens, positions=positions, segment_ids=mask, targets=targets,
               loss_mask=loss_mask)
    return {**{k: v[rows] for k, v in out.items()}, "example_valid": np.asarray(valid, bool)}


def make_process(s: OnlineDPOSettings):
    """process(rollout batch) -> (update batch, shaped scores, metrics) for online.Producer."""

    def process(batch):
        chosen, rejected, scores = online_pairs(batch["scores"], batch["contains_eos"],
                                                s.missing_eos_penalty)
        length = batch["response_mask"].sum(axis=1).astype(np.float32)
        has_eos = np.asarray(batch["contains_eos"], bool)
        tied = scores[chosen] == scores[rejected]
        metrics = {"objective/scores": float(scores.mean()),
                   "objective/scores_margin": float((scores[chosen] - scores[rejected]).mean()),
                   "frac_pairs_tied": float(tied.mean()),
                   "val/contain_eos_token": float(has_eos.mean()),
                   "completions/mean_length": float(length.mean()),
                   "completions/clipped_ratio": float(1.0 - has_eos.mean())}
        valid = ~tied if s.skip_ties else np.ones_like(tied)
        return pair_batch(batch, chosen, rejected, valid), scores, metrics

    return process


# ---- registry hooks -----------------------------------------------------------------------------

def slots(config, s: OnlineDPOSettings) -> list:
    return dpo.slots(config, s.dpo)


def sums(config, s: OnlineDPOSettings, modules: dict):
    return dpo.make_sums_fn(modules["policy"], modules.get("reference"), s.dpo), dpo.metrics


def abstract_batch(config, s: OnlineDPOSettings) -> dict:
    """One global update batch (for `alignjax compile`)."""
    batch = abstract_grouped_batch(s.pairs, 2, s.max_prompt_len + s.max_new_tokens)
    return {k: v for k, v in batch.items()
            if k in ("tokens", "positions", "segment_ids", "targets", "loss_mask", "example_valid")}


def build(config, workdir: str, run, s: OnlineDPOSettings, modules: dict, loader=None):
    from alignjax.train.loop import Algorithm
    from alignjax.train.rollout import Roller
    from alignjax import sharding as shd
    reward, prompts = online.reward_and_prompts(s, "online_dpo", run)
    n = shd.axis_size(run.mesh, dict(run.rules).get("batch"))
    if (s.pairs // s.grad_accum_steps) % n:
        raise ConfigError(f"train.batch_size={s.pairs}: a micro-batch of {s.pairs // s.grad_accum_steps} "
                          f"pairs (train.batch_size / train.grad_accum_steps) does not split over the "
                          f"{n} data-parallel devices; make it a multiple of {n}")
    # No old log-probs: the DPO step computes the policy's and the reference's itself.
    roller = Roller(modules["policy"], run.mesh, run.rules, run.tokenizer, s.rollout, reward=reward,
                    old_logps=False)
    producer = online.build_producer(config, workdir, roller, s, prompts, make_process(s))
    sums_fn, mfn = sums(config, s, modules)
    return Algorithm("online_dpo", sums_fn, mfn, producer=producer, epochs=1, num_minibatches=1,
                     host_state=online.HostState(prompts=prompts))


SPEC = AlgorithmSpec("online_dpo", settings, slots, sums, abstract_batch, build,
                     resident=online.reward_models)
