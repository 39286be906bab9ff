"""SLiC-HF and RRHF learn held-out preferences from the session's SFT model."""

import pytest

from test_preference_train import _learn


@pytest.mark.parametrize("loss_type, steps, lr, extra", [
    ("slic", 50, 1e-4, ["dpo.slic_delta=30.0"]), ("rrhf", 60, 1.5e-4, [])], ids=["slic", "rrhf"])
@pytest.mark.slow
def test_slic_and_rrhf_learn_held_out_preferences(sft_run, tmp_path, loss_type, steps, lr, extra):
    """SLiC-HF and a ranking loss (RRHF) reach >= 85% held-out preference accuracy, measured
    against the step-0 evaluation of the SFT model they start from: RRHF must raise its accuracy
    (measured 79% -> 86% in 100 steps at lr 1e-4, 79.6% -> 87.0% in these 60 at 1.5e-4 and
    86.2% in 50 at 2e-4). The SFT model already separates the pairs (mean held-out margin 18.5
    nats of sequence log-prob in a fresh-clone run), beyond SLiC's default margin (slic_delta 1),
    where only its SFT term acts and the held-out loss may drift either way (0.0267 -> 0.0286 in
    that run): with a margin of 30 the hinge acts on the pairs, so SLiC must widen the held-out
    margin (measured 18.5 -> 20.9 nats, loss 13.79 -> 12.29)."""
    import json
    _learn("configs/dpo.py:tiny", tmp_path, sft_run[0],
           [f"dpo.loss_type={loss_type}", f"train.steps={steps}", f"optimizer.lr={lr}",
            "train.eval_every=0", "train.eval_on_start=True", *extra])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start, end = rows[0], rows[-1]
    assert start["step"] == 0 and end["step"] == steps
    assert end["eval/rewards/accuracies"] >= 0.85, end
    if loss_type == "rrhf":
        assert end["eval/rewards/accuracies"] >= start["eval/rewards/accuracies"] + 0.04, (start, end)
    else:
        def margin(row):
            return row["eval/logps/chosen"] - row["eval/logps/rejected"]
        assert end["eval/rewards/accuracies"] >= start["eval/rewards/accuracies"] - 0.015, (start, end)
        assert margin(end) > margin(start) + 1.0 and end["eval/loss"] < start["eval/loss"], (start, end)
