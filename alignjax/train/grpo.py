"""Critic-free online RL (docs/algorithms.md section 7): GRPO, RLOO, REINFORCE++ and
REINFORCE++-baseline, one algorithm (`algorithm="grpo"`) chosen by `grpo.advantage`.

One loop step = one rollout of train.batch_size responses (train.batch_size /
grpo.samples_per_prompt prompts, each sampled samples_per_prompt times: a prompt's group is
consecutive rows) + grpo.epochs x grpo.num_minibatches jitted updates of the policy:

    producer(state, frozen, step, rng)   sample with state["params"]["policy"] (no copy), score,
                                         old (and reference) log-probs, then `advantages` (jitted)
    sums_fn(params, minibatch, frozen)   rl.grpo_token_loss aggregated by rl.aggregate_token_loss

There is no value model. The reference model is loaded only when grpo.beta > 0; where beta acts
depends on the method, as in its home implementation:

    advantage              baseline / scaling                 beta (default)    ratio      loss_type
    grpo (TRL)             group mean / group std (scale)     k3 in the loss (0) token      dapo
    rloo (TRL)             leave-one-out mean, no scaling     seq. k1 in reward (0.05) sequence grpo
    reinforce_pp (OpenRLHF)          returns whitened over the batch   token k1 in reward (0.01) token bnpo
    reinforce_pp_baseline  group mean score, then whitened    token k1 in reward (0.01) token bnpo

(`beta`, `ratio` and `loss_type` left at None/"auto" take the method's column.) `ratio`: token
(per-token rho), gspo (exp of the mean log-ratio of the sequence, GSPO) or sequence (exp of the
summed log-ratio: TRL's RLOO). loss_type: grpo = mean over responses of their token means,
bnpo = token mean of each micro-batch, dapo = token mean of the whole update (all micro-batches),
dr_grpo = token sum / (responses x max_new_tokens).

Metrics carry TRL's GRPO names: reward, reward_std, frac_reward_zero_std,
completions/{mean,min,max}_length, completions/clipped_ratio (share without EOS), kl (grpo: token
mean of k3 in the update; rloo/reinforce: mean sequence k1 of the rollout), entropy,
clip_ratio/{low,high,region}_mean (token means), plus timing/rollout, timing/score,
timing/update as PPO.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses import rl
from alignjax.model.config import ConfigError
from alignjax.train import online
from alignjax.train.registry import AlgorithmSpec
from alignjax.train.rollout import RolloutSettings, response_token_stats

ADVANTAGES = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
RATIOS = {"token": False, "gspo": "mean", "sequence": "sum"}  # -> rl.grpo_token_loss(sequence_ratio)
# The methods' defaults (TRL GRPOConfig / RLOOConfig, OpenRLHF) for the keys left at auto.
METHOD_DEFAULTS = {
    "grpo": dict(beta=0.0, ratio="token", loss_type="dapo"),
    "rloo": dict(beta=0.05, ratio="sequence", loss_type="grpo"),
    "reinforce_pp": dict(beta=0.01, ratio="token", loss_type="bnpo"),
    "reinforce_pp_baseline": dict(beta=0.01, ratio="token", loss_type="bnpo"),
}
GROUPED = ("grpo", "rloo", "reinforce_pp_baseline")  # need >= 2 samples per prompt


# ---- settings -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    advantage: str = "grpo"              # grpo | rloo | reinforce_pp | reinforce_pp_baseline
    # rollout
    reward: str = "toy"                  # rewards.py spec: toy | RM dir | python:f.py:fn | sums
    reward_normalize: bool = False
    samples_per_prompt: int = 8          # G, TRL's num_generations
    max_prompt_len: int = 512
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # reward shaping (every method)
    missing_eos_penalty: Optional[float] = None  # subtracted from a response without EOS
    overlong_buffer: int = 0             # DAPO soft overlong penalty over the last b tokens (0 = off)
    overlong_factor: float = 1.0
    # advantages and loss
    scale_rewards: str = "group"         # grpo: group | batch | none (Dr. GRPO)
    beta: float = 0.0                    # resolved from METHOD_DEFAULTS when the config holds None
    ratio: str = "token"                 # token | gspo | sequence (resolved from "auto")
    loss_type: str = "dapo"              # grpo | bnpo | dr_grpo | dapo (resolved from "auto")
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2            # DAPO's clip-higher: 0.28
    epochs: int = 1                      # TRL's num_iterations
    num_minibatches: int = 1
    ref_dtype: str = "float32"
    # from the shared keys, not grpo.*:
    rows: int = 64                       # train.batch_size: responses per rollout
    grad_accum_steps: int = 1
    seed: int = 0
    prompts: str = "toy"

    @property
    def prompts_per_step(self) -> int:
        return self.rows // self.samples_per_prompt

    @property
    def rollout(self) -> RolloutSettings:
        return RolloutSettings(self.max_prompt_len, self.max_new_tokens, self.samples_per_prompt,
                               self.temperature, self.top_p, self.top_k)

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    @property
    def kl_in_loss(self) -> bool:
        """GRPO puts beta * k3 in the loss; the others fold beta * k1 into the reward."""
        return self.advantage == "grpo" and self.needs_reference


SHARED_KEYS = {"rows": ("train", "batch_size"), "grad_accum_steps": ("train", "grad_accum_steps"),
               "seed": ("train", "seed"), "prompts": ("data", "train")}


def settings_from_config(config) -> GRPOSettings:
    """`config.grpo` (+ train.batch_size, train.grad_accum_steps, train.seed, data.train) ->
    GRPOSettings with the method's defaults filled in, validated; a ConfigError names the key."""
    g = config.grpo
    known = {f.name for f in dataclasses.fields(GRPOSettings)} - set(SHARED_KEYS)
    unknown = sorted(set(g.keys()) - known)
    if unknown:
        raise ConfigError(f"grpo.{unknown[0]}: unknown GRPO setting; known: {', '.join(sorted(known))}")
    kw = {k: g[k] for k in g.keys()}
    method = kw.get("advantage", "grpo")
    if method not in ADVANTAGES:
        raise ConfigError(f"grpo.advantage={method!r}: choose one of {', '.join(ADVANTAGES)}")
    for key, value in METHOD_DEFAULTS[method].items():
        if kw.get(key) in (None, "auto"):
            kw[key] = value
    penalty = kw.get("missing_eos_penalty")
    kw["missing_eos_penalty"] = None if penalty is None or float(penalty) == 0 else float(penalty)
    shared = {k: config[section][key] for k, (section, key) in SHARED_KEYS.items()}
    s = GRPOSettings(**kw, **shared)
    _check(s)
    return s


