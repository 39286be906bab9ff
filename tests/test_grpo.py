"""Critic-free RL (alignjax/train/grpo.py: GRPO, RLOO, REINFORCE++(-baseline)) against the NumPy
transcription of docs/algorithms.md section 7 (reference_rl.py): the producer's advantages and metrics
on a real rollout, the update's loss for every loss_type and ratio, one update on a sharded mesh
vs one device, settings errors (three steps through the loop from the trained SFT model: test_grpo_loop.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_rl as ref
from alignjax import rewards
from alignjax import sharding as shd
from alignjax.config import load_config
from alignjax.model.config import ConfigError, LlamaConfig
from alignjax.model.params import abstract_params, build_module
from alignjax.train import grpo, online
from alignjax.train import rollout as ro
from alignjax.train.rollout import sequence_inputs
from test_ppo_rollout import random_params

K, P, N = 4, 40, 8  # samples per prompt, prompt bucket, new tokens
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def policy_setup(bpe_tokenizer, tmp_path_factory):
    tok = bpe_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, remat_policy="none")
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    policy = build_module(cfg, "lm")
    params = {"policy": random_params(policy, mesh, 0, eos_boost=tok.eos_token_id)}
    frozen = {"reference": random_params(policy, mesh, 2)}
    return tok, policy, mesh, params, frozen


@pytest.fixture(scope="module")
def rollout(policy_setup, tmp_path_factory):
    """One real rollout (4 prompts x 4 samples) of a random policy, scored by a function that
    gives one prompt's group a constant score (zero std)."""
    tok, policy, mesh, params, frozen = policy_setup
    py = tmp_path_factory.mktemp("py") / "r.py"
    py.write_text("def f(prompts, completions):\n"
                  "    return [0.5 if 'hello' in p else float(len(c) % 3)\n"
                  "            for p, c in zip(prompts, completions)]\n")
    reward = rewards.build_reward(f"python:{py}:f", policy_tokenizer=tok)
    roller = ro.Roller(policy, mesh, shd.DEFAULT_RULES, tok,
                       ro.RolloutSettings(P, N, K, temperature=1.0), reward=reward, ref_module=policy)
    texts = ["add 2 and 3", "spell cat backwards", "what is 7 times 6?", "say hello"]
    ids = ro.encode_chat_prompts(tok, texts)
    batch, info = roller.rollout(params, frozen, texts, ids, seed=11)
    assert 0 < batch["contains_eos"].sum() < len(batch["scores"])  # both kinds of response
    assert 0 < want_zero_std(batch["scores"]) < 1
    return texts, ids, batch, info


def want_zero_std(scores):
    return np.mean(scores.reshape(-1, K).std(axis=1) == 0)


class _Replay:
    """A roller that hands back one recorded rollout (the producer's input)."""

    def __init__(self, texts, ids, batch, info):
        self.recorded = (texts, ids, batch, info)

    def rollout(self, params, frozen, texts, ids, seed):
        want_texts, _, batch, info = self.recorded
        assert list(texts) == want_texts
        return batch, info


class _Prompts:
    def __init__(self, texts, ids):
        self.texts, self.ids = texts, ids

    def take(self, n):
        assert n == len(self.texts)
        return self.texts, self.ids


METHODS = {
    "grpo": dict(advantage="grpo"),
    "grpo_batch_scale_penalty_overlong": dict(advantage="grpo", scale_rewards="batch",
                                              missing_eos_penalty=1.0, overlong_buffer=3,
                                              overlong_factor=0.5),
    "dr_grpo_no_scale": dict(advantage="grpo", scale_rewards="none"),
    "rloo": dict(advantage="rloo", beta=0.05),
    "reinforce_pp": dict(advantage="reinforce_pp", beta=0.01),
    "reinforce_pp_baseline": dict(advantage="reinforce_pp_baseline", beta=0.1,
                                  missing_eos_penalty=0.5),
}


@pytest.mark.parametrize("method", METHODS)
def test_producer_advantages_equal_numpy(rollout, method):
    texts, ids, batch, info = rollout
    s = dataclasses.replace(grpo.GRPOSettings(), samples_per_prompt=K, max_prompt_len=P,
                            max_new_tokens=N, rows=len(texts) * K, **METHODS[method])
    producer = online.Producer(_Replay(texts, ids, batch, info), s, _Prompts(texts, ids),
                               grpo.make_process(s))
    out, metrics = producer({"params": {}}, {}, step=1)
    mask = batch["response_mask"]
    adv, scores = ref.critic_free_advantages(
        s.advantage, batch["scores"], batch["contains_eos"], batch["logps"],
        batch["ref_logps"] if s.needs_reference else None, mask, K, s.beta, s.scale_rewards,
        s.missing_eos_penalty, s.overlong_buffer, s.overlong_factor, N)
    np.testing.assert_allclose(out["advantages"], adv, rtol=1e-5, atol=1e-6)
    assert np.abs(adv).max() > 0.1
    assert set(out) == set(grpo.UPDATE_KEYS) | {"advantages"}  # beta acts in the reward here
    groups = scores.reshape(-1, K)
    lengths = mask.sum(1)
    want = {"reward": scores.mean(), "reward_std": groups.std(axis=1, ddof=1).mean(),
            "frac_reward_zero_std": np.mean(groups.std(axis=1) == 0),
            "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": 1 - batch["contains_eos"].mean()}
    if s.needs_reference:
        want["kl"] = (ref.kl(batch["logps"], batch["ref_logps"], "k1") * (mask > 0)).sum(1).mean()
    for k, v in want.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    for k in ("timing/rollout", "timing/score"):
        assert k in metrics


