"""Shared pytest fixtures. Keep each fixture small, offline and fast; session scope for anything
that trains or loads (tokenizers, tiny models)."""
from __future__ import annotations

import os
import pathlib

# Before jax is imported anywhere: 8 fake CPU devices so meshes are real (the Makefile sets these too).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# Fixtures that train a model: every test using one is in the slow tier (`make test-fast` skips it).
TRAINING_FIXTURES = ("sft_run",)
# Modules scheduled between the one that trains the SFT model and the others that use it.
TRAINED_AFTER = 12


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


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """The toy-suite SFT model of the demo (configs/sft.py:tiny), trained once per session and
    shared by every xdist worker (the first to need it trains it under a file lock; the others
    wait, then read it).

    Returns (workdir, final metrics); reward-model and DPO tests start from it.
    """
    import json

    from filelock import FileLock

    from alignjax.config import load_config
    from alignjax.train import run_training

    reuse = os.environ.get("ALIGNJAX_TEST_SFT_WORKDIR")  # developers: skip the ~5 min SFT run
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's base directory, above each worker's own
    workdir = pathlib.Path(reuse) if reuse else shared / "sft_tiny"
    done = shared / "sft_tiny.json"
    with FileLock(str(shared / "sft_tiny.lock")):
        if not done.exists():
            out = run_training(load_config("configs/sft.py:tiny", ["train.log_every=50"]), str(workdir))
            done.write_text(json.dumps(out["metrics"]))
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
