"""From a config to the pieces every trainer needs: mesh, tokenizer, model, initial params, data.

Kept separate from the loop so `alignjax compile` can build the same step abstractly.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
from typing import Any, Optional

import jax
import numpy as np

from alignjax import fs
from alignjax import sharding as shd
from alignjax.config import ARCH_KEYS
from alignjax.model.config import ConfigError, LlamaConfig
from alignjax.model.params import build_module

RUNTIME_KEYS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "layer_loop")


def rules(config) -> tuple:
    return shd.rules_from_config(config.sharding.rules)


def runtime_overrides(config) -> dict:
    return {k: config.model[k] for k in RUNTIME_KEYS if k in config.model}


def model_config(config, tokenizer=None) -> LlamaConfig:
    """The architecture: from `model.init_from` when set, else from the config's model fields."""
    m = config.model
    if m.init_from:
        from alignjax.model.store import path_kind, MODEL_FILE
        path = m.init_from
        if path_kind(path) == "hf":
            if fs.is_remote(path):
                raise ConfigError(f"model.init_from={path}: a Hugging Face folder is read from a "
                                  "local path; copy it to the machine first")
            cfg = LlamaConfig.from_hf_dir(path, **runtime_overrides(config))
        else:
            meta = json.loads(fs.read_text(fs.join(path, MODEL_FILE)))
            cfg = LlamaConfig.from_json_dict(meta["model"], **runtime_overrides(config))
    else:
        arch = {k: m[k] for k in ARCH_KEYS if k in m and m[k] is not None}
        if isinstance(arch.get("rope_scaling"), dict) or hasattr(arch.get("rope_scaling"), "to_dict"):
            arch["rope_scaling"] = dict(arch["rope_scaling"])
        cfg = LlamaConfig(**arch, **runtime_overrides(config))
        if tokenizer is not None:
            cfg = cfg.replace(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    context = int(m.get("context_length", 0) or 0)
    if context:  # RoPE positions are computed, not stored: no weight changes
        cfg = cfg.replace(max_position_embeddings=context)
    seq_len = config.get("data", {}).get("seq_len") if hasattr(config, "get") else None
    if m.init_from and isinstance(seq_len, int) and seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the context of model.init_from "
                          f"{m.init_from} (max_position_embeddings {cfg.max_position_embeddings}); "
                          f"lower data.seq_len, or set model.context_length={seq_len} to extend it "
                          "(a large extension wants model.rope_scaling as well)")
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer "
                          f"({len(tokenizer)} tokens); set --config.model.vocab_size={len(tokenizer)} "
                          "or larger")
    return cfg


def tokenizer_for(config, workdir: str):
    """`tokenizer.path`: a directory, "toy" (trained on the toy suite, kept in the workdir), or ""
    (the tokenizer stored with `model.init_from`)."""
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.checkpoint import has_checkpoint
    saved = fs.join(workdir, "tokenizer")
    if has_checkpoint(workdir) and fs.exists(fs.join(saved, "tokenizer_config.json")):
        return load_tokenizer(saved)  # resume: the exact tokenizer of the run that saved
    path = config.tokenizer.path
    if path == "toy":
        tok = copy.deepcopy(_toy_tokenizer(int(config.tokenizer.vocab_size)))
    elif path:
        tok = load_tokenizer(path)
    elif config.model.init_from:
        from alignjax.model.store import path_kind
        base = config.model.init_from
        tok = load_tokenizer(fs.join(base, "tokenizer") if path_kind(base) == "alignjax" else base)
    else:
        raise ConfigError("tokenizer.path is empty and model.init_from is not set: give a tokenizer "
                          "directory, or 'toy' for the built-in toy suite")
    if jax.process_index() == 0:
        save_tokenizer(tok, saved)
    return tok


def save_tokenizer(tok, path: str):
    """`tok.save_pretrained(path)`; `path` may be a URL (transformers writes only local folders)."""
    if not fs.is_remote(path):
        tok.save_pretrained(path)
        return
    with tempfile.TemporaryDirectory(prefix="alignjax-tokenizer-") as local:
        tok.save_pretrained(local)
        fs.put_dir(local, path)


