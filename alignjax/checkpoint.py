"""Training checkpoints: everything needed to continue exactly, in one orbax CheckpointManager.

    WORKDIR/checkpoints/<step>/state   params, optimizer state, step, RNG (sharded arrays)
                              /data    the grain iterator's position (one file per process)
                              /meta    resolved config, tokens seen, reward statistics, ...

Resume is automatic: the trainer restores the latest step found in the workdir.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


class Checkpointer:
    def __init__(self, workdir: str, every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, every),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                               data=grain.checkpoint.CheckpointHandler(),
                               meta=ocp.JsonCheckpointHandler()))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, meta: dict, force: bool = False) -> bool:
        """Saves if `step` is on the save interval (or `force`); asynchronous when configured."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict]:
        """Restores the state into the shardings of `abstract_state` and the iterator in place."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, abstract_params: Any, key: str = "params") -> Any:
        """Only the params (or another entry `key` of the state, e.g. "ref_params") of a training
        checkpoint (for evaluation, export, init_from)."""
        abstract = {key: abstract_params}
        path = os.path.join(self.directory, str(step), "state")
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item=abstract, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
        return out[key]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
