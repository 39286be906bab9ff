"""Metrics to three places: a progress bar, WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tb)."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import numpy as np

PEAK_FLOPS_CACHE: dict = {}


def device_peak_flops() -> tuple[float, str]:
    """Peak FLOP/s of one local device: the table for TPUs/GPUs, else measured on the spot."""
    kind = jax.devices()[0].device_kind
    try:
        from alignjax.aot import peak_flops_for
        peak = peak_flops_for(kind)
    except ImportError:
        peak = None
    if peak:
        return float(peak), f"{kind} (table)"
    if kind not in PEAK_FLOPS_CACHE:
        PEAK_FLOPS_CACHE[kind] = _measure_matmul_flops()
    return PEAK_FLOPS_CACHE[kind], f"{kind} (measured matmul)"


def _measure_matmul_flops(n: int = 512, reps: int = 8) -> float:
    """Sustained float32 matmul FLOP/s of all local devices together, divided per device."""
    x = jax.numpy.ones((n, n), jax.numpy.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        x = f(x)
    x.block_until_ready()
    # Fake CPU devices share the host's cores: one device's matmul already uses them all.
    per_call = (time.perf_counter() - start) / reps
    return 2 * n**3 / per_call / max(1, jax.local_device_count())


class MetricsWriter:
    """Writes on process 0 only. On resume, history past the restored step is dropped."""

    def __init__(self, workdir: str, resume_step: int = 0, total_steps: Optional[int] = None,
                 desc: str = "train", enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _truncate_history(self.path, resume_step)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # TensorBoard files are optional; JSONL always works
            self._tb = None
        if total_steps:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=resume_step, desc=desc, dynamic_ncols=True)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        clean = {k: _to_py(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._bar is not None:
            shown = {k: clean[k] for k in ("loss", "eval/loss", "lr", "tokens_per_s") if k in clean}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _to_py(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def _truncate_history(path: str, resume_step: int):
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
    with open(path, "w") as f:
        f.writelines(lines)


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