@functools.lru_cache(maxsize=2)  # deterministic, 1.3 s to train: once per process
def _toy_tokenizer(vocab_size: int):
    from alignjax.data import toy
    from alignjax.data.tokenizer import train_bpe_tokenizer
    return train_bpe_tokenizer(list(toy.all_texts(toy.make_examples(4000, seed=12345))), vocab_size)


def initial_params(config, run):
    """The params training starts from: `model.init_from` (a scalar head on a language model gets
    a new score head, N(0, 1/(d_model+1)) as docs/algorithms.md section 2 asks), else a seeded
    random init."""
    from alignjax.train.slots import Slot, SlotLoader
    slot = Slot("policy", head=run.module.head, source=config.model.init_from)
    return SlotLoader(config, run, []).load(slot, run.module)


def with_new_score_head(lm_params, module, mesh, rules_, seed: int, zero: bool = False):
    """Backbone of `lm_params` + a new scalar head (random, or zeros for a value head)."""
    from alignjax.model.params import abstract_params
    abstract, shardings = abstract_params(module, mesh, rules_)
    kernel = abstract["params"]["score"]["kernel"]
    scale = 0.0 if zero else 1.0 / (module.config.hidden_size + 1) ** 0.5

    def new_kernel(key):
        return jax.random.normal(key, kernel.shape, kernel.dtype) * scale

    score = jax.jit(new_kernel, out_shardings=shardings["params"]["score"]["kernel"])(
        jax.random.PRNGKey(seed))
    backbone = {k: v for k, v in lm_params["params"].items() if k != "lm_head"}
    return {"params": {**backbone, "score": {"kernel": score}}}


TOY_SPECS = ("toy", "toy_imperfect")


def data_sources(spec: str, workdir: str, split: str, kind: str = "sft") -> list:
    """Comma-separated source specs; "toy" writes the toy suite's records into WORKDIR/data,
    "toy_imperfect" its SFT records with a share of wrong demonstrations (toy.imperfect)."""
    out = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        if part in TOY_SPECS:
            out.append(write_toy_split(workdir, split, kind, imperfect=part == "toy_imperfect"))
        else:
            out.append(part)
    return out


def checked_sources(spec: str, workdir: str, split: str, tokenizer, data_cfg,
                    kind: str = "sft") -> list:
    """`data_sources`, with every record of the user's files put through the pipeline's own
    read-and-format step before training (alignjax.data.validate): all bad records are reported
    at once, or skipped with `data.skip_invalid`, and the truncated / dropped counts are printed.
    `kind`: "sft", or the preference kinds "pair", "ranked", "kto". Toy records (written by
    alignjax) are not re-checked."""
    import sys
    from alignjax.data import validate
    toy_kind = {"sft": "sft", "pair": "preference", "ranked": "ranked", "kto": "kto"}[kind]
    specs = data_sources(spec, workdir, split, toy_kind)
    trusted = [write_toy_split(workdir, split, toy_kind, imperfect=part == "toy_imperfect")
               for part in dict.fromkeys(s.strip() for s in spec.split(",")) if part in TOY_SPECS]
    seq_len, what = int(data_cfg.seq_len), f"data.{split}"
    if kind == "sft":
        from alignjax.data.formatting import FormatConfig, SFTFormatter
        from alignjax.data.pipeline import SFTStats, _TokenizeIndex
        formatter, stats = SFTFormatter(tokenizer, FormatConfig.from_config(data_cfg)), SFTStats()

        def make_check(source):
            return _TokenizeIndex(source, formatter, seq_len, tokenizer.pad_token_id, stats)
    else:
        from alignjax.data.preference import PrefStats, _setup
        from alignjax.data.ratings import record_check
        stats = PrefStats()

        def make_check(source):
            built, check, _, _ = _setup(source, tokenizer, data_cfg, kind, 1, seq_len, 0, 1)
            check.skip_invalid, check.stats = False, stats  # report bad records, never skip here
            return record_check(built, check)  # data.from_ratings: check rated record r's pairs
    out = validate.validated_sources(specs, make_check, bool(data_cfg.skip_invalid),
                                     what, trusted)
    if len(trusted) < len(specs):
        print(validate.describe_counts(stats.as_dict(), what, seq_len), file=sys.stderr)
    return out


