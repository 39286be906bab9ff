"""Tiny random transformers Llama models in the styles of each Llama generation (test references)."""

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

STYLES = {
    # Llama 2: multi-head attention, rope_theta 1e4.
    "llama2": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0),
    # Llama 3.1: grouped-query attention, rope_theta 5e5, llama3 RoPE scaling.
    "llama31": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Llama 3.2: tied embeddings, explicit head_dim different from hidden/heads.
    "llama32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
                    tie_word_embeddings=True,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Linear RoPE scaling with attention and MLP biases.
    "linear_bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                        mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def hf_config(style: str, **overrides) -> LlamaConfig:
    kw = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
    kw.update(STYLES[style])
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_hf_model(style: str, path=None, head: str = "lm", seed: int = 0, **overrides):
    """A random model (biases and norms randomised too, so no weight is trivially 0 or 1)."""
    torch.manual_seed(seed)
    cfg = hf_config(style, **overrides)
    if head == "scalar":
        cfg.num_labels = 1
        model = LlamaForSequenceClassification(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.eval()
    if path is not None:
        model.save_pretrained(os.fspath(path))
    return model
