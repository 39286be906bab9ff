"""alignjax.eval.plots: PNG curves from metrics.jsonl, and its errors."""

from __future__ import annotations

import json
import struct

import pytest

from alignjax.errors import UserError
from alignjax.eval import plots


def _run(tmp_path, name, n):
    w = tmp_path / name
    w.mkdir()
    with open(w / "metrics.jsonl", "w") as f:
        for s in range(1, n + 1):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, **({"eval/loss": 2.0 / s} if s % 2 == 0 else {})}) + "\n")
    return str(w)


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_overlays_runs_one_panel_per_metric(tmp_path):
    a, b = _run(tmp_path, "a", 10), _run(tmp_path, "b", 6)
    out = plots.plot_metrics([a, b], ["loss", "eval/loss"], str(tmp_path / "out" / "curves.png"))
    assert _png_size(out) == (700, 520)  # 7 x (2.6 * 2) inches at 100 dpi


def test_unknown_metric_lists_the_keys_present(tmp_path):
    a = _run(tmp_path, "a", 3)
    with pytest.raises(UserError, match=r"--metrics eval/acc.*keys present: eval/loss, loss"):
        plots.plot_metrics([a], ["eval/acc"], str(tmp_path / "x.png"))


def test_headline_plots(tmp_path):
    a = _run(tmp_path, "a", 5)
    written = plots.plot_headline(a)
    assert [p.split("/")[-1] for p in written] == ["loss.png", "eval_loss.png"]


def test_missing_or_broken_metrics_file(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plots.read_rows(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not JSON"):
        plots.read_rows(str(tmp_path))