def write_toy_split(workdir: str, split: str, kind: str = "sft", imperfect: bool = False) -> str:
    """WORKDIR/data/toy_<kind>_<split>.jsonl, copied from the machine's toy cache (a remote
    workdir reads the cached file itself: the readers take local files)."""
    from alignjax.data.sources import DataError
    if imperfect and kind != "sft":
        raise DataError(f"data.{split}=toy_imperfect holds SFT demonstrations, some wrong; "
                        "preference and reward data read data.train=toy")
    name = f"toy_{kind}_{split}" + ("_imperfect" if imperfect else "")
    cached = _cached_toy_file(name, split, kind, imperfect)
    if fs.is_remote(workdir):  # the readers take local files: the cached one, or a local copy
        if cached:
            return cached
        workdir = fs.temp_dir("alignjax-toy-")
    path = os.path.join(workdir, "data", f"{name}.jsonl")
    if not os.path.exists(path):
        _write_atomically(path, lambda tmp: shutil.copyfile(cached, tmp) if cached
                          else _write_toy_records(tmp, split, kind, imperfect))
    return path


def _write_toy_records(path: str, split: str, kind: str, imperfect: bool) -> None:
    from alignjax.data import toy
    splits = toy.toy_splits()
    if imperfect:
        splits = {k: toy.imperfect(v) for k, v in splits.items()}
    records = {"sft": lambda ex: toy.sft_records(ex, style="messages"),
               "preference": lambda ex: toy.preference_records(ex, seed=1),
               "ranked": lambda ex: toy.ranked_records(ex, k=4, seed=1),
               "kto": lambda ex: toy.kto_records(ex, seed=1)}[kind](splits[split])
    toy.write_jsonl(records, path)


def _cached_toy_file(name: str, split: str, kind: str, imperfect: bool) -> Optional[str]:
    """The toy file, generated once per machine (1.5-3 s: every run and test process would
    otherwise make its own) under cache_dir()/toy/KEY/; KEY changes with the code and the
    libraries that make its bytes. None where the cache cannot be written."""
    from alignjax.data import toy
    from alignjax.train.metrics import cache_dir
    key = hashlib.sha256(pathlib.Path(toy.__file__).read_bytes() + repr(
        (np.__version__, sys.version_info[:2])).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), "toy", key, f"{name}.jsonl")
    if not os.path.exists(path):
        try:
            _write_atomically(path, lambda tmp: _write_toy_records(tmp, split, kind, imperfect))
        except OSError:  # a read-only home: each run writes its own
            return None
    return path


def _write_atomically(path: str, write) -> None:
    """write(tmp) then rename to `path`: processes that race (the hosts of a pod, test workers)
    write the same bytes, and none reads half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclasses.dataclass
class Run:
    """What a trainer builds before its first step."""
    mesh: Any
    rules: tuple
    tokenizer: Any
    model_config: LlamaConfig
    module: Any


def build_run(config, workdir: str, head: str = "lm", devices: Optional[list] = None) -> Run:
    mesh = shd.make_mesh(dict(config.mesh), devices)
    rules_ = rules(config)
    tokenizer = tokenizer_for(config, workdir)
    cfg = model_config(config, tokenizer)
    return Run(mesh, rules_, tokenizer, cfg, build_module(cfg, head))


def eval_batch_size(config) -> int:
    """Process-local rows of an eval batch: one micro-batch (eval keeps no gradients)."""
    return int(config.train.batch_size) // int(config.train.grad_accum_steps) // jax.process_count()