def test_grpo_with_beta_carries_reference_logps(rollout):
    texts, ids, batch, info = rollout
    s = dataclasses.replace(grpo.GRPOSettings(), samples_per_prompt=K, max_prompt_len=P,
                            max_new_tokens=N, rows=len(texts) * K, beta=0.04)
    out, metrics = online.Producer(_Replay(*rollout), s, _Prompts(texts, ids), grpo.make_process(s))(
        {"params": {}}, {}, step=1)
    np.testing.assert_array_equal(out["ref_logps"], batch["ref_logps"])
    assert "kl" not in metrics  # GRPO's kl is the update's (k3 in the loss)


# ---- the update ---------------------------------------------------------------------------------

def _update_batch(vocab, seed=0, rows=8, p=7, n=6):
    rs = np.random.RandomState(seed)
    qlen, rlen = rs.randint(1, p + 1, rows), rs.randint(1, n + 1, rows)
    qlen[0], rlen[0] = p, n
    mask = (np.arange(n)[None] < rlen[:, None]).astype(np.int32)
    f = lambda *s: rs.randn(*s).astype(np.float32)  # noqa: E731
    return dict(query=rs.randint(3, vocab, (rows, p)).astype(np.int32),
                query_mask=(np.arange(p)[None] >= p - qlen[:, None]).astype(np.int32),
                response=rs.randint(3, vocab, (rows, n)).astype(np.int32), response_mask=mask,
                logps=-6.2 + 0.3 * f(rows, n), advantages=(f(rows, n) * mask).astype(np.float32),
                ref_logps=-6.2 + 0.3 * f(rows, n))


UPDATES = {
    "grpo_dapo_k3": dict(advantage="grpo", beta=0.04, loss_type="dapo", epsilon_high=0.28),
    "gspo_bnpo": dict(advantage="reinforce_pp", ratio="gspo", loss_type="bnpo", epsilon_low=0.003,
                      epsilon_high=0.004, temperature=0.7),
    "rloo_sequence": dict(advantage="rloo", beta=0.05, ratio="sequence", loss_type="grpo"),
    "dr_grpo": dict(advantage="grpo", loss_type="dr_grpo", epsilon_low=0.1),
}


@pytest.mark.parametrize("case", UPDATES)
def test_update_loss_and_metrics_equal_numpy(policy_setup, case):
    _, policy, mesh, params, _ = policy_setup
    n = 6
    s = dataclasses.replace(grpo.GRPOSettings(), max_new_tokens=n, **UPDATES[case])
    batch = _update_batch(policy.config.vocab_size)
    if not s.kl_in_loss:
        batch.pop("ref_logps")
    with shd.mesh_context(mesh):
        objective, sums = jax.jit(grpo.make_sums_fn(policy, s))(params, shd.shard_batch(batch, mesh), {})
    got = jax.device_get(grpo.metrics_fn({**sums, "objective": objective}))
    tokens, positions, segs = sequence_inputs(*(jnp.asarray(batch[k]) for k in (
        "query", "query_mask", "response", "response_mask")))
    logits = np.asarray(policy.apply(params["policy"], tokens, positions, segs)[0])[:, 7 - 1:-1]
    loss, means = ref.critic_free_update(
        logits, batch["response"], batch["logps"], batch["advantages"], batch["response_mask"],
        s.temperature, s.epsilon_low, s.epsilon_high, s.beta if s.kl_in_loss else 0.0,
        batch.get("ref_logps"), s.ratio, s.loss_type, n)
    np.testing.assert_allclose(got["loss"], loss, **TOL)
    if not s.kl_in_loss:
        means.pop("kl")
    assert set(got) == set(means) | {"loss", "num_tokens"}
    for k, v in means.items():
        np.testing.assert_allclose(got[k], v, err_msg=k, **TOL)
    assert got["clip_ratio/region_mean"] > 0  # the clipped branch is exercised


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_update_is_the_same_on_different_meshes(policy_setup):
    """Loss, sums and gradients of one minibatch on data=2/fsdp=2/tensor=2 and on 1 device."""
    _, policy, _, params, _ = policy_setup
    s = dataclasses.replace(grpo.GRPOSettings(), max_new_tokens=6, beta=0.04, epsilon_high=0.28)
    batch = _update_batch(policy.config.vocab_size, seed=3)
    grad_fn = jax.value_and_grad(grpo.make_sums_fn(policy, s), has_aux=True)
    host = jax.device_get(params["policy"])
    out = []
    for mesh in (shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                 shd.make_mesh({"data": 1}, jax.devices()[:1])):
        placed = {"policy": jax.device_put(host, abstract_params(policy, mesh)[1])}
        with shd.mesh_context(mesh):
            out.append(jax.device_get(jax.jit(grad_fn)(placed, shd.shard_batch(batch, mesh), {})))
    assert float(out[0][0][1]["kl"]) > 0
    # float32 sums in another order: a few of the 33k gradient entries differ by ~3e-5
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=5e-5),
                           out[0], out[1])


