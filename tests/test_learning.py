"""The demo's claims, asserted: the toy SFT model learns (held-out checker accuracy >= 90%)."""

import pytest

from alignjax.eval.toy import toy_accuracy
from alignjax.model.store import load_model


@pytest.mark.slow
def test_sft_reaches_90_percent_checker_accuracy(sft_run):
    workdir, out = sft_run
    model = load_model(str(workdir))  # the workdir itself: latest checkpoint's params
    from alignjax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(str(workdir / "tokenizer"))
    result = toy_accuracy(model.module, model.params, model.mesh, model.rules, tok, n=200)
    assert result["accuracy"] >= 0.90, result
    from alignjax.train.metrics import read_metrics
    assert [m for m in read_metrics(str(workdir)) if "eval/loss" in m][-1]["eval/loss"] < 0.5
