"""`alignjax compare`: a reduced comparison writes its table and picture, resumes, refuses bad input."""

import json
import os

import pytest

from alignjax import compare
from alignjax.config import load_config
from alignjax.errors import UserError
from alignjax.model.config import ConfigError

LENGTH = os.path.join(os.path.dirname(__file__), "length_reward.py")
THRESHOLD = 12.0  # conditional tokens: samples of at least 12 characters earn <|good|>


def _config(start, *extra):
    return load_config("configs/compare.py:toy", [
        f"compare.start={start}", f"compare.reward=python:{LENGTH}:reward",
        "compare.methods=best_of_4,rso,conditional,grpo", "compare.steps=2",
        f"compare.conditional_threshold={THRESHOLD}",
        "compare.eval_prompts=6", "compare.rso_prompts=8", "compare.rso_candidates=4",
        "compare.overrides.rso=('train.batch_size=8',)",
        "compare.overrides.grpo=('train.batch_size=16', 'grpo.samples_per_prompt=4')", *extra])


@pytest.mark.slow  # trains three methods for 2 steps each, evaluates five models
def test_reduced_comparison_writes_table_and_png_and_resumes(small_start_model, tmp_path):
    start_model = small_start_model
    workdir = tmp_path / "cmp"
    rows = compare.run(_config(start_model), str(workdir))
    assert [r["method"] for r in rows] == ["start (SFT)", "best_of_4", "rso", "conditional", "grpo"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["mean_length"] >= 0 and r["seconds"] >= 0
    assert abs(rows[0]["kl"]) < 1e-4  # the start model against itself (sampler vs forward log-probs)
    assert rows[1]["kl"] == pytest.approx(compare.math.log(4) - 3 / 4)  # best-of-n's analytic KL
    assert rows[1]["policy_samples"] == 4 * 6 and rows[2]["policy_samples"] == 8 * 4
    assert rows[3]["policy_samples"] == 8 * 4  # as many start-model samples as RSO
    assert rows[4]["policy_samples"] == 2 * 16  # steps x responses per rollout
    table = (workdir / "compare.md").read_text()
    assert all(f"| {r['method']} |" in table for r in rows)
    assert json.loads((workdir / "compare.json").read_text())["rows"] == rows
    assert (workdir / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rso = [json.loads(x) for x in (workdir / "rso" / "rso.jsonl").read_text().splitlines()]
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in rso)  # RSO pairs from the start model
    for name in ("rso", "grpo"):  # each method trained in its own workdir, from the start model
        cfg = json.loads((workdir / name / "run" / "config.json").read_text())
        assert cfg["model"]["init_from"] == start_model and cfg["train"]["steps"] == 2
    # Conditional tokens: every start-model sample, prefixed by the token its reward earns
    # (1% of records keep no token), SFT of the start model with the tokens added.
    cond = workdir / "conditional"
    samples = [json.loads(x) for x in (cond / "samples.jsonl").read_text().splitlines()]
    records = [json.loads(x) for x in (cond / "conditional.jsonl").read_text().splitlines()]
    assert len(records) == len(samples) > 16 and {r["control_token"] for r in records} >= {"<|good|>", "<|bad|>"}
    for sample, record in zip(samples, records):
        token = record["control_token"]
        want = "<|good|>" if sample["reward"] >= THRESHOLD else "<|bad|>"
        assert token in (want, None) and record["completion"] == sample["completion"]
        [user], [plain] = record["prompt"], sample["prompt"]  # chat prompts: one user message
        assert user == {"role": "user", "content": (token or "") + plain["content"]}
    cfg = json.loads((cond / "run" / "config.json").read_text())
    assert cfg["model"]["init_from"] == str(cond / compare.CONDITIONAL_START) and cfg["train"]["steps"] == 2
    assert "<|good|>" in (cond / "run" / "tokenizer" / "tokenizer.json").read_text()

    # Resume: finished methods are read back, not run again; a lost result is recomputed from
    # the finished training run (which does not train again).
    stamps = {n: os.stat(workdir / n / "result.json").st_mtime_ns
              for n in ("start", "best_of_4", "conditional", "grpo")}
    os.remove(workdir / "rso" / "result.json")
    again = compare.run(_config(start_model), str(workdir))
    assert {n: os.stat(workdir / n / "result.json").st_mtime_ns for n in stamps} == stamps
    assert again[2]["accuracy"] == rows[2]["accuracy"]
    metrics = (workdir / "rso" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics][-1] == 2

    with pytest.raises(UserError, match="started from .* not .*elsewhere"):
        compare.run(_config(str(tmp_path / "elsewhere")), str(workdir))


@pytest.mark.parametrize("overrides, message", [
    (("compare.methods=dpo,bogus",), "compare.methods: unknown method 'bogus'; choose from best_of_4"),
    (("compare.methods=dpo,dpo",), "names a method twice"),
    (("compare.start=",), "compare.start is empty"),
    (("compare.steps=1",), "compare.steps=1"),
])
def test_bad_comparison_configs_name_the_key(overrides, message):
    config = load_config("configs/compare.py:toy", ["compare.start=runs/sft", *overrides])
    with pytest.raises(ConfigError, match=message):
        compare.settings(config)