# ---- settings -----------------------------------------------------------------------------------

def _config(*overrides):
    return load_config("configs/grpo.py:tiny", list(overrides))


def test_method_defaults_and_reference_slot():
    s = grpo.settings(_config())
    assert (s.advantage, s.beta, s.ratio, s.loss_type, s.samples_per_prompt) == (
        "grpo", 0.0, "token", "dapo", 8)
    assert [x.name for x in grpo.slots(_config(), s)] == ["policy"]  # beta 0: no reference model
    r = grpo.settings(_config("grpo.advantage=rloo", "grpo.samples_per_prompt=2"))
    assert (r.beta, r.ratio, r.loss_type) == (0.05, "sequence", "grpo")
    assert [x.name for x in grpo.slots(_config(), r)] == ["policy", "reference"]
    p = grpo.settings(_config("grpo.advantage=reinforce_pp", "grpo.samples_per_prompt=1",
                              "grpo.beta=0.0", "grpo.loss_type=dr_grpo"))
    assert (p.beta, p.loss_type, p.needs_reference) == (0.0, "dr_grpo", False)


@pytest.mark.parametrize("overrides, message", [
    (("grpo.samples_per_prompt=1",), "grpo.samples_per_prompt=1: grpo.advantage=grpo compares"),
    (("grpo.advantage=rloo", "grpo.samples_per_prompt=1"), "grpo.samples_per_prompt=1"),
    (("grpo.epsilon_high=0.1",), "grpo.epsilon_high=0.1: must be >= grpo.epsilon_low=0.2"),
    (("grpo.num_minibatches=3",), "grpo.num_minibatches=3: a rollout batch of 64"),
    (("train.batch_size=60",), "train.batch_size=60"),
    (("grpo.advantage=ppo",), "grpo.advantage='ppo'"),
    (("grpo.loss_type=mean",), "grpo.loss_type='mean'"),
    (("grpo.ratio=seq",), "grpo.ratio='seq'"),
    (("grpo.scale_rewards=std",), "grpo.scale_rewards='std'"),
    (("grpo.beta=-0.1",), "grpo.beta=-0.1"),
    (("grpo.overlong_buffer=16",), "grpo.overlong_buffer=16"),
])
def test_settings_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        grpo.settings(_config(*overrides))


def test_unknown_setting_is_named():
    c = _config()
    with c.unlocked():
        c.grpo.num_generations = 8
    with pytest.raises(ConfigError, match=r"^grpo\.num_generations: unknown"):
        grpo.settings(c)


# ---- the loop -----------------------------------------------------------------------------------

@pytest.mark.slow  # trains GRPO through the loop
def test_updates_move_log_probs_with_the_advantages(tmp_path, monkeypatch):
    """From a small random model with a length reward (so every group has a spread): after each
    step, the tokens of the rollout it trained on moved with their advantages."""
    from alignjax.train import run_training
    from test_ppo_train import OVERRIDES, _record_logp_moves
    reward = tmp_path / "length.py"
    reward.write_text("def reward(prompts, completions):\n"
                      "    return [float(len(c)) for c in completions]\n")
    model = [o for o in OVERRIDES if o.startswith(("model.", "tokenizer."))]
    config = _config(*model, "train.steps=3", "train.batch_size=16", "train.log_every=1",
                     "train.eval_every=0", "checkpoint.every=100", f"grpo.reward=python:{reward}:reward",
                     "grpo.samples_per_prompt=4", "grpo.max_new_tokens=8", "grpo.num_minibatches=2")
    moves = _record_logp_moves(monkeypatch)
    run_training(config, str(tmp_path / "run"))
    assert len(moves) == 2
    for dlogp, adv in moves:
        assert np.corrcoef(dlogp, adv)[0, 1] > 0.2
        assert dlogp[adv > 0].mean() > 0 > dlogp[adv < 0].mean()
