"""SLiC-HF and RRHF learn held-out preferences from the session's SFT model."""

import pytest

from test_preference_train import _learn


@pytest.mark.parametrize("loss_type, steps, lr", [("slic", 50, 1e-4), ("rrhf", 60, 1.5e-4)])
@pytest.mark.slow
def test_slic_and_rrhf_learn_held_out_preferences(sft_run, tmp_path, loss_type, steps, lr):
    """SLiC-HF and a ranking loss (RRHF) reach >= 85% held-out preference accuracy, measured
    against the step-0 evaluation of the SFT model they start from: RRHF must raise its accuracy
    (measured 79% -> 86% in 100 steps at lr 1e-4, 79.6% -> 87.0% in these 60 at 1.5e-4 and
    86.2% in 50 at 2e-4); SLiC's starts high (98.5-99%: the SFT model already prefers the correct
    answers), so it must keep it and lower the held-out SLiC loss."""
    import json
    _learn("configs/dpo.py:tiny", tmp_path, sft_run[0],
           [f"dpo.loss_type={loss_type}", f"train.steps={steps}", f"optimizer.lr={lr}",
            "train.eval_every=0", "train.eval_on_start=True"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start, end = rows[0], rows[-1]
    assert start["step"] == 0 and end["step"] == steps
    assert end["eval/rewards/accuracies"] >= 0.85, end
    if loss_type == "rrhf":
        assert end["eval/rewards/accuracies"] >= start["eval/rewards/accuracies"] + 0.04, (start, end)
    else:
        # Its held-out loss must fall: measured 0.119 -> 0.011, 0.020 -> lower and 0.061 -> 0.045
        # from three SFT models in 100 steps, 0.039 -> 0.027 (99.0% -> 99.5%) in these 50. The
        # accuracy starts at 98.5-99.5% (the SFT model already separates the pairs), so it may
        # move by a pair or two of the 200 either way.
        assert end["eval/rewards/accuracies"] >= start["eval/rewards/accuracies"] - 0.015, (start, end)
        assert end["eval/loss"] < start["eval/loss"], (start, end)
