"""Multi-host start-up: jax.distributed.initialize before any device is used.

Three ways in, first match wins:
  1. explicit: --coordinator HOST:PORT --num-processes N --process-id I (any command), or the
     environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID;
  2. a Cloud TPU VM that is one worker of several (a pod slice): jax's own cluster detection
     finds the coordinator, process count and id from the TPU metadata;
  3. otherwise a single process, no initialisation.
"""

from __future__ import annotations

import argparse
import glob
import os

from alignjax.errors import UserError

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-host (TPU pods are detected without these)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0 (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    g.add_argument("--init-timeout", type=int, default=300, metavar="SECONDS",
                   help="give up when the processes have not all connected by then (default 300)")


def split_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Takes the multi-host flags from anywhere in argv (before or after the command)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_flags(parser)
    return parser.parse_known_args(argv)


def settings(coordinator, num_processes, process_id, environ, tpu_hosts: int) -> dict | None:
    """jax.distributed.initialize keyword arguments, {} for TPU auto-detection, None for one process.

    Pure: `environ` is the environment and `tpu_hosts` the number of TPU workers (0: not a TPU VM).
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, var in ENV.items():
        if given[key] is None and environ.get(var):
            given[key] = environ[var] if key == "coordinator" else _int(environ[var], var)
    if all(v is None for v in given.values()):
        return {} if tpu_hosts > 1 else None
    missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
    if missing:
        raise UserError(f"multi-host: also give {' and '.join(missing)} (or env "
                        f"{', '.join(ENV[k] for k, v in given.items() if v is None)})")
    host, _, port = given["coordinator"].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator {given['coordinator']!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    n, i = given["num_processes"], given["process_id"]
    if n < 1:
        raise UserError(f"--num-processes {n}: must be >= 1")
    if not 0 <= i < n:
        raise UserError(f"--process-id {i}: must be in [0, {n}) for --num-processes {n}")
    return {"coordinator_address": given["coordinator"], "num_processes": n, "process_id": i}


def _int(text: str, var: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {var}={text!r}: expected an integer") from None


def tpu_host_count(environ) -> int:
    """Workers in this TPU slice; 0 when this is not a TPU VM (or jax is forced onto the CPU)."""
    if environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return 0
    if not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/*")):
        return 0
    hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES")
    if hosts is None:  # a GCE TPU VM keeps the worker list in its metadata, as jax reads it
        try:
            from jax._src.clusters.cloud_tpu_cluster import get_metadata
            hosts = get_metadata("worker-network-endpoints")[0]
        except Exception:  # no metadata server: treat as one host
            return 1
    return len([h for h in hosts.split(",") if h.strip()])


def initialize(flags: argparse.Namespace, environ=None) -> dict | None:
    """Calls jax.distributed.initialize when the flags, the environment or the TPU pod ask for it."""
    environ = os.environ if environ is None else environ
    kwargs = settings(flags.coordinator, flags.num_processes, flags.process_id, environ,
                      tpu_host_count(environ))
    if kwargs is None:
        return None
    if flags.init_timeout < 1:
        raise UserError(f"--init-timeout {flags.init_timeout}: must be >= 1 second")
    timeout = flags.init_timeout
    if kwargs.get("process_id", 0) > 0:
        # jax aborts the whole process (a C++ fatal error, no exception) when the coordinator
        # never answers; probing the port first turns the common case into a clear message.
        waited = _wait_for_port(kwargs["coordinator_address"], timeout)
        timeout = max(1, int(timeout - waited))
    elif kwargs:
        import sys
        print(f"multi-host: process 0 of {kwargs['num_processes']}, coordinator at "
              f"{kwargs['coordinator_address']}; waiting up to {timeout} s (--init-timeout) for "
              "the other processes", file=sys.stderr, flush=True)
    import jax
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
    except Exception as e:  # jax raises its runtime's error types; the message is what matters
        where = kwargs.get("coordinator_address", "the TPU pod's worker 0")
        raise UserError(
            f"multi-host: could not connect to the coordinator at {where} with all processes "
            f"within --init-timeout {flags.init_timeout} s ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); start every process with the same "
            "--coordinator and --num-processes and check the address and port") from None
    return kwargs


def _wait_for_port(address: str, timeout: float) -> float:
    """Seconds until HOST:PORT accepts a TCP connection; UserError after `timeout` seconds."""
    import socket
    import time
    host, _, port = address.rpartition(":")
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return time.monotonic() - start
        except OSError as e:
            if time.monotonic() - start >= timeout:
                raise UserError(f"multi-host: the coordinator {address} (--coordinator) did not "
                                f"answer within --init-timeout {timeout} s ({e.strerror or e}); "
                                "start process 0 first and check the host and port") from None
            time.sleep(0.5)
