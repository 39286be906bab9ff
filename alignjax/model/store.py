"""alignjax model directories, and loading a model from any path a user may hand us.

An alignjax model directory holds:
    alignjax_model.json   {"format": 1, "head": "lm"|"scalar", "model": <LlamaConfig json>, ...}
    params/               orbax checkpoint of the params tree, restored straight into shardings
    tokenizer/            the tokenizer files found with the source model (if any)
    generation_config.json  (if the source had one)
A training workdir has the same json with "params": "checkpoints" and "slot": its latest
checkpoint's state["params"][slot] (checkpoints written before named slots: state["params"]).
A Hugging Face directory (config.json + safetensors) is read directly through the key table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from alignjax import fs
from alignjax import sharding as shd
from alignjax.convert.hf import ARCHITECTURES, load_hf_params
from alignjax.errors import UserError
from alignjax.model.config import ConfigError, LlamaConfig
from alignjax.model.llama import Llama
from alignjax.model.params import abstract_params, build_module

MODEL_FILE = "alignjax_model.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


@dataclasses.dataclass
class LoadedModel:
    config: LlamaConfig
    head: str
    module: Llama
    params: Any
    mesh: Mesh
    rules: tuple
    tokenizer_dir: Optional[str]
    extra: dict  # e.g. generation_config, reward statistics

    def eos_ids(self, tokenizer=None) -> tuple:
        ids = list(self.config.eos_token_ids)
        gen = self.extra.get("generation_config") or {}
        g = gen.get("eos_token_id")
        ids += g if isinstance(g, list) else ([g] if g is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))


def path_kind(path: str) -> str:
    if fs.exists(fs.join(path, MODEL_FILE)):
        return "alignjax"
    if fs.exists(fs.join(path, "config.json")):
        return "hf"
    if not fs.exists(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    raise ConfigError(f"{path}: neither an alignjax model directory ({MODEL_FILE}) nor a Hugging "
                      "Face directory (config.json); convert it or point at the right folder")


def _hf_head(path: str) -> str:
    with open(os.path.join(path, "config.json")) as f:
        archs = json.load(f).get("architectures") or ["LlamaForCausalLM"]
    return "scalar" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"


def _read_json(path):
    return json.loads(fs.read_text(path)) if fs.exists(path) else None


def _local_copy(path: str) -> str:
    """A local folder with the files of `path`: itself, or a download of a bucket folder (for
    readers that take only local files, such as transformers' tokenizers)."""
    if not fs.is_remote(path):
        return fs.canonical(path)
    return fs.get_dir(path, fs.temp_dir("alignjax-download-"))


def load_model(path: str, mesh: Optional[Mesh] = None, rules=shd.DEFAULT_RULES,
               head: Optional[str] = None, slot: Optional[str] = None, **runtime) -> LoadedModel:
    """Loads an HF directory or an alignjax model directory onto `mesh` (default: data-parallel).

    `runtime` overrides LlamaConfig runtime fields (dtype, param_dtype, remat_policy, ...).
    `slot`: another trained slot of a training workdir than the one it loads as (e.g. PPO's
    "value"); its head is read from the checkpoint.
    """
    mesh = mesh or shd.make_mesh()
    kind = path_kind(path)
    if kind == "hf" and fs.is_remote(path):
        raise UserError(f"{path}: a Hugging Face folder is read from a local path; copy it to "
                        "this machine first (a bucket URL works for alignjax workdirs and models)")
    meta = _read_json(fs.join(path, MODEL_FILE)) if kind == "alignjax" else None
    if slot is not None and (meta or {}).get("params") != "checkpoints":
        raise UserError(f"--slot {slot}: {path} is not a training workdir; --slot picks a trained "
                        "model of a training workdir (e.g. PPO's value model)")
    if kind == "hf":
        config = LlamaConfig.from_hf_dir(path, **runtime)
        head = head or _hf_head(path)
        module = build_module(config, head)
        abstract, shardings = abstract_params(module, mesh, rules)
        params = load_hf_params(path, config, abstract, shardings, head)
        tok_dir = path if any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES) else None
        extra = {"generation_config": _read_json(os.path.join(path, "generation_config.json"))}
        return LoadedModel(config, head, module, params, mesh, rules, tok_dir, extra)

    config = LlamaConfig.from_json_dict(meta["model"], **runtime)
    stored_head = meta.get("head", "lm")
    own_slot = slot is None or slot == meta.get("slot", "policy")

    def checked(found):
        if head is not None and head != found:
            raise ConfigError(f"{path} holds a model with head={found!r}, but head={head!r} was asked for")
        return found

    if own_slot:
        checked(stored_head)
    if meta.get("params") == "checkpoints":  # a training workdir: its latest checkpoint
        from alignjax.checkpoint import Checkpointer
        name = slot or meta.get("slot", "policy")
        ckpt = Checkpointer(path, every=1)
        try:
            if not own_slot:
                stored_head = checked(_slot_head(ckpt, name, path))
            abstract, _ = abstract_params(build_module(config, stored_head), mesh, rules)
            # the newest checkpoint that restores; damaged newer ones are moved aside
            step, params = ckpt.restore_newest(lambda s: ckpt.restore_params(
                s, abstract, _params_key(ckpt, s, name)))
        finally:
            ckpt.close()
        if step is None:
            raise ConfigError(f"{path}: training workdir without any checkpoint yet")
    else:
        params = restore_params(fs.join(path, "params"),
                                abstract_params(build_module(config, stored_head), mesh, rules)[0])
    module = build_module(config, stored_head)
    tok_dir = fs.join(path, "tokenizer")
    extra = {k: v for k, v in meta.items() if k not in ("model", "head", "format", "params", "slot")}
    # the workdir's generation settings belong to the slot it loads as (the policy)
    extra["generation_config"] = _read_json(fs.join(path, "generation_config.json")) if own_slot else None
    return LoadedModel(config, stored_head, module, params, mesh, rules,
                       _local_copy(tok_dir) if fs.isdir(tok_dir) else None, extra)


