"""PPO rollouts (alignjax/train/rollout.py): static shapes, log-probs and values against plain
full-sequence forwards, greedy responses against the generator's, scores from rewards.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import rewards
from alignjax import sharding as shd
from alignjax.data import toy
from alignjax.errors import UserError
from alignjax.model.config import LlamaConfig
from alignjax.model.generate import SamplingParams
from alignjax.model.params import abstract_params, build_module
from alignjax.train import rollout as ro

P, N, K = 48, 12, 2
PROMPTS = [e.prompt for e in toy.make_examples(4, seed=3)]


def random_params(module, mesh, seed, eos_boost=None):
    """Random weights drawn in NumPy (no init program to compile), sharded on `mesh`."""
    abstract, shardings = abstract_params(module, mesh)
    rng = np.random.default_rng(seed)

    def draw(path, a):
        x = rng.normal(size=a.shape) * 0.1 + jax.tree_util.keystr(path).endswith("['scale']")
        if eos_boost is not None and jax.tree_util.keystr(path).endswith("['lm_head']['kernel']"):
            x[:, eos_boost] *= 6.0  # EOS now and then, so some responses end early
        return x.astype(a.dtype)
    params = jax.tree_util.tree_map_with_path(draw, abstract)
    return jax.device_put(params, shardings)


@pytest.fixture(scope="module")
def setup(bpe_tokenizer, tmp_path_factory):
    tok = bpe_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, remat_policy="none")
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    policy, value = build_module(cfg, "lm"), build_module(cfg, "scalar")
    params = {"policy": random_params(policy, mesh, 0, eos_boost=tok.eos_token_id),
              "value": random_params(value, mesh, 1)}
    frozen = {"reference": random_params(policy, mesh, 2)}
    py = tmp_path_factory.mktemp("py") / "r.py"
    py.write_text("def f(prompts, completions):\n"
                  "    return [len(c) + 0.001 * len(p) for p, c in zip(prompts, completions)]\n")
    reward = rewards.build_reward(f"python:{py}:f", policy_tokenizer=tok)
    settings = ro.RolloutSettings(max_prompt_len=P, max_new_tokens=N, samples_per_prompt=K,
                                  temperature=0.9)
    roller = ro.Roller(policy, mesh, shd.DEFAULT_RULES, tok, settings, reward=reward,
                       value_module=value, ref_module=policy)
    return roller, params, frozen


def _full_forward_logps(module, params, q, qm, r, rm, temperature):
    """Independent: the model's full logits, log-softmax in NumPy, picked per response token."""
    tokens = np.concatenate([q, r], 1)
    mask = np.concatenate([qm, rm], 1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, _ = module.apply(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    z = np.asarray(logits, np.float64)[:, q.shape[1] - 1:-1] / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, r[..., None], -1)[..., 0]


def _full_forward_values(module, params, q, qm, r, rm):
    tokens = np.concatenate([q, r], 1)
    mask = np.concatenate([qm, rm], 1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    scores, _ = module.apply(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(scores)[:, q.shape[1] - 1:-1]


@pytest.mark.slow  # a whole rollout with four models
def test_rollout_batch_shapes_logps_values_and_scores(setup):
    roller, params, frozen = setup
    tok = roller.tokenizer
    ids = ro.encode_chat_prompts(tok, PROMPTS)
    batch, info = roller.rollout(params, frozen, PROMPTS, ids, seed=7)
    r = len(PROMPTS) * K
    shapes = {k: v.shape for k, v in batch.items()}
    assert shapes == dict(query=(r, P), query_mask=(r, P), response=(r, N), response_mask=(r, N),
                          contains_eos=(r,), logps=(r, N), ref_logps=(r, N), values=(r, N),
                          scores=(r,))
    q, qm, resp, rm = (batch[k] for k in ("query", "query_mask", "response", "response_mask"))
    # Prompts left-padded; each prompt's k copies consecutive.
    for i, p_ids in enumerate(ids):
        for j in range(K):
            assert q[i * K + j, P - len(p_ids):].tolist() == list(p_ids)
            assert qm[i * K + j].sum() == len(p_ids)
    # Mask: a prefix, ending at the first EOS (included); pad after it.
    eos = set(roller.eos_ids)
    for row, m, has in zip(resp, rm, batch["contains_eos"]):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert (row[n:] == tok.pad_token_id).all()
        first = next((t for t, x in enumerate(row) if int(x) in eos), None)
        assert bool(has) == (first is not None)
        assert n == (first + 1 if first is not None else N)
    assert 0 < batch["contains_eos"].sum() < r, "the test wants both ended and truncated rows"
    valid = rm > 0
    pol = _full_forward_logps(roller.policy_module, params["policy"], q, qm, resp, rm, 0.9)
    ref = _full_forward_logps(roller.policy_module, frozen["reference"], q, qm, resp, rm, 0.9)
    np.testing.assert_allclose(batch["logps"][valid], pol[valid], atol=2e-5)
    np.testing.assert_allclose(batch["ref_logps"][valid], ref[valid], atol=2e-5)
    assert np.abs(batch["logps"][valid] - batch["ref_logps"][valid]).max() > 1e-2  # two models
    vals = _full_forward_values(roller.value_module, params["value"], q, qm, resp, rm)
    np.testing.assert_allclose(batch["values"][valid], vals[valid], atol=2e-5)
    # The sampler's own per-step log-probs (KV-cache decode) agree with the full forward.
    again = roller.generator.generate_padded(
        params["policy"], q, qm, SamplingParams(max_new_tokens=N, temperature=0.9, seed=7))
    np.testing.assert_array_equal(again["tokens"], resp)
    np.testing.assert_allclose(again["logps"][valid], batch["logps"][valid], atol=2e-4)
    # Scores: the python reward on the raw prompt text and the decoded completion.
    texts = rewards.decode_completions(tok, [row[m > 0].tolist() for row, m in zip(resp, rm)])
    want = [len(c) + 0.001 * len(PROMPTS[i // K]) for i, c in enumerate(texts)]
    np.testing.assert_allclose(batch["scores"], want, rtol=1e-6)
    assert info["completions"] == texts and info["prompts"][1] == PROMPTS[0]


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_greedy_rollout_equals_the_generator_and_does_not_recompile(setup):
    roller, params, frozen = setup
    greedy = ro.Roller(roller.policy_module, roller.mesh, roller.rules, roller.tokenizer,
                       ro.RolloutSettings(max_prompt_len=P, max_new_tokens=N, samples_per_prompt=K,
                                          temperature=0.0), reward=roller.reward,
                       value_module=roller.value_module, ref_module=roller.ref_module)
    ids = ro.encode_chat_prompts(roller.tokenizer, PROMPTS)
    batch, _ = greedy.rollout(params, frozen, PROMPTS, ids, seed=0)
    want = greedy.generator.generate_ids(params["policy"], ids,
                                         SamplingParams(max_new_tokens=N, temperature=0.0))
    for i in range(len(ids)):
        for j in range(K):
            np.testing.assert_array_equal(batch["response"][i * K + j], want["tokens"][i])
            np.testing.assert_array_equal(batch["response_mask"][i * K + j], want["mask"][i])
    compiles = (greedy.generator.compile_count(), ro._forward._cache_size())
    other = [p + " x" for p in PROMPTS[::-1]]  # other lengths, same shapes
    greedy.rollout(params, frozen, other, ro.encode_chat_prompts(roller.tokenizer, other), seed=1)
    assert (greedy.generator.compile_count(), ro._forward._cache_size()) == compiles


def test_prompt_longer_than_the_bucket_names_the_key():
    with pytest.raises(UserError, match=r"ppo.max_prompt_len=4: a prompt has 5 tokens"):
        ro.pad_prompts([[1, 2], [1, 2, 3, 4, 5]], 4, 0)


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_rollout_program_equals_the_roller(setup):
    """The one-program rollout (for `alignjax compile`) samples and scores what the Roller does."""
    roller, params, frozen = setup
    s = roller.settings
    program = ro.rollout_program(roller.policy_module, roller.ref_module, roller.value_module, s,
                                 roller.eos_ids, roller.pad_id)
    ids = ro.encode_chat_prompts(roller.tokenizer, PROMPTS)
    q, qm = ro.pad_prompts(ids, P, roller.pad_id)
    q, qm = np.repeat(q, K, 0), np.repeat(qm, K, 0)
    want = roller.sample(params["policy"], q[::K], qm[::K], seed=5)
    want.update(roller.forward(params, frozen, want))
    with shd.mesh_context(roller.mesh, roller.rules):
        got = jax.jit(program)({"params": params}, frozen, *shd.shard_batch(
            dict(q=q, qm=qm), roller.mesh).values(), jax.random.PRNGKey(5))
    got = jax.device_get(got)
    np.testing.assert_array_equal(got["response"], want["response"])
    np.testing.assert_array_equal(got["response_mask"], want["response_mask"])
    for k in ("logps", "ref_logps", "values"):
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
