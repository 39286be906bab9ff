"""PPO for RLHF (docs/algorithms.md section 6): policy, value, reference and reward on one mesh.

One loop step = one rollout (alignjax.train.rollout) + `ppo.epochs` x `ppo.num_minibatches`
jitted updates over shuffled minibatches of it (the loop splits the batch):

    producer(state, frozen, step, rng)   sample with state["params"]["policy"] (no copy), score,
                                         old/ref log-probs and values, then `advantages` (jitted):
                                         KL-penalised per-token rewards, GAE, whitening
    sums_fn(params, minibatch, frozen)   clipped policy loss (+ dual clip), clipped value loss x
                                         vf_coef, entropy bonus, KL loss term; TRL's metric names
    KLController                         fixed or adaptive KL coefficient, host state (checkpointed)

Settings are `ppo.*` keys parsed once into `PPOSettings` (one-line ConfigError naming the key);
the shared keys keep their meaning: train.batch_size = responses per rollout (prompts per step x
ppo.samples_per_prompt), train.grad_accum_steps = micro-batches per minibatch, data.train = the
prompts (toy, or records with a string "prompt" field).
Defaults are TRL's PPO (lambda 0.95, value clip 0.2, vf_coef 0.1, 4 epochs, kl_coef 0.05,
temperature 0.7) except where docs/algorithms.md says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses import rl
from alignjax.model.config import ConfigError
from alignjax.train.grouped import sums_to_means
from alignjax.train import online
from alignjax.train.registry import AlgorithmSpec
from alignjax.train.rollout import RolloutSettings, response_token_stats, response_values

KL_PLACES = ("reward", "loss")
VALUE_INITS = ("auto", "reward", "policy")


# ---- settings -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PPOSettings:
    # rollout
    reward: str = "toy"                  # rewards.py spec: toy | RM dir | python:f.py:fn | sums
    reward_normalize: bool = False       # (r - mean) / std with the RM's stored reward_stats
    samples_per_prompt: int = 1
    max_prompt_len: int = 128
    max_new_tokens: int = 53
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    # update
    epochs: int = 4
    num_minibatches: int = 1
    clip_eps: float = 0.2
    dual_clip: Optional[float] = None    # c > 1: negative-advantage loss capped at -c A
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    # KL to the reference
    kl_coef: float = 0.05
    kl_target: Optional[float] = None    # None = fixed coefficient; else the adaptive controller's
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    kl_in: str = "reward"                # reward (per-token penalty) | loss (policy-loss term)
    # reward shaping
    reward_clip: Optional[float] = None  # clip scores to [-c, c]
    missing_eos_penalty: Optional[float] = None  # subtracted from a response without EOS
    missing_eos_score: Optional[float] = None    # or: its score replaced by this
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    # models
    value_init: str = "auto"             # auto | reward | policy (zero-initialised scalar head)
    ref_dtype: str = "float32"           # the frozen models: reference and reward models
    # from the shared keys, not ppo.*:
    rows: int = 64                       # train.batch_size: responses per rollout (loop step)
    grad_accum_steps: int = 1            # train.grad_accum_steps: micro-batches per minibatch
    seed: int = 0                        # train.seed
    prompts: str = "toy"                 # data.train: toy, or data with a string "prompt" field

    @property
    def prompts_per_step(self) -> int:
        return self.rows // self.samples_per_prompt

    @property
    def rollout(self) -> RolloutSettings:
        return RolloutSettings(self.max_prompt_len, self.max_new_tokens, self.samples_per_prompt,
                               self.temperature, self.top_p, self.top_k)


# PPOSettings fields read from the keys every algorithm has.
SHARED_KEYS = {"rows": ("train", "batch_size"), "grad_accum_steps": ("train", "grad_accum_steps"),
               "seed": ("train", "seed"), "prompts": ("data", "train")}


def _off(v):
    """None and 0 both mean "off" for optional thresholds (config overrides cannot write None
    into a float field)."""
    return None if v is None or float(v) == 0.0 else float(v)


def settings_from_config(config) -> PPOSettings:
    """`config.ppo` (+ train.batch_size, train.grad_accum_steps, train.seed, data.train) ->
    PPOSettings, validated; a ConfigError names the first bad key."""
    p = config.ppo
    known = {f.name for f in dataclasses.fields(PPOSettings)} - set(SHARED_KEYS)
    unknown = sorted(set(p.keys()) - known)
    if unknown:
        raise ConfigError(f"ppo.{unknown[0]}: unknown PPO setting; known: {', '.join(sorted(known))}")
    kw = {k: p[k] for k in p.keys()}
    for k in ("dual_clip", "kl_target", "reward_clip", "missing_eos_penalty"):
        if k in kw:
            kw[k] = _off(kw[k])
    if kw.get("missing_eos_score") is not None:
        kw["missing_eos_score"] = float(kw["missing_eos_score"])
    shared = {k: config[section][key] for k, (section, key) in SHARED_KEYS.items()}
    s = PPOSettings(**kw, **shared)
    _check(s)
    return s


def _check(s: PPOSettings) -> None:
    online.check_settings(s, "ppo")  # first: the checks below divide by these counts
    bad = online.bad_setting(s, "ppo")
    if not 0 < s.clip_eps < 1:
        bad("clip_eps", "must be in (0, 1) (TRL/OpenRLHF: 0.2)")
    if s.dual_clip is not None and s.dual_clip <= 1:
        bad("dual_clip", "must be > 1 (0 = off; the usual value is 3)")
    if s.vf_clip <= 0:
        bad("vf_clip", "must be > 0 (TRL: 0.2, OpenRLHF: 0.5)")
    for key in ("vf_coef", "ent_coef", "kl_coef"):
        if getattr(s, key) < 0:
            bad(key, "must be >= 0")
    if not 0 <= s.gamma <= 1:
        bad("gamma", "must be in [0, 1]")
    if not 0 <= s.lam <= 1:
        bad("lam", "must be in [0, 1]")
    if s.kl_target is not None and s.kl_target < 0:
        bad("kl_target", "must be > 0 (0 = a fixed kl_coef)")
    if s.kl_horizon <= 0:
        bad("kl_horizon", "must be > 0")
    if s.kl_estimator not in rl.KL_ESTIMATORS:
        bad("kl_estimator", f"choose one of {', '.join(rl.KL_ESTIMATORS)}")
    if s.kl_in not in KL_PLACES:
        bad("kl_in", f"choose one of {', '.join(KL_PLACES)}")
    if s.reward_clip is not None and s.reward_clip < 0:
        bad("reward_clip", "must be > 0 (0 = off)")
    if s.missing_eos_penalty is not None and s.missing_eos_score is not None:
        bad("missing_eos_score", "set either ppo.missing_eos_penalty or ppo.missing_eos_score")
    if s.value_init not in VALUE_INITS:
        bad("value_init", f"choose one of {', '.join(VALUE_INITS)}")


# ---- KL controller (host state) -------------------------------------------------------------------

class KLController:
    """beta, fixed or adaptive (Ziegler et al.): beta <- beta (1 + clip(KL/target - 1, +-0.2) n /
    horizon) after each rollout, with KL the batch's mean sequence KL and n its responses."""

    def __init__(self, value: float, target: Optional[float] = None, horizon: float = 10000.0):
        self.value, self.target, self.horizon = float(value), target, float(horizon)

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            self.value = float(rl.adaptive_kl_coef(self.value, float(kl), n, self.target,
                                                   self.horizon))
        return self.value

    def get_state(self) -> dict:
        return {"kl_coef": self.value}

    def set_state(self, state: dict) -> None:
        self.value = float(state["kl_coef"])