def _slot_head(ckpt, slot: str, path: str) -> str:
    """The head of trained slot `slot`, from the tree metadata of the newest checkpoint that has
    readable metadata (no array is read): a scalar slot has a "score" kernel."""
    tree, step = None, None
    for step in sorted(ckpt.manager.all_steps(), reverse=True):
        try:
            with ocp.PyTreeCheckpointer() as reader:
                tree = reader.metadata(fs.join(ckpt.directory, str(step), "state")).item_metadata.tree
            layout_ok = _params_key(ckpt, step, slot) != ("params",)
            break
        except Exception:  # a damaged checkpoint: the restore below reports and moves it aside
            continue
    if tree is None:
        raise ConfigError(f"{path}: training workdir without any readable checkpoint")
    slots = tree.get("params", {}) if layout_ok else {}
    if slot not in slots:
        raise UserError(f"--slot {slot}: the checkpoint {step} of {path} has no trained slot "
                        f"{slot!r}; it has: {', '.join(sorted(slots)) or 'none (a single-model run)'}")
    return "scalar" if "score" in slots[slot].get("params", {}) else "lm"


def _params_key(ckpt, step: int, slot: str) -> tuple:
    """Where a checkpoint's model params are: state["params"][slot], or state["params"] in
    checkpoints written before named slots (their meta has no "state_layout")."""
    layout = ckpt.restore_meta(step).get("state_layout", 1)
    return ("params", slot) if layout >= 2 else ("params",)


def restore_params(params_dir: str, abstract):
    """Restores an orbax params checkpoint directly into the shardings carried by `abstract`."""
    params_dir = fs.canonical(params_dir)  # absolute, or a URL
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(params_dir, abstract)


# ---- writing model directories: never into a training workdir, never half-written -------------

