#!/usr/bin/env bash
# Cloud TPU VMs for alignjax through gcloud: create a pod, ship this tree to every worker, install,
# run the same command on all workers, watch it, stop it, delete the pod.
#
#   launch/tpu.sh VERB --name NAME --zone ZONE [flags] [-- COMMAND ...]
#
# --dry-run prints every command (one per line, quoted exactly as it would run) instead of running
# it; tests/test_launch.py checks the scripts that way. Run `launch/tpu.sh help` for the verbs.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu.sh VERB --name NAME --zone ZONE [flags] [-- COMMAND ...]

verbs:
  create    queued resource (default) or, with --direct, a plain TPU VM; on-demand unless --spot
            or --reserved; needs --accelerator-type (v4-N, v5litepod-N (v5e-N), v5p-N, v6e-N)
  list      queued resources and TPU VMs in --zone (--name not needed)
  delete    the queued resource with its TPU VM (--direct: the TPU VM)
  copy      this working tree to every worker (without .venv, runs, .git) into ~/alignjax
  setup     pip install -e '.[tpu]' on every worker, the JAX stack pinned to this host's versions
  run       -- COMMAND ...: the same command on every worker, detached, one log per worker in
            ~/alignjax/logs/JOB.<hostname>.log; --restart retries it (preemption-safe)
  sweep     --sweep FILE --workdir DIR: the sweep's runs one after another on the pod, or spread
            round-robin over several pods with --name a,b,c
  logs      the last --lines lines of every worker's log of --job
  check     per worker: is the job running, finished (with its exit code) or stopped, and which
            processes hold the TPU
  ssh       a shell (or -- COMMAND) on --worker (default 0)
  stop      SIGTERM the job (it checkpoints and exits 143), then kill -9 whatever still holds
            /dev/accel* or /dev/vfio/* so the next run can start
  supervise -- COMMAND ...: keep COMMAND running on a queued resource through preemptions, from
            this machine (run it under tmux or nohup). Every --poll seconds it reads the queued
            resource's state: ACTIVE and the job not started: copy, setup, run --restart; the
            job finished: exit with its exit code; SUSPENDED, FAILED or gone (a preempted spot
            pod): delete it and create it again (the create flags), at most --max-recreations
            times; any other state: wait. Training resumes from the workdir's last checkpoint.

flags:
  --name NAME               TPU / queued-resource name (sweep: comma-separated names)
  --zone ZONE               e.g. us-east5-a
  --project PROJECT         default: gcloud's configured project
  --accelerator-type TYPE   create: e.g. v5p-64
  --runtime-version V       create: default by generation (v4: tpu-ubuntu2204-base,
                            v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot | --reserved       create: capacity type (default on-demand)
  --direct                  create/delete/check a TPU VM without a queued resource
  --job NAME                run/logs/check/stop: job name for logs and pid files (default: run)
  --restart                 run/sweep: restart the command (sweep: each run) when it exits
                            non-zero (143 after SIGTERM included), except 2 (a usage error)
                            and 130 (interrupted)
  --max-restarts N          default 20
  --restart-delay S         seconds between restarts (default 10)
  --poll S                  supervise: seconds between state checks (default 60)
  --max-recreations N       supervise: default 10
  --sweep FILE --workdir DIR   sweep
  --worker W                ssh: worker index (default 0)
  --lines N                 logs: default 40
  --dry-run                 print the commands instead of running them
EOF
}

die() { echo "launch/tpu.sh: error: $*" >&2; exit 2; }

# Quote one word for a POSIX shell: bare when safe, else single quotes ('\'' inside).
shq() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

shjoin() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(shq "$w")"; done
  printf '%s' "$out"
}

# Runs a command, or prints it with --dry-run.
x() {
  if [[ $DRY_RUN == 1 ]]; then
    shjoin "$@"; echo
  else
    "$@"
  fi
}

# The accelerator types Cloud TPU offers (TensorCores for v4/v5p, chips for v5e/v6e).
check_accelerator() {
  local t=$1 n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || n=0
  case $t in
    v4-*) (( n >= 8 && n <= 4096 && n % 8 == 0 )) && return ;;
    v5p-*) (( n >= 8 && n <= 12288 && n % 8 == 0 )) && return ;;
    v5litepod-*|v6e-*) [[ " 1 4 8 16 32 64 128 256 " == *" $n "* ]] && return ;;
  esac
  die "--accelerator-type $t: unknown Cloud TPU type; use v4-N or v5p-N (N TensorCores, a" \
      "multiple of 8), v5litepod-N / v5e-N or v6e-N (N in 1 4 8 16 32 64 128 256)"
}

default_runtime() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

REMOTE_DIR=alignjax            # relative to the remote home directory
NAME="" ZONE="" PROJECT="" ACCEL="" RUNTIME="" CAPACITY="" DIRECT=0 JOB=run RESTART=0
MAX_RESTARTS=20 RESTART_DELAY=10 SWEEP="" WORKDIR="" WORKER=0 LINES=40 DRY_RUN=0
POLL=60 MAX_RECREATIONS=10
CMD=()

VERB=${1:-}
[[ -n $VERB ]] || { usage >&2; die "give a verb (create, list, delete, copy, setup, run, sweep, logs, check, ssh, stop, supervise)"; }
shift
case $VERB in
  help|-h|--help) usage; exit 0 ;;
  create|list|delete|copy|setup|run|sweep|logs|check|ssh|stop|supervise) ;;
  *) die "unknown verb '$VERB'; use create, list, delete, copy, setup, run, sweep, logs, check, ssh, stop or supervise" ;;
esac

need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --spot|--reserved)
      [[ -z $CAPACITY || $CAPACITY == "${1#--}" ]] || die "give one of --spot and --reserved"
      CAPACITY=${1#--}; shift ;;
    --direct) DIRECT=1; shift ;;
    --job) need_value "$@"; JOB=$2; shift 2 ;;
    --restart) RESTART=1; shift ;;
    --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --restart-delay) need_value "$@"; RESTART_DELAY=$2; shift 2 ;;
    --sweep) need_value "$@"; SWEEP=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    --poll) need_value "$@"; POLL=$2; shift 2 ;;
    --max-recreations) need_value "$@"; MAX_RECREATIONS=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; CMD=("$@"); break ;;
    *) die "$VERB: unknown argument '$1' (put the command to run after --)" ;;
  esac
done

[[ -n $ZONE ]] || die "$VERB: --zone is required (e.g. --zone us-east5-a)"
NAME_RE='^[a-z]([-a-z0-9]*[a-z0-9])?$'
if [[ $VERB == sweep ]]; then
  [[ -n $NAME ]] || die "sweep: --name is required (one pod, or several as --name a,b,c)"
  IFS=, read -r -a NAMES <<< "$NAME"
else
  [[ $VERB == list || -n $NAME ]] || die "$VERB: --name is required (the TPU / queued-resource name)"
  NAMES=("$NAME")
fi
for n in "${NAMES[@]}"; do
  [[ $VERB == list && -z $n ]] || [[ $n =~ $NAME_RE ]] \
    || die "--name '$n': use lowercase letters, digits and '-', starting with a letter"
done
[[ $JOB =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job '$JOB': use letters, digits, '_', '.', '-'"
for v in MAX_RESTARTS RESTART_DELAY WORKER LINES POLL MAX_RECREATIONS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "--$(tr '_A-Z' '-a-z' <<< "$v") '${!v}': give a non-negative integer"
done
if [[ ${#CMD[@]} -gt 0 && $VERB != run && $VERB != ssh && $VERB != supervise ]]; then
  die "$VERB takes no command after --"
fi
if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found; install the Google Cloud CLI (or use --dry-run)"
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GLOBAL=(--zone="$ZONE")
[[ -z $PROJECT ]] || GLOBAL+=(--project="$PROJECT")
QR=(gcloud compute tpus queued-resources)
VM=(gcloud compute tpus tpu-vm)

# ssh NAME COMMAND: one shell command line on every worker of a pod.
on_all() { x "${VM[@]}" ssh "$1" "${GLOBAL[@]}" --worker=all --command "$2"; }

# With --restart, COMMAND-LINE inside a retry loop: a preempted or crashed run resumes from its
# workdir's latest checkpoint when started again; 0, 2 (usage error) and 130 (Ctrl-C) end it.
retried() {
  if [[ $RESTART == 0 ]]; then printf '%s' "$1; rc=\$?"; return; fi
  printf '%s' "n=0; while true; do $1; rc=\$?; if [ \$rc -eq 0 ] || [ \$rc -eq 2 ] ||"
  printf '%s' " [ \$rc -eq 130 ] || [ \$n -ge $MAX_RESTARTS ]; then break; fi; n=\$((n+1));"
  printf '%s' " echo \"launch: exit \$rc, restart \$n/$MAX_RESTARTS in $RESTART_DELAY s\"; sleep $RESTART_DELAY; done"
}

# The shell line that starts BODY (ending with its exit code in $rc) detached on a worker: its own
# session (so `stop` can signal the whole group), output in logs/JOB.<hostname>.log, pid in
# logs/JOB.pid, and the exit code in logs/JOB.exit when it ends (what `supervise` waits for).
detached() {
  local body="export PATH=\"\$HOME/.local/bin:\$PATH\"; $1; echo \$rc > logs/$JOB.exit"
  printf '%s' "cd $REMOTE_DIR && mkdir -p logs && rm -f logs/$JOB.exit && { setsid nohup bash -c $(shq "$body") > logs/$JOB.\$(hostname).log 2>&1 < /dev/null & echo \$! > logs/$JOB.pid; }"
}

create_pod() {
  [[ -n $ACCEL ]] || die "$VERB: --accelerator-type is required (e.g. v5p-64)"
  [[ $ACCEL == v5e-* ]] && ACCEL=v5litepod-${ACCEL#v5e-}
  check_accelerator "$ACCEL"
  RUNTIME=${RUNTIME:-$(default_runtime "$ACCEL")}
  local cap=(); [[ -z $CAPACITY ]] || cap=(--"$CAPACITY")
  if [[ $DIRECT == 1 ]]; then
    x "${VM[@]}" create "$NAME" "${GLOBAL[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME" "${cap[@]}"
  else
    x "${QR[@]}" create "$NAME" "${GLOBAL[@]}" --node-id="$NAME" --accelerator-type="$ACCEL" \
      --runtime-version="$RUNTIME" "${cap[@]}"
  fi
}

delete_pod() {
  if [[ $DIRECT == 1 ]]; then
    x "${VM[@]}" delete "$NAME" "${GLOBAL[@]}" --quiet
  else
    x "${QR[@]}" delete "$NAME" "${GLOBAL[@]}" --force --quiet
  fi
}

copy_tree() {
  local tarball=${TMPDIR:-/tmp}/alignjax-src.tar.gz
  x tar --exclude=./.venv --exclude=./runs --exclude=./.git --exclude=__pycache__ \
    --exclude='*.egg-info' -czf "$tarball" -C "$ROOT" . || return
  x "${VM[@]}" scp "$tarball" "$NAME:/tmp/alignjax-src.tar.gz" "${GLOBAL[@]}" --worker=all || return
  on_all "$NAME" "mkdir -p $REMOTE_DIR && tar -xzf /tmp/alignjax-src.tar.gz -C $REMOTE_DIR"
}

setup_workers() {
  # The JAX stack at the versions this host runs (and tests) with; jax[tpu] then brings the
  # matching libtpu. Other dependencies follow pyproject.toml's ranges.
  local py=${ALIGNJAX_PYTHON:-$ROOT/.venv/bin/python} pins pin_words
  [[ -x $py ]] || py=python3
  pins=$("$py" - <<'EOF'
import importlib.metadata as m
out = []
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
    try:
        out.append(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
print(" ".join(out))
EOF
) || die "setup: could not read the installed versions with $py"
  [[ $pins == *jax==* ]] || die "setup: jax is not installed for $py (set ALIGNJAX_PYTHON)"
  read -r -a pin_words <<< "$pins"
  on_all "$NAME" "cd $REMOTE_DIR && python3 -m pip install --upgrade pip && python3 -m pip install -e '.[tpu]' $(shjoin "${pin_words[@]}")"
}

qr_state() { x "${QR[@]}" describe "$NAME" "${GLOBAL[@]}" --format='value(state.state)'; }

# Worker 0's view of the job: exit:N (finished with N), running, or none (never started here).
job_status() {
  x "${VM[@]}" ssh "$NAME" "${GLOBAL[@]}" --worker=0 --command "cd $REMOTE_DIR 2>/dev/null && if [ -f logs/$JOB.exit ]; then echo exit:\$(cat logs/$JOB.exit); elif p=\$(cat logs/$JOB.pid 2>/dev/null) && kill -0 \"\$p\" 2>/dev/null; then echo running; else echo none; fi || echo none"
}

case $VERB in
  create)
    create_pod
    ;;
  list)
    x "${QR[@]}" list "${GLOBAL[@]}"
    x "${VM[@]}" list "${GLOBAL[@]}"
    ;;
  delete)
    delete_pod
    ;;
  copy)
    copy_tree
    ;;
  setup)
    setup_workers
    ;;
  run)
    [[ ${#CMD[@]} -gt 0 ]] || die "run: give the command after --, e.g. -- alignjax train --config configs/sft.py:tiny --workdir runs/sft"
    on_all "$NAME" "$(detached "$(retried "$(shjoin "${CMD[@]}")")")"
    ;;
  sweep)
    [[ -n $SWEEP && -n $WORKDIR ]] || die "sweep: --sweep FILE and --workdir DIR are required"
    py=${ALIGNJAX_PYTHON:-$ROOT/.venv/bin/python}
    [[ -x $py ]] || py=python3
    listing=$(cd "$ROOT" && "$py" -m alignjax.cli sweep --sweep "$SWEEP" --workdir "$WORKDIR" \
      --print-commands) || die "sweep: could not expand $SWEEP (the error is above)"
    mapfile -t runs <<< "$listing"
    [[ ${#runs[@]} -gt 0 ]] || die "sweep: $SWEEP expands to no runs"
    # Round-robin: pod i gets runs i, i+P, i+2P, ...; each pod runs its share one after another
    # (a failed run does not stop the next one; with --restart each run has its own retry loop).
    for i in "${!NAMES[@]}"; do
      share=""
      for ((j = i; j < ${#runs[@]}; j += ${#NAMES[@]})); do
        share+="${share:+ ; }$(retried "${runs[j]}")"
      done  # (logs/JOB.exit holds the last run's exit code)
      [[ -z $share ]] || on_all "${NAMES[i]}" "$(detached "$share")"
    done
    ;;
  logs)
    on_all "$NAME" "echo \"== \$(hostname)\"; tail -n $LINES $REMOTE_DIR/logs/$JOB.\$(hostname).log"
    ;;
  check)
    if [[ $DIRECT == 1 ]]; then
      x "${VM[@]}" describe "$NAME" "${GLOBAL[@]}" --format='value(state)'
    else
      qr_state
    fi
    on_all "$NAME" "p=\$(cat $REMOTE_DIR/logs/$JOB.pid 2>/dev/null); if [ -f $REMOTE_DIR/logs/$JOB.exit ]; then s=\"finished (exit \$(cat $REMOTE_DIR/logs/$JOB.exit))\"; elif [ -n \"\$p\" ] && kill -0 \"\$p\" 2>/dev/null; then s=running; else s=stopped; fi; echo \"\$(hostname): $JOB \$s; TPU held by: \$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | tr '\\n' ' ')\""
    ;;
  ssh)
    if [[ ${#CMD[@]} -gt 0 ]]; then
      x "${VM[@]}" ssh "$NAME" "${GLOBAL[@]}" --worker="$WORKER" --command "$(shjoin "${CMD[@]}")"
    else
      x "${VM[@]}" ssh "$NAME" "${GLOBAL[@]}" --worker="$WORKER"
    fi
    ;;
  stop)
    # SIGTERM first: the training loop saves a checkpoint and exits 143 (up to 120 s).
    on_all "$NAME" "for f in $REMOTE_DIR/logs/*.pid; do [ -f \"\$f\" ] || continue; p=\$(cat \"\$f\"); kill -TERM -- -\"\$p\" 2>/dev/null; for i in \$(seq 120); do kill -0 -- -\"\$p\" 2>/dev/null || break; sleep 1; done; rm -f \"\$f\"; done; pids=\$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u); if [ -n \"\$pids\" ]; then sudo kill -9 \$pids; fi; echo \"\$(hostname): TPU free\""
    ;;
  supervise)
    [[ ${#CMD[@]} -gt 0 ]] || die "supervise: give the command after --, e.g. -- alignjax train --config configs/sft.py:llama3_8b --workdir runs/sft8b"
    [[ $DIRECT == 0 ]] || die "supervise: needs a queued resource (drop --direct)"
    [[ -n $ACCEL ]] || die "supervise: --accelerator-type is required (to create the pod again after a preemption)"
    RESTART=1  # a preempted or crashed process restarts on the same VM; a lost VM is created again
    job=$(detached "$(retried "$(shjoin "${CMD[@]}")")")
    if [[ $DRY_RUN == 1 ]]; then  # one pass of what a preemption costs: the commands, in order
      qr_state; job_status; delete_pod; create_pod; copy_tree; setup_workers; on_all "$NAME" "$job"
      exit 0
    fi
    # A failing gcloud call (network, quota, a pod still being deleted) is reported and tried
    # again at the next poll; only a missing or broken setting (exit 2) ends the supervisor.
    recreated=0
    while true; do
      if out=$(qr_state 2>&1); then
        state=${out##*$'\n'}
      elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then
        state=GONE
      else
        state=UNKNOWN; echo "launch: $NAME: describe failed: ${out##*$'\n'}"
      fi
      case $state in
        ACTIVE)
          status=$(job_status 2>/dev/null) || status=""
          case $status in
            exit:*) echo "launch: $NAME: job $JOB finished with exit ${status#exit:}"; exit "${status#exit:}" ;;
            none)
              echo "launch: $NAME is ACTIVE: copy, setup, start job $JOB"
              { copy_tree && setup_workers && on_all "$NAME" "$job"; } \
                || echo "launch: $NAME: starting the job failed; trying again in $POLL s" ;;
            *) ;;  # running, or the workers did not answer: look again later
          esac ;;
        SUSPENDED|FAILED|GONE)
          (( recreated < MAX_RECREATIONS )) \
            || die "supervise: $NAME is $state after $recreated recreations (--max-recreations)"
          recreated=$((recreated + 1))
          echo "launch: $NAME is $state: creating it again ($recreated/$MAX_RECREATIONS)"
          { if [[ $state != GONE ]]; then delete_pod; fi && create_pod; } \
            || echo "launch: $NAME: recreating failed; trying again in $POLL s" ;;
        *) ;;  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, CREATING, SUSPENDING, DELETING, ...
      esac
      sleep "$POLL"
    done
    ;;
esac
