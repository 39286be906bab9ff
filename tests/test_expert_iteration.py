"""Expert iteration (`alignjax iterate`): the rounds chain, an interrupted run continues, bad input."""

import json
import os

import pytest

from alignjax.config import load_config
from alignjax.errors import UserError
from alignjax.model.config import ConfigError
from alignjax.train import expert_iteration

# the rounds' SFT runs: the start model's architecture, small batches
SMALL = ["train.batch_size=8", "train.log_every=1", "optimizer.warmup_steps=1", "checkpoint.async_save=False"]


def _config(start, reward, *extra):
    return load_config("configs/expert_iteration.py:tiny", SMALL + [
        f"model.init_from={start}", "expert_iteration.rounds=2", "expert_iteration.num_prompts=6",
        "expert_iteration.samples_per_prompt=4", "expert_iteration.max_new_tokens=6",
        f"expert_iteration.reward=python:{reward}:reward", "expert_iteration.min_reward=-inf",
        "expert_iteration.steps_per_round=2", "expert_iteration.eval_toy=4",
        "expert_iteration.sample_batch_size=24", *extra])


@pytest.mark.slow  # two rounds of sampling and SFT, twice
def test_rounds_chain_and_an_interrupted_run_continues(small_start_model, tmp_path, monkeypatch):
    start_model = small_start_model
    reward = tmp_path / "length.py"  # a reward every random sample gets a different share of
    reward.write_text("def reward(prompts, completions):\n"
                      "    return [float(len(c)) for c in completions]\n")
    config = _config(start_model, reward)
    workdir = tmp_path / "ei"

    from alignjax import train
    real_training = train.run_training
    calls = []

    def crash_in_round_2(cfg, wd):
        calls.append(wd)
        if wd.endswith(os.path.join("round_2", "sft")):
            raise KeyboardInterrupt("preempted")
        return real_training(cfg, wd)

    monkeypatch.setattr(train, "run_training", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        expert_iteration.run(config, str(workdir))
    round_1 = workdir / "round_1"
    assert (round_1 / "round.json").exists() and not (workdir / "round_2" / "round.json").exists()
    first_samples = (round_1 / "samples.jsonl").stat().st_mtime_ns

    monkeypatch.setattr(train, "run_training", real_training)
    rows = expert_iteration.run(config, str(workdir))  # continues with round 2's SFT only
    assert (round_1 / "samples.jsonl").stat().st_mtime_ns == first_samples
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert json.loads((workdir / "expert_iteration.json").read_text())["rounds"] == rows
    assert all(0 <= r["eval_toy_accuracy"] <= 1 for r in rows)
    for r in (1, 2):
        records = [json.loads(x) for x in (workdir / f"round_{r}" / "samples.jsonl").read_text().splitlines()]
        # keep=best, min_reward -inf: the longest of each prompt's samples, one per prompt
        assert len(records) == rows[r]["kept"] == 6
        # chat prompts: conversational records, so SFT renders the template sampling used
        assert all(rec["prompt"][0]["role"] == "user" and rec["completion"][0]["role"] == "assistant"
                   for rec in records)
        assert all(rec["reward"] == len(rec["completion"][0]["content"]) for rec in records)
        assert rows[r]["best_of_n_reward"] >= rows[r]["mean_reward"]
        sft = json.loads((workdir / f"round_{r}" / "sft" / "config.json").read_text())
        assert sft["algorithm"] == "sft" and sft["train"]["steps"] == 2
        assert sft["data"]["train"] == str(workdir / f"round_{r}" / "samples.jsonl")
        # round 1 fine-tunes the start model; round 2 the model round 1 trained
        want = start_model if r == 1 else str(round_1 / "sft")
        assert sft["model"]["init_from"] == want

    with pytest.raises(UserError, match="started from .* not .*other"):
        expert_iteration.run(_config(str(tmp_path / "other"), reward), str(workdir))


@pytest.mark.parametrize("overrides, message", [
    (("expert_iteration.keep=most",), "expert_iteration.keep='most': use one of best, all"),
    (("expert_iteration.rounds=0",), "expert_iteration.rounds=0"),
    (("expert_iteration.temperature=-1.0",), r"expert_iteration.temperature=-1.0: must be >= 0"),
    (("model.init_from=",), "model.init_from is empty"),
])
def test_bad_settings_name_the_key(overrides, message):
    config = load_config("configs/expert_iteration.py:tiny", ["model.init_from=runs/sft", *overrides])
    with pytest.raises(ConfigError, match=message):
        expert_iteration.settings(config)


def test_unknown_key_is_named():
    config = load_config("configs/expert_iteration.py:tiny", ["model.init_from=runs/sft"])
    with config.unlocked():
        config.expert_iteration.rouds = 2
    with pytest.raises(ConfigError, match="expert_iteration.rouds: unknown"):
        expert_iteration.settings(config)
