"""Multi-host start-up (alignjax/distributed.py) and real 2-process runs on this machine.

The 2-process tests start two `alignjax` processes with 4 CPU devices each, joined through
jax.distributed on localhost (CPU collectives: gloo), and check them against the test's own
process with 8 devices:
- SFT: the same losses, a 2-process checkpoint that resumes in 2 processes exactly, and the same
  HF export from 2 processes as from 1. The data of a step does not depend on the process count
  (alignjax.data.pipeline.shard_records); with data.packing=pad it is the same rows, so the
  losses agree to float rounding.
- DPO with a precomputed reference table: the same losses.
- PPO (rollouts, scoring, values, reference, global minibatches): every logged metric.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from alignjax import distributed
from alignjax.cli import main as cli_main
from alignjax.errors import UserError
from alignjax.train.metrics import read_metrics
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_ENV: dict = {}


# ---- which processes initialise, and how -----------------------------------------------------

def test_explicit_flags():
    assert distributed.settings("10.0.0.2:8476", 4, 3, NO_ENV, 0) == {
        "coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}


def test_standard_environment_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.settings(None, None, None, env, 0) == {
        "coordinator_address": "host:1234", "num_processes": 2, "process_id": 1}
    # a flag wins over its variable
    assert distributed.settings(None, None, 0, env, 0)["process_id"] == 0


def test_tpu_pod_is_detected_single_host_and_plain_hosts_are_not():
    assert distributed.settings(None, None, None, NO_ENV, 8) == {}  # jax's TPU cluster detection
    assert distributed.settings(None, None, None, NO_ENV, 1) is None  # one TPU VM: nothing to join
    assert distributed.settings(None, None, None, NO_ENV, 0) is None


def test_tpu_host_count_is_zero_off_tpu():
    assert distributed.tpu_host_count({"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "a,b"}) == 0


@pytest.mark.parametrize("args, env, message", [
    (("h:1", 2, 2), NO_ENV, "--process-id 2: must be in [0, 2) for --num-processes 2"),
    (("h:1", 2, -1), NO_ENV, "--process-id -1: must be in [0, 2)"),
    (("h:1", 0, 0), NO_ENV, "--num-processes 0: must be >= 1"),
    (("h:1", None, 0), NO_ENV, "multi-host: also give --num-processes (or env JAX_NUM_PROCESSES)"),
    ((None, 2, None), NO_ENV, "also give --coordinator and --process-id"),
    (("nohost", 2, 0), NO_ENV, "--coordinator 'nohost': expected HOST:PORT"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                          "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two': expected an integer"),
])
def test_bad_settings(args, env, message):
    with pytest.raises(UserError, match=None) as e:
        distributed.settings(*args, env, 0)
    assert message in str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_process_id_out_of_range(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--config", "configs/sft.py:tiny", "--workdir", "unused",
                  "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "alignjax: error: --process-id 2: must be in [0, 2) for --num-processes 2\n")


def test_cli_unreachable_coordinator_times_out_with_a_message(capsys):
    """Nothing listens on the port: a clear error after --init-timeout, not a hang or an abort."""
    port = _free_port()
    with pytest.raises(SystemExit) as e:
        cli_main(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                  "--init-timeout", "1", "train", "--config", "configs/sft.py:tiny", "--workdir", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alignjax: error: multi-host: the coordinator 127.0.0.1:{port} "
                          "(--coordinator) did not answer within --init-timeout 1 s") and err.count("\n") == 1


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_process_zero_alone_gives_up_after_the_timeout(tmp_path):
    """Process 0 hosts the coordinator; when the others never come it must stop, not hang. jax ends
    the process itself (a fatal error from its runtime, not an exception), after our line."""
    port = _free_port()
    p = subprocess.run([sys.executable, "-m", "alignjax.cli", "train", "--config", "configs/sft.py:tiny",
                        "--workdir", str(tmp_path / "wd"), "--coordinator", f"127.0.0.1:{port}",
                        "--num-processes", "2", "--process-id", "0", "--init-timeout", "2"],
                       cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert p.stderr.startswith(f"multi-host: process 0 of 2, coordinator at 127.0.0.1:{port}; "
                               "waiting up to 2 s (--init-timeout) for the other processes\n")


def test_mesh_product_error_names_mesh_flag_and_keys():
    from alignjax.sharding import ShardingError, mesh_shape
    with pytest.raises(ShardingError) as e:
        mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
    assert "mesh.data/mesh.fsdp/mesh.tensor (config) or --mesh" in str(e.value)
    assert "3 but 8 devices" in str(e.value)


# ---- a real 2-process run ----------------------------------------------------------------------

FAST = ["train.steps=4", "train.log_every=1", "train.eval_every=0", "checkpoint.every=2",
        "checkpoint.async_save=False", "optimizer.warmup_steps=2", "data.seq_len=48",
        "train.batch_size=16", "data.packing=pad"]  # packed rows depend on each process's records
TIMEOUT_S = 900  # a hang (e.g. one process waiting in a collective for a dead peer) is a failure


def _train_args(workdir):
    return ["train", "--config", "configs/sft.py:tiny", "--workdir", str(workdir)] + [
        f"--config.{o}" for o in FAST]


def _env(devices: int, extra=None):
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(devices), **(extra or {})}


def _run_processes(args, n: int, env_extra=None) -> list[subprocess.CompletedProcess]:
    """`alignjax ARGS` in n > 1 processes with 8/n CPU devices each, joined through
    jax.distributed; all are killed at the timeout."""
    base = [sys.executable, "-m", "alignjax.cli", *args]
    port = _free_port()
    procs = [subprocess.Popen(
        base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                "--process-id", str(i), "--init-timeout", "120"],
        cwd=ROOT, env=_env(8 // n, env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_exactly(tmp_path):
    from alignjax.config import load_config
    from alignjax.train import run_training
    run_training(load_config("configs/sft.py:tiny", FAST), str(tmp_path / "one"))  # 8 devices
    ref = _losses(tmp_path / "one")
    assert sorted(ref) == [1, 2, 3, 4]

    # Two processes, "preempted" right after the step-2 checkpoint, then restarted in two processes.
    two = tmp_path / "two"
    first = _run_processes(_train_args(two), 2, {"ALIGNJAX_KILL_AFTER_STEP": "2"})
    assert [r.returncode for r in first] == [3, 3], [r.stderr[-3000:] for r in first]
    assert sorted(_losses(two)) == [1, 2]
    second = _run_processes(_train_args(two), 2)
    assert [r.returncode for r in second] == [0, 0], [r.stderr[-3000:] for r in second]
    assert "resuming" in second[0].stdout
    got = _losses(two)
    assert sorted(got) == [1, 2, 3, 4]  # only process 0 writes metrics.jsonl: no duplicate rows
    for step in ref:
        np.testing.assert_allclose(got[step], ref[step], atol=1e-6, rtol=0, err_msg=f"step {step}")

    # HF export of that checkpoint from 2 processes (parameters gathered to process 0, which
    # alone writes) equals the export from 1 process, byte for byte.
    cli_main(["convert", "alignjax-to-hf", "--ckpt", str(two), "--out", str(tmp_path / "hf1")])
    done = _run_processes(["convert", "alignjax-to-hf", "--ckpt", str(two), "--out",
                           str(tmp_path / "hf2")], 2)
    assert [r.returncode for r in done] == [0, 0], [r.stderr[-3000:] for r in done]
    files = sorted(os.listdir(tmp_path / "hf1"))
    assert "model.safetensors.index.json" in files and sorted(os.listdir(tmp_path / "hf2")) == files
    for name in files:
        assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "hf1" / name).read_bytes(), name


def _one_and_two_processes(config: str, overrides: list, tmp_path) -> dict:
    """Trains `config` in this process (8 devices; its programs are often in the test run's
    compilation cache already) and in 2 processes x 4 devices; {n: workdir}."""
    from alignjax.config import load_config
    from alignjax.train import run_training
    run_training(load_config(config, overrides), str(tmp_path / "p1"))
    done = _run_processes(["train", "--config", config, "--workdir", str(tmp_path / "p2")] + [
        f"--config.{o}" for o in overrides], 2)
    assert [r.returncode for r in done] == [0, 0], [r.stderr[-3000:] for r in done]
    return {1: tmp_path / "p1", 2: tmp_path / "p2"}


@pytest.mark.slow
def test_ppo_rollouts_in_two_processes_match_one(tmp_path):
    """Online RL across processes: each draws the same prompts, they sample, score and compute
    values and reference log-probs of the global batch together, and each process trains on its
    own rows of every (global) minibatch. PPO with its four slots (2 epochs x 2 minibatches) in
    2 processes logs what it logs in 1 process with 8 devices."""
    from test_ppo_train import NOISY, OVERRIDES
    overrides = [o for o in OVERRIDES if not o.startswith(("train.steps=", "checkpoint.every="))]
    workdirs = _one_and_two_processes("configs/ppo.py:tiny", overrides + [
        "train.steps=2", "checkpoint.every=2"], tmp_path)
    rows = {n: {m["step"]: {k: v for k, v in m.items() if not k.startswith(NOISY)}
                for m in read_metrics(w)} for n, w in workdirs.items()}
    assert sorted(rows[2]) == sorted(rows[1]) == [1, 2]
    for step, want in rows[1].items():
        assert sorted(rows[2][step]) == sorted(want)
        assert want["grad_norm/policy"] > 0 and want["grad_norm/value"] > 0  # not a trivial update
        for key, value in want.items():
            np.testing.assert_allclose(rows[2][step][key], value, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step} {key}")
    assert rows[1][2]["objective/kl"] != 0  # step 2 samples from the trained policy


@pytest.mark.slow
def test_dpo_with_a_precomputed_reference_in_two_processes_matches_one(tmp_path):
    """DPO's pair batches and its precomputed reference table (the processes score the records
    together and each keeps the whole table) give the losses of 1 process with 8 devices."""
    from test_ppo_train import OVERRIDES
    from alignjax.data import toy
    pairs = tmp_path / "pairs.jsonl"  # the precompute pass reads every record: keep it small
    toy.write_jsonl(toy.preference_records(toy.make_examples(64, seed=3), seed=3), str(pairs))
    model = [o for o in OVERRIDES if o.startswith(("model.", "tokenizer."))]  # a small random model
    workdirs = _one_and_two_processes("configs/dpo.py:tiny", model + [
        "dpo.reference=precomputed", f"data.train={pairs}", "data.eval=", "train.steps=2",
        "train.batch_size=16", "train.log_every=1", "train.eval_every=0", "checkpoint.every=2",
        "checkpoint.async_save=False", "optimizer.warmup_steps=0"], tmp_path)
    losses = {n: _losses(w) for n, w in workdirs.items()}
    assert [len(list(workdirs[n].glob("reference_logps_*.npy"))) for n in (1, 2)] == [1, 2]
    assert sorted(losses[2]) == sorted(losses[1]) == [1, 2]
    assert losses[1][2] != losses[1][1]  # the policy moved away from its reference
    for step, want in losses[1].items():
        np.testing.assert_allclose(losses[2][step], want, atol=1e-6, rtol=0, err_msg=f"step {step}")
