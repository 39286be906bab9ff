"""Never lose or damage a user's work (issue 10): export safety, SIGINT/SIGTERM saves, resumable
`sample --out`, damaged-checkpoint fallback, config pinning only by a saved step.

One small SFT run (module fixture, in-process) is the workdir the tests copy and damage, and the
uninterrupted reference the signal test compares against.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from alignjax.cli import main as cli_main
from alignjax.train import run_training
from alignjax.config import load_config
from alignjax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40  # long enough that a signal sent after step 3 always lands mid-run
SMALL = ["train.steps=40", "train.log_every=1", "train.eval_every=0", "checkpoint.every=20",
         "checkpoint.async_save=False", "optimizer.warmup_steps=2", "data.seq_len=32",
         "train.batch_size=8", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_hidden_layers=1", "data.eval="]


def _config(extra=()):
    return load_config("configs/sft.py:tiny", SMALL + list(extra))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rel_run")
    run_training(_config(), str(workdir))
    return workdir


def _copy(src, tmp_path, name="w"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _digest(path) -> dict:
    """{relative file: sha1} of everything under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


def _fails(argv, capsys) -> str:
    """Runs the CLI in-process, expects a non-zero exit; returns stderr (checked to be one line)."""
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


# ---- exports never write into a training workdir, nor half-write -------------------------------

@pytest.mark.slow
def test_export_refuses_training_workdir_which_still_resumes(run_dir, tmp_path, capsys):
    w = _copy(run_dir, tmp_path)
    before = _digest(w)
    err = _fails(["convert", "alignjax-to-hf", "--ckpt", str(w), "--out", str(w)], capsys)
    assert "training workdir" in err and str(w) in err
    err = _fails(["convert", "alignjax-to-hf", "--ckpt", str(w), "--out", str(w), "--overwrite"],
                 capsys)
    assert "training workdir" in err
    hf = tmp_path / "hf"
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(w), "--out", str(hf)])
    err = _fails(["convert", "hf-to-alignjax", "--hf", str(hf), "--out", str(w), "--overwrite"],
                 capsys)
    assert "training workdir" in err
    assert _digest(w) == before
    out = run_training(_config(), str(w))  # resumes (restores step 40, config accepted)
    assert "resuming" in capsys.readouterr().out
    assert out["metrics"] == {}


@pytest.mark.slow
def test_export_into_non_empty_dir_needs_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _fails(["convert", "alignjax-to-hf", "--ckpt", str(run_dir), "--out", str(out)], capsys)
    assert "--overwrite" in err and str(out) in err
    assert os.listdir(out) == ["notes.txt"]
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(run_dir), "--out", str(out), "--overwrite"])
    files = set(os.listdir(out))
    assert "config.json" in files and "notes.txt" not in files  # replaced, not merged
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32


