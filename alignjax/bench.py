"""`alignjax bench forward|generate`: tokens/s of alignjax and of transformers' PyTorch Llama,
measured in the same run on the same architecture, so the ratio is visible.

Weights are random (speed does not depend on their values); both sides use the same dtype.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from alignjax.model.config import ConfigError, LlamaConfig

PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    "medium": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4),
    # Llama-3.2-1B's architecture.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
               tie_word_embeddings=True, max_position_embeddings=131072,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def bench_config(preset: str = "small", hf_config: str | None = None, dtype: str = "float32"):
    if hf_config:
        return LlamaConfig.from_hf_dir(hf_config, dtype=dtype)
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {sorted(PRESETS)}")
    return LlamaConfig(**PRESETS[preset], dtype=dtype, max_position_embeddings=PRESETS[preset].get(
        "max_position_embeddings", 4096))


def _timeit(fn, steps: int) -> float:
    fn()  # warm-up (compilation, allocator)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def _jax_side(config, what, batch, seq_len, new_tokens, steps, mesh_sizes):
    import jax
    import jax.numpy as jnp
    from alignjax import sharding as shd
    from alignjax.model.generate import Generator, SamplingParams
    from alignjax.model.params import build_module, init_params

    mesh = shd.make_mesh(mesh_sizes)
    module = build_module(config)
    params = init_params(module, jax.random.PRNGKey(0), mesh)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, config.vocab_size, (batch, seq_len)).astype(np.int32)
    if what == "forward":
        data = shd.shard_batch(dict(tokens=tokens, positions=np.tile(np.arange(seq_len, dtype=np.int32),
                                                                       (batch, 1)),
                                    segment_ids=np.ones_like(tokens)), mesh)
        fwd = jax.jit(lambda p, b: module.apply(p, b["tokens"], b["positions"], b["segment_ids"])[0])
        with shd.mesh_context(mesh):
            secs = _timeit(lambda: fwd(params, data).block_until_ready(), steps)
        return batch * seq_len / secs, secs
    gen = Generator(module, mesh, eos_ids=(), pad_id=0, prompt_buckets=(seq_len,))
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    mask = np.ones_like(tokens)
    secs = _timeit(lambda: gen.generate_padded(params, tokens, mask, sampling), steps)
    return batch * new_tokens / secs, secs


def _torch_side(config, what, batch, seq_len, new_tokens, steps):
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    hf = HFConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures",)})
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).to(device=device, dtype=torch_dtype).eval()
    tokens = torch.tensor(np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq_len)),
                          device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    @torch.no_grad()
    def run():
        if what == "forward":
            model(tokens).logits
        else:
            model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        sync()

    secs = _timeit(run, steps)
    n = batch * (seq_len if what == "forward" else new_tokens)
    return n / secs, secs, device


def run(what: str, preset="small", hf_config=None, batch=8, seq_len=256, new_tokens=64, steps=5,
        dtype="float32", mesh=None, with_torch=True) -> dict:
    import jax
    config = bench_config(preset, hf_config, dtype)
    tps, secs = _jax_side(config, what, batch, seq_len, new_tokens, steps, mesh or {"data": -1})
    result = dict(what=what, preset=hf_config or preset, dtype=dtype, batch=batch, seq_len=seq_len,
                  new_tokens=new_tokens if what == "generate" else None,
                  params=config.num_params(), devices=f"{jax.device_count()}x {jax.devices()[0].device_kind}",
                  host=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  alignjax_tokens_per_s=tps, alignjax_s_per_call=secs)
    if what == "forward":  # forward FLOPs ~ 2 * params per token, attention excluded
        result["alignjax_tflops"] = 2 * config.num_params() * tps / 1e12
    if with_torch:
        try:
            ttps, tsecs, device = _torch_side(config, what, batch, seq_len, new_tokens, steps)
            result.update(torch_tokens_per_s=ttps, torch_s_per_call=tsecs, torch_device=device,
                          speedup=tps / ttps)
        except ImportError:
            result["torch_tokens_per_s"] = None
    return result


def format_result(r: dict) -> str:
    lines = [f"bench {r['what']}: preset={r['preset']} params={r['params']:,} dtype={r['dtype']} "
             f"batch={r['batch']} seq_len={r['seq_len']}"
             + (f" new_tokens={r['new_tokens']}" if r["new_tokens"] else ""),
             f"  devices: {r['devices']}   host: {r['host']}",
             f"  alignjax (JAX)        {r['alignjax_tokens_per_s']:>12,.1f} tokens/s"
             f"   ({r['alignjax_s_per_call'] * 1e3:.1f} ms/call)"]
    if r.get("torch_tokens_per_s"):
        lines.append(f"  transformers (torch)  {r['torch_tokens_per_s']:>12,.1f} tokens/s"
                     f"   ({r['torch_s_per_call'] * 1e3:.1f} ms/call, {r['torch_device']})")
        lines.append(f"  ratio alignjax/torch: {r['speedup']:.2f}x")
    elif "torch_tokens_per_s" in r:
        lines.append("  transformers (torch): not installed")
    return "\n".join(lines)
