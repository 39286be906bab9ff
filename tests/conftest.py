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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in TRAINING_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)  # only with pytest-xdist: `make test` runs 2 workers
def pytest_xdist_make_scheduler(config, log):
    """Whole modules go to one worker each, so module fixtures are built once, and the modules
    that use a training fixture share one worker, so the session's SFT model is trained once.
    Keep tests that do not need a trained model out of those modules: they would wait in line."""
    from xdist.scheduler import LoadScopeScheduling

    here = pathlib.Path(__file__).parent
    trained = {p.relative_to(config.rootpath).as_posix() for p in here.glob("test_*.py")
               if any(name in p.read_text() for name in TRAINING_FIXTURES)}

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "trained" if module in trained else module

        def _assign_work_unit(self, node) -> None:
            # The trained group is the longest serial chain: it starts first, on the first worker,
            # while the others take the remaining modules (largest first, xdist's order).
            if "trained" in self.workqueue:
                self.workqueue.move_to_end("trained", last=False)
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
    """The toy-suite SFT model of the demo (configs/sft.py:tiny), trained once per session.

    Returns (workdir, final metrics); reward-model and DPO tests start from it.
    """
    from alignjax.train import run_training
    from alignjax.config import load_config

    reuse = os.environ.get("ALIGNJAX_TEST_SFT_WORKDIR")  # developers: skip the ~5 min SFT run
    workdir = pathlib.Path(reuse) if reuse else tmp_path_factory.mktemp("sft_tiny")
    out = run_training(load_config("configs/sft.py:tiny", ["train.log_every=50"]), str(workdir))
    return workdir, out


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
