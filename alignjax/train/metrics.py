"""Metrics to three places: a progress bar, WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tb).
An online algorithm's rollout samples (WORKDIR/samples/step_N.jsonl) also go to TensorBoard's
text tab ("samples", at step N)."""

from __future__ import annotations

import io
import json
import os
import re
import time
from typing import Optional

import jax
import numpy as np

from alignjax import fs

PEAK_FLOPS_CACHE: dict = {}  # in-process copy of the on-disk cache below
CACHE_ENV = "ALIGNJAX_CACHE_DIR"  # default ~/.cache/alignjax (or $XDG_CACHE_HOME/alignjax)

# Dense bf16 peak per device (per chip on TPU: v4/v5p run as one megacore device per chip).
PEAK_FLOPS: dict[str, float] = {
    "v4": 275e12,
    "v5p": 459e12,
    "v5e": 197e12,
    "v6e": 918e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
}

# Ordered: the first substring match of the lower-cased device_kind wins ("tpu v5 lite" before
# "tpu v5"; compile-only v5p devices call themselves "TPU v5").
_KIND_PATTERNS = (
    ("tpu v6 lite", "v6e"), ("tpu v6e", "v6e"),
    ("tpu v5 lite", "v5e"), ("tpu v5e", "v5e"),
    ("tpu v5p", "v5p"), ("tpu v5", "v5p"),
    ("tpu v4 lite", None), ("tpu v4", "v4"),
    ("h200", "H200"), ("h100 pcie", "H100 PCIe"), ("h100", "H100 SXM"),
    ("a100", "A100"),
)


