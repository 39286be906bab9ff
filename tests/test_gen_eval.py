"""train.eval_generate_every: generation-based eval during training, and the training-end plots.

The logged numbers are recomputed here from the responses the run wrote, with the reward
function itself (response length in characters, tests/length_reward.py) and a hand-written win
rate, so a wrong mean, a wrong baseline or swapped win/loss fails.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import SMALL_MODEL

REWARD = "python:tests/length_reward.py:reward"


def _config(steps: int):
    from alignjax.config import load_config
    return load_config("configs/sft.py:tiny", SMALL_MODEL + [
        f"train.steps={steps}", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
        "optimizer.warmup_steps=1", "optimizer.lr=3e-3", "checkpoint.async_save=False",
        "checkpoint.every=2", "train.eval_generate_every=2", "train.eval_generate_num=6",
        "train.eval_generate_batch_size=4", "train.eval_generate_max_new_tokens=12",
        "train.eval_generate_temperature=1.0", f"train.eval_reward={REWARD}"])


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _rows(workdir):
    return {r["step"]: r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


@pytest.mark.slow
def test_generation_eval_metrics_resume_and_plots(tmp_path):
    from alignjax.train import run_training
    workdir = str(tmp_path / "sft")
    run_training(_config(4), workdir)
    rows = _rows(workdir)
    start = _read_jsonl(os.path.join(workdir, "eval_generate", "start.jsonl"))
    assert len(start) == 6
    start_len = np.array([len(r["response"]) for r in start], float)
    assert rows[0]["eval/reward_mean"] == pytest.approx(start_len.mean())
    assert "eval/win_rate_vs_start" not in rows[0]
    for step in (2, 4):
        got = _read_jsonl(os.path.join(workdir, "eval_generate", f"step_{step}.jsonl"))
        assert [r["prompt"] for r in got] == [r["prompt"] for r in start]
        length = np.array([len(r["response"]) for r in got], float)
        assert rows[step]["eval/reward_mean"] == pytest.approx(length.mean())
        wins = (length > start_len).sum() + 0.5 * (length == start_len).sum()
        assert rows[step]["eval/win_rate_vs_start"] == pytest.approx(wins / len(length))
        assert 0 < rows[step]["eval/response_length"] <= 12
    assert 1 not in rows or "eval/reward_mean" not in rows[1]  # only every 2 steps
    # the plots written when training ended are PNGs
    for name in ("loss.png", "eval_reward_mean.png", "eval_win_rate_vs_start.png"):
        with open(os.path.join(workdir, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a resumed run compares against the same starting responses, not the resumed model's
    before = _read_jsonl(os.path.join(workdir, "eval_generate", "start.jsonl"))
    run_training(_config(6), workdir)
    assert _read_jsonl(os.path.join(workdir, "eval_generate", "start.jsonl")) == before
    got = _read_jsonl(os.path.join(workdir, "eval_generate", "step_6.jsonl"))
    length = np.array([len(r["response"]) for r in got], float)
    wins = (length > start_len).sum() + 0.5 * (length == start_len).sum()
    assert _rows(workdir)[6]["eval/win_rate_vs_start"] == pytest.approx(wins / len(length))


def test_generation_eval_config_errors():
    from alignjax.config import load_config
    from alignjax.errors import UserError
    from alignjax.train import gen_eval
    config = load_config("configs/sft.py:tiny", ["train.eval_generate_every=5"])
    with pytest.raises(UserError, match="train.eval_reward"):
        gen_eval.build(config, "unused", run=None, head="lm")
    with pytest.raises(UserError, match="score model, which does not generate"):
        gen_eval.build(config, "unused", run=None, head="score")
    assert gen_eval.build(load_config("configs/sft.py:tiny"), "unused", None, "lm") is None


def test_mean_adjusted_win_rate_leaves_out_unparsed():
    from alignjax.train.gen_eval import mean_adjusted_win_rate
    assert mean_adjusted_win_rate([1.0, 0.5, None, 0.0, 1.0]) == pytest.approx(2.5 / 4)
    assert np.isnan(mean_adjusted_win_rate([None]))
