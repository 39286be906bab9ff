"""Named model slots: the models an algorithm runs, where each comes from, and which ones train.

SFT and reward training have one slot ("policy", an lm or scalar head); DPO adds a frozen
"reference"; PPO has "policy", "value", "reference" and "reward". A trainable slot lives in
state["params"][name] with its own optimizer (state["opt_state"][name]); a frozen slot that
training changes (TR-DPO's reference, `follows`) lives in state["frozen"][name]; every other
frozen slot is read once and passed to the step in the `frozen` dict.

Every distinct source path is read from disk once (`SlotLoader`): DPO's policy and reference come
from one read of `model.init_from`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import jax
import optax

from alignjax.model.config import ConfigError

HEADS = ("lm", "scalar")


@dataclasses.dataclass(frozen=True)
class Follow:
    """A frozen slot that moves toward a trainable one: every `every` updates,
    frozen <- alpha * slot + (1 - alpha) * frozen (TR-DPO; alpha = 1 copies)."""
    slot: str
    every: int
    alpha: float


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str
    head: str = "lm"                 # lm | scalar
    source: str = ""                 # a model path (alignjax dir, training workdir, HF dir); "" = random init
    trains: bool = True
    dtype: Optional[str] = None      # compute and param dtype; None = the configured model's
    zero_score_head: bool = False    # scalar slot read from an lm: new score head zero (value) vs random
    follows: Optional[Follow] = None  # frozen, but changed by training (held in state["frozen"])
    optimizer: str = "optimizer"     # config section of a trainable slot's optimizer
    source_key: str = "model.init_from"  # the config key that set `source` (for error messages)


def trainable(slots) -> list:
    return [s for s in slots if s.trains]


def followers(slots) -> list:
    return [s for s in slots if not s.trains and s.follows is not None]


def fixed(slots) -> list:
    """Frozen slots that never change: the step's `frozen` argument."""
    return [s for s in slots if not s.trains and s.follows is None]


def slot_module(model_config, slot: Slot):
    from alignjax.model.params import build_module
    cfg = model_config if slot.dtype is None else model_config.replace(
        dtype=slot.dtype, param_dtype=slot.dtype)
    return build_module(cfg, slot.head)


def slot_optimizer(config, slots, total_updates: int):
    """(one optimizer over {slot: params}, {slot: lr schedule}): each trainable slot has its own
    optax chain built from its config section (`Slot.optimizer`)."""
    from alignjax.train.optim import make_optimizer
    txs, schedules = {}, {}
    for s in trainable(slots):
        txs[s.name], schedules[s.name] = make_optimizer(config[s.optimizer], total_updates)
    return per_slot(txs), schedules


def per_slot(txs: dict) -> optax.GradientTransformation:
    """One optimizer per slot over a {slot: params} dict; the state is {slot: that slot's state}."""

    def init(params):
        return {k: tx.init(params[k]) for k, tx in txs.items()}

    def update(grads, state, params=None):
        out = {k: tx.update(grads[k], state[k], None if params is None else params[k])
               for k, tx in txs.items()}
        return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}

    out = _PerSlot(init, update)
    out.slots = txs  # state.state_shardings maps each slot's state to its params' shardings
    return out


class _PerSlot(optax.GradientTransformation):
    """An optax GradientTransformation that also carries {slot: its transformation}."""


class SlotLoader:
    """Reads each source path once and hands out every slot's params.

    `pending`: the slots that will be asked for. While another pending slot still needs a source,
    its read stays cached and the slot asked for gets a copy (a trainable slot's buffers are
    donated to the train step, so two slots never share them); the last one gets the read itself.
    Slots outside `pending` (e.g. a reference read only to precompute its log-probs) share the
    cache but do not count.
    """

    def __init__(self, config, run, pending):
        self.config, self.run = config, run
        self.pending = collections.Counter(s.source for s in pending if s.source)
        self.cache = {}

    def load(self, slot: Slot, module=None):
        module = module or slot_module(self.run.model_config, slot)
        if not slot.source:
            from alignjax.model.params import init_params
            return init_params(module, jax.random.PRNGKey(int(self.config.train.seed)),
                               self.run.mesh, self.run.rules)
        src = slot.source
        loaded = self.cache.pop(src, None) or self._read(slot)
        if self.pending[src] > 0:
            self.pending[src] -= 1
        keep = self.pending[src] > 0
        if keep:
            self.cache[src] = loaded
        return self._adapt(loaded, slot, module, copy=keep)

    def _read(self, slot: Slot):
        src = slot.source
        from alignjax.model.store import load_model
        from alignjax.train.setup import runtime_overrides
        loaded = load_model(src, self.run.mesh, self.run.rules, **runtime_overrides(self.config))
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        want = self.run.model_config
        # model.context_length may extend the stored context: it is not part of the weights
        if loaded.config.replace(**{k: getattr(want, k) for k in ids},
                                 dtype=want.dtype, param_dtype=want.param_dtype,
                                 max_position_embeddings=want.max_position_embeddings) != want:
            raise ConfigError(f"{slot.source_key}={src}: architecture differs from the "
                              "configured model")
        return loaded

    def _adapt(self, loaded, slot: Slot, module, copy: bool):
        params = loaded.params
        if loaded.head != slot.head:
            if slot.head != "scalar":
                raise ConfigError(f"{slot.source_key}={slot.source} holds a {loaded.head}-head model; "
                                  f"the {slot.name} model is a language model and cannot start from it")
            from alignjax.train.setup import with_new_score_head
            params = with_new_score_head(params, module, self.run.mesh, self.run.rules,
                                         int(self.config.train.seed), zero=slot.zero_score_head)
        return cast_params(params, module, self.run.mesh, self.run.rules, copy)


def cast_params(params, module, mesh, rules, copy: bool = False):
    """`params` in `module`'s param dtype on its shardings; a real copy when `copy` (a cast to
    the same dtype may hand back the same buffers)."""
    from alignjax.model.params import abstract_params
    abstract, shardings = abstract_params(module, mesh, rules)
    same = all(a.dtype == p.dtype for a, p in zip(jax.tree_util.tree_leaves(abstract),
                                                  jax.tree_util.tree_leaves(params)))
    if same:
        return jax.tree_util.tree_map(lambda x: x.copy(), params) if copy else params
    cast = jax.jit(lambda p: jax.tree_util.tree_map(lambda x, a: x.astype(a.dtype), p, abstract),
                   out_shardings=shardings)
    return cast(params)
