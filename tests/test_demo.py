"""The demo's bookkeeping: a finished stage is recognised and its metrics read back (so a second
`make demo` reuses it and prints the same table), and the results table itself."""

import json
import os

from alignjax.config import load_config
from alignjax.demo import _finished, results_table


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