def _check(s: GRPOSettings) -> None:
    online.check_settings(s, "grpo")  # first: the checks below divide by these counts
    bad = online.bad_setting(s, "grpo")
    if s.advantage in GROUPED and s.samples_per_prompt < 2:
        bad("samples_per_prompt", f"grpo.advantage={s.advantage} compares the samples of a prompt "
            "(the group mean and std are undefined for one sample); use >= 2 (TRL: 8 for GRPO, "
            "2 for RLOO) or grpo.advantage=reinforce_pp")
    if s.scale_rewards not in rl.GRPO_SCALES:
        bad("scale_rewards", f"choose one of {', '.join(rl.GRPO_SCALES)}")
    if s.loss_type not in rl.GRPO_LOSS_TYPES:
        bad("loss_type", f"choose one of {', '.join(rl.GRPO_LOSS_TYPES)} (or auto)")
    if s.ratio not in RATIOS:
        bad("ratio", f"choose one of {', '.join(RATIOS)} (or auto)")
    if s.beta < 0:
        bad("beta", "must be >= 0 (0 = no KL term and no reference model)")
    if not 0 < s.epsilon_low < 1:
        bad("epsilon_low", "must be in (0, 1) (TRL: 0.2)")
    if s.epsilon_high < s.epsilon_low:
        bad("epsilon_high", f"must be >= grpo.epsilon_low={s.epsilon_low} (DAPO's clip-higher "
            "raises only the upper bound; 0.28 is its suggestion)")
    if s.missing_eos_penalty is not None and s.missing_eos_penalty < 0:
        bad("missing_eos_penalty", "must be >= 0 (0 = off)")
    if not 0 <= s.overlong_buffer < s.max_new_tokens:
        bad("overlong_buffer", f"must be in [0, grpo.max_new_tokens={s.max_new_tokens}) (0 = off)")


