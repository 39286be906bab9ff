"""Config files, command-line overrides, saved configs, validation and sweeps.

Config files (``configs/*.py``) define ``get_config(preset: str | None = None) -> ConfigDict`` and
``PRESETS = (...)``; a spec selects one: ``configs/sft.py`` (the file's default preset) or
``configs/sft.py:tiny``. Relative paths are tried from the working directory, then from the
repository root, so ``configs/...`` works from anywhere in a checkout.

Overrides follow ml_collections.config_flags: ``--config.optimizer.lr=2e-5`` (``config.x=y`` and
``x=y`` work too). A value is cast to the type of the field it replaces: int (``"2e-5"`` for an int
field is an error), float (``"3"`` -> 3.0), bool (true/false/1/0), str (verbatim), tuple/list/dict
via ``ast.literal_eval``. A field that is None takes ``literal_eval(value)``, or the string
when that fails. Unknown keys are errors that suggest the closest existing keys. The loaded
config is locked, so a typo in code (``config.optimizer.lrr``) fails as well. Top-level sections
cannot be replaced whole (that would silently drop their other keys); nested dict values can.

Validation (``validate_schema``: the keys every algorithm shares; each algorithm's own settings are
checked by ``alignjax.train.registry.validate_config``) runs before anything compiles and reports
every problem at once, each naming its config key. Resuming: ``check_resume_config(load_saved_config(workdir),
config)`` refuses a changed architecture and returns the other changes for a warning.

Sweep files (``configs/sweeps/*.py``) define either the grid sugar::

    SWEEP = {"base": "configs/sft.py:tiny",
             "grid": {"optimizer.lr": [1e-4, 3e-4], "train.seed": [0, 1]},   # cartesian product
             "fixed": {"train.steps": 100}}                                   # optional, every run

or an explicit list::

    BASE = "configs/sft.py:tiny"
    def get_sweep() -> list[dict]:
        return [{"name": "fast", "optimizer.lr": 1e-3}, {"optimizer.lr": 1e-4}]

``expand_sweep(path)`` returns ``(base_spec, [(name, overrides), ...])``. A run's name (its workdir
subfolder) is the dict's ``"name"`` or ``key=value`` pairs joined by commas, e.g.
``optimizer.lr=0.0003,train.seed=1``; grid order is ``itertools.product`` over the keys as written.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
from typing import Any, Sequence

import ml_collections

from alignjax import fs
from alignjax.data.formatting import FORMATS, PACKINGS, TRUNCATIONS
from alignjax.errors import UserError
from alignjax.model.config import LAYER_LOOPS, REMAT_POLICIES, SUPPORTED_ROPE_TYPES, ConfigError

ConfigDict = ml_collections.ConfigDict

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")
# The model.* fields that define a Llama architecture (a model built from the config).
ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
             "rope_theta", "rope_scaling", "tie_word_embeddings", "rms_norm_eps")
# Keys whose change makes a checkpoint unusable (shapes or semantics of the weights); the
# context length may change on resume.
ARCHITECTURE_KEYS = ("algorithm",) + tuple(f"model.{k}" for k in ARCH_KEYS
                                          if k != "max_position_embeddings")


class _Missing:
    def __repr__(self):
        return "<missing>"


MISSING = _Missing()  # config_diff's value for a key one side lacks


# ---- loading -----------------------------------------------------------------------------------

def _load_module(path: str, what: str):
    in_repo = os.path.join(_REPO_ROOT, path)
    if not os.path.exists(path) and os.path.exists(in_repo):  # relative to the checkout too
        path = in_repo
    example = "configs/sft.py:tiny" if what == "config" else "configs/sweeps/sft_lr.py"
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".py"))
        raise ConfigError(f"{what} {path!r} is a directory; give a file in it, e.g. {example}"
                          + (f" (there: {', '.join(found)})" if found else ""))
    if not os.path.isfile(path):
        where = dict.fromkeys([os.getcwd(), _REPO_ROOT])  # once each, in order
        raise ConfigError(f"{what} file {path!r} not found (looked in {' and '.join(where)})")
    if not path.endswith(".py"):
        raise ConfigError(f"{what} {path!r} is not a Python config file (.py); use e.g. {example}")
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    spec = importlib.util.spec_from_file_location(f"_alignjax_cfg_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # a file path, not a package import: configs/ is no package
    except SyntaxError as e:
        raise ConfigError(f"{e.filename or path}:{e.lineno}: syntax error in the {what} file: "
                          f"{e.msg}") from None
    except Exception as e:  # an error while running the file: point at its line
        raise ConfigError(f"{_where_in(path, e)}: error in the {what} file: "
                          f"{type(e).__name__}: {e}") from None
    return module


def _where_in(path: str, e: BaseException) -> str:
    """``path:line`` of the innermost traceback frame inside ``path`` (just ``path`` if none)."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{path}:{line}" if line else path


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"file.py:preset"`` -> ("file.py", "preset"); no preset -> None (the file's default)."""
    path, sep, preset = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path, preset or None
    return spec, None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads ``file.py[:preset]``, applies command-line style overrides, returns it locked."""
    path, preset = split_spec(spec)
    module = _load_module(path, "config")
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{path}: defines no get_config(preset=None); a config file must")
    presets = tuple(getattr(module, "PRESETS", ()))
    if preset is not None and presets and preset not in presets:
        raise ConfigError(f"{path}: unknown preset {preset!r}; valid presets: {', '.join(presets)}")
    try:
        config = get_config(preset)
    except ConfigError:
        raise
    except Exception as e:  # the file's own code failed: point at its line
        raise ConfigError(f"{_where_in(module.__file__, e)}: get_config({preset!r}) failed: "
                          f"{type(e).__name__}: {e}") from None
    if isinstance(config, dict):
        config = ConfigDict(config)
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
    apply_overrides(config, overrides)
    config.lock()
    return config


# ---- overrides ---------------------------------------------------------------------------------

def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. --config.optimizer.lr=2e-5")
    key = key.strip()
    for prefix in ("--config.", "config.", "--"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return key, value


def flatten(tree: Any, prefix: str = "") -> dict:
    """Nested dicts/ConfigDicts -> {dotted.key: leaf}; an empty dict is a leaf."""
    if isinstance(tree, (dict, ConfigDict)) and len(tree):
        out = {}
        for k in tree.keys():
            out.update(flatten(tree[k], f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _suggest(key: str, config: ConfigDict) -> str:
    keys = list(flatten(config))
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    close += [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=2, cutoff=0.7)]
    close = list(dict.fromkeys(close))[:3]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def parse_value(key: str, text: str, current: Any) -> Any:
    """Casts the override string to the type of the field's current value (config_flags rules)."""
    bad = f"--config.{key}={text!r}: expected {{}} (the field holds {current!r})"
    if isinstance(current, bool):
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0"):
            raise ConfigError(bad.format("true/false/1/0"))
        return low in ("true", "1")
    if isinstance(current, (int, float)):
        try:  # int("2e-5") fails on purpose: a step count given as a float is a mistake
            return type(current)(text)
        except ValueError:
            want = "an integer" if isinstance(current, int) else "a number"
            raise ConfigError(bad.format(want)) from None
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        if current is None:
            return text  # a None field takes a literal when it parses, else the string
        raise ConfigError(bad.format(f"a Python literal ({e})")) from None
    if current is None or value is None:
        return value
    if isinstance(current, (tuple, list)):
        return type(current)(value if isinstance(value, (tuple, list)) else (value,))
    if isinstance(current, (dict, ConfigDict)) and not isinstance(value, dict):
        raise ConfigError(bad.format("a dict literal"))
    return value


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Sets each ``key=value`` on ``config`` in place; unknown keys and bad values raise."""
    for item in overrides:
        key, text = _split_override(item)
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ConfigDict) else None
        if not isinstance(node, ConfigDict) or leaf not in node:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, config)}")
        current = node[leaf]
        if isinstance(current, ConfigDict) and not parents:
            raise ConfigError(f"{key!r} is a config section; set its fields, e.g. "
                              f"--config.{key}.{next(iter(current.keys()), 'field')}=...")
        try:
            node[leaf] = parse_value(key, text, current)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"--config.{key}={text!r}: {e}") from None
    return config


# ---- saved configs and resume ------------------------------------------------------------------

def save_config(config: ConfigDict, workdir: str) -> str:
    """Writes ``workdir/config.json`` (atomically) and returns its path."""
    path = fs.join(workdir, "config.json")
    fs.write_text(path, config.to_json_best_effort(indent=2, sort_keys=False) + "\n")
    return path


def load_saved_config(workdir: str) -> ConfigDict:
    """The config a run in ``workdir`` was started with (lists where the original had tuples)."""
    path = fs.join(workdir, "config.json")
    if not fs.exists(path):
        raise ConfigError(f"{workdir}: no config.json; is this an alignjax workdir?")
    config = ConfigDict(json.loads(fs.read_text(path)))
    config.lock()
    return config


def _plain(config: Any) -> dict:
    # JSON round trip: tuples and lists compare equal, references resolve, as in config.json.
    if isinstance(config, ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def config_diff(a: Any, b: Any) -> dict:
    """{dotted key: (value in a, value in b)} for keys that differ; MISSING where one lacks it."""
    fa, fb = flatten(_plain(a)), flatten(_plain(b))
    return {k: (fa.get(k, MISSING), fb.get(k, MISSING))
            for k in sorted(set(fa) | set(fb)) if fa.get(k, MISSING) != fb.get(k, MISSING)}


def check_resume_config(saved: Any, current: Any) -> dict:
    """Refuses a resume that changes the architecture; returns the other changes (to warn about)."""
    diff = config_diff(saved, current)
    arch = {k: v for k, v in diff.items()
            if any(k == a or k.startswith(a + ".") for a in ARCHITECTURE_KEYS)}
    if arch:
        lines = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in arch.items())
        raise ConfigError(f"cannot resume: the workdir's checkpoint was trained with a different "
                          f"architecture ({lines}). Use a new workdir or restore those values.")
    return diff


# ---- validation --------------------------------------------------------------------------------

def _get(config: ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(low: int):
    return lambda v: _is_int(v) and v >= low, f"must be an integer >= {low}"


def _one_of(*choices):
    return lambda v: v in choices, f"use one of {', '.join(choices)}"


_BOOL = (lambda v: isinstance(v, bool), "must be True or False")
_POSITIVE = (lambda v: _is_num(v) and v > 0, "must be a number > 0")
_NON_NEGATIVE = (lambda v: _is_num(v) and v >= 0, "must be a number >= 0")
_BETA = (lambda v: _is_num(v) and 0 <= v < 1, "must be in [0, 1)")
# key -> (predicate, what to do); checked for every config (every algorithm starts from sft.py).
_CHECKS = {
    "model.dtype": _one_of(*DTYPES), "model.param_dtype": _one_of(*DTYPES),
    "model.remat_policy": _one_of(*REMAT_POLICIES), "model.attention_impl": _one_of("xla", "flash"),
    "model.layer_loop": _one_of(*LAYER_LOOPS),
    # a string, or a list of sources (alignjax.data.mixture: "a.jsonl:0.7", {"path": ..., ...})
    "data.train": (lambda v: (isinstance(v, str) and v.strip() != "")
                   or (isinstance(v, (list, tuple)) and len(v) > 0),
                   "name at least one source (.jsonl, .parquet, dataset dir, hf://name or toy)"),
    "data.eval": (lambda v: isinstance(v, (str, list, tuple)),
                  "must be a string or a list of sources ('' = no eval data)"),
    "data.format": _one_of(*FORMATS), "data.packing": _one_of(*PACKINGS),
    "data.truncation": _one_of(*TRUNCATIONS), "data.completion_only_loss": _BOOL,
    "data.seq_len": _int(1), "data.shuffle_seed": _int(0), "data.skip_invalid": _BOOL,
    "data.prefetch_batches": _int(0), "data.cache_mb": _int(0), "data.read_threads": _int(1),
    "data.prefetch": _int(0), "data.worker_count": _int(0), "data.pack_bins": _int(0),
    "data.check_overlap": _BOOL,
    "tokenizer.vocab_size": _int(1),
    "optimizer.lr": (_POSITIVE[0], "must be > 0 (e.g. 2e-5 for SFT of a pretrained model)"),
    "optimizer.b1": _BETA, "optimizer.b2": _BETA, "optimizer.eps": _POSITIVE,
    "optimizer.weight_decay": _NON_NEGATIVE, "optimizer.schedule": _one_of(*SCHEDULES),
    "optimizer.warmup_steps": _int(0),
    "optimizer.min_lr_ratio": (lambda v: _is_num(v) and 0 <= v <= 1,
                               "must be in [0, 1] (final lr = lr * min_lr_ratio)"),
    "optimizer.grad_clip": (_NON_NEGATIVE[0], "must be >= 0 (0 disables clipping)"),
    "train.steps": _int(1), "train.batch_size": _int(1), "train.grad_accum_steps": _int(1),
    "train.seed": _int(0), "train.log_every": _int(1), "train.eval_every": _int(0),
    "train.eval_batches": _int(0), "train.nan_guard": _BOOL, "train.eval_on_start": _BOOL,
    "checkpoint.every": _int(1), "checkpoint.keep": _int(1), "checkpoint.async_save": _BOOL,
}
# Preference data built from rated responses (configs/dpo.py, configs/reward.py; the names are
# alignjax.data.ratings.RULES): checked when the config has them.
_RATINGS_CHECKS = {
    "data.from_ratings": (
        lambda v: v in ("", "best_vs_worst", "best_vs_random", "all_pairs", "ranked"),
        "use '' (off), best_vs_worst, best_vs_random, all_pairs or ranked"),
    "data.min_margin": _NON_NEGATIVE, "data.rating_seed": _int(0),
    "data.rating_key": (lambda v: isinstance(v, str),
                        "must be a string ('' = overall_score / score)"),
    "data.rating_margin_scale": (_NON_NEGATIVE[0], "must be >= 0 (0 = pairs carry no margin)"),
}
# Checked only when the model is built from the config (model.init_from == "").
_ARCH_CHECKS = {
    **{f"model.{k}": _int(1) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
    "model.head_dim": (lambda v: v is None or (_is_int(v) and v > 0),
                       "use None (= hidden_size / num_attention_heads) or a positive integer"),
    "model.rope_theta": _POSITIVE, "model.rms_norm_eps": _POSITIVE,
    "model.tie_word_embeddings": _BOOL,
    "model.rope_scaling": (lambda v: v is None or (isinstance(v, (dict, ConfigDict)) and v.get(
        "rope_type", "default") in SUPPORTED_ROPE_TYPES),
        f"use None or a dict with rope_type in {SUPPORTED_ROPE_TYPES}"),
}


def _table_errors(config: ConfigDict, table: dict) -> list:
    errs = []
    for key, (ok, want) in table.items():
        value = _get(config, key)
        if value is MISSING:
            errs.append(f"{key}: missing from the config; add it (see configs/sft.py)")
        elif not ok(value):
            errs.append(f"{key}={value!r}: {want}")
    return errs


def _mesh(config: ConfigDict, num_devices: int) -> tuple[dict | None, list]:
    from alignjax.sharding import DCN_AXES, MESH_AXES, mesh_shape  # imports jax: only when validating

    sizes = {a: _get(config, f"mesh.{a}") for a in MESH_AXES}
    bad = [f"mesh.{a}={v!r}: must be a positive integer or -1 (the rest of the devices)"
           for a, v in sizes.items() if not (_is_int(v) and (v >= 1 or v == -1))]
    dcn = {a: _get(config, f"mesh.{a}") for a in DCN_AXES}
    dcn = {a: 1 if v is MISSING else v for a, v in dcn.items()}  # configs saved before multislice
    bad += [f"mesh.{a}={v!r}: must be a positive integer (a number of slices)"
            for a, v in dcn.items() if not (_is_int(v) and v >= 1)]
    sizes.update(dcn)
    if bad:
        return None, bad
    try:
        return mesh_shape(sizes, num_devices), []
    except UserError as e:  # ShardingError: its message names the mesh.* keys
        return None, [str(e)]


def _model_errors(config: ConfigDict, mesh: dict | None) -> list:
    m = config.model
    heads, kv, hidden = m.num_attention_heads, m.num_key_value_heads, m.hidden_size
    errs = []
    if heads % kv:
        errs.append(f"model.num_key_value_heads={kv} must divide model.num_attention_heads={heads}")
    if m.head_dim is None and hidden % heads:
        errs.append(f"model.hidden_size={hidden} is not divisible by model.num_attention_heads="
                    f"{heads}; set model.head_dim explicitly")
    seq_len, context = _get(config, "data.seq_len"), _get(config, "model.context_length")
    context, key = ((context, "model.context_length") if _is_int(context) and context > 0
                    else (m.max_position_embeddings, "model.max_position_embeddings"))
    if _is_int(seq_len) and seq_len > context:
        errs.append(f"data.seq_len={seq_len} exceeds {key}={context}; lower data.seq_len or "
                    "extend the context (model.context_length, with rope_scaling for a large "
                    "extension)")
    if mesh is None:
        return errs
    # Weight dimensions that the sharding rules split must divide their mesh axes; checking here
    # names the config keys instead of failing inside parameter init.
    from alignjax.sharding import rules_from_config

    dims = {"vocab": m.vocab_size, "embed": hidden, "mlp": m.intermediate_size,
            "heads": heads, "kv_heads": kv}
    for logical, axes in rules_from_config(_get(config, "sharding.rules")):
        if logical not in dims or axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        n = math.prod(mesh.get(a, 1) for a in axes)
        if dims[logical] % n:
            errs.append(f"model: the {logical} dimension ({dims[logical]}) is not divisible by "
                        f"mesh {'*'.join(axes)} = {n}; change mesh.{axes[0]} or map '{logical}' "
                        "elsewhere in sharding.rules")
    return errs


def _batch_errors(config: ConfigDict, mesh: dict, num_devices: int) -> list:
    batch, accum = config.train.batch_size, config.train.grad_accum_steps
    n = mesh["data"] * mesh["fsdp"]
    where = f"mesh.data*mesh.fsdp = {mesh['data']}*{mesh['fsdp']} = {n} (on {num_devices} devices)"
    if batch % n:
        return [f"train.batch_size={batch} is not divisible by {where}; use a multiple of {n} "
                "or change mesh.data/mesh.fsdp"]
    if batch % accum:
        return [f"train.batch_size={batch} is not divisible by train.grad_accum_steps={accum}"]
    if (batch // accum) % n:
        return [f"micro-batch train.batch_size/train.grad_accum_steps = {batch // accum} is not "
                f"divisible by {where}; lower train.grad_accum_steps or raise train.batch_size"]
    return []


def validate_schema(config: ConfigDict, num_devices: int, algorithms: Sequence[str]) -> None:
    """Checks the keys every algorithm shares (`algorithm` must be one of `algorithms`) before
    anything compiles; one ConfigError lists every problem."""
    errs = _table_errors(config, {"algorithm": _one_of(*algorithms), **_CHECKS})
    errs += _table_errors(config, {k: v for k, v in _RATINGS_CHECKS.items()
                                   if _get(config, k) is not MISSING})
    mesh, mesh_errs = _mesh(config, num_devices)
    errs += mesh_errs
    if not _get(config, "model.init_from"):  # else the architecture comes from that directory
        arch_errs = _table_errors(config, _ARCH_CHECKS)
        errs += arch_errs or _model_errors(config, mesh)
        if _get(config, "tokenizer.path") == "":
            errs.append("tokenizer.path is empty and there is no model.init_from to take it "
                        "from; set tokenizer.path (a tokenizer directory, or 'toy')")
    steps, warmup = _get(config, "train.steps"), _get(config, "optimizer.warmup_steps")
    if _is_int(steps) and _is_int(warmup) and warmup >= steps:
        errs.append(f"optimizer.warmup_steps={warmup} must be < train.steps={steps}")
    if mesh and not any(e.startswith(("train.batch_size", "train.grad_accum")) for e in errs):
        errs += _batch_errors(config, mesh, num_devices)
    if len(errs) == 1:
        raise ConfigError(errs[0])
    if errs:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))


# ---- sweeps ------------------------------------------------------------------------------------

def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _run_name(run: dict) -> str:
    name = run.get("name") or ",".join(f"{k}={_format_value(v)}" for k, v in run.items()
                                       if k != "name") or "base"
    name = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(name)).strip("._") or "run"
    if len(name) > 120:  # keep paths short; the hash keeps names unique
        name = f"{name[:100]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def expand_sweep(path: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """Returns (base spec, [(run name, ["key=value", ...]), ...]) for a sweep file."""
    module = _load_module(path, "sweep")
    sweep = getattr(module, "SWEEP", None)
    if sweep is not None:
        unknown = set(sweep) - {"base", "grid", "fixed"}
        if unknown or "base" not in sweep:
            raise ConfigError(f"{path}: SWEEP needs 'base' and takes 'grid' and 'fixed'; "
                              f"got {sorted(sweep)}")
        grid = dict(sweep.get("grid") or {})
        for key, values in grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"{path}: SWEEP['grid'][{key!r}] must be a non-empty list")
        base, fixed = sweep["base"], dict(sweep.get("fixed") or {})
        runs = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    elif callable(getattr(module, "get_sweep", None)):
        base, fixed = getattr(module, "BASE", None), {}
        if not base:
            raise ConfigError(f"{path}: get_sweep() needs BASE = 'configs/<file>.py:<preset>'")
        runs = [dict(r) for r in module.get_sweep()]
    else:
        raise ConfigError(f"{path}: define SWEEP = {{'base': ..., 'grid': ...}} "
                          "or BASE + get_sweep()")
    out, seen = [], set()
    for run in runs:
        name = _run_name(run)
        if name in seen:
            raise ConfigError(f"{path}: two runs are both named {name!r}; "
                              "give them distinct 'name's")
        seen.add(name)
        items = {**fixed, **{k: v for k, v in run.items() if k != "name"}}
        out.append((name, [f"{k}={_format_value(v)}" for k, v in items.items()]))
    return base, out


def load_config_module(path: str):
    """A config file as a module (config files build on each other: reward.py starts from sft.py)."""
    return _load_module(path, "config")
