"""The training machinery: accumulation, sharding, exact resume, packing, guards and CLI errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from alignjax import sharding as shd
from alignjax.cli import main as cli_main
from alignjax.config import load_config
from alignjax.model.config import LlamaConfig
from alignjax.model.params import build_module, init_params
from alignjax.train import sft
from alignjax.train.metrics import read_metrics
from alignjax.train.optim import make_optimizer
from alignjax.train.slots import per_slot
from alignjax.train.state import init_state, state_shardings
from alignjax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["train.steps=6", "train.log_every=1", "train.eval_every=0", "checkpoint.every=3",
        "checkpoint.async_save=False", "optimizer.warmup_steps=2", "data.seq_len=48",
        "train.batch_size=16"]


def _random_batch(b=16, t=24, vocab=64, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, -rng.randint(0, 8):] = 0  # ragged right padding
    seg[1::3, 10:] = 2 * seg[1::3, 10:]  # some rows packed with a second document
    pos = np.where(seg == 2, np.arange(t) - 10, np.arange(t)) * (seg > 0)
    mask = (rng.rand(b, t) > 0.3).astype(np.float32) * (seg > 0)
    targets = rng.randint(3, vocab, (b, t)).astype(np.int32)
    return dict(tokens=tokens, positions=pos.astype(np.int32), segment_ids=seg, targets=targets,
                loss_mask=mask)


def _one_step(accum: int, mesh_sizes: dict):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    module, mesh = build_module(cfg), shd.make_mesh(mesh_sizes)
    opt_cfg = load_config("configs/sft.py:tiny").optimizer
    tx, schedule = make_optimizer(opt_cfg, 10)
    optimizer = per_slot({"policy": tx})
    _, shardings = state_shardings({"policy": module}, optimizer, mesh)
    state = init_state({"policy": init_params(module, jax.random.PRNGKey(0), mesh)}, optimizer,
                       shardings, 0)
    step = jax.jit(make_train_step(sft.make_sums_fn(module, chunk_size=8), sft.metrics, optimizer,
                                   {"policy": schedule}, accum))
    with shd.mesh_context(mesh):
        for i in range(2):  # two steps: the second uses Adam moments built from accumulated grads
            state, metrics = step(state, shd.shard_batch(_random_batch(seed=i), mesh), {})
    return jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.slow  # two train steps at two accumulation settings
def test_gradient_accumulation_equals_one_big_batch():
    p1, m1 = _one_step(1, {"data": 8})
    p4, m4 = _one_step(4, {"data": 4, "tensor": 2})
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p4)
    for k in ("loss", "grad_norm", "mean_token_accuracy", "num_tokens"):
        np.testing.assert_allclose(m1[k], m4[k], rtol=1e-5, err_msg=k)


def _train(workdir, extra=(), env=None, bucket=None, then=()):
    """`alignjax train` in a subprocess; with `bucket`, gs:// means that local folder
    (tests/fake_bucket.py) and `then` is another command run after it in the same process."""
    cli = ["-m", "alignjax.cli"] if bucket is None else ["tests/fake_bucket.py", str(bucket), "alignjax"]
    cmd = ([sys.executable] + cli + ["train", "--config", "configs/sft.py:tiny", "--workdir",
                                     str(workdir)] + [f"--config.{o}" for o in FAST + list(extra)]
           + (["--and", *then] if then else []))
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=600)


def _losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    r = _train(workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_exact_resume_after_kill_in_a_gs_workdir_and_export(uninterrupted, tmp_path):
    """A run killed right after a checkpoint resumes to the same losses as an uninterrupted one,
    here with --workdir gs://... (a local folder posing as the bucket): checkpoints, metrics,
    TensorBoard, tokenizer and the HF export all go through the URL. (Local workdirs resume
    exactly in test_reliability's SIGTERM test and test_multihost's killed 2-process run.)"""
    from transformers import AutoModelForCausalLM
    bucket, run = tmp_path / "bucket", "gs://runs/sft"
    killed = _train(run, env={"ALIGNJAX_KILL_AFTER_STEP": "3"}, bucket=bucket)
    assert killed.returncode == 3, killed.stderr[-3000:]
    resumed = _train(run, bucket=bucket, then=["convert", "alignjax-to-hf", "--ckpt", run, "--out",
                                               "gs://runs/sft-hf"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    stored = bucket / "runs" / "sft"
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # the URL did not become a local folder
    ref, got = _losses(uninterrupted), _losses(stored)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        np.testing.assert_allclose(got[step], ref[step], atol=1e-6, rtol=0, err_msg=f"step {step}")
    assert sorted(os.listdir(stored / "checkpoints")) == sorted(os.listdir(uninterrupted / "checkpoints"))
    assert b"loss" in b"".join(f.read_bytes() for f in (stored / "tb").iterdir())
    assert (stored / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((stored / "config.json").read_text())["train"]["steps"] == 6
    model = AutoModelForCausalLM.from_pretrained(bucket / "runs" / "sft-hf")
    assert model.config.vocab_size == 512


@pytest.mark.slow
def test_same_losses_on_another_mesh(uninterrupted, tmp_path):
    r = _train(tmp_path, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = _losses(uninterrupted), _losses(tmp_path)
    for step in ref:
        np.testing.assert_allclose(got[step], ref[step], atol=1e-4, rtol=0, err_msg=f"step {step}")


@pytest.mark.slow
def test_workdir_is_a_model_and_exports(uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(uninterrupted), "--out", str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 512
    metrics = read_metrics(uninterrupted)
    assert {"loss", "perplexity", "mean_token_accuracy", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(metrics[-1])
    assert os.listdir(uninterrupted / "tb")


def test_packed_batch_loss_equals_its_pieces(bpe_tokenizer):
    """No attention or loss crosses a segment boundary: sums over a packed row = sums of its pieces."""
    from alignjax.data.pipeline import make_sft_eval_iterator, make_sft_iterator
    cfg = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    module = build_module(cfg)
    mesh = shd.make_mesh({"data": 8})
    params = {"policy": init_params(module, jax.random.PRNGKey(1), mesh)}
    records = [{"prompt": f"sort: {i} 1 2", "completion": " 1 2 " + str(i)} for i in range(3, 11)]
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pack_{os.getpid()}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    sums_fn = jax.jit(sft.make_sums_fn(module, chunk_size=16))
    packed = next(make_sft_iterator(path, bpe_tokenizer, {"packing": "pack"}, seed=0, batch_size=8,
                                    seq_len=64, shuffle=False, num_epochs=1))
    assert packed["segment_ids"].max() >= 2  # really packed
    alone = next(make_sft_eval_iterator(path, bpe_tokenizer, {}, batch_size=8, seq_len=64))
    alone.pop("valid")
    nll_p, s_p = sums_fn(params, packed)
    nll_a, s_a = sums_fn(params, alone)
    np.testing.assert_allclose(nll_p, nll_a, rtol=1e-5)
    assert float(s_p["count"]) == float(s_a["count"]) > 0


@pytest.mark.slow
def test_nan_guard_stops_with_clear_error(tmp_path):
    r = _train(tmp_path, ["optimizer.lr=1e12", "optimizer.grad_clip=0.0", "train.steps=4"])
    assert r.returncode == 2
    assert "non-finite" in r.stderr and "Last good checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("override,message", [
    ("--config.optimizer.lrr=1", "optimizer.lrr"),
    ("--config.train.batch_size=12", "train.batch_size=12 is not divisible"),
    ("--config.data.seq_len=4096", "data.seq_len"),
])
def test_train_cli_config_errors(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--config", "configs/sft.py:tiny", "--workdir", str(tmp_path), override])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_malformed_training_data_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(SystemExit):
        cli_main(["train", "--config", "configs/sft.py:tiny", "--workdir", str(tmp_path / "w"),
                  f"--config.data.train={data}", "--config.data.eval=", "--config.train.steps=2",
                  "--config.optimizer.warmup_steps=1"])
    assert f"{data}:2" in capsys.readouterr().err
