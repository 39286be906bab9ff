"""The toy reward model from the session's SFT model: it learns the pairs, and its HF export scores
like alignjax. (Modules that use the trained SFT model run in parallel once it exists: keep each
one's heavy fixture in a module of its own, tests/conftest.py.)"""

import numpy as np
import pytest
import torch

from alignjax.cli import main as cli_main
from test_preference_train import _learn


@pytest.fixture(scope="module")
def reward_run(sft_run, tmp_path_factory):
    # A quarter of the preset's 1200 steps (its whole schedule, compressed): the suite's budget.
    # The preset itself (>= 90% in every run of 3 seeds x 1 and 8 devices) is measured by the
    # study in the README's "Reward models" section and by `make demo`.
    workdir = tmp_path_factory.mktemp("rm")
    return workdir, _learn("configs/reward.py:tiny", workdir, sft_run[0],
                           ["train.steps=300", "train.eval_every=300", "checkpoint.every=300"])


@pytest.mark.slow
def test_reward_model_learns_pairs(reward_run):
    # Measured on the 200 held-out toy pairs after 300 steps of the 1200-step preset: 83.5% and
    # 85.5%; chance is 50%. A broken loss, head or pair collation stays near chance.
    _, metrics = reward_run
    assert metrics["eval/accuracy"] >= 0.80, metrics
    assert metrics["eval/num_examples"] == 200


@pytest.mark.slow
def test_exported_reward_model_scores_like_alignjax(reward_run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from alignjax.data.preference import format_pair_batch
    workdir, _ = reward_run
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(workdir), "--out", str(tmp_path / "hf")])
    prompts = ["sort: 3 1 2", "sort: 3 1 2", "reverse: cat dog", "uppercase: red fox"]
    responses = ["1 2 3", "1 3 2", "dog cat", "RED FOX"]
    capsys.readouterr()
    cli_main(["score", "--model", str(workdir), "--json"]
             + sum((["--prompt", p, "--response", r] for p, r in zip(prompts, responses)), []))
    import json
    ours = np.array([x["reward"] for x in json.loads(capsys.readouterr().out)])
    assert np.ptp(ours) > 1e-2  # distinct scores: the comparison below is not of constants
    # (whether the right answer wins is test_reward_model_learns_pairs' job, over 200 pairs)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    batch = format_pair_batch(tok, prompts, responses, 64)
    ids = torch.tensor(batch["tokens"][:, 0].astype(np.int64))
    mask = torch.tensor(batch["segment_ids"][:, 0] > 0).long()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    stats = json.load(open(workdir / "alignjax_model.json"))["reward_stats"]
    assert stats["std"] > 0