# ---- advantages ---------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=1)
def advantages(batch: dict, s: GRPOSettings) -> dict:
    """Shaped scores, per-token advantages [R, N] (0 off the mask) and the rollout's TRL metrics.

    `batch`: logps, response_mask, scores, contains_eos (+ ref_logps when beta > 0)."""
    mask = batch["response_mask"].astype(jnp.float32)
    valid = mask > 0
    length = jnp.sum(mask, axis=1)
    has_eos = batch["contains_eos"] > 0
    scores = rl.shape_scores(batch["scores"].astype(jnp.float32), has_eos,
                             missing_eos_penalty=s.missing_eos_penalty)
    if s.overlong_buffer:
        scores = scores + rl.overlong_penalty(length, s.max_new_tokens, s.overlong_buffer,
                                              s.overlong_factor)
    k1 = jnp.zeros_like(mask)
    if s.needs_reference:
        k1 = jnp.where(valid, rl.kl_estimate(batch["logps"], batch["ref_logps"], "k1"), 0.0)
    g = s.samples_per_prompt
    if s.advantage == "grpo":
        adv = rl.grpo_advantages(scores, g, s.scale_rewards)[:, None] * mask
    elif s.advantage == "rloo":
        adv = rl.rloo_advantages(scores, jnp.sum(k1, axis=1), g, s.beta)[0][:, None] * mask
    else:
        adv = rl.reinforce_pp_advantages(scores, k1, mask, s.beta,
                                         g if s.advantage == "reinforce_pp_baseline" else None)
    if g > 1:
        group_std = jnp.std(scores.reshape(-1, g), axis=1, ddof=1)
        reward_std = jnp.mean(group_std)
        zero_std = jnp.mean((group_std <= 1e-8).astype(jnp.float32))
    else:
        reward_std, zero_std = jnp.std(scores, ddof=1), jnp.float32(1.0)
    metrics = {"reward": jnp.mean(scores), "reward_std": reward_std,
               "frac_reward_zero_std": zero_std,
               "completions/mean_length": jnp.mean(length),
               "completions/min_length": jnp.min(length),
               "completions/max_length": jnp.max(length),
               "completions/clipped_ratio": 1.0 - jnp.mean(has_eos.astype(jnp.float32))}
    if s.needs_reference and not s.kl_in_loss:
        metrics["kl"] = jnp.mean(jnp.sum(k1, axis=1))  # TRL's RLOO: the mean sequence KL
    return dict(advantages=jnp.where(valid, adv, 0.0), scores=scores, metrics=metrics)


# ---- the update ---------------------------------------------------------------------------------

UPDATE_KEYS = ("query", "query_mask", "response", "response_mask", "logps")
CLIP_KEYS = {"clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean",
             "clip_region": "clip_ratio/region_mean"}


def make_sums_fn(policy_module, s: GRPOSettings):
    """sums_fn(params={"policy"}, minibatch, frozen) -> (objective_sum, sums).

    The objective is rl.aggregate_token_loss's (sum, normaliser) as sums["count"], so the step's
    division by the summed count over micro-batches is exactly the loss_type's normalisation:
    grpo divides by all responses, dapo by all tokens of the update, dr_grpo by responses x
    max_new_tokens; bnpo's per-micro-batch token mean is weighted by the micro-batch's rows.
    Metric sums are token sums over sums["tokens"].
    """
    temperature = s.temperature if s.temperature > 0 else 1.0
    beta = s.beta if s.kl_in_loss else 0.0

    def sums_fn(params, batch, frozen):
        del frozen  # reference log-probs come with the batch (computed once per rollout)
        mask = batch["response_mask"].astype(jnp.float32)
        logps, entropy = response_token_stats(policy_module, params["policy"], batch, temperature)
        loss, stats = rl.grpo_token_loss(
            logps, batch["logps"], batch["advantages"], mask, eps_low=s.epsilon_low,
            eps_high=s.epsilon_high, ref_logp_bt=batch.get("ref_logps"), beta=beta,
            sequence_ratio=RATIOS[s.ratio])
        total, norm = rl.aggregate_token_loss(loss, mask, s.loss_type, s.max_new_tokens)
        if s.loss_type == "bnpo":
            rows = jnp.float32(mask.shape[0])
            total, norm = total / jnp.maximum(norm, 1.0) * rows, rows
        sums = {"count": norm, "tokens": jnp.sum(mask), "entropy": rl.masked_sum(entropy, mask)}
        sums.update({name: rl.masked_sum(stats[k], mask) for k, name in CLIP_KEYS.items()})
        if beta:
            sums["kl"] = rl.masked_sum(stats["k3"], mask)
        return total, sums

    return sums_fn