@pytest.mark.slow
def test_failed_export_leaves_old_output_intact(run_dir, tmp_path, monkeypatch):
    from alignjax.convert import hf as hf_convert
    out = tmp_path / "hf"
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(run_dir), "--out", str(out)])
    before = _digest(out)
    real = hf_convert.iter_hf_tensors

    def dies_midway(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 3:
                raise OSError(28, "No space left on device", "model-00002.safetensors")
            yield item

    monkeypatch.setattr(hf_convert, "iter_hf_tensors", dies_midway)
    with pytest.raises(SystemExit):
        cli_main(["convert", "alignjax-to-hf", "--ckpt", str(run_dir), "--out", str(out),
                  "--overwrite", "--max-shard-gb", "0.00001"])
    assert _digest(out) == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no half-written sibling left behind


# ---- damaged checkpoints -----------------------------------------------------------------------

@pytest.mark.slow
def test_resume_falls_back_past_a_damaged_checkpoint(run_dir, tmp_path, capsys):
    w = _copy(run_dir, tmp_path)
    os.remove(w / "checkpoints" / "40" / "state" / "_METADATA")
    out = run_training(_config(), str(w))  # retrains steps 21..40 from checkpoint 20
    err = capsys.readouterr().err
    assert "checkpoint 40" in err and "used checkpoint 20" in err
    aside = [d for d in os.listdir(w / "checkpoints") if d.startswith("40.damaged-")]
    assert len(aside) == 1 and os.listdir(w / "checkpoints" / aside[0])  # kept, not deleted
    ref, got = _losses(run_dir), _losses(w)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(21, STEPS + 1):
        np.testing.assert_allclose(got[step], ref[step], atol=1e-6, rtol=0, err_msg=f"step {step}")
    assert out["metrics"]["loss"] == pytest.approx(ref[STEPS], abs=1e-6)


@pytest.mark.slow
def test_load_and_generate_fall_back_and_all_damaged_is_one_line(run_dir, tmp_path, capsys):
    from alignjax.checkpoint import Checkpointer
    from alignjax.model.params import abstract_params
    from alignjax.model.store import load_model
    w = _copy(run_dir, tmp_path)
    data = w / "checkpoints" / "40" / "state" / "ocdbt.process_0" / "d"
    for f in os.listdir(data):  # every array file of step 40
        os.remove(data / f)
    model = load_model(str(w))
    assert "checkpoint 40" in capsys.readouterr().err
    ckpt = Checkpointer(str(w), every=1)
    want = ckpt.restore_params(20, abstract_params(model.module, model.mesh, model.rules)[0],
                               ("params", "policy"))
    ckpt.close()
    for a, b in zip(*(map(np.asarray, __import__("jax").tree_util.tree_leaves(t))
                      for t in (model.params, want))):
        np.testing.assert_array_equal(a, b)
    for step in ("20", "1"):  # now damage every checkpoint left: nothing restores
        if os.path.isdir(w / "checkpoints" / step):
            os.remove(w / "checkpoints" / step / "state" / "_METADATA")
            shutil.rmtree(w / "checkpoints" / step / "state" / "ocdbt.process_0")
    left = sorted(os.listdir(w / "checkpoints"))
    err = _fails(["generate", "--model", str(w), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert "no checkpoint restores" in err
    assert sorted(os.listdir(w / "checkpoints")) == left  # nothing moved when none restores


@pytest.mark.slow
def test_damaged_checkpoint_fallback_prints_one_line_in_a_real_process(run_dir, tmp_path):
    """A failed orbax restore abandons its other array reads; in a real process they used to end
    in hundreds of lines of asyncio tracebacks after our one line."""
    w = _copy(run_dir, tmp_path)
    data = w / "checkpoints" / "40" / "state" / "ocdbt.process_0" / "d"
    for f in os.listdir(data):
        with open(data / f, "r+b") as fh:  # cut short, not deleted
            fh.truncate(7)
    out = subprocess.run([sys.executable, "-m", "alignjax.cli", "generate", "--model", str(w),
                          "--prompt", "hi", "--max-new-tokens", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "checkpoint 40" in lines[0] and "used checkpoint 20" in lines[0], lines[:5]


# ---- only a saved step pins the workdir's config -----------------------------------------------

@pytest.mark.slow
def test_run_that_never_saved_does_not_pin_the_architecture(run_dir, tmp_path, monkeypatch, capsys):
    from alignjax.config import save_config
    from alignjax.train import loop
    trained = []
    monkeypatch.setattr(loop, "train", lambda c, w, **_: trained.append(w) or {"metrics": {}})
    fresh = tmp_path / "fresh"
    save_config(_config(["model.hidden_size=64"]), str(fresh))  # what a run that failed leaves
    run_training(_config(), str(fresh))
    assert trained == [str(fresh)]
    assert json.load(open(fresh / "config.json"))["model"]["hidden_size"] == 32
    with pytest.raises(Exception, match="different architecture"):  # a saved step does pin it
        run_training(_config(["model.hidden_size=64"]), str(run_dir))


# ---- SIGTERM / SIGINT: save, one line, exit 128+n, exact resume --------------------------------

def _train_cmd(workdir) -> list:
    return [sys.executable, "-m", "alignjax.cli", "train", "--config", "configs/sft.py:tiny",
            "--workdir", str(workdir)] + [f"--config.{o}" for o in SMALL]


def _interrupt_after(workdir, step: int, sig) -> tuple[int, str]:
    """Starts `alignjax train`, sends `sig` once metrics.jsonl shows `step`; (exit code, stderr)."""
    proc = subprocess.Popen(_train_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max(_losses(workdir), default=0) >= step:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _saved_line(err: str, name: str) -> int:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"alignjax: caught {name} at step")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return int(lines[0].split("saved checkpoint ")[1].split()[0])


@pytest.mark.slow
def test_sigterm_and_sigint_save_and_resume_exactly(run_dir, tmp_path, capsys):
    """A real SIGTERM to `alignjax train` (what a preempted TPU VM gets), then the same run
    resumed in-process and stopped by SIGINT (Ctrl-C): both save, and every step's loss equals
    the uninterrupted run's."""
    import threading
    w = tmp_path / "w"
    code, err = _interrupt_after(w, 3, signal.SIGTERM)
    assert code == 143, err[-3000:]
    first = _saved_line(err, "SIGTERM")
    assert 3 <= first < STEPS and os.path.isdir(w / "checkpoints" / str(first))
    assert max(_losses(w)) == first

    def ctrl_c_after(step):
        while max(_losses(w), default=0) < step:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=ctrl_c_after, args=(first + 2,), daemon=True).start()
    with pytest.raises(SystemExit) as e:
        run_training(_config(), str(w))
    assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    second = _saved_line(capsys.readouterr().err, "SIGINT")
    assert first + 2 <= second < STEPS and os.path.isdir(w / "checkpoints" / str(second))
    ref, got = _losses(run_dir), _losses(w)
    assert sorted(got) == list(range(1, second + 1))
    for step in got:
        np.testing.assert_allclose(got[step], ref[step], atol=1e-6, rtol=0, err_msg=f"step {step}")


# ---- sample --out: atomic, and a rerun resumes instead of resampling ---------------------------

@pytest.mark.slow
def test_sample_resumes_after_a_crash_and_writes_atomically(run_dir, tmp_path, monkeypatch, capsys):
    from alignjax.model.generate import Generator

    def sample(out):
        cli_main(["sample", "--model", str(run_dir), "--prompts", "toy", "--reward", "toy",
                  "--mode", "best_of_n", "--n", "2", "--num-prompts", "6", "--batch-size", "4",
                  "--max-new-tokens", "4", "--out", str(out)])

    sample(tmp_path / "straight.jsonl")
    real, calls = Generator.generate_texts, []

    def crashes_on_second_chunk(self, *a, **k):
        calls.append(1)
        if len(calls) == 2 and crash:
            raise RuntimeError("host lost")
        return real(self, *a, **k)

    monkeypatch.setattr(Generator, "generate_texts", crashes_on_second_chunk)
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    crash = True
    with pytest.raises(RuntimeError):
        sample(out)
    assert out.read_text() == "old\n"  # nothing half-written over the old file
    partial = (tmp_path / "out.jsonl.partial").read_text().splitlines()
    assert len(partial) == 1 + 2  # header + the 2 prompts of the first chunk (3 chunks of 2)
    crash, calls[:] = False, []
    sample(out)
    assert "resuming" in capsys.readouterr().out
    assert len(calls) == 2  # only the chunks not sampled before
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()
    assert not os.path.exists(tmp_path / "out.jsonl.partial")


# ---- data checked before the first step ---------------------------------------------------------

def _sft_file(path, n=600, bad=(), long=()):
    """prompt/completion records; `bad` {line: raw text}; `long` lines get a prompt of ~300 words."""
    lines = []
    for i in range(1, n + 1):
        prompt = " ".join(["sort:"] + ["7 3 5"] * 100) if i in long else f"sort: {i % 7} 3 5"
        lines.append(bad.get(i, json.dumps({"prompt": prompt, "completion": "3 5 7"})))
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_SFT = {57: "{not json", 333: json.dumps({"prompt": "x"}),
           590: json.dumps({"prompt": "x", "completion": 3})}


@pytest.mark.slow
def test_bad_records_are_all_reported_before_the_first_step(run_dir, tmp_path, capsys):
    data = _sft_file(tmp_path / "train.jsonl", bad=BAD_SFT)
    w = tmp_path / "w"
    with pytest.raises(SystemExit):
        cli_main(["train", "--config", "configs/sft.py:tiny", "--workdir", str(w)]
                 + [f"--config.{o}" for o in SMALL + [f"data.train={data}",
                                                       f"tokenizer.path={run_dir / 'tokenizer'}"]])
    err = capsys.readouterr().err
    assert "3 invalid records of 600" in err and "skip_invalid" in err and "Traceback" not in err
    for line in BAD_SFT:
        assert f"{data}:{line}: " in err
    assert not os.path.exists(w / "metrics.jsonl") and not os.path.exists(w / "checkpoints")


@pytest.mark.slow
def test_skip_invalid_trains_and_counts_skipped_and_truncated(run_dir, tmp_path, capsys):
    data = _sft_file(tmp_path / "train.jsonl", bad=BAD_SFT, long=(10, 20, 30, 40))
    out = run_training(_config([f"data.train={data}", f"tokenizer.path={run_dir / 'tokenizer'}",
                                "data.skip_invalid=True", "train.steps=3"]), str(tmp_path / "w"))
    err = capsys.readouterr().err
    assert "skipped 3 invalid records of 600" in err
    assert "data.train: 4 truncated to seq_len 32" in err
    assert np.isfinite(out["metrics"]["loss"])


def test_preference_records_are_checked_up_front(bpe_tokenizer, tmp_path, capsys):
    from ml_collections import ConfigDict
    from alignjax.data.sources import DataError
    from alignjax.train.setup import checked_sources
    good = {"prompt": "sort: 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1"}
    lines = [json.dumps(good)] * 300
    lines[40] = json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"})
    lines[250] = json.dumps({"prompt": "p", "chosen": "a"})
    lines[299] = "[1, 2]"
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = ConfigDict(dict(seq_len=64, skip_invalid=False, truncation="truncate_left_prompt"))
    with pytest.raises(DataError) as e:
        checked_sources(str(data), str(tmp_path), "train", bpe_tokenizer, cfg, "pair")
    assert "3 invalid records of 300" in str(e.value)
    for line in (41, 251, 300):
        assert f"{data}:{line}: " in str(e.value)
    cfg.skip_invalid = True
    (source,) = checked_sources(str(data), str(tmp_path), "train", bpe_tokenizer, cfg, "pair")
    assert len(source) == 297 and source.where(40) == f"{data}:42"
    assert "skipped 3 invalid records of 300" in capsys.readouterr().err


def test_sample_checks_out_before_loading_anything(tmp_path, monkeypatch, capsys):
    from alignjax.model import store
    monkeypatch.setattr(store, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "x.jsonl", tmp_path):  # parent is a file; out is a directory
        err = _fails(["sample", "--model", str(tmp_path), "--prompts", "toy", "--reward", "toy",
                      "--out", str(out)], capsys)
        assert "--out" in err
