"""`alignjax sample` end to end from the session's toy SFT model (a module of its own:
tests that need no trained model stay out of the modules that wait for it, tests/conftest.py)."""

import json

import numpy as np
import pytest

from alignjax.data import toy


@pytest.mark.slow
def test_sample_cli_writes_on_policy_pairs_the_trainer_reads(sft_run, tmp_path, capsys):
    from alignjax.cli import main
    from alignjax.config import load_config
    from alignjax.data.preference import make_preference_eval_iterator
    from alignjax.data.tokenizer import load_tokenizer
    out = tmp_path / "pairs.jsonl"
    main(["sample", "--model", str(sft_run[0]), "--prompts", "toy", "--num-prompts", "96", "--reward",
          "toy", "--mode", "pairs", "--n", "4", "--out", str(out), "--max-new-tokens", "24"])
    assert "pairs records" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records, "a 96%-accurate policy sampled at temperature 1 makes some mistakes"
    for r in records:  # the toy checker is 0/1: chosen are right, rejected wrong
        assert toy.check(r["prompt"], r["chosen"]) == 1.0 and toy.check(r["prompt"], r["rejected"]) == 0.0
    config = load_config("configs/dpo.py:tiny", [f"data.train={out}"])
    it = make_preference_eval_iterator(str(out), load_tokenizer(str(sft_run[0] / "tokenizer")),
                                       config.data, kind="pair", batch_size=8, seq_len=64)
    assert sum(int(np.sum(b["example_valid"])) for b in it) == len(records)  # nothing dropped