# ---- advantages (step 3) ------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=1)
def advantages(batch: dict, s: PPOSettings, kl_coef) -> dict:
    """Per-token rewards, GAE, returns and whitening of one rollout (docs/algorithms.md section 6,
    steps 3-5), plus the rollout's TRL metrics. `batch`: the rollout fields (logps, ref_logps,
    values, response_mask, scores, contains_eos); `kl_coef` is traced (the adaptive controller
    changes it without a recompile).

    Returns advantages / returns / rewards [R, N], the shaped scores [R], the per-token KL
    estimate [R, N] and `metrics` (objective/..., val/num_eos_tokens, ...).
    """
    mask = batch["response_mask"].astype(jnp.float32)
    valid = mask > 0
    has_eos = batch["contains_eos"] > 0
    scores = rl.shape_scores(batch["scores"].astype(jnp.float32), has_eos, clip=s.reward_clip,
                             missing_eos_penalty=s.missing_eos_penalty,
                             missing_eos_score=s.missing_eos_score)
    kl = jnp.where(valid, rl.kl_estimate(batch["logps"], batch["ref_logps"], s.kl_estimator), 0.0)
    coef = kl_coef if s.kl_in == "reward" else 0.0
    rewards = rl.token_rewards(scores, kl, mask, coef)
    if s.whiten_rewards:
        rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = rl.gae(rewards, batch["values"], mask, s.gamma, s.lam)
    if s.whiten_advantages:
        adv = rl.masked_whiten(adv, mask)
    seq_kl = jnp.sum(kl, axis=1)
    non_score = jnp.sum(jnp.where(valid, -coef * kl, 0.0), axis=1)
    metrics = {
        "objective/kl": jnp.mean(seq_kl),
        "objective/entropy": jnp.mean(jnp.sum(jnp.where(valid, -batch["logps"], 0.0), axis=1)),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(scores + non_score),
        "objective/scores": jnp.mean(scores),
        "objective/scores_raw": jnp.mean(batch["scores"]),
        "val/num_eos_tokens": jnp.sum(has_eos.astype(jnp.float32)),
        "val/eos_fraction": jnp.mean(has_eos.astype(jnp.float32)),
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
    }
    return dict(advantages=adv, returns=returns, rewards=rewards, scores=scores, kl=kl,
                metrics=metrics)


