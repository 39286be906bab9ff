"""GRPO through the shared loop from the session's toy SFT model (a module of its own:
tests that need no trained model stay out of the modules that wait for it, tests/conftest.py)."""

import json

import numpy as np

from test_grpo import _config

LOGGED = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
          "completions/min_length", "completions/max_length", "completions/clipped_ratio", "kl",
          "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
          "timing/rollout", "timing/score", "loss", "grad_norm", "lr")


def test_three_steps_through_the_loop_and_exact_resume(sft_run, tmp_path, monkeypatch):
    """GRPO with a KL term (reference loaded) from the toy SFT model: every metric name is
    logged, timing/update from step 2, the toy eval measures the start and the trained model, and
    the loop's no-recompile check holds (it raises).
    The same run stopped while producing step 3 (after checkpoint 2) and resumed logs the same
    rows: the prompt position, sampling keys, params and optimizer state all come back."""
    from alignjax.train import run_training
    from test_ppo_train import _rows, assert_resumes_exactly
    sft_dir, _ = sft_run
    config = _config(f"model.init_from={sft_dir}", "train.steps=3", "train.batch_size=16",
                     "train.log_every=1", "train.eval_every=2", "checkpoint.every=2",
                     "checkpoint.async_save=False", "grpo.samples_per_prompt=4", "grpo.beta=0.04",
                     "grpo.num_minibatches=2", "grpo.max_new_tokens=12")
    whole = tmp_path / "whole"
    run_training(config, str(whole))
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in LOGGED:
        assert all(key in r for r in rows), key
    assert "timing/update" in rows[1] and rows[2]["episode"] == 48
    # The toy eval: the start model in step 1's row, the trained model (after 3 steps) in the
    # last row; none in between (step 3's own would measure the model after 2 steps).
    assert [r.get("eval/toy_accuracy_step") for r in rows] == [0.0, None, 3.0]
    assert all(0 <= r["eval/toy_accuracy"] <= 1 for r in (rows[0], rows[2]))
    assert all(np.isfinite(r["loss"]) and -1 <= r["reward"] <= 1 for r in rows)

    assert_resumes_exactly(config, _rows(whole), tmp_path / "cut", monkeypatch, stop_at=3)