def peak_flops_for(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one jax device of this `device.device_kind`; None if unknown."""
    kind = (device_kind or "").lower()
    for pattern, key in _KIND_PATTERNS:
        if pattern in kind:
            return PEAK_FLOPS[key] if key else None
    return None


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """Peak FLOP/s of all the hardware this run has (every process), for MFU.

    MFU = model FLOPs/s of the whole run / this number. TPUs and GPUs: the vendor's dense peak
    per chip (PEAK_FLOPS above) times the device count. CPUs: a measured matmul peak of the
    host (see `cpu_peak_flops`) times the process count; fake CPU devices
    (--xla_force_host_platform_device_count) share the host's cores, so they add nothing.
    """
    kind = jax.devices()[0].device_kind
    peak = peak_flops_for(kind)
    if peak:
        return float(peak) * jax.device_count(), f"{jax.device_count()}x {kind} (table)"
    host = cpu_peak_flops(dtype)
    return host * jax.process_count(), f"{jax.process_count()}x host {kind} {dtype} (measured matmul)"


def cpu_peak_flops(dtype: str = "float32", *, refresh: bool = False) -> float:
    """Best matmul FLOP/s of this host's cores, measured once per machine and cached.

    The cache file ($ALIGNJAX_CACHE_DIR or ~/.cache/alignjax)/peak_flops.json is keyed by device
    kind, CPU model, core count and dtype: not by the number of (fake) JAX devices, which share
    the same cores. `refresh=True` measures again; the cache keeps the best value ever measured
    (a measurement on a busy machine only under-estimates the peak, which would over-state MFU:
    one device's first measurement, taken during a test run, said 68 GFLOP/s where the cores
    give 150, and the logged MFU of a medium-preset step came out at 108%).
    """
    key = _machine_key(dtype)
    if not refresh and key in PEAK_FLOPS_CACHE:
        return PEAK_FLOPS_CACHE[key]
    path = os.path.join(cache_dir(), "peak_flops.json")
    table = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}  # a damaged cache is re-measured and rewritten
    if refresh or key not in table:
        table[key] = max(measure_matmul_flops(dtype), float(table.get(key, 0.0)))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        except OSError:
            pass  # a read-only home: keep the measurement for this process only
    PEAK_FLOPS_CACHE[key] = float(table[key])
    return PEAK_FLOPS_CACHE[key]


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(CACHE_ENV) or os.path.join(base, "alignjax")


def _machine_key(dtype: str) -> str:
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{jax.devices()[0].device_kind}|{cpu}|{os.cpu_count()} cores|{dtype}"


def measure_matmul_flops(dtype: str = "float32", sizes=(512, 1024, 2048), reps: int = 5) -> float:
    """Matmul FLOP/s of the host: best of `reps` timed n x n products in `dtype` for each n in
    `sizes`, of one (largest n) / 2 product on every local device at once, and (float32) of
    NumPy's BLAS on the same products: the cores' peak, whichever library reaches it, since one
    XLA device may not use every core.

    Inputs are random normal scaled by 1/sqrt(n), so products stay O(1) (no overflow to inf,
    no denormals); each call is timed alone and the fastest counts (the least disturbed by
    other load on the machine).
    """
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()
    best, square = 0.0, jax.jit(lambda x: x @ x)
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32) / np.sqrt(n)
        one = jax.device_put(a.astype(dtype), devices[0])
        best = max(best, _best_rate(square, one, 2.0 * n ** 3, reps))
        if jnp.dtype(dtype) == jnp.float32:
            host = np.asarray(a)
            best = max(best, _best_rate(lambda x: x @ x, host, 2.0 * n ** 3, reps))
    if len(devices) > 1:  # half-size products on every device: about the same work per call
        m = n // 2
        mesh = Mesh(np.array(devices), ("d",))
        many = jax.device_put(jnp.broadcast_to(one[:m, :m] * np.sqrt(2.0), (len(devices), m, m)),
                              NamedSharding(mesh, PartitionSpec("d")))
        best = max(best, _best_rate(jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x)), many,
                                    2.0 * m ** 3 * len(devices), max(2, reps // 2)))
    return best


def _best_rate(fn, x, flops: float, reps: int) -> float:
    """FLOP/s of the fastest of `reps` calls of `fn(x)` (a jax or a NumPy function)."""
    out = jax.block_until_ready(fn(x))  # compile + warm-up
    if not bool(np.isfinite(np.asarray(out)).all()):
        raise RuntimeError("peak-FLOPs matmul overflowed; this is a bug")
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - start)
    return flops / best


BUCKET_LIST_EVERY_S = 30  # samples/ in a bucket is listed at most this often, not at every step


class MetricsWriter:
    """Writes on process 0 only. On resume, history past the restored step is dropped."""

    def __init__(self, workdir: str, resume_step: int = 0, total_steps: Optional[int] = None,
                 desc: str = "train", enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = fs.join(workdir, "metrics.jsonl")
        self._tb = self._bar = None
        if not self.enabled:
            return
        self.samples_dir = fs.join(workdir, "samples")
        self._remote, self._listed = fs.is_remote(workdir), 0.0
        self._step = self._samples_done = resume_step  # a resumed run sent its samples already
        fs.makedirs(workdir)
        _truncate_history(self.path, resume_step)
        try:
            SummaryWriter = _tensorboardx().SummaryWriter
            if fs.is_remote(workdir):
                _tensorboard_through_epath(self.path.split("://")[0])
            self._tb = SummaryWriter(fs.join(workdir, "tb"))
        except ImportError:  # TensorBoard files are optional; JSONL always works
            self._tb = None
        if total_steps:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=resume_step, desc=desc, dynamic_ncols=True)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        clean = {k: _to_py(v) for k, v in metrics.items()}
        fs.append_text(self.path, json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            if not self._remote:  # a bucket's event file is rewritten whole: tensorboardX's timer
                self._tb.flush()  # (every 2 minutes) and close() send it there
        if self._bar is not None:
            shown = {k: clean[k] for k in ("loss", "eval/loss", "lr", "tokens_per_s") if k in clean}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1):
        """The end of `n` more steps."""
        if self._bar is not None:
            self._bar.update(n)
        if self._tb is not None:
            self._step += n
            if not self._remote or time.monotonic() - self._listed >= BUCKET_LIST_EVERY_S:
                self._write_samples()

    def _write_samples(self):
        """Sample files of the steps done since the last call -> TensorBoard text, each once.
        A file of a later step (left by a killed run, rewritten when its step comes) waits."""
        self._listed = time.monotonic()
        steps = [int(m.group(1)) for m in map(re.compile(r"step_(\d+)\.jsonl").fullmatch,
                                                 fs.listdir(self.samples_dir)) if m]
        for step in sorted(n for n in steps if self._samples_done < n <= self._step):
            text = fs.read_text(fs.join(self.samples_dir, f"step_{step}.jsonl"))
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            self._tb.add_text("samples", samples_markdown(rows), step)
            if not self._remote:
                self._tb.flush()
        self._samples_done = self._step

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            if self._samples_done < self._step:
                self._write_samples()
            self._tb.close()


def samples_markdown(rows: list[dict]) -> str:
    """Sample rows ({"prompt", "response", "score"}) as a markdown table (TensorBoard's text tab
    renders markdown): one column per key, newlines as <br>, pipes escaped."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _to_py(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def _truncate_history(path: str, resume_step: int):
    if not fs.exists(path):
        return
    lines = [ln for ln in fs.read_text(path).splitlines(keepends=True)
             if ln.strip() and json.loads(ln)["step"] <= resume_step]
    fs.write_text(path, "".join(lines))  # whole: a reader or a crash never sees it half-written


def read_metrics(workdir: str) -> list[dict]:
    """The rows of metrics.jsonl; a last line without its newline is a row still being written."""
    text = fs.read_text(fs.join(workdir, "metrics.jsonl"))
    return [json.loads(ln) for ln in text.splitlines(keepends=True) if ln.strip() and ln.endswith("\n")]


class _EpathEventFile:
    """A TensorBoard event file in a bucket, through epath: the object is rewritten whole on each
    flush (a bucket has no append), as tensorboardX's own GCS writer does."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes):
        self.buffer.write(data)

    def flush(self):
        fs.write_bytes(self.path, self.buffer.getvalue())

    def close(self):
        self.flush()


def _tensorboardx():
    """tensorboardX, imported without torch where torch is not loaded yet: its writer imports
    torch (2.5 s, in every training process) only to accept torch tensors, and we log floats."""
    import sys
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        import tensorboardX
        import tensorboardX.record_writer  # noqa: F401
    finally:
        del sys.modules["torch"]
    return tensorboardX


class _EpathEventFiles:
    def open(self, path: str):
        return _EpathEventFile(path)

    def directory_check(self, path: str):
        pass  # buckets need no folders


def _tensorboard_through_epath(scheme: str):
    """TensorBoard files under a `scheme://` URL go through the same layer as everything else
    (tensorboardX's own GCS writer would need google-cloud-storage and its own credentials)."""
    _tensorboardx().record_writer.register_writer_factory(scheme, _EpathEventFiles())
