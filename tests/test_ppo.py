"""PPO's building blocks (alignjax/train/ppo.py) against the NumPy transcription of docs/algorithms.md
section 6 (reference_rl.py): advantages and rollout metrics, the update's sums (policy/value
losses, entropy, KL term, TRL metric names), the KL controller, settings validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import reference_rl as ref
from alignjax import sharding as shd
from alignjax.model.config import ConfigError, LlamaConfig
from alignjax.model.params import build_module
from alignjax.train import ppo
from alignjax.train.rollout import sequence_inputs
from test_ppo_rollout import random_params

R, N = 6, 9
TOL = dict(rtol=1e-6, atol=1e-6)


def _rollout(seed=0):
    rs = np.random.RandomState(seed)
    lengths = np.array([9, 1, 4, 9, 7, 3])
    has_eos = np.array([1, 1, 1, 0, 1, 1], np.int32)  # row 3 ran out of tokens
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    f = lambda *s: rs.randn(*s).astype(np.float32)  # noqa: E731
    return dict(logps=-np.abs(f(R, N)), ref_logps=-np.abs(f(R, N)), values=f(R, N),
                response_mask=mask, scores=3 * f(R), contains_eos=has_eos)


VARIANTS = {
    "defaults": {},
    "k3_whiten_rewards_clip_penalty": dict(kl_estimator="k3", whiten_rewards=True, reward_clip=2.0,
                                           missing_eos_penalty=1.0, kl_coef=0.2),
    "kl_in_loss_eos_score_no_adv_whitening": dict(kl_in="loss", kl_estimator="k2",
                                                  missing_eos_score=-1.0, whiten_advantages=False,
                                                  gamma=0.9, lam=1.0),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_advantages_equal_numpy(variant):
    kw = VARIANTS[variant]
    s = dataclasses.replace(ppo.PPOSettings(), **kw)
    b = _rollout(1)
    got = jax.device_get(ppo.advantages(b, s, jnp.float32(s.kl_coef)))
    adv, ret, r, scores, k = ref.ppo_advantages(
        b["scores"], b["contains_eos"], b["logps"], b["ref_logps"], b["values"], b["response_mask"],
        s.kl_coef, s.kl_estimator, s.kl_in, s.gamma, s.lam, s.whiten_rewards, s.whiten_advantages,
        s.reward_clip, s.missing_eos_penalty, s.missing_eos_score)
    m = b["response_mask"] > 0
    for name, want in (("advantages", adv), ("returns", ret), ("rewards", r), ("kl", k)):
        np.testing.assert_allclose(np.where(m, got[name], 0.0), want, err_msg=name, **TOL)
    np.testing.assert_allclose(got["scores"], scores, **TOL)
    # TRL's rollout metrics, from the same numbers.
    coef = s.kl_coef if s.kl_in == "reward" else 0.0
    non_score = (-coef * k).sum(1)
    want_m = {"objective/kl": k.sum(1).mean(), "objective/scores": scores.mean(),
              "objective/non_score_reward": non_score.mean(),
              "objective/rlhf_reward": (scores + non_score).mean(),
              "objective/entropy": np.where(m, -b["logps"], 0).sum(1).mean(),
              "val/num_eos_tokens": 5.0, "response_length": b["response_mask"].sum(1).mean()}
    for key, want in want_m.items():
        np.testing.assert_allclose(float(got["metrics"][key]), want, rtol=1e-6, atol=1e-6, err_msg=key)


def test_advantages_do_not_recompile_when_the_kl_coef_changes():
    s, b = ppo.PPOSettings(), _rollout(2)
    ppo.advantages(b, s, jnp.float32(0.05))
    n = ppo.advantages._cache_size()
    ppo.advantages(b, s, jnp.float32(0.07))
    assert ppo.advantages._cache_size() == n


def test_kl_controller_fixed_adaptive_and_its_state():
    fixed = ppo.KLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    ctl, beta = ppo.KLController(0.1, target=6.0, horizon=10000.0), 0.1
    for kl in (0.0, 3.0, 6.0, 9.0, 100.0):
        beta = ref.adaptive_kl(beta, kl, 64, 6.0, 10000.0)
        np.testing.assert_allclose(ctl.update(kl, 64), beta, rtol=1e-6)
    other = ppo.KLController(0.1, target=6.0)
    other.set_state(ctl.get_state())
    assert other.value == ctl.value


# ---- the update's sums ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(bpe_tokenizer):
    tok = bpe_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      remat_policy="none")
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    policy, value = build_module(cfg, "lm"), build_module(cfg, "scalar")
    params = {"policy": random_params(policy, mesh, 0), "value": random_params(value, mesh, 1)}
    return policy, value, params, mesh


def _update_batch(vocab, seed=0, rows=8, p=7, n=6):
    rs = np.random.RandomState(seed)
    qlen, rlen = rs.randint(1, p + 1, rows), rs.randint(0, n + 1, rows)
    qlen[0], rlen[0] = p, n  # one full row
    f = lambda *s: rs.randn(*s).astype(np.float32)  # noqa: E731
    return dict(query=rs.randint(3, vocab, (rows, p)).astype(np.int32),
                query_mask=(np.arange(p)[None] >= p - qlen[:, None]).astype(np.int32),
                response=rs.randint(3, vocab, (rows, n)).astype(np.int32),
                response_mask=(np.arange(n)[None] < rlen[:, None]).astype(np.int32),
                logps=-5.5 + 0.3 * f(rows, n), values=f(rows, n), advantages=f(rows, n),
                returns=f(rows, n), ref_logps=-5.5 + 0.3 * f(rows, n),
                kl_coef=np.abs(f(rows)))


def _plain_forward(policy, value, params, batch):
    tokens, positions, segs = sequence_inputs(*(jnp.asarray(batch[k]) for k in (
        "query", "query_mask", "response", "response_mask")))
    p = batch["query"].shape[1]
    logits, _ = policy.apply(params["policy"], tokens, positions, segs)
    scores, _ = value.apply(params["value"], tokens, positions, segs)
    return np.asarray(logits)[:, p - 1:-1], np.asarray(scores)[:, p - 1:-1]


@pytest.mark.parametrize("kw", [dict(), dict(dual_clip=3.0, ent_coef=0.01, temperature=0.0),
                                dict(kl_in="loss", kl_estimator="k3", clip_eps=0.1, vf_clip=0.05)],
                         ids=["defaults", "dual_clip_entropy_greedy", "kl_in_loss"])
def test_sums_fn_equals_numpy(models, kw):
    policy, value, params, mesh = models
    s = dataclasses.replace(ppo.PPOSettings(), **kw)
    batch = _update_batch(policy.config.vocab_size)
    if s.kl_in != "loss":
        batch = {k: v for k, v in batch.items() if k not in ("ref_logps", "kl_coef")}
    sums_fn = ppo.make_sums_fn(policy, value, s)
    with shd.mesh_context(mesh):
        objective, sums = jax.jit(sums_fn)(params, shd.shard_batch(batch, mesh), {})
    logits, v_new = _plain_forward(policy, value, params, batch)
    temp = s.temperature if s.temperature > 0 else 1.0
    want_obj, want = ref.ppo_update_sums(
        logits, batch["response"], v_new, batch["logps"], batch["values"], batch["advantages"],
        batch["returns"], batch["response_mask"], temp, s.clip_eps, s.vf_clip, s.vf_coef,
        s.ent_coef, s.dual_clip, batch.get("ref_logps"), batch.get("kl_coef"), s.kl_estimator)
    got = jax.device_get(sums)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(float(got[k]), want[k], rtol=2e-5, atol=2e-5, err_msg=k)
    np.testing.assert_allclose(float(objective), want_obj, rtol=2e-5, atol=2e-5)
    assert 0 < want["policy/clipfrac_avg"] < want["count"]  # both branches are exercised
    m = ppo.metrics_fn({**got, "objective": objective})  # the step adds the objective
    for key in ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg",
                "policy/entropy_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_var", "loss"):
        assert np.isfinite(m[key]), key
    np.testing.assert_allclose(m["val/ratio_var"], want["val/ratio_sq"] / want["count"] -
                               (want["val/ratio"] / want["count"]) ** 2, rtol=1e-5, atol=1e-6)


# ---- settings -----------------------------------------------------------------------------------

def _config(batch_size=64, **ppo_kw):
    c = ConfigDict()
    c.train = ConfigDict(dict(batch_size=batch_size, grad_accum_steps=1, seed=0))
    c.data = ConfigDict(dict(train="toy"))
    c.ppo = ConfigDict({f.name: f.default for f in dataclasses.fields(ppo.PPOSettings)
                        if f.name not in ppo.SHARED_KEYS})
    for k in ("dual_clip", "kl_target", "reward_clip", "missing_eos_penalty"):
        c.ppo[k] = 0.0
    c.ppo.update(ppo_kw)
    return c


def test_settings_defaults_parse():
    s = ppo.settings_from_config(_config(batch_size=32, samples_per_prompt=4))
    assert s.dual_clip is None and s.kl_target is None and s.rows == 32 and s.prompts_per_step == 8
    assert s.prompts == "toy"


@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=6, num_minibatches=4),
     r"^ppo.num_minibatches=4: a rollout batch of 6 responses \(train.batch_size\) does not divide "
     r"into 4 minibatches$"),
    (dict(batch_size=6, samples_per_prompt=4),
     r"^train.batch_size=6: the batch is the responses of one rollout; make it a multiple of "
     r"ppo.samples_per_prompt=4$"),
    (dict(kl_estimator="k4"), r"^ppo.kl_estimator='k4': choose one of k1, k2, k3$"),
    (dict(kl_in="both"), r"^ppo.kl_in='both': choose one of reward, loss$"),
    (dict(dual_clip=0.5), r"^ppo.dual_clip=0.5: must be > 1"),
    (dict(missing_eos_penalty=1.0, missing_eos_score=-1.0), r"^ppo.missing_eos_score=-1.0: set either"),
    (dict(value_init="rm"), r"^ppo.value_init='rm': choose one of auto, reward, policy$"),
])
def test_settings_errors_name_the_key(kw, message):
    with pytest.raises(ConfigError, match=message):
        ppo.settings_from_config(_config(**kw))


def test_settings_unknown_key_and_accumulation():
    c = _config()
    c.ppo.cliprange = 0.2
    with pytest.raises(ConfigError, match=r"^ppo.cliprange: unknown PPO setting"):
        ppo.settings_from_config(c)
    c = _config(batch_size=8, num_minibatches=2)
    c.train.grad_accum_steps = 3
    with pytest.raises(ConfigError, match=r"^train.grad_accum_steps=3: a minibatch of 4 responses"):
        ppo.settings_from_config(c)


def test_value_init_needs_a_reward_model():
    c = _config(value_init="reward")
    c.model = ConfigDict(dict(init_from="runs/sft"))
    s = ppo.settings_from_config(c)
    with pytest.raises(ConfigError, match=r"^ppo.value_init=reward: ppo.reward='toy' holds no reward"):
        ppo.value_source(c, s)
    assert ppo.value_source(c, dataclasses.replace(s, value_init="auto")) == ("runs/sft", True)
    assert ppo.value_source(c, dataclasses.replace(s, reward="toy + 0.5*runs/rm")) == ("runs/rm", False)


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_update_is_the_same_on_different_meshes(models):
    """sums and gradients of one minibatch on data=2/fsdp=2/tensor=2 and on 1 device."""
    from alignjax.model.params import abstract_params
    policy, value, params, _ = models
    s = dataclasses.replace(ppo.PPOSettings(), dual_clip=3.0, ent_coef=0.01)
    batch = _update_batch(policy.config.vocab_size, seed=3)
    grad_fn = jax.value_and_grad(ppo.make_sums_fn(policy, value, s), has_aux=True)
    host = jax.device_get(params)
    out = []
    for mesh in (shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                 shd.make_mesh({"data": 1}, jax.devices()[:1])):
        placed = {k: jax.device_put(host[k], abstract_params(m, mesh)[1])
                  for k, m in (("policy", policy), ("value", value))}
        with shd.mesh_context(mesh):
            out.append(jax.device_get(jax.jit(grad_fn)(placed, shd.shard_batch(batch, mesh), {})))
    for other in out[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                               out[0], other)


def test_value_model_from_a_reward_model_with_another_backbone_is_refused(tmp_path):
    import json
    from alignjax.model.store import MODEL_FILE
    for name, layers, head in (("sft", 4, "lm"), ("rm", 2, "scalar")):
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        (tmp_path / name).mkdir()
        (tmp_path / name / MODEL_FILE).write_text(json.dumps(
            {"format": 1, "head": head, "model": cfg.to_json_dict()}))
    c = _config(reward=str(tmp_path / "rm"))
    c.model = ConfigDict(dict(init_from=str(tmp_path / "sft")))
    s = ppo.settings_from_config(c)
    with pytest.raises(ConfigError, match=r"^ppo.value_init: the value model would start from the "
                       r"reward model .*/rm, whose backbone does not match the policy's "
                       r"\(num_hidden_layers 2 vs 4\); use ppo.value_init=policy"):
        ppo.value_source(c, s)
    assert ppo.value_source(c, dataclasses.replace(s, value_init="policy")) == (str(tmp_path / "sft"), True)