# ---- the update (step 6) -----------------------------------------------------------------------

UPDATE_KEYS = ("query", "query_mask", "response", "response_mask", "logps", "values",
               "advantages", "returns")
TOKEN_METRICS = ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg",
                 "policy/entropy_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_sq", "val/vpred",
                 "loss/kl_avg")


def make_sums_fn(policy_module, value_module, s: PPOSettings):
    """sums_fn(params={"policy", "value"}, minibatch, frozen) -> (objective_sum, sums).

    Every term is a sum over the minibatch's response tokens and sums["count"] is their number,
    so the loop's objective is the token mean TRL takes per minibatch (and gradient accumulation
    adds up exactly). With kl_in="loss" the batch carries ref_logps and a per-row kl_coef.
    """
    temperature = s.temperature if s.temperature > 0 else 1.0

    def sums_fn(params, batch, frozen):
        del frozen  # reference log-probs come with the batch (computed once per rollout)
        mask = batch["response_mask"].astype(jnp.float32)
        valid = mask > 0
        logps, entropy = response_token_stats(policy_module, params["policy"], batch, temperature)
        values = response_values(value_module, params["value"], batch)
        pg, stats = rl.ppo_policy_loss(logps, batch["logps"], batch["advantages"], s.clip_eps,
                                       dual_clip=s.dual_clip)
        vf, vf_clipped = rl.ppo_value_loss(values, batch["values"], batch["returns"], s.vf_clip)
        per_token = pg + s.vf_coef * vf - s.ent_coef * entropy
        kl_term = jnp.zeros_like(pg)
        if s.kl_in == "loss":
            kl_term = rl.kl_estimate(logps, batch["ref_logps"], s.kl_estimator)
            per_token = per_token + batch["kl_coef"][:, None] * kl_term

        def total(x):
            return rl.masked_sum(x, valid)

        sums = {"loss/policy_avg": total(pg), "loss/value_avg": total(vf),
                "policy/approxkl_avg": total(stats.approxkl), "policy/clipfrac_avg": total(stats.clipped),
                "policy/entropy_avg": total(entropy), "val/clipfrac_avg": total(vf_clipped),
                "val/ratio": total(stats.ratio), "val/ratio_sq": total(stats.ratio ** 2),
                "val/vpred": total(values), "loss/kl_avg": total(kl_term),
                "count": jnp.sum(mask)}
        return total(per_token), sums

    return sums_fn


def metrics_fn(sums) -> dict:
    """Token means of the sums (TRL's names), val/ratio_var = E[rho^2] - E[rho]^2."""
    out = sums_to_means(sums)
    out["val/ratio_var"] = out.pop("val/ratio_sq") - out["val/ratio"] ** 2
    out["num_tokens"] = out.pop("num_examples")
    return out


def update_batch(batch: dict, adv: dict, s: PPOSettings, kl_coef: float) -> dict:
    """The fields the update reads (numpy, one row per response)."""
    out = {k: np.asarray(batch[k]) for k in UPDATE_KEYS if k in batch}
    out["advantages"] = np.asarray(adv["advantages"], np.float32)
    out["returns"] = np.asarray(adv["returns"], np.float32)
    if s.kl_in == "loss":
        out["ref_logps"] = np.asarray(batch["ref_logps"], np.float32)
        out["kl_coef"] = np.full((len(out["response"]),), kl_coef, np.float32)
    return out


def abstract_batch(config, s: PPOSettings) -> dict:
    """One global update minibatch (for `alignjax compile`)."""
    r, p, n = s.rows // s.num_minibatches, s.max_prompt_len, s.max_new_tokens
    i32, f32 = jnp.int32, jnp.float32
    out = dict(query=((r, p), i32), query_mask=((r, p), i32), response=((r, n), i32),
               response_mask=((r, n), i32), logps=((r, n), f32), values=((r, n), f32),
               advantages=((r, n), f32), returns=((r, n), f32))
    if s.kl_in == "loss":
        out.update(ref_logps=((r, n), f32), kl_coef=((r,), f32))
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in out.items()}


