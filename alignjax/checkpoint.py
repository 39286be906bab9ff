"""Training checkpoints: everything needed to continue exactly, in one orbax CheckpointManager.

    WORKDIR/checkpoints/<step>/state   params, optimizer state, step, RNG (sharded arrays)
                              /data    the grain iterator's position (one file per process)
                              /meta    resolved config, algorithm, state layout, ...
                              /host    an online algorithm's host state (KL controller, ...)

Resume is automatic: the trainer restores the latest step found in the workdir. A checkpoint that
does not restore (a file lost or cut short) while an older one does is moved aside, renamed
<step>.damaged-<time> (never deleted), and the older one is used; both are said on stderr.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import sys
import time
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp

from alignjax import fs
from alignjax.errors import UserError

def has_checkpoint(workdir: str) -> bool:
    """Whether a training run in `workdir` saved any step: only then do its config and tokenizer
    pin the next run (a run that failed before its first save pins nothing)."""
    return any(name.isdigit() for name in fs.listdir(fs.join(workdir, "checkpoints")))


def is_training_workdir(path: str) -> bool:
    """A training workdir: checkpoints/, or the config.json `alignjax train` writes (an HF
    config.json has no "algorithm" key)."""
    if fs.isdir(fs.join(path, "checkpoints")):
        return True
    try:
        return "algorithm" in json.loads(fs.read_text(fs.join(path, "config.json")))
    except (OSError, ValueError, TypeError):
        return False


class NoRestorableCheckpoint(UserError):
    pass


def _reason(e: BaseException) -> str:
    """The first line of an orbax/tensorstore error, short enough for one line of output."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:200]}"


def _drop_abandoned_reads(unraisable, previous=sys.unraisablehook):
    """sys.unraisablehook that drops the 'Exception ignored' reports of orbax array reads a
    failed restore abandoned (they are finalised whenever the garbage collector gets to them)."""
    if getattr(unraisable.object, "__name__", "") != "_read_array_index_and_device_put":
        previous(unraisable)


@contextlib.contextmanager
def _quiet_if_failing():
    """Runs a restore attempt with stderr captured: on success the capture is replayed, on failure
    it is dropped. A failed orbax restore leaves its other array reads running; they end in
    hundreds of lines of 'Event loop is closed' / 'Exception ignored in coroutine' noise, while
    the one line that matters is the reason we report ourselves."""
    captured, real_stderr = io.StringIO(), sys.stderr
    sys.stderr = captured
    try:
        yield
    except BaseException:
        # From here on, the abandoned reads' late reports ('Exception ignored', asyncio's 'Task
        # exception was never retrieved') are dropped too: the failure was reported already.
        sys.unraisablehook = _drop_abandoned_reads
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        gc.collect()
        time.sleep(0.2)  # let the I/O threads meet their closed event loop while captured
        raise
    else:
        real_stderr.write(captured.getvalue())
    finally:
        sys.stderr = real_stderr


# Orbax writes a replicated array "replica-parallel": each replica writes a slice, cut on device by
# an eager op that compiles once per shape and device. For small arrays that costs far more than
# the write (a 4-slot tiny PPO run: 7 of its 8 s of saving, 80 compiles). Arrays whose slice per
# replica would be under this size are written whole by one replica; big replicated arrays on a
# pod are still split.
REPLICA_PARALLEL_MIN_BYTES = 4 << 20


def _write_small_arrays_whole() -> None:
    from orbax.checkpoint._src.serialization.type_handler_registry import GLOBAL_TYPE_HANDLER_REGISTRY
    default = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(default, "_min_slice_bytes_for_replica_parallel", None) == REPLICA_PARALLEL_MIN_BYTES:
        return
    # ignore_warnings: orbax's override warning would also set up root logging on stderr, which
    # the quiet restore below could then no longer capture
    GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(default, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
        override=True, ignore_warnings=True)


class Checkpointer:
    def __init__(self, workdir: str, every: int, keep: int = 3, async_save: bool = True):
        _write_small_arrays_whole()
        self.directory = fs.join(workdir, "checkpoints")  # a local path or a URL (gs://...)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, every),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                               data=grain.checkpoint.CheckpointHandler(),
                               meta=ocp.JsonCheckpointHandler(),
                               host=ocp.JsonCheckpointHandler()))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore_newest(self, restore_fn: Callable[[int], Any]) -> tuple[Optional[int], Any]:
        """(step, restore_fn(step)) for the newest checkpoint that restores; (None, None) if there
        is none. A newer one that fails while an older one restores is damaged: it is moved
        aside and reported. If none restores, nothing is moved (the fault may not be the files)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        failed = []
        for step in steps:
            try:
                with _quiet_if_failing():
                    out = restore_fn(step)
            except Exception as e:  # orbax/tensorstore raise many types for a lost or cut file
                failed.append((step, _reason(e)))
                continue
            for bad, why in failed:
                aside = self._move_aside(bad)
                print(f"alignjax: checkpoint {bad} in {self.directory} does not restore ({why}); "
                      f"moved it to {aside} and used checkpoint {step}", file=sys.stderr, flush=True)
            if failed:
                self.manager.reload()
            return step, out
        if failed:
            raise NoRestorableCheckpoint(
                f"{self.directory}: no checkpoint restores (" + "; ".join(
                    f"step {s}: {why}" for s, why in failed) + "); nothing was moved. Use a new "
                "workdir, or move this checkpoints/ folder away to start from scratch")
        return None, None

    def _move_aside(self, step: int) -> str:
        src = fs.join(self.directory, str(step))
        dst = f"{src}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            fs.rename(src, dst)
        return dst

    def save(self, step: int, state: Any, data_iterator, meta: dict, force: bool = False,
             host: Optional[dict] = None) -> bool:
        """Saves if `step` is on the save interval (or `force`); asynchronous when configured.
        `data_iterator` may be None (a producer without one); `host`: extra JSON state."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if host is not None:
            items["host"] = ocp.args.JsonSave(host)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator, host: bool = False):
        """Restores the state into the shardings of `abstract_state` and the iterator in place:
        (state, meta), or (state, meta, host state) with `host`."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if host:
            items["host"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return (out["state"], out["meta"]) + ((out["host"],) if host else ())

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, abstract_params: Any, key=("params",)) -> Any:
        """Only one tree of a training checkpoint's state (for evaluation, export, init_from):
        `key` is its path, e.g. ("params", "policy") or ("frozen", "reference")."""
        key = (key,) if isinstance(key, str) else tuple(key)
        abstract = abstract_params
        for k in reversed(key):
            abstract = {k: abstract}
        path = fs.join(self.directory, str(step), "state")
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item=abstract, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
        for k in key:
            out = out[k]
        # orbax's partial restore hands back the placeholders of a path the checkpoint lacks
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(out)):
            raise KeyError(f"checkpoint {step} holds no state{''.join(f'[{k!r}]' for k in key)}")
        return out

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
