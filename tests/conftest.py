"""Shared pytest fixtures. Keep each fixture small, offline and fast; session scope for anything
that trains or loads (tokenizers, tiny models)."""
from __future__ import annotations

import os
import pathlib

# Before jax is imported anywhere: 8 fake CPU devices so meshes are real (the Makefile sets these too).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is bound by compiling: hundreds of small programs, most run a few times. XLA's CPU
# backend at -O0 compiles them faster (the fast tier: 179 s against 246 s) and runs them slower
# (an SFT step: 1.4x), so the runs whose point is learning train in subprocesses at the default
# level (train_in_subprocess). The flag is part of the compilation cache's key.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
ROOT = pathlib.Path(__file__).parent.parent

import pytest  # noqa: E402

# Fixtures that train a model: every test using one is in the slow tier (`make test-fast` skips it).
TRAINING_FIXTURES = ("sft_run",)
# Modules scheduled between the one that trains the SFT model and the others that use it: enough
# that the other worker does not wait for it (with 12 it waited 246 s; xdist hands each worker
# several modules up front, so that worker runs about half of these).
TRAINED_AFTER = 24


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run, shared by the xdist workers and the
    CLI subprocesses (they inherit the variable): tests build the same tiny models and steps again
    and again, and a cache hit skips the compile (the suite's CPU time: 40 minutes instead of 46).
    Set JAX_COMPILATION_CACHE_DIR yourself to keep the cache between runs of your edit-test loop
    (warm, test_train.py and test_loop.py took 85 s instead of 143 s)."""
    if hasattr(config, "workerinput"):
        return  # a worker: the controller set the variables before it started this process
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import shutil
        import tempfile

        cache = tempfile.mkdtemp(prefix="alignjax-xla-cache-")
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    # Cache every program: jax's defaults skip those that compile in under a second.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in TRAINING_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)  # only with pytest-xdist: `make test` runs several workers
def pytest_xdist_make_scheduler(config, log):
    """Whole modules go to one worker each, so module fixtures are built once. The session's SFT
    model is trained once for all workers (`sft_run`): one module that uses it goes first, so its
    training starts at once, and the other such modules follow after a few others, by when it is
    nearly ready (a worker that takes one earlier waits for it, leaving the cores to the rest).
    Keep tests that need no trained model out of those modules, and give each heavy fixture built
    on it a module of its own: those modules then run side by side."""
    from xdist.scheduler import LoadScopeScheduling

    here = pathlib.Path(__file__).parent
    trained = sorted(p.relative_to(config.rootpath).as_posix() for p in here.glob("test_*.py")
                     if any(name in p.read_text() for name in TRAINING_FIXTURES))

    class ByModule(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("::", 1)[0]

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # once, when the queue is first filled (largest modules first)
                others = [scope for scope in self.workqueue if scope not in trained]
                waiting = [scope for scope in trained if scope in self.workqueue]
                order = waiting[:1] + others[:TRAINED_AFTER] + waiting[1:] + others[TRAINED_AFTER:]
                for scope in reversed(order):
                    self.workqueue.move_to_end(scope, last=False)
                self.ordered = True
            super()._assign_work_unit(node)

    return ByModule(config, log)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """Llama-3-style byte-level BPE (bos <|begin_of_text|>, eos <|eot_id|>, pad <|pad|>), vocab 512."""
    from alignjax.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(vocab_size=512)


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """Llama-2-style sentencepiece BPE (<s>, </s>, <unk>, added <pad>, [INST] template)."""
    from alignjax.data.tokenizer import train_sentencepiece_tokenizer

    return train_sentencepiece_tokenizer(vocab_size=512, out_dir=tmp_path_factory.mktemp("spm"))


def xla_flags(devices: int, optimize: bool = False) -> str:
    """This run's XLA_FLAGS for a subprocess with `devices` CPU devices; `optimize`: XLA's default
    optimisation level instead of the suite's -O0 (which changes the last bits of some results)."""
    drop = ("--xla_force_host_platform_device_count",) + (("--xla_backend_optimization_level",)
                                                           if optimize else ())
    kept = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(drop)]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def train_in_subprocess(spec: str, workdir, overrides=(), devices: int = 8) -> dict:
    """`alignjax train --config SPEC --workdir W --config.KEY=VALUE ...` in a subprocess on
    `devices` CPU devices, compiled at XLA's default optimisation level: the learning runs, whose
    time is in their steps. Returns run_training's "metrics": each metric's last value."""
    import subprocess
    import sys

    from alignjax.train.metrics import read_metrics
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices, optimize=True)}
    done = subprocess.run([sys.executable, "-m", "alignjax.cli", "train", "--config", spec,
                           "--workdir", str(workdir), *(f"--config.{o}" for o in overrides)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{spec} {overrides}: exit {done.returncode}\n{done.stderr[-4000:]}"
    last = {}
    for row in read_metrics(str(workdir)):
        last.update(row)
    last.pop("step", None)
    return last


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """The toy-suite SFT model of the demo (configs/sft.py:tiny on 2 devices), trained once per
    session and shared by every xdist worker (the first to need it trains it under a file lock;
    the others wait, then read it).

    Returns (workdir, final metrics); reward-model and DPO tests start from it.
    """
    import json

    from filelock import FileLock

    reuse = os.environ.get("ALIGNJAX_TEST_SFT_WORKDIR")  # developers: skip the ~5 min SFT run
    if reuse:
        from alignjax.train.metrics import read_metrics
        last = {}
        for row in read_metrics(reuse):
            last.update(row)
        return pathlib.Path(reuse), last
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's base directory, above each worker's own
    workdir = shared / "sft_tiny"
    done = shared / "sft_tiny.json"
    with FileLock(str(shared / "sft_tiny.lock")):
        if not done.exists():
            # On 2 devices, one per core of the 2-core CI machine, as `make demo` trains it: each
            # device runs its half of the batch on one thread (the tiny SFT step in `bench train`:
            # 9,700 tokens/s against 7,250 on 1 device; this fixture: 527 s in a fresh-clone
            # suite against 586-679 s on 1). The later learning runs stay on 8: on 2 they were
            # slower in the suite, beside the other worker (reward model 182 s against 127-135).
            metrics = train_in_subprocess("configs/sft.py:tiny", workdir, ["train.log_every=50"],
                                          devices=2)
            done.write_text(json.dumps(metrics))
    return workdir, json.loads(done.read_text())


# A small model on the toy tokenizer, for tests whose point is the plumbing, not learning.
SMALL_MODEL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
               "model.num_attention_heads=4", "model.num_key_value_heads=2", "tokenizer.path=toy"]


@pytest.fixture(scope="session")
def small_start_model(tmp_path_factory):
    """A two-step SFT run of SMALL_MODEL: a nearly random start model directory (expert
    iteration and the comparison start from it)."""
    from alignjax.config import load_config
    from alignjax.train import run_training
    workdir = tmp_path_factory.mktemp("small_start")
    run_training(load_config("configs/sft.py:tiny", SMALL_MODEL + [
        "train.steps=2", "train.batch_size=8", "train.eval_every=0", "optimizer.warmup_steps=1",
        "checkpoint.async_save=False"]), str(workdir))
    return str(workdir)
