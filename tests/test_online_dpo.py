"""Online DPO: TRL's pair construction, the pairs' layout, bad settings, and the loop end to end."""

import json

import jax
import numpy as np
import pytest

import reference_rl as ref
from alignjax import sharding as shd
from alignjax.config import load_config
from alignjax.model.config import ConfigError
from alignjax.train import online_dpo

SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "tokenizer.path=toy"]


def test_pairs_match_trl_construction():
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = int(rng.integers(1, 9))
        scores = rng.integers(0, 3, 2 * b).astype(np.float32)  # ties are common
        has_eos = rng.random(2 * b) > 0.3
        chosen, rejected, shaped = online_dpo.online_pairs(scores, has_eos, 1.0)
        # TRL's layout: first half = each prompt's first sample; ours: rows 2b, 2b + 1
        to_trl = np.concatenate([np.arange(0, 2 * b, 2), np.arange(1, 2 * b, 2)])
        want_c, want_r, want_s = ref.online_dpo_pairs(scores[to_trl], has_eos[to_trl], 1.0)
        np.testing.assert_allclose(shaped[to_trl], want_s, atol=1e-6)
        np.testing.assert_array_equal(chosen, to_trl[want_c])
        np.testing.assert_array_equal(rejected, to_trl[want_r])


def test_pair_batch_scores_the_sampled_tokens(bpe_tokenizer):
    """The grouped batch's summed log-probs (what the DPO step reads) equal the rollout's own
    per-token log-probs of the same responses: prompt, response, positions and mask line up."""
    from alignjax.model.config import LlamaConfig
    from alignjax.model.params import build_module, init_params
    from alignjax.train.grouped import group_logps
    from alignjax.train.rollout import response_token_stats
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, dtype="float32")
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    module = build_module(cfg)
    params = init_params(module, jax.random.PRNGKey(0), mesh)
    rng = np.random.default_rng(1)
    r, p, n = 6, 7, 5
    query_mask = (np.arange(p)[None, :] >= rng.integers(1, p, r)[:, None]).astype(np.int32)  # left pad
    response_mask = (np.arange(n)[None, :] < rng.integers(1, n + 1, r)[:, None]).astype(np.int32)
    batch = dict(query=rng.integers(1, 64, (r, p)).astype(np.int32) * query_mask, query_mask=query_mask,
                 response=rng.integers(1, 64, (r, n)).astype(np.int32) * response_mask,
                 response_mask=response_mask)
    token_logps, _ = response_token_stats(module, params, batch, 1.0)
    want = np.sum(np.asarray(token_logps) * response_mask, axis=1)
    chosen, rejected = np.array([1, 2, 5]), np.array([0, 3, 4])
    pairs = online_dpo.pair_batch(batch, chosen, rejected, np.ones(3, bool))
    sums, lens = group_logps(module, params, pairs)
    np.testing.assert_allclose(np.asarray(sums), want[np.stack([chosen, rejected], 1)], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lens), response_mask.sum(1)[np.stack([chosen, rejected], 1)])


@pytest.mark.parametrize("overrides, message", [
    (("dpo.loss_type=rrhf",), "online DPO trains on pairs"),
    (("dpo.reference=precomputed",), "reference must be colocated"),
    (("online_dpo.temperature=0.0",), "online_dpo.temperature=0.0: must be > 0"),
    (("online_dpo.top_k=1",), "online_dpo.top_k=1"),
    (("online_dpo.missing_eos_penalty=-1.0",), "online_dpo.missing_eos_penalty=-1.0"),
    (("train.batch_size=30", "train.grad_accum_steps=4"), "train.batch_size=30"),
])
def test_bad_settings_name_the_key(overrides, message):
    config = load_config("configs/online_dpo.py:tiny", ["model.init_from=runs/sft", *overrides])
    with pytest.raises(ConfigError, match=message):
        online_dpo.settings(config)


@pytest.mark.slow  # trains online DPO through the loop
def test_online_dpo_runs_and_skips_tied_pairs(tmp_path):
    from alignjax.train import run_training
    reward = tmp_path / "length.py"  # random samples of a prompt rarely tie on length
    reward.write_text("def reward(prompts, completions):\n"
                      "    return [float(len(c) % 3) for c in completions]\n")
    config = load_config("configs/online_dpo.py:tiny", SMALL + [
        "model.init_from=", "train.steps=3", "optimizer.warmup_steps=1", "train.batch_size=8",
        "train.log_every=1",
        "train.eval_every=0", "checkpoint.every=100", f"online_dpo.reward=python:{reward}:reward",
        "online_dpo.max_new_tokens=6"])
    run_training(config, str(tmp_path / "run"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "objective/scores",
                    "objective/scores_margin", "val/contain_eos_token", "frac_pairs_tied"):
            assert np.isfinite(r[key]), key
        # skip_ties (the toy preset): only the untied pairs of the 8 count
        assert r["num_examples"] == pytest.approx(8 * (1 - r["frac_pairs_tied"]))
        assert r["objective/scores_margin"] > 0 or r["frac_pairs_tied"] == 1