def metrics_fn(sums) -> dict:
    tokens = jnp.maximum(sums["tokens"], 1.0)
    out = {k: v / tokens for k, v in sums.items() if k not in ("count", "tokens", "objective")}
    out["loss"] = sums["objective"] / jnp.maximum(sums["count"], 1.0)
    out["num_tokens"] = sums["tokens"]
    return out


def update_batch(batch: dict, adv: dict, s: GRPOSettings) -> dict:
    """The fields the update reads (numpy, one row per response, shapes fixed by the settings)."""
    out = {k: np.asarray(batch[k]) for k in UPDATE_KEYS}
    out["advantages"] = np.asarray(adv["advantages"], np.float32)
    if s.kl_in_loss:
        out["ref_logps"] = np.asarray(batch["ref_logps"], np.float32)
    return out


def abstract_batch(config, s: GRPOSettings) -> dict:
    """One global update minibatch (for `alignjax compile`)."""
    r, p, n = s.rows // s.num_minibatches, s.max_prompt_len, s.max_new_tokens
    i32, f32 = jnp.int32, jnp.float32
    out = dict(query=((r, p), i32), query_mask=((r, p), i32), response=((r, n), i32),
               response_mask=((r, n), i32), logps=((r, n), f32), advantages=((r, n), f32))
    if s.kl_in_loss:
        out["ref_logps"] = ((r, n), f32)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in out.items()}


# ---- the producer's part ------------------------------------------------------------------------

def make_process(s: GRPOSettings):
    """process(rollout batch) -> (update batch, scores, metrics) for alignjax.train.online.Producer."""
    keys = ("logps", "response_mask", "scores", "contains_eos") + (
        ("ref_logps",) if s.needs_reference else ())

    def process(batch):
        adv = jax.device_get(advantages({k: batch[k] for k in keys}, s))
        metrics = {k: float(v) for k, v in adv["metrics"].items()}
        return update_batch(batch, adv, s), adv["scores"], metrics

    return process


# ---- registry hooks -----------------------------------------------------------------------------

def settings(config) -> GRPOSettings:
    return settings_from_config(config)


def slots(config, s: GRPOSettings) -> list:
    from alignjax.train.slots import Slot
    init = str(config.model.init_from)
    out = [Slot("policy", "lm", init, trains=True)]
    if s.needs_reference:  # beta = 0 loads no reference model
        out.append(Slot("reference", "lm", init, trains=False, dtype=s.ref_dtype))
    return out


def sums(config, s: GRPOSettings, modules: dict):
    return make_sums_fn(modules["policy"], s), metrics_fn


def build(config, workdir: str, run, s: GRPOSettings, modules: dict, loader=None):
    """The Algorithm: a rollout producer around `sums` (alignjax/train/loop.py: Algorithm)."""
    from alignjax.train.loop import Algorithm
    from alignjax.train.rollout import Roller
    reward, prompts = online.reward_and_prompts(s, "grpo", run)
    roller = Roller(modules["policy"], run.mesh, run.rules, run.tokenizer, s.rollout, reward=reward,
                    ref_module=modules.get("reference") if s.needs_reference else None)
    producer = online.build_producer(config, workdir, roller, s, prompts, make_process(s))
    sums_fn, mfn = sums(config, s, modules)
    return Algorithm("grpo", sums_fn, mfn, producer=producer, epochs=s.epochs,
                     num_minibatches=s.num_minibatches, host_state=online.HostState(prompts=prompts))


SPEC = AlgorithmSpec("grpo", settings, slots, sums, abstract_batch, build,
                     resident=online.reward_models)
