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
        "compare.methods=best_of_4,conditional,grpo", "compare.steps=2",
        f"compare.conditional_threshold={THRESHOLD}",
        "compare.eval_prompts=6", "compare.rso_prompts=8", "compare.rso_candidates=4",
        "compare.overrides.conditional=('train.batch_size=8',)",
        "compare.overrides.grpo=('train.batch_size=16', 'grpo.samples_per_prompt=4')", *extra])


@pytest.mark.slow  # trains two methods for 2 steps each, evaluates four models
def test_reduced_comparison_writes_table_and_png_and_resumes(small_start_model, tmp_path):
    start_model = small_start_model
    workdir = tmp_path / "cmp"
    rows = compare.run(_config(start_model), str(workdir))
    assert [r["method"] for r in rows] == ["start (SFT)", "best_of_4", "conditional", "grpo"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["mean_length"] >= 0 and r["seconds"] >= 0
    assert abs(rows[0]["kl"]) < 1e-4  # the start model against itself (sampler vs forward log-probs)
    assert rows[1]["kl"] == pytest.approx(compare.math.log(4) - 3 / 4)  # best-of-n's analytic KL
    assert rows[1]["policy_samples"] == 4 * 6
    assert rows[2]["policy_samples"] == 8 * 4  # prompts x candidates from the start model, as RSO
    assert rows[3]["policy_samples"] == 2 * 16  # steps x responses per rollout
    table = (workdir / "compare.md").read_text()
    assert all(f"| {r['method']} |" in table for r in rows)
    assert json.loads((workdir / "compare.json").read_text())["rows"] == rows
    assert (workdir / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((workdir / "grpo" / "run" / "config.json").read_text())  # its own workdir
    assert cfg["model"]["init_from"] == start_model and cfg["train"]["steps"] == 2
    # Conditional tokens: every start-model sample, prefixed by the token its reward earns
    # (1% of records keep no token), SFT of the start model with the tokens added.
    cond = workdir / "conditional"
    samples = [json.loads(x) for x in (cond / "samples.jsonl").read_text().splitlines()]
    records = [json.loads(x) for x in (cond / "conditional.jsonl").read_text().splitlines()]
    assert len(records) == len(samples) > 16
    assert {r["control_token"] for r in records} >= {"<|good|>", "<|bad|>"}
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
    # the finished training run (which neither samples nor trains again).
    stamps = {n: os.stat(workdir / n / "result.json").st_mtime_ns for n in ("start", "best_of_4", "grpo")}
    data_stamp = os.stat(cond / "conditional.jsonl").st_mtime_ns
    os.remove(cond / "result.json")
    again = compare.run(_config(start_model), str(workdir))
    assert {n: os.stat(workdir / n / "result.json").st_mtime_ns for n in stamps} == stamps
    assert again[2]["accuracy"] == rows[2]["accuracy"] and again[2]["kl"] == pytest.approx(rows[2]["kl"])
    assert os.stat(cond / "conditional.jsonl").st_mtime_ns == data_stamp
    metrics = (cond / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics][-1] == 2

    with pytest.raises(UserError, match="started from .* not .*elsewhere"):
        compare.run(_config(str(tmp_path / "elsewhere")), str(workdir))


def test_sampling_methods_train_on_their_own_data(tmp_path):
    """RSO trains sigmoid-norm DPO on the pairs it sampled; conditional tokens SFT the start model
    with the control tokens added on its conditioned samples, at expert iteration's lr."""
    s = compare.settings(_config("runs/sft", "compare.methods=rso,conditional"))
    rso = compare.method_config("rso", s, str(tmp_path / "rso"))
    assert (rso.algorithm, rso.dpo.loss_type) == ("dpo", "sigmoid_norm")
    assert rso.data.train == str(tmp_path / "rso" / "rso.jsonl")
    assert rso.model.init_from == "runs/sft" and rso.train.steps == 2
    cond = compare.method_config("conditional", s, str(tmp_path / "c"))
    assert (cond.algorithm, cond.tokenizer.path) == ("sft", "")
    assert cond.model.init_from == str(tmp_path / "c" / compare.CONDITIONAL_START)
    assert cond.data.train == str(tmp_path / "c" / "conditional.jsonl") and cond.optimizer.lr == 3e-4
    assert cond.train.batch_size == 8  # compare.overrides.conditional


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


def test_conditional_threshold_must_be_a_number():
    with pytest.raises(ConfigError, match="compare.conditional_threshold.*expected a number"):
        load_config("configs/compare.py:toy", ["compare.start=runs/sft", "compare.conditional_threshold=high"])