def _partial_dir(out_dir: str) -> str:
    """The temporary sibling an output is written into before it is renamed into place."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.alignjax-partial")


def check_output_dir(out_dir: str, overwrite: bool = False, flag: str = "--out") -> None:
    """Refuses a training workdir (writing there breaks its resume, even with `overwrite`) and a
    non-empty directory unless `overwrite`. Cheap: commands call it before loading anything."""
    from alignjax.checkpoint import is_training_workdir
    out = fs.canonical(out_dir)
    if fs.exists(out):
        if not fs.isdir(out):
            raise UserError(f"{flag} {out_dir}: exists and is not a directory; choose a new directory")
        if is_training_workdir(out):
            raise UserError(f"{flag} {out_dir} is a training workdir (checkpoints/, config.json); "
                            "writing there would break its resume. Choose another directory")
        if fs.listdir(out) and not overwrite:
            raise UserError(f"{flag} {out_dir}: directory is not empty; choose a new directory, "
                            "or pass --overwrite to replace it")


def begin_output_dir(out_dir: str, overwrite: bool = False, flag: str = "--out") -> str:
    """`check_output_dir`, then an empty temporary sibling to write into. The old output stays
    until `finish_output_dir`."""
    check_output_dir(out_dir, overwrite, flag)
    partial = _partial_dir(out_dir)
    if jax.process_index() == 0:
        if os.path.exists(partial):  # left by an export that crashed: ours by its name
            shutil.rmtree(partial)
        os.makedirs(partial)
    return partial


def finish_output_dir(partial: str, out_dir: str) -> None:
    """Renames the complete `partial` into place; an old `out_dir` is removed only after that."""
    if jax.process_index() != 0:
        return
    out = os.path.abspath(out_dir)
    old = None
    if os.path.exists(out):
        old = f"{partial}-old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(out, old)
    os.rename(partial, out)
    if old:
        shutil.rmtree(old)


def _write_output_dir(out_dir: str, overwrite: bool, write) -> Any:
    """`write(tmp_dir)` into a temporary sibling, then rename; a failure leaves `out_dir` as it was.
    A bucket URL (gs://...) has no rename: the files are written into a local temporary folder,
    then process 0 uploads them (only process 0 writes HF files); a failure uploads nothing."""
    if fs.is_remote(out_dir):
        check_output_dir(out_dir, overwrite)
        with tempfile.TemporaryDirectory(prefix="alignjax-export-") as local:
            result = write(local)
            if jax.process_index() == 0:
                if fs.exists(out_dir):
                    fs.as_path(out_dir).rmtree()  # --overwrite (checked above)
                fs.put_dir(local, out_dir)
        return result
    partial = begin_output_dir(out_dir, overwrite)
    try:
        result = write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finish_output_dir(partial, out_dir)
    return result


def save_model_dir(out_dir: str, params, config: LlamaConfig, head: str = "lm",
                   tokenizer_dir: Optional[str] = None, generation_config: Optional[dict] = None,
                   extra: Optional[dict] = None, overwrite: bool = False):
    """Writes an alignjax model directory (all processes call this; orbax coordinates them).

    Refuses a training workdir and, unless `overwrite`, a non-empty directory; the files are
    written next to it and renamed into place when complete. `out_dir` is a local folder: on a
    pod, every process writes its shards of the params there."""
    if fs.is_remote(out_dir):
        raise UserError(f"--out {out_dir}: an alignjax model folder is written to a local (or "
                        "mounted) path; copy it to the bucket afterwards, or train with "
                        "--workdir gs://... and use that workdir as the model")
    return _write_output_dir(out_dir, overwrite, lambda tmp: _save_model_files(
        tmp, params, config, head, tokenizer_dir, generation_config, extra))


def _save_model_files(out_dir, params, config, head, tokenizer_dir, generation_config, extra):
    params_dir = os.path.join(out_dir, "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() != 0:
        return
    meta = {"format": 1, "head": head, "model": config.to_json_dict(), **(extra or {})}
    with open(os.path.join(out_dir, MODEL_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, os.path.join(out_dir, "tokenizer"))
    if generation_config:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(generation_config, f, indent=2)


def copy_tokenizer_files(src: str, dst: str) -> list:
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def export_hf(model: LoadedModel, out_dir: str, dtype: str = "float32",
              max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> list:
    """Writes an HF directory transformers loads: sharded safetensors, index, config, tokenizer.

    Refuses a training workdir and, unless `overwrite`, a non-empty directory; the files are
    written next to it and renamed into place when complete."""
    import ml_dtypes
    import numpy as np
    np_dtype = {"float32": np.float32, "float16": np.float16,
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}.get(dtype)
    if np_dtype is None:
        raise ConfigError(f"--dtype {dtype}: use bfloat16, float16 or float32")
    return _write_output_dir(out_dir, overwrite, lambda tmp: _export_hf_files(
        model, tmp, dtype, np_dtype, max_shard_bytes))


def _export_hf_files(model: LoadedModel, out_dir: str, dtype: str, np_dtype, max_shard_bytes: int):
    from alignjax.convert.hf import save_hf_weights
    files = save_hf_weights(model.params, model.config, out_dir, model.head, np_dtype, max_shard_bytes)
    if jax.process_index() != 0:
        return []
    hf = model.config.to_hf_dict(ARCHITECTURES[model.head])
    hf["torch_dtype"] = dtype
    if model.head == "scalar":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  problem_type="regression")
        if hf.get("pad_token_id") is None and model.tokenizer_dir:
            hf["pad_token_id"] = _tokenizer_pad_id(model.tokenizer_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    gen = model.extra.get("generation_config")
    if gen is None and model.head == "lm":
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": hf["eos_token_id"],
               "pad_token_id": model.config.pad_token_id}
    if gen:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
    if model.tokenizer_dir:
        files += copy_tokenizer_files(model.tokenizer_dir, out_dir)
    return files


def _tokenizer_pad_id(tokenizer_dir: str):
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(tokenizer_dir).pad_token_id
    except Exception:  # the pad id is a convenience for sequence classification, not required
        return None
