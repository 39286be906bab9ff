"""Llama architecture config, and its translation to and from Hugging Face's config.json."""

from __future__ import annotations

from alignjax.errors import UserError

import dataclasses
import json
import os
from typing import Any, Optional

# HF model_type values whose weights follow the Llama layout and semantics we implement.
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")  # see llama._REMAT_POLICIES
LAYER_LOOPS = ("auto", "scan", "unroll")
UNROLL_MAX_LAYERS = 16  # layer_loop="auto": Llama-3.2-1B (16 layers) unrolls, 3B (28) scans
# config.json keys without a sensible default: the weights' shapes follow from them.
HF_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")


class ConfigError(UserError):
    """A user-facing configuration problem; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama 1/2/3.x model (the part of HF's LlamaConfig we honour).

    `dtype` is the compute dtype, `param_dtype` the dtype of the master weights.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted ((key, value), ...) so the dataclass stays hashable
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2  # int or tuple of ints (Llama 3 instruct has several)
    pad_token_id: Optional[int] = None
    # Runtime choices (not architecture): numerics and memory.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
    attention_impl: str = "xla"  # xla | flash (Pallas TPU kernel when seq_len % 128 == 0; decode uses xla)
    # How the forward walks the layers (params are stored stacked either way): scan (one compiled
    # layer, fast compiles for deep models), unroll (~10-20% faster steps, longer compiles) or
    # auto (unroll up to UNROLL_MAX_LAYERS layers, scan deeper models).
    layer_loop: str = "auto"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    def validate(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; Llama uses 'silu'")
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type={rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}: use none, full, dots or "
                              "dots_with_no_batch_dims")
        if self.layer_loop not in LAYER_LOOPS:
            raise ConfigError(f"layer_loop={self.layer_loop!r}: use one of {', '.join(LAYER_LOOPS)}")
        if self.attention_impl not in ("xla", "flash"):
            raise ConfigError(f"attention_impl={self.attention_impl!r}: use 'xla' (any backend) or "
                              "'flash' (Pallas TPU flash attention)")

    @property
    def scans_layers(self) -> bool:
        if self.layer_loop == "auto":
            return self.num_hidden_layers > UNROLL_MAX_LAYERS
        return self.layer_loop == "scan"

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def eos_token_ids(self) -> tuple:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self, include_embeddings: bool = True) -> int:
        e, h, k, d, i = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                         self.head_dim, self.intermediate_size)
        attn = e * (h + 2 * k) * d + h * d * e
        if self.attention_bias:
            attn += (h + 2 * k) * d + e
        mlp = 3 * e * i + ((2 * i + e) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * e
        n = self.num_hidden_layers * layer + e
        if include_embeddings:
            n += self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs to train on one token of a `seq_len` row: 3x the forward (backward = 2x).

        The convention of PaLM's MFU (Chowdhery et al. 2022, appendix B), used by the train
        loop's `mfu` and by `alignjax bench` for both alignjax and torch: forward = 2 FLOPs per
        weight of every matmul (the layers and the LM head; the embedding lookup is no matmul)
        + attention's two products QK^T and PV, 2 * 2 * layers * seq_len * heads * head_dim,
        over all `seq_len` keys. Full, not causal: XLA's attention computes the whole masked
        score matrix, so counting half would call real work waste. Norms, RoPE, softmax and the
        optimizer update are not counted (each is O(params) or O(activations), not a matmul).
        """
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.hidden_size
        attn = 2 * self.num_hidden_layers * seq_len * self.num_attention_heads * self.head_dim
        return 6.0 * n + 6.0 * attn

    # ---- Hugging Face translation -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json", **runtime) -> "LlamaConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not a Llama model; alignjax supports "
                f"model_type in {SUPPORTED_MODEL_TYPES} (Llama 1/2/3/3.1/3.2)")
        missing = [k for k in HF_REQUIRED_KEYS if hf.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing {', '.join(missing)}; a Llama config.json needs "
                              f"{', '.join(HF_REQUIRED_KEYS)} (re-download or re-export the model)")
        bad = [f"{k}={hf[k]!r}" for k in HF_REQUIRED_KEYS
               if not isinstance(hf[k], int) or isinstance(hf[k], bool) or hf[k] < 1]
        if bad:
            raise ConfigError(f"{source}: {', '.join(bad)}: must be positive integers")
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        # transformers >= 5 folds rope_theta into `rope_parameters`.
        rope_params = hf.get("rope_parameters")
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            if "type" in rope_scaling and "rope_type" not in rope_scaling:
                rope_scaling["rope_type"] = rope_scaling.pop("type")
            if rope_scaling.get("rope_type") == "default":
                rope_scaling = None
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        kw.update(runtime)
        return cls(**kw)

    @classmethod
    def from_hf_dir(cls, path: str, **runtime) -> "LlamaConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ConfigError(f"{path}: no config.json; expected a Hugging Face model directory")
        return cls.from_hf_dict(read_hf_config(cfg_path), source=cfg_path, **runtime)

    def to_hf_dict(self, architecture: str = "LlamaForCausalLM") -> dict:
        eos = self.eos_token_id
        d = dict(
            architectures=[architecture],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling_dict or None,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            attention_dropout=0.0,
            mlp_bias=self.mlp_bias,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        return d

    # ---- alignjax's own json (architecture + runtime) -----------------------------------------

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict or None
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @classmethod
    def from_json_dict(cls, d: dict, **runtime) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{**d, **runtime})


def read_hf_config(path: str) -> dict:
    """A Hugging Face config.json as a dict; a damaged file is a ConfigError naming file:line."""
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                          "re-download or re-export the model") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; re-download or re-export the model") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def _freeze(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))
