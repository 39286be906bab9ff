"""Honest MFU: the measured CPU peak, the FLOP count, and the `mfu` the train loop logs.

References: FLOPs counted by hand for a known matmul workload; the Llama training-FLOPs formula
written out here in NumPy terms (PaLM's convention, full attention), and the peak read back from
the cache file.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.model.store import MODEL_FILE
from alignjax.train import metrics


def test_peak_flops_for_device_kinds():
    assert metrics.peak_flops_for("TPU v5p") == metrics.peak_flops_for("TPU v5") == 459e12
    assert metrics.peak_flops_for("TPU v5 lite") == metrics.peak_flops_for("TPU v5e") == 197e12
    assert metrics.peak_flops_for("TPU v6 lite") == 918e12
    assert metrics.peak_flops_for("TPU v4") == 275e12
    assert metrics.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_for("NVIDIA H200") == 989e12
    assert metrics.peak_flops_for("cpu") is None
    assert metrics.peak_flops_for(jax.devices()[0].device_kind) is None  # this CPU host


@pytest.fixture
def fresh_peak(tmp_path, monkeypatch):
    """An empty peak cache in tmp_path (nothing carried over from the machine or the session)."""
    monkeypatch.setenv(metrics.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(metrics, "PEAK_FLOPS_CACHE", {})
    return tmp_path / "peak_flops.json"


def test_matmul_workload_is_between_0_and_1_of_the_peak(fresh_peak, monkeypatch):
    # The workload is timed between two peak measurements (the cache keeps the better one), so
    # both see the same load on the machine; it reports its mean over runs, the peak its best.
    peak_before = metrics.cpu_peak_flops("float32")
    n, reps = 1024, 8
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32) / np.sqrt(n)

    @jax.jit
    def chain(x):  # reps dependent matmuls: matmul-bound, nothing else of note
        return jax.lax.fori_loop(0, reps, lambda _, y: y @ a, x)

    chain(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(3):
        out = chain(a).block_until_ready()
    achieved = 3 * reps * 2 * n ** 3 / (time.perf_counter() - start)
    # The same products through NumPy's BLAS, which uses every core even where one XLA device
    # does not: the peak is the cores', so this stays under it too.
    host = np.asarray(a)
    start = time.perf_counter()
    for _ in range(3 * reps):
        host @ host
    blas = 3 * reps * 2 * n ** 3 / (time.perf_counter() - start)
    assert metrics.cpu_peak_flops("float32", refresh=True) >= peak_before  # never lowered
    assert np.isfinite(np.asarray(out)).all()

    peak, source = metrics.peak_flops("float32")
    assert "measured" in source and np.isfinite(peak)
    assert 0 < achieved / peak <= 1, (achieved, peak)
    assert 0 < blas / peak <= 1, (blas, peak)
    # Fake CPU devices share the host: the run's peak is the host's, not multiplied by 8.
    assert peak == pytest.approx(metrics.cpu_peak_flops("float32") * jax.process_count())

    # Cached per machine and dtype (not per count of fake devices, which share the cores): a
    # second process-level lookup reads the file, no re-measuring.
    (key, value), = json.loads(fresh_peak.read_text()).items()
    assert key.endswith(f"{os.cpu_count()} cores|float32") and value == pytest.approx(peak)
    monkeypatch.setattr(metrics, "PEAK_FLOPS_CACHE", {})
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda *a, **k: pytest.fail("re-measured"))
    assert metrics.cpu_peak_flops("float32") == pytest.approx(value)


def _training_flops_per_token(m: dict, seq_len: int) -> float:
    """6 x (matmul weights of the layers + LM head) + 12 x layers x seq_len x heads x head_dim."""
    e, h, k, i, layers = (m["hidden_size"], m["num_attention_heads"], m["num_key_value_heads"],
                          m["intermediate_size"], m["num_hidden_layers"])
    d = m["head_dim"] or e // h
    per_layer = e * h * d + 2 * e * k * d + h * d * e + 3 * e * i + 2 * e  # q, k, v, o, mlp, norms
    weights = layers * per_layer + e + m["vocab_size"] * e  # final norm + LM head
    return 6 * weights + 12 * layers * seq_len * h * d


@pytest.mark.slow  # a short CLI training run (~30 s on 2 cores)
def test_logged_mfu_matches_flops_times_throughput_over_peak(fresh_peak, tmp_path):
    from alignjax.cli import main
    workdir = tmp_path / "run"
    main(["train", "--config", "configs/sft.py:tiny", "--workdir", str(workdir),
          "--config.train.steps=9", "--config.train.log_every=3", "--config.train.eval_every=0",
          "--config.data.eval=", "--config.checkpoint.every=1000", "--config.optimizer.warmup_steps=0"])
    rows = [json.loads(ln) for ln in open(workdir / "metrics.jsonl")]
    model = json.load(open(workdir / MODEL_FILE))["model"]
    seq_len = 128  # configs/sft.py:tiny
    peak = json.loads(fresh_peak.read_text())
    (peak,) = peak.values()
    assert len(rows) == 3
    for row in rows:
        expected = _training_flops_per_token(model, seq_len) * row["tokens_per_s"] / peak
        assert row["mfu"] == pytest.approx(expected, rel=0.10)
        assert 0 < row["mfu"] <= 1
        assert row["data_wait"] >= 0
