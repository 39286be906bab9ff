"""PNG plots with matplotlib (Agg backend: no display needed): training curves from metrics.jsonl."""

from __future__ import annotations

import io
import json
import os
from typing import Sequence

from alignjax import fs
from alignjax.errors import UserError

HEADLINE = ("loss", "eval/loss", "eval/accuracy", "eval/rewards/accuracies", "rewards/margins",
            "objective/rlhf_reward", "objective/kl", "eval/reward_mean", "eval/response_length",
            "eval/win_rate_vs_start", "tokens_per_s")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_rows(workdir: str) -> list[dict]:
    path = fs.join(workdir, "metrics.jsonl")
    if not fs.exists(path):
        raise UserError(f"{workdir}: no metrics.jsonl (is it a training workdir?)")
    rows = []
    for n, line in enumerate(fs.read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def curves(rows: Sequence[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that logged a numeric `key`."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_metrics(workdirs: Sequence[str], metrics: Sequence[str], out_png: str,
                 labels: Sequence[str] | None = None) -> str:
    """One panel per metric, one line per run, against step. Unknown keys are an error that
    lists the keys the runs have."""
    runs = [read_rows(w) for w in workdirs]
    have = sorted({k for rows in runs for r in rows for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float))})
    missing = [m for m in metrics if m not in have]
    if missing:
        raise UserError(f"--metrics {','.join(missing)}: no metrics.jsonl of {', '.join(workdirs)} "
                        f"has {'it' if len(missing) == 1 else 'them'}; keys present: {', '.join(have)}")
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.6 * len(metrics)), squeeze=False)
    for ax, key in zip(axes[:, 0], metrics):
        for i, rows in enumerate(runs):
            steps, values = curves(rows, key)
            if steps:
                label = labels[i] if labels else os.path.basename(os.path.normpath(workdirs[i]))
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    fs.write_bytes(out_png, png.getvalue())
    plt.close(fig)
    return out_png


def plot_headline(workdir: str) -> list[str]:
    """WORKDIR/plots/<metric>.png for each headline metric the run logged (at the end of training)."""
    rows = read_rows(workdir)
    written = []
    for key in HEADLINE:
        if len(curves(rows, key)[0]) >= 2:
            name = key.replace("/", "_") + ".png"
            written.append(plot_metrics([workdir], [key], fs.join(workdir, "plots", name)))
    return written
