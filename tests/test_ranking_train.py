"""SLiC-HF and RRHF learn held-out preferences from the session's SFT model."""

import pytest

from test_preference_train import _learn


@pytest.mark.parametrize("loss_type", ["slic", "rrhf"])
@pytest.mark.slow
def test_slic_and_rrhf_learn_held_out_preferences(sft_run, tmp_path, loss_type):
    """SLiC-HF and a ranking loss (RRHF) reach >= 85% held-out preference accuracy, measured
    against the step-0 evaluation of the SFT model they start from: RRHF must raise its accuracy
    (measured 79% -> 86%); SLiC's starts high (98.5%: the SFT model already prefers the correct
    answers), so it must keep it and lower the held-out SLiC loss."""
    import json
    _learn("configs/dpo.py:tiny", tmp_path, sft_run[0],
           [f"dpo.loss_type={loss_type}", "train.steps=100", "optimizer.lr=1e-4", "train.eval_every=0",
            "train.eval_on_start=True"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start, end = rows[0], rows[-1]
    assert start["step"] == 0 and end["step"] == 100
    assert end["eval/rewards/accuracies"] >= 0.85, end
    if loss_type == "rrhf":
        assert end["eval/rewards/accuracies"] >= start["eval/rewards/accuracies"] + 0.04, (start, end)
    else:
        # Its held-out loss must fall: measured 0.119 -> 0.011, 0.020 -> lower and 0.061 -> 0.045
        # from three SFT models. The accuracy starts at 98.5-99.5% (the SFT model already
        # separates the pairs), so it may move by a pair or two of the 200 either way.
        assert end["eval/rewards/accuracies"] >= start["eval/rewards/accuracies"] - 0.015, (start, end)
        assert end["eval/loss"] < start["eval/loss"], (start, end)