# ---- the producer's PPO part --------------------------------------------------------------------

def make_process(s: PPOSettings, kl: KLController):
    """process(rollout batch) -> (update batch, scores, metrics) for alignjax.train.online.Producer:
    the advantages at the current KL coefficient, then the controller's update."""

    def process(batch):
        kl_coef = kl.value
        adv = jax.device_get(advantages({k: batch[k] for k in (
            "logps", "ref_logps", "values", "response_mask", "scores", "contains_eos")}, s,
            jnp.float32(kl_coef)))
        metrics = {k: float(v) for k, v in adv["metrics"].items()}
        kl.update(metrics["objective/kl"], s.rows)
        return update_batch(batch, adv, s, kl_coef), adv["scores"], metrics

    return process


# ---- registry hooks (alignjax.train.registry) ----------------------------------------------------

def settings(config) -> PPOSettings:
    return settings_from_config(config)


def value_source(config, s: PPOSettings) -> tuple[str, bool]:
    """(source path of the value model, whether its score head starts at zero)."""
    rms = online.reward_model_paths(s, "ppo")
    init = s.value_init if s.value_init != "auto" else ("reward" if rms else "policy")
    if init == "reward":
        if not rms:
            raise ConfigError(f"ppo.value_init=reward: ppo.reward={s.reward!r} holds no reward "
                              "model to start the value model from; use ppo.value_init=policy")
        check_value_backbone(rms[0], str(config.model.init_from))
        return rms[0], False
    return str(config.model.init_from), True


BACKBONE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim")


def _architecture(path: str):
    """A model directory's LlamaConfig, from its metadata only (no weights read)."""
    from alignjax import fs
    from alignjax.model.config import LlamaConfig
    from alignjax.model.store import MODEL_FILE, path_kind
    if path_kind(path) == "hf":
        return LlamaConfig.from_hf_dir(path)
    return LlamaConfig.from_json_dict(json.loads(fs.read_text(fs.join(path, MODEL_FILE)))["model"])


def check_value_backbone(reward_path: str, policy_path: str) -> None:
    """The value model starts from the reward model and reads the policy's tokens, so both need
    the policy's backbone; checked from metadata before anything loads (paths that do not exist
    yet are reported where they are read)."""
    from alignjax import fs
    if not (reward_path and policy_path and fs.isdir(reward_path) and fs.isdir(policy_path)):
        return
    rm, pol = _architecture(reward_path), _architecture(policy_path)
    diff = [f"{k} {getattr(rm, k)} vs {getattr(pol, k)}" for k in BACKBONE_KEYS
            if getattr(rm, k) != getattr(pol, k)]
    if diff:
        raise ConfigError(f"ppo.value_init: the value model would start from the reward model "
                          f"{reward_path}, whose backbone does not match the policy's "
                          f"({', '.join(diff)}); use ppo.value_init=policy (a zero-initialised "
                          "value head on the policy)")


def slots(config, s: PPOSettings) -> list:
    from alignjax.train.slots import Slot
    init = str(config.model.init_from)
    value_src, zero = value_source(config, s)
    value_opt = "value_optimizer" if "value_optimizer" in config else "optimizer"
    return [Slot("policy", "lm", init, trains=True),
            Slot("value", "scalar", value_src, trains=True, zero_score_head=zero, optimizer=value_opt),
            Slot("reference", "lm", init, trains=False, dtype=s.ref_dtype)]


def sums(config, s: PPOSettings, modules: dict):
    return make_sums_fn(modules["policy"], modules["value"], s), metrics_fn


def build(config, workdir: str, run, s: PPOSettings, modules: dict, loader=None):
    """The PPO Algorithm: a rollout producer around `sums` (alignjax/train/loop.py: Algorithm)."""
    from alignjax.train.loop import Algorithm
    from alignjax.train.rollout import Roller
    reward, prompts = online.reward_and_prompts(s, "ppo", run)
    roller = Roller(modules["policy"], run.mesh, run.rules, run.tokenizer, s.rollout,
                    reward=reward, value_module=modules["value"], ref_module=modules["reference"])
    kl = KLController(s.kl_coef, s.kl_target, s.kl_horizon)
    producer = online.build_producer(config, workdir, roller, s, prompts, make_process(s, kl))
    sums_fn, mfn = sums(config, s, modules)
    return Algorithm("ppo", sums_fn, mfn, producer=producer, epochs=s.epochs,
                     num_minibatches=s.num_minibatches,
                     host_state=online.HostState(kl=kl, prompts=prompts))


SPEC = AlgorithmSpec("ppo", settings, slots, sums, abstract_batch, build,
                     resident=online.reward_models)
