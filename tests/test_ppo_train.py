"""PPO through the shared loop (alignjax.train.run_training): TRL's metric names are logged, and a
run stopped after a checkpoint resumes exactly (prompt position, KL controller, sampling seeds,
minibatch order, both optimizers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignjax.config import load_config
from alignjax.train import online, run_training

OVERRIDES = [
    # a small random model on the toy suite: the point is the loop, not learning
    "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
    "model.num_attention_heads=4", "model.num_key_value_heads=2", "tokenizer.path=toy",
    "train.steps=3", "train.batch_size=16", "train.log_every=1", "train.eval_every=0",
    "checkpoint.every=1", "checkpoint.async_save=False",
    "ppo.epochs=2", "ppo.num_minibatches=2", "ppo.max_new_tokens=8", "ppo.kl_target=1.0",
    "ppo.kl_horizon=100.0", "ppo.temperature=1.0",
]
NOISY = ("timing/", "tokens_per_s", "data_wait", "mfu", "rollout_tokens_per_s")


def _rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(NOISY)} for r in rows}


@pytest.mark.slow  # trains PPO through the loop twice
def test_ppo_logs_trl_metrics_and_resumes_exactly(tmp_path, monkeypatch):
    config = load_config("configs/ppo.py:tiny", OVERRIDES)
    whole = tmp_path / "whole"
    moves = _record_logp_moves(monkeypatch)
    run_training(config, str(whole))
    monkeypatch.undo()
    # A step's updates raise the log-probs of its positive-advantage tokens and lower the
    # negative ones (the wiring of rollout, advantages and minibatches, not just the formulas).
    assert len(moves) == 2
    for dlogp, adv in moves:
        assert np.corrcoef(dlogp, adv)[0, 1] > 0.2
        assert dlogp[adv > 0].mean() > 0 > dlogp[adv < 0].mean()
    want = _rows(whole)
    assert sorted(want) == [1, 2, 3]
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward",
                "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
                "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg", "loss/value_avg",
                "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "lr", "lr/value", "episode",
                "response_length", "kl_coef"):
        assert key in want[3], key
    assert want[1]["kl_coef"] == pytest.approx(0.05) and want[3]["kl_coef"] != want[2]["kl_coef"]
    raw = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert raw[-1]["tokens_per_s"] > 0 and raw[-1]["mfu"] > 0  # query + response tokens count

    # The same run, stopped while producing step 3 (after checkpoint 2), then resumed.
    assert_resumes_exactly(config, want, tmp_path / "cut", monkeypatch, stop_at=3)


def _record_logp_moves(monkeypatch) -> list:
    """Patches the producer: at each step after the first, the previous step's update batch is
    scored again under the updated policy; appends (logp change, advantage) of its tokens."""
    import jax

    from alignjax.train.rollout import response_token_stats
    call, moves, last = online.Producer.__call__, [], {}
    score = jax.jit(lambda module, p, b, t: response_token_stats(module, p, b, t)[0],
                    static_argnums=(0, 3))  # one compile for the run, not one per step

    def recording(self, state, frozen, step, rng=None):
        if last:
            b = last.pop("batch")
            new = score(self.roller.policy_module, state["params"]["policy"], b, self.s.temperature)
            valid = b["response_mask"] > 0
            adv = b["advantages"]  # per token (PPO) or per response (GRPO)
            adv = np.broadcast_to(adv[:, None], valid.shape) if adv.ndim == 1 else adv
            moves.append(((np.asarray(new) - b["logps"])[valid], adv[valid]))
        out = call(self, state, frozen, step, rng)
        last["batch"] = out[0]
        return out

    monkeypatch.setattr(online.Producer, "__call__", recording)
    return moves


def assert_resumes_exactly(config, want: dict, workdir, monkeypatch, stop_at: int):
    """Run `config` in `workdir`, interrupted while its producer makes step `stop_at`, then
    again (it resumes from the last checkpoint); every logged row must equal `want`'s."""
    call = online.Producer.__call__

    def interrupted(self, state, frozen, step, rng=None):
        if step == stop_at:
            raise KeyboardInterrupt
        return call(self, state, frozen, step, rng)

    monkeypatch.setattr(online.Producer, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(config, str(workdir))
    monkeypatch.setattr(online.Producer, "__call__", call)
    run_training(config, str(workdir))
    got = _rows(workdir)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step].keys() == want[step].keys()
        for k in want[step]:
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-6, abs=1e-7), (step, k)
