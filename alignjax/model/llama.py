"""A Flax (Linen) Llama that computes what Hugging Face's LlamaForCausalLM computes.

Layers are scanned over a stacked `layers` axis so compile time does not grow with depth. Every
parameter carries logical axis names; `alignjax.sharding` maps them onto the mesh.

Batches carry explicit `positions` (RoPE; left padding does not shift them) and `segment_ids`
(0 = padding; tokens attend only within their own segment, so packed documents stay separate).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from alignjax.model.config import LlamaConfig

HEADS = ("lm", "scalar")
_NEG_INF = -1e30  # finite, so fully masked rows (padding queries) stay NaN-free


def _dtype(name):
    return jnp.dtype(name)


def _param(init, names):
    return nn.with_logical_partitioning(init, names)


def constrain(x, names):
    """Activation sharding hint; a no-op unless a mesh and logical rules are in context."""
    return nn.with_logical_constraint(x, names)


# ---- RoPE ------------------------------------------------------------------------------------

def rope_inv_freq(config: LlamaConfig) -> jnp.ndarray:
    """Inverse frequencies [head_dim/2], with HF's `linear` and `llama3` scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: LlamaConfig, positions_bt: jnp.ndarray):
    """cos, sin [B, T, head_dim] in float32 (HF's rotate-half layout)."""
    freqs_btf = positions_bt.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    emb = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd, cos_btd, sin_btd):
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    cos, sin = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
    return (x_bthd * cos + rotated * sin).astype(x_bthd.dtype)


# ---- attention masks and the KV cache -------------------------------------------------------

def attention_mask(q_segment_bt, kv_segment_bs, q_index_t, kv_index_s):
    """[B, T, S] bool: causal by slot index, same segment, key not padding."""
    causal = kv_index_s[None, None, :] <= q_index_t[None, :, None]
    same = q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]
    return causal & same & (kv_segment_bs[:, None, :] != 0)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache: one buffer per layer for k ([B, kv_heads, head_dim, S]) and v
    ([B, kv_heads, S, head_dim]), segment ids [B, S].

    Each layer's buffers are laid out as the attention dots read them, batch and kv-head axes
    major, keys transposed: q @ k then multiplies [G, d] by [d, S] and probs @ v [G, S] by
    [S, d], both plain matrix products. Each decode step writes its token in place and the dots
    read the buffers as they are. A stacked [layers, ...] cache, or a [B, S, kv, d] layout, made
    XLA copy and transpose every layer's whole cache at every token (tests/test_decode_hlo.py);
    keys stored [S, d] made XLA:CPU's q @ k^T about 3x slower than the same product on [d, S]
    (at batch 64 it was the largest cost of a decode step).
    """
    dtype = dtype or _dtype(config.dtype)
    k_shape = (batch, config.num_key_value_heads, config.head_dim, length)
    v_shape = (batch, config.num_key_value_heads, length, config.head_dim)
    layers = range(config.num_hidden_layers)
    return dict(k=tuple(jnp.zeros(k_shape, dtype) for _ in layers),
                v=tuple(jnp.zeros(v_shape, dtype) for _ in layers),
                segment_ids=jnp.zeros((batch, length), jnp.int32), index=jnp.zeros((), jnp.int32))


K_AXES = ("batch", "kv_heads", "head_dim", "cache_length")  # one layer's keys, transposed
V_AXES = ("batch", "kv_heads", "cache_length", "head_dim")  # one layer's values
CACHE_AXES = dict(k=K_AXES, v=V_AXES, segment_ids=("batch", "cache_length"), index=())


def constrain_cache(cache: dict) -> dict:
    """Sharding hints for every buffer of a cache from init_cache."""
    return {name: jax.tree_util.tree_map(lambda x, axes=CACHE_AXES[name]: constrain(x, axes), value)
            for name, value in cache.items()}


def flash_attention(q_bthd, k_btkd, v_btkd, segment_ids_bt):
    """Pallas TPU flash attention (causal, segment-masked), per device under shard_map.

    Same result as the XLA path for every non-padding query: a token attends to earlier tokens of
    its own segment only (padding is segment 0, which no real token shares). Key/value heads are
    repeated for grouped-query attention. On CPU it runs in Pallas' TPU interpret mode (tests).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    from jax.sharding import PartitionSpec as P
    h, k, d = q_bthd.shape[2], k_btkd.shape[2], q_bthd.shape[3]
    k_bthd, v_bthd = (jnp.repeat(x, h // k, axis=2) for x in (k_btkd, v_btkd))

    def attend(q, k, v, seg):
        q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))  # the kernel wants [B, H, T, D]
        out = fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(seg, seg), causal=True,
                                 sm_scale=1.0 / math.sqrt(d))
        return out.swapaxes(1, 2)

    segment_ids_bt = segment_ids_bt.astype(jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(q_bthd, k_bthd, v_bthd, segment_ids_bt)
    # A Pallas call cannot be partitioned by XLA: run it on each device's shard explicitly.
    rules = dict(nn.get_logical_axis_rules())
    batch, heads = rules.get("batch"), rules.get("heads")
    spec = P(batch, None, heads, None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)),
                         out_specs=spec, check_vma=False)(q_bthd, k_bthd, v_bthd, segment_ids_bt)


