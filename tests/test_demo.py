"""The demo's bookkeeping: a finished stage is recognised and its metrics read back (so a second
`make demo` reuses it and prints the same table), and the results table itself."""

import json
import os

from alignjax.config import load_config
from alignjax.demo import _finished, _ppo_summary, _read_winrate, results_table


def _run_dir(tmp_path, rows, checkpoints):
    wd = tmp_path / "run"
    for step in checkpoints:
        os.makedirs(wd / "checkpoints" / str(step))
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(wd)


def test_finished_run_metrics_are_read_back(tmp_path):
    config = load_config("configs/reward.py:tiny", ["train.steps=4"])
    rows = [{"step": 2, "loss": 0.6, "eval/accuracy": 0.7},
            {"step": 4, "loss": 0.4, "eval/accuracy": 0.9, "eval/margin": 1.5}]
    wd = _run_dir(tmp_path, rows, checkpoints=(2, 4))
    # Merged in order, as the training loop returns them: the last value of each metric.
    assert _finished(wd, config) == {"step": 4, "loss": 0.4, "eval/accuracy": 0.9, "eval/margin": 1.5}


def test_unfinished_runs_are_trained(tmp_path):
    config = load_config("configs/reward.py:tiny", ["train.steps=4"])
    rows = [{"step": 2, "loss": 0.6}]
    assert _finished(_run_dir(tmp_path / "a", rows, checkpoints=(2,)), config) is None
    # metrics say step 4 but its checkpoint was never written (killed while saving)
    rows4 = rows + [{"step": 4, "loss": 0.4}]
    assert _finished(_run_dir(tmp_path / "b", rows4, checkpoints=(2,)), config) is None
    assert _finished(str(tmp_path / "missing"), config) is None


def test_results_table():
    r = {"sft": {"before": 0.0, "after": 0.975, "params": 722048, "steps": 600},
         "reward": {"accuracy": 0.94, "steps": 500, "batch_size": 64},
         "dpo": {"implicit_accuracy": 0.97, "checker_accuracy": 0.99, "loss": "dpo+sft",
                 "beta": 1.0, "steps": 100},
         "hf_generation_matches": True, "hf_reward_matches": True}
    lines = results_table(r).splitlines()
    assert lines[:2] == ["| stage | result |", "|---|---|"]
    assert lines[2] == ("| SFT, 0.72M-parameter Llama, 600 steps | held-out checker accuracy "
                        "0.0% → 97.5% |")
    assert "held-out pairwise accuracy 94.0%" in lines[3] and "500 steps of 64 pairs" in lines[3]
    assert "implicit-reward accuracy 97.0%; checker accuracy 97.5% → 99.0%" in lines[4]
    assert lines[5] == "| export to HF | transformers' greedy answers and reward scores equal alignjax's |"
    assert "MISMATCH" in results_table(dict(r, hf_reward_matches=False))
    # the win-rate rows go before the export row
    w = dict(judge="checker", wins=3, ties=193, losses=4, adjusted=0.4975, ci=(0.485, 0.51))
    lines = results_table(dict(r, winrates=[w])).splitlines()
    assert lines[5] == ("| DPO vs SFT, judged by the checker | wins / ties / losses 3 / 193 / 4; "
                        "adjusted win rate 49.8% [48.5%, 51.0%] |")
    assert lines[6].startswith("| export to HF |")


def test_results_table_with_ppo_and_its_win_rates():
    r = {"sft": {"before": 0.0, "after": 0.865, "params": 722048, "steps": 600},
         "reward": {"accuracy": 0.91, "steps": 1200, "batch_size": 32},
         "dpo": {"implicit_accuracy": 0.935, "checker_accuracy": 0.86, "loss": "dpo+sft",
                 "beta": 1.0, "steps": 100},
         "ppo": {"score_first": -0.1234, "score_last": 0.4567, "kl_last": 0.0891, "window": 10,
                 "checker_accuracy": 0.83, "steps": 50, "batch_size": 64, "standardised": True},
         "hf_generation_matches": True, "hf_reward_matches": True,
         "winrates": [dict(model=m, judge="checker", wins=w, ties=190, losses=10 - w, adjusted=0.5,
                           ci=(0.48, 0.52)) for m, w in (("DPO", 3), ("PPO", 2))]}
    lines = results_table(r).splitlines()
    assert lines[5] == ("| PPO from the SFT model, the reward model as the reward, 50 steps of 64 rollouts | "
                        "reward-model score (standardised) of the rollouts -0.12 → +0.46; KL 0.09; checker accuracy "
                        "86.5% → 83.0% |")
    assert lines[6].startswith("| DPO vs SFT, judged by the checker | wins / ties / losses 3 / 190 / 7;")
    assert lines[7].startswith("| PPO vs SFT, judged by the checker | wins / ties / losses 2 / 190 / 8;")
    assert lines[8].startswith("| export to HF |")


def test_ppo_summary_averages_the_first_and_last_window(tmp_path):
    rows = [{"step": s, "objective/scores": float(s), "objective/kl": s / 100} for s in range(5, 55, 5)]
    rows.insert(3, {"step": 20, "eval/reward_mean": 0.5})  # rows without a score are skipped
    wd = _run_dir(tmp_path, rows, checkpoints=(50,))
    assert _ppo_summary(wd, window=10) == dict(score_first=7.5, score_last=47.5, kl_last=0.5, window=10)


def test_win_rates_are_read_back_only_for_the_same_models(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "winrate.json").write_text(json.dumps({"model": "runs/ppo", "baseline": "runs/sft",
                                                  "wins": 1, "ties": 2, "losses": 1}))
    assert _read_winrate(str(out), "runs/ppo", "runs/sft", 4)["wins"] == 1
    assert _read_winrate(str(out), "runs/dpo", "runs/sft", 4) is None
    assert _read_winrate(str(out), "runs/ppo", "runs/sft", 200) is None
    assert _read_winrate(str(tmp_path / "none"), "runs/ppo", "runs/sft", 4) is None
