"""Hugging Face Llama <-> alignjax parameters, driven by one declarative key table.

Each row names an HF tensor (with `{i}` for the layer index), the alignjax parameter path, and a
transform pair between the HF layout and ours. Import reads tensors one at a time from
memory-mapped safetensors and places each device's shard directly (no full host copy of the
model); export streams tensors into sharded safetensors. Any tensor not in the table, or in the
table but not in the checkpoint, is an error naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from alignjax.convert.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter, WeightsError
from alignjax.model.config import LlamaConfig

ARCHITECTURES = {"lm": "LlamaForCausalLM", "scalar": "LlamaForSequenceClassification"}


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str                      # HF key; "{i}" marks a per-layer tensor stacked on our `layers` axis
    path: tuple                  # path in the alignjax params tree (under "params")
    to_ours: Callable            # HF array (one layer) -> our layout
    to_hf: Callable              # our layout (one layer) -> HF array

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def _identity(x):
    return x


def _t(x):
    return x.T


def key_table(config: LlamaConfig, head: str = "lm") -> list[Row]:
    """The rows that exist for this architecture (biases, tied embeddings, head)."""
    e, h, k, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def proj_in(heads):  # HF [heads*d, e] <-> ours [e, heads, d]
        return (lambda w: w.T.reshape(e, heads, d), lambda w: w.reshape(e, heads * d).T)

    def bias_in(heads):  # HF [heads*d] <-> ours [heads, d]
        return (lambda b: b.reshape(heads, d), lambda b: b.reshape(heads * d))

    o_proj = (lambda w: w.T.reshape(h, d, e), lambda w: w.reshape(h * d, e).T)
    layer = "model.layers.{i}."
    rows = [Row("model.embed_tokens.weight", ("embed", "embedding"), _identity, _identity)]
    for name, heads in (("q", h), ("k", k), ("v", k)):
        rows.append(Row(layer + f"self_attn.{name}_proj.weight", ("layers", "attn", name, "kernel"),
                        *proj_in(heads)))
        if config.attention_bias:
            rows.append(Row(layer + f"self_attn.{name}_proj.bias", ("layers", "attn", name, "bias"),
                            *bias_in(heads)))
    rows.append(Row(layer + "self_attn.o_proj.weight", ("layers", "attn", "o", "kernel"), *o_proj))
    if config.attention_bias:
        rows.append(Row(layer + "self_attn.o_proj.bias", ("layers", "attn", "o", "bias"), _identity, _identity))
    for name in ("gate", "up", "down"):
        rows.append(Row(layer + f"mlp.{name}_proj.weight", ("layers", "mlp", name, "kernel"), _t, _t))
        if config.mlp_bias:
            rows.append(Row(layer + f"mlp.{name}_proj.bias", ("layers", "mlp", name, "bias"),
                            _identity, _identity))
    rows += [
        Row(layer + "input_layernorm.weight", ("layers", "attn_norm", "scale"), _identity, _identity),
        Row(layer + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), _identity, _identity),
        Row("model.norm.weight", ("final_norm", "scale"), _identity, _identity),
    ]
    if head == "scalar":
        rows.append(Row("score.weight", ("score", "kernel"), _t, _t))
    elif not config.tie_word_embeddings:
        rows.append(Row("lm_head.weight", ("lm_head", "kernel"), _t, _t))
    return rows


def hf_keys(rows: list[Row], num_layers: int) -> list[str]:
    return [r.hf.format(i=i) for r in rows for i in (range(num_layers) if r.stacked else [None])]


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---- import ----------------------------------------------------------------------------------

def _shard_key(index):
    return tuple((s.start, s.stop, s.step) for s in index)


def _place(shape, dtype, sharding, read_layer: Callable, read_whole: Callable, stacked: bool):
    """Builds one sharded jax.Array, reading each HF tensor once and keeping only local shards."""
    idx_map = sharding.addressable_devices_indices_map(shape)
    norm = {dev: tuple(slice(*s.indices(n)) for s, n in zip(idx, shape)) for dev, idx in idx_map.items()}
    unique = {_shard_key(idx): idx for idx in norm.values()}
    if stacked:
        bufs = {key: np.empty([len(range(*s.indices(n))) for s, n in zip(idx, shape)], dtype)
                for key, idx in unique.items()}
        for i in range(shape[0]):
            w = None
            for key, idx in unique.items():
                layers = range(*idx[0].indices(shape[0]))
                if i in layers:
                    w = read_layer(i) if w is None else w
                    bufs[key][layers.index(i)] = w[idx[1:]]
    else:
        w = read_whole()
        bufs = {key: np.asarray(w[idx], dtype) for key, idx in unique.items()}
    arrays = [jax.device_put(bufs[_shard_key(idx)], dev) for dev, idx in norm.items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_hf_params(hf_dir: str, config: LlamaConfig, abstract_params, shardings, head: str = "lm"):
    """Reads an HF Llama directory into a sharded params tree shaped like `abstract_params`.

    `abstract_params`/`shardings` come from `alignjax.model.init.abstract_params` (same tree as
    `module.init(...)`, unboxed).
    """
    reader = SafetensorsReader(hf_dir)
    rows = key_table(config, head)
    expected = set(hf_keys(rows, config.num_hidden_layers))
    present = set(reader.keys())
    # Tied checkpoints sometimes carry lm_head.weight too; it is ignored only when it equals the embedding.
    extra = present - expected - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if head == "scalar":
        extra -= {"lm_head.weight"}
    extra = {k for k in extra if not k.endswith("rotary_emb.inv_freq")}  # buffers, not weights
    if extra:
        raise WeightsError(f"{hf_dir}: tensors not in alignjax's Llama key table (unmapped): "
                           f"{sorted(extra)[:10]}{' ...' if len(extra) > 10 else ''}")
    missing = expected - present
    if missing:
        raise WeightsError(f"{hf_dir}: tensors missing from the checkpoint: "
                           f"{sorted(missing)[:10]}{' ...' if len(missing) > 10 else ''}")

    params = {}
    for row in rows:
        abstract = _get(abstract_params["params"], row.path)
        want = tuple(abstract.shape)
        layer_shape = want[1:] if row.stacked else want

        hf_shape = tuple(jax.eval_shape(row.to_hf, jax.ShapeDtypeStruct(layer_shape, np.float32)).shape)

        def read(key, row=row, hf_shape=hf_shape):
            if tuple(reader.shape(key)) != hf_shape:
                raise WeightsError(
                    f"{hf_dir}: tensor {key} has shape {reader.shape(key)}, but the config implies "
                    f"{hf_shape}; config.json and the weights disagree")
            return row.to_ours(reader.get(key))

        value = _place(want, abstract.dtype, _get(shardings["params"], row.path),
                       read_layer=lambda i, row=row, read=read: read(row.hf.format(i=i)),
                       read_whole=lambda row=row, read=read: read(row.hf),
                       stacked=row.stacked)
        _set(params, row.path, value)
    return {"params": params}


# ---- export ----------------------------------------------------------------------------------

def _host(x) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(params, config: LlamaConfig, head: str = "lm", dtype=np.float32):
    """Yields (hf_key, numpy array) in table order, one layer slice at a time."""
    p = params["params"] if "params" in params else params
    rows = key_table(config, head)
    table_paths = {r.path for r in rows}
    flat = jax.tree_util.tree_flatten_with_path(p)[0]
    for path, _ in flat:
        keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        if keys not in table_paths:
            raise WeightsError(f"parameter {'/'.join(keys)} has no row in the HF key table; "
                               "it would be dropped on export")
    for row in rows:
        leaf = _get(p, row.path)
        if row.stacked:
            for i in range(config.num_hidden_layers):
                yield row.hf.format(i=i), np.asarray(row.to_hf(_host(leaf[i])), dtype)
        else:
            yield row.hf, np.asarray(row.to_hf(_host(leaf)), dtype)


def save_hf_weights(params, config: LlamaConfig, out_dir: str, head: str = "lm",
                    dtype=np.float32, max_shard_bytes: int = 2 * 1024**3) -> Optional[list]:
    """Writes sharded safetensors + index (on process 0 only). Returns the shard file names."""
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes) if jax.process_index() == 0 else None
    for key, array in iter_hf_tensors(params, config, head, dtype):
        if writer is not None:
            writer.add(key, array)
    return writer.close() if writer is not None else None