# ---- modules ---------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _param(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


class Linear(nn.Module):
    """x @ kernel over the trailing `len(in_names)` axes of x, kernel [*in, *out] with logical names."""

    out_shape: tuple
    in_names: tuple
    out_names: tuple
    use_bias: bool
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c, n_in = self.config, len(self.in_names)
        init = nn.initializers.normal(c.initializer_range)
        kernel = self.param("kernel", _param(init, self.in_names + self.out_names),
                            x.shape[-n_in:] + tuple(self.out_shape), _dtype(c.param_dtype))
        dtype = _dtype(c.dtype)
        # One 2-D matmul [rows, in] @ [in, out]: XLA:CPU runs multi-axis contractions (the weight
        # gradient of a [B, T, E] input contracts B and T) far slower than the same flat GEMM.
        lead, fan_in = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
        y = jnp.matmul(x.reshape(-1, fan_in).astype(dtype), kernel.reshape(fan_in, -1).astype(dtype))
        y = y.reshape(lead + tuple(self.out_shape))
        if self.use_bias:
            bias = self.param("bias", _param(nn.initializers.zeros, self.out_names),
                              tuple(self.out_shape), _dtype(c.param_dtype))
            y = y + bias.astype(dtype)
        return y


def _dense(features, in_names, out_names, bias, cfg: LlamaConfig, name):
    features = features if isinstance(features, tuple) else (features,)
    return Linear(features, in_names, out_names, bias, cfg, name=name)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_bte, cos, sin, mask_bts, cache_kv, cache_index, segment_ids_bt=None):
        """cache_kv: this layer's cache buffers (k [B, kv, d, S], v [B, kv, S, d]), or None."""
        c = self.config
        h, k, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_bthd = _dense((h, d), ("embed",), ("heads", "head_dim"), c.attention_bias, c, "q")(x_bte)
        k_btkd = _dense((k, d), ("embed",), ("kv_heads", "head_dim"), c.attention_bias, c, "k")(x_bte)
        v_btkd = _dense((k, d), ("embed",), ("kv_heads", "head_dim"), c.attention_bias, c, "v")(x_bte)
        q_bthd = constrain(apply_rope(q_bthd, cos, sin), ("batch", "length", "heads", "head_dim"))
        k_btkd = apply_rope(k_btkd, cos, sin)

        b, t = q_bthd.shape[:2]
        # The kernel tiles the sequence in blocks of 128: other lengths (and decode) use XLA.
        if c.attention_impl == "flash" and cache_kv is None and t % 128 == 0:
            out_bthd = flash_attention(q_bthd, k_btkd, v_btkd, segment_ids_bt).astype(_dtype(c.dtype))
            return _dense(c.hidden_size, ("heads", "head_dim"), ("embed",), c.attention_bias, c, "o")(out_bthd), None
        # Batch and kv-head axes major: the layout the dots (and the cache) use. Grouped-query
        # attention: the G = h/k query heads of a kv head share its keys and values.
        k_bkds, v_bksd = k_btkd.transpose(0, 2, 3, 1), v_btkd.swapaxes(1, 2)
        new_kv = None
        if cache_kv is not None:  # write this chunk at positions index..index + T, in place
            k_bkds, v_bksd = new_kv = (
                constrain(jax.lax.dynamic_update_slice(cache_kv[0], k_bkds.astype(cache_kv[0].dtype),
                                                       (0, 0, 0, cache_index)), K_AXES),
                constrain(jax.lax.dynamic_update_slice(cache_kv[1], v_bksd.astype(cache_kv[1].dtype),
                                                       (0, 0, cache_index, 0)), V_AXES))
        # Scale q (T x D values) rather than the scores (T x S).
        q_bkgtd = (q_bthd * (1.0 / math.sqrt(d))).reshape(b, t, k, h // k, d).transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum("bkgtd,bkds->bkgts", q_bkgtd, k_bkds.astype(q_bkgtd.dtype))
        scores = scores.astype(jnp.float32)
        scores = jnp.where(mask_bts[:, None, None, :, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(_dtype(c.dtype))
        out_bkgtd = jnp.einsum("bkgts,bksd->bkgtd", probs, v_bksd.astype(probs.dtype))
        out_bthd = out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
        out = _dense(c.hidden_size, ("heads", "head_dim"), ("embed",), c.attention_bias, c, "o")(out_bthd)
        return out, new_kv


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_bte):
        c = self.config
        gate = _dense(c.intermediate_size, ("embed",), ("mlp",), c.mlp_bias, c, "gate")(x_bte)
        up = _dense(c.intermediate_size, ("embed",), ("mlp",), c.mlp_bias, c, "up")(x_bte)
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(c.hidden_size, ("mlp",), ("embed",), c.mlp_bias, c, "down")(hidden)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, cos, sin, mask_bts, cache_index, segment_ids_bt):
        """carry = (x [B,T,E], this layer's (k, v) cache or None)."""
        x_bte, cache_kv = carry
        c = self.config
        norm = functools.partial(RMSNorm, c.rms_norm_eps, _dtype(c.dtype), _dtype(c.param_dtype))
        attn_out, new_kv = Attention(c, name="attn")(
            norm(name="attn_norm")(x_bte), cos, sin, mask_bts, cache_kv, cache_index, segment_ids_bt)
        x_bte = x_bte + attn_out
        x_bte = x_bte + MLP(c, name="mlp")(norm(name="mlp_norm")(x_bte))
        return (constrain(x_bte, ("batch", "length", None)), new_kv), None


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Llama(nn.Module):
    """Llama backbone with an LM head (`head="lm"`) or a scalar head (`head="scalar"`).

    Call: `(tokens, positions, segment_ids, cache=None, output=...) -> (out, new_cache)` where
    `output` is "logits" ([B,T,V]; for the scalar head: scores [B,T] float32) or "hidden"
    ([B,T,E] after the final norm, for the chunked log-prob kernel).
    """

    config: LlamaConfig
    head: str = "lm"
    # None: as config.layer_loop says. False: one module per layer, reading "layers_0",
    # "layers_1", ... (`apply` slices them out of the stored stack); the decode loop needs it, as
    # a scanned layer would copy its weights out of the stack at every token.
    scan_layers: Optional[bool] = None

    @property
    def scans(self) -> bool:
        return self.config.scans_layers if self.scan_layers is None else self.scan_layers

    def init(self, *args, **kwargs):
        """Variables in the stored layout (layers stacked under "layers"), however `apply` runs."""
        return super(Llama, self.clone(scan_layers=True)).init(*args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        if not self.scans and "layers" in variables.get("params", {}):
            variables = unstack_layers(variables, self.config.num_hidden_layers)
        return super().apply(variables, *args, **kwargs)

    @nn.compact
    def __call__(self, tokens_bt, positions_bt, segment_ids_bt, cache: Optional[dict] = None,
                 output: str = "logits"):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=_dtype(c.dtype),
                         param_dtype=_dtype(c.param_dtype), name="embed",
                         embedding_init=_param(nn.initializers.normal(c.initializer_range),
                                               ("vocab", "embed")))
        x_bte = constrain(embed(tokens_bt), ("batch", "length", None))
        cos, sin = rope_tables(c, positions_bt)

        t = tokens_bt.shape[1]
        if cache is None:
            index = jnp.zeros((), jnp.int32)
            mask = attention_mask(segment_ids_bt, segment_ids_bt, jnp.arange(t), jnp.arange(t))
        else:
            if self.scans:
                raise ValueError("a KV cache holds one buffer per layer: decode with "
                                 "Llama(scan_layers=False)")
            index = cache["index"]
            kv_segments = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids_bt.astype(jnp.int32), (0, index))
            mask = attention_mask(segment_ids_bt, kv_segments, index + jnp.arange(t),
                                  jnp.arange(kv_segments.shape[1]))

        layer = DecoderLayer
        if c.remat_policy != "none":
            layer = nn.remat(layer, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        new_cache = None
        if self.scans:
            stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            (x_bte, _), _ = stack(c, name="layers")((x_bte, None), cos, sin, mask, index, segment_ids_bt)
        else:
            new_k, new_v = [], []
            for i in range(c.num_hidden_layers):
                kv = None if cache is None else (cache["k"][i], cache["v"][i])
                (x_bte, kv), _ = layer(c, name=f"layers_{i}")((x_bte, kv), cos, sin, mask, index,
                                                               segment_ids_bt)
                if kv is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
            if cache is not None:
                new_cache = dict(k=tuple(new_k), v=tuple(new_v), segment_ids=kv_segments, index=index + t)

        x_bte = RMSNorm(c.rms_norm_eps, _dtype(c.dtype), _dtype(c.param_dtype), name="final_norm")(x_bte)
        if output == "hidden":
            return x_bte, new_cache
        if self.head == "scalar":
            score = nn.Dense(1, use_bias=False, name="score", dtype=_dtype(c.dtype),
                             param_dtype=_dtype(c.param_dtype),
                             kernel_init=_param(nn.initializers.normal(1.0 / math.sqrt(c.hidden_size + 1)),
                                                ("embed", "score")))
            return score(x_bte)[..., 0].astype(jnp.float32), new_cache
        if c.tie_word_embeddings:
            return embed.attend(x_bte), new_cache
        lm_head = _dense(c.vocab_size, ("embed",), ("vocab",), False, c, "lm_head")
        return lm_head(x_bte), new_cache


def head_kernel(params: dict, config: LlamaConfig):
    """The [E, V] output projection (the embedding transposed when tied)."""
    p = params["params"] if "params" in params else params
    if config.tie_word_embeddings:
        return p["embed"]["embedding"].T
    return p["lm_head"]["kernel"]


def project_logits(params: dict, config: LlamaConfig, x_bte):
    """What the LM head computes from `output="hidden"` states (e.g. only the last prompt position)."""
    dtype = _dtype(config.dtype)
    return jnp.dot(x_bte.astype(dtype), head_kernel(params, config).astype(dtype))


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Stacked "layers" params -> "layers_0".."layers_{n-1}", for `Llama(scan_layers=False)`."""
    if "params" in params:
        return {**params, "params": unstack_layers(params["params"], num_layers)}
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x: x[i], params["layers"])
    return out
