"""The one table of training algorithms, used by `alignjax train`, `alignjax compile` and config
validation.

An algorithm module (alignjax/train/<name>.py) defines `SPEC = AlgorithmSpec(...)`:

    settings(config) -> frozen dataclass       parsed and validated once (ConfigError names the key)
    slots(config, settings) -> [Slot]          the models the step sees (alignjax.train.slots);
                                               the first trainable slot is the exported model
    sums(config, settings, modules) -> (sums_fn, metrics_fn)   modules: {slot: flax module}
    abstract_batch(config, settings) -> {key: ShapeDtypeStruct}  one global update batch (compile)
    build(config, workdir, run, settings, modules, loader) -> loop.Algorithm
                                               data (or a rollout producer) around sums();
                                               `loader` (slots.SlotLoader) reads extra models
    finish(config, workdir, out) (optional)    after the last step (e.g. reward statistics)
    resident(config, settings) -> [Slot] (optional)  frozen models training keeps on the mesh
                                               outside the step (PPO's reward model); `alignjax
                                               compile` counts them

Modules are imported on first use, so listing names (validation, --help) imports no algorithm.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

from alignjax.model.config import ConfigError

# name -> module defining SPEC (add a line here to register an algorithm)
MODULES = {"sft": "alignjax.train.sft", "reward": "alignjax.train.reward", "dpo": "alignjax.train.dpo",
           "ppo": "alignjax.train.ppo", "grpo": "alignjax.train.grpo",
           "online_dpo": "alignjax.train.online_dpo"}


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    settings: Callable[[Any], Any]
    slots: Callable[[Any, Any], list]
    sums: Callable[[Any, Any, dict], tuple]
    abstract_batch: Callable[[Any, Any], dict]
    build: Callable[..., Any]
    finish: Optional[Callable[[Any, str, dict], None]] = None
    resident: Optional[Callable[[Any, Any], list]] = None


def names() -> tuple:
    return tuple(MODULES)


def get(name: str) -> AlgorithmSpec:
    if name not in MODULES:
        raise ConfigError(f"algorithm={name!r}: use one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).SPEC


def no_settings(config):
    return None


def validate_config(config, num_devices: int):
    """Schema checks shared by every algorithm (alignjax.config), then the algorithm's own
    settings; returns those settings."""
    from alignjax.config import validate_schema
    validate_schema(config, num_devices, names())
    return get(config.algorithm).settings(config)
