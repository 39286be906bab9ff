"""`alignjax bench forward|generate|rollout|train`: tokens/s of alignjax and of transformers'
PyTorch Llama, measured in the same run on the same architecture, so the ratio is visible.

Weights and batches are random (speed does not depend on their values); both sides use the same
dtype. `train` times one optimizer step: alignjax's jitted step (alignjax.train.step with the SFT
or DPO sums function and alignjax's AdamW) against the same step in torch (LlamaForCausalLM +
torch.optim.AdamW, gradient clipping 1.0 on both sides), i.e. the inner step of TRL's SFT and DPO
trainers without their overhead. SFT: masked token NLL on [batch, seq_len]. DPO: `batch` pairs;
the policy runs on chosen and rejected stacked on the batch axis ([2 * batch, seq_len]), the
frozen reference (a colocated copy) runs forward only, sigmoid DPO loss with beta 0.1.
MFU = model FLOPs/s / the hardware's peak FLOP/s (alignjax.train.metrics.peak_flops), with
FLOPs from LlamaConfig.flops_per_token (the reference forward counts a third of a train token).
`rollout` times the sampling of one PPO rollout: `batch` responses, `batch / samples_per_prompt`
prompts of `seq_len` tokens each sampled `samples_per_prompt` times, `new_tokens` tokens each
(no stop token), at temperature 0.7 (PPO's default), through the engine PPO uses
(alignjax.train.rollout.Roller.sample) against transformers' `generate(do_sample=True,
num_return_sequences=samples_per_prompt)` (TRL's PPO rollout); tokens/s counts generated tokens.
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
    return LlamaConfig(**{"max_position_embeddings": 4096, **PRESETS[preset]}, dtype=dtype)


def _timeit(fn, steps: int) -> float:
    fn()  # warm-up (compilation, allocator)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


TRAIN_ALGORITHMS = ("sft", "dpo")
DPO_BETA = 0.1


def train_flops_per_token(config, seq_len: int, algorithm: str) -> float:
    """Model FLOPs per policy token of one train step (same convention as the train loop)."""
    fpt = config.flops_per_token(seq_len)
    return fpt * (1 + 1 / 3) if algorithm == "dpo" else fpt  # + the reference's forward


def _train_batch(config, algorithm: str, batch: int, seq_len: int) -> dict:
    """A synthetic batch: SFT [batch, T]; DPO [batch, 2, T] (chosen, rejected). Loss on the
    second half of each row (the "completion"), like a prompt/response example."""
    shape = (batch, seq_len) if algorithm == "sft" else (batch, 2, seq_len)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, config.vocab_size, shape).astype(np.int32)
    mask = np.zeros(shape, np.float32)
    mask[..., seq_len // 2:-1] = 1.0
    return dict(tokens=tokens, positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
                segment_ids=np.ones(shape, np.int32), targets=np.roll(tokens, -1, axis=-1),
                loss_mask=mask)


def _optimizer_config():
    from ml_collections import ConfigDict
    return ConfigDict(dict(lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, schedule="constant",
                           warmup_steps=0, min_lr_ratio=0.0, grad_clip=1.0))


def _jax_train(config, algorithm, batch, seq_len, steps, mesh_sizes):
    """Seconds per optimizer step of alignjax's real jitted train step."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from alignjax import sharding as shd
    from alignjax.model.params import build_module, init_params
    from alignjax.train import dpo, sft
    from alignjax.train.loop import to_global
    from alignjax.train.optim import make_optimizer
    from alignjax.train.slots import per_slot
    from alignjax.train.state import init_state, state_shardings
    from alignjax.train.step import make_train_step

    mesh = shd.make_mesh(mesh_sizes)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % shards:
        raise ConfigError(f"--batch {batch} is not a multiple of the mesh's data x fsdp = {shards} "
                          "devices; choose a multiple, or --mesh data=1 (fewer devices)")
    module = build_module(config)
    tx, schedule = make_optimizer(_optimizer_config(), 1000)
    optimizer = per_slot({"policy": tx})
    _, shardings = state_shardings({"policy": module}, optimizer, mesh)
    params = init_params(module, jax.random.PRNGKey(0), mesh)
    frozen = {}
    if algorithm == "sft":
        sums_fn, metrics_fn = sft.make_sums_fn(module), sft.metrics
    else:
        from alignjax.config import load_config
        settings = dpo.settings(load_config("configs/dpo.py:tiny", [
            "dpo.loss_type=dpo", f"dpo.beta={DPO_BETA}", "dpo.reference=colocated"]))
        sums_fn, metrics_fn = dpo.make_sums_fn(module, module, settings), dpo.metrics
        frozen = {"reference": jax.tree_util.tree_map(lambda x: x.copy(), params)}  # colocated
    state = init_state({"policy": params}, optimizer, shardings, 0)
    step_fn = jax.jit(make_train_step(sums_fn, metrics_fn, optimizer, {"policy": schedule}),
                      out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
    with shd.mesh_context(mesh):
        data = to_global(_train_batch(config, algorithm, batch, seq_len), mesh, shd.DEFAULT_RULES)

        def one():
            nonlocal state
            state, metrics = step_fn(state, data, frozen)
            jax.block_until_ready(metrics)

        return _timeit(one, steps)


def _torch_train(config, algorithm, batch, seq_len, steps):
    """Seconds per optimizer step of the same step in PyTorch (what TRL runs inside)."""
    import copy
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    hf = HFConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures",)})
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).to(device=device, dtype=torch_dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    b = {k: torch.tensor(v, device=device, dtype=torch.float32 if v.dtype == np.float32 else torch.long)
         for k, v in _train_batch(config, algorithm, batch, seq_len).items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def seq_logps(m, tokens, targets, mask):  # [N, T] -> summed response log-probs [N]
        logits = m(tokens).logits.float()
        logps = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return (logps * mask).sum(-1)

    if algorithm == "sft":
        def loss_fn():
            logits = model(b["tokens"]).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), b["targets"], reduction="none")
            return (nll * b["loss_mask"]).sum() / b["loss_mask"].sum()
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        # [batch, 2, T] -> [2 * batch, T]: all chosen rows, then all rejected rows.
        stacked = [b[k].transpose(0, 1).reshape(2 * batch, seq_len) for k in ("tokens", "targets", "loss_mask")]

        def loss_fn():
            policy = seq_logps(model, *stacked)
            with torch.no_grad():
                ref = seq_logps(reference, *stacked)
            margin = (policy[:batch] - ref[:batch]) - (policy[batch:] - ref[batch:])
            return -F.logsigmoid(DPO_BETA * margin).mean()

    def one():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    return _timeit(one, steps), device


def _jax_side(config, what, batch, seq_len, new_tokens, steps, mesh_sizes):
    import jax
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


ROLLOUT_TEMPERATURE = 0.7  # PPO's default (configs/ppo.py), TRL's too


def _prompts(config, batch: int, seq_len: int) -> np.ndarray:
    return np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq_len)).astype(np.int32)


def _jax_rollout(config, batch, seq_len, new_tokens, steps, mesh_sizes, samples_per_prompt):
    """(seconds per rollout, tokens generated by the last one) of PPO's sampler."""
    import jax
    from alignjax import sharding as shd
    from alignjax.model.params import build_module, init_params
    from alignjax.train.rollout import Roller, RolloutSettings

    mesh = shd.make_mesh(mesh_sizes)
    module = build_module(config)
    params = init_params(module, jax.random.PRNGKey(0), mesh)
    settings = RolloutSettings(max_prompt_len=seq_len, max_new_tokens=new_tokens,
                               samples_per_prompt=samples_per_prompt, temperature=ROLLOUT_TEMPERATURE)
    roller = Roller(module, mesh, shd.DEFAULT_RULES, None, settings, eos_ids=(), pad_id=0)
    query = _prompts(config, batch // samples_per_prompt, seq_len)
    out = {}

    def one():
        out["batch"] = roller.sample(params, query, np.ones_like(query), seed=0)

    secs = _timeit(one, steps)
    return secs, int(out["batch"]["response_mask"].sum())


def _torch_side(config, what, batch, seq_len, new_tokens, steps, samples_per_prompt=1):
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    hf = HFConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures",)})
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).to(device=device, dtype=torch_dtype).eval()
    k = samples_per_prompt if what == "rollout" else 1
    tokens = torch.tensor(_prompts(config, batch // k, seq_len), dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # rollout: sampled as TRL's PPO does (top_k 0 = off, as alignjax's)
    sampling = (dict(do_sample=True, temperature=ROLLOUT_TEMPERATURE, top_k=0, top_p=1.0,
                     num_return_sequences=k) if what == "rollout" else dict(do_sample=False))
    out = {}

    @torch.no_grad()
    def run():
        if what == "forward":
            model(tokens).logits
        else:
            out["tokens"] = model.generate(tokens, attention_mask=torch.ones_like(tokens),
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           pad_token_id=0, **sampling)
        sync()

    secs = _timeit(run, steps)
    if what == "rollout":  # the tokens the last call generated
        generated = out["tokens"].shape[0] * (out["tokens"].shape[1] - seq_len)
        return generated / secs, secs, device, generated
    n = batch * (seq_len if what == "forward" else new_tokens)
    return n / secs, secs, device


def run(what: str, preset="small", hf_config=None, batch=8, seq_len=256, new_tokens=64, steps=5,
        dtype="float32", mesh=None, with_torch=True, algorithm="sft", samples_per_prompt=1) -> dict:
    """One bench at one batch size -> a JSON-able dict (see format_result / format_table)."""
    import jax
    from alignjax.train.metrics import peak_flops
    config = bench_config(preset, hf_config, dtype)
    if what == "train" and algorithm not in TRAIN_ALGORITHMS:
        raise ConfigError(f"--algorithm {algorithm!r}: choose one of {', '.join(TRAIN_ALGORITHMS)}")
    if what == "rollout" and (samples_per_prompt < 1 or batch % samples_per_prompt):
        raise ConfigError(f"--batch {batch} is not a multiple of --samples-per-prompt "
                          f"{samples_per_prompt}: --batch counts responses; choose a multiple")
    mesh_sizes = mesh or {"data": -1}
    extra = {}
    # Tokens per call: train counts every sequence the policy trains on (DPO: 2 per pair).
    if what == "train":
        secs = _jax_train(config, algorithm, batch, seq_len, steps, mesh_sizes)
        n_tokens = batch * seq_len * (2 if algorithm == "dpo" else 1)
        tps = n_tokens / secs
    elif what == "rollout":
        secs, generated = _jax_rollout(config, batch, seq_len, new_tokens, steps, mesh_sizes,
                                       samples_per_prompt)
        tps = generated / secs
        extra = dict(samples_per_prompt=samples_per_prompt, temperature=ROLLOUT_TEMPERATURE,
                     alignjax_tokens_per_call=generated)
    else:
        tps, secs = _jax_side(config, what, batch, seq_len, new_tokens, steps, mesh_sizes)
    result = dict(what=what, algorithm=algorithm if what == "train" else None,
                  preset=hf_config or preset, dtype=dtype, batch=batch, seq_len=seq_len,
                  new_tokens=new_tokens if what in ("generate", "rollout") else None,
                  params=config.num_params(), devices=f"{jax.device_count()}x {jax.devices()[0].device_kind}",
                  host=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  alignjax_tokens_per_s=tps, alignjax_s_per_call=secs, **extra)
    if what in ("forward", "train"):  # generation is memory-bound: MFU says little there
        fpt = (train_flops_per_token(config, seq_len, algorithm) if what == "train"
               else config.flops_per_token(seq_len) / 3)  # forward = a third of a train token
        peak, source = peak_flops(dtype)
        result.update(flops_per_token=fpt, peak_flops=peak, peak_source=source,
                      alignjax_mfu=tps * fpt / peak)
    if with_torch:
        try:
            if what == "train":
                tsecs, device = _torch_train(config, algorithm, batch, seq_len, steps)
                ttps = n_tokens / tsecs
            elif what == "rollout":
                ttps, tsecs, device, generated = _torch_side(config, what, batch, seq_len, new_tokens,
                                                             steps, samples_per_prompt)
                result["torch_tokens_per_call"] = generated
            else:
                ttps, tsecs, device = _torch_side(config, what, batch, seq_len, new_tokens, steps)
            result.update(torch_tokens_per_s=ttps, torch_s_per_call=tsecs, torch_device=device,
                          speedup=tps / ttps)
            if "peak_flops" in result:
                result["torch_mfu"] = ttps * result["flops_per_token"] / result["peak_flops"]
        except ImportError:
            result["torch_tokens_per_s"] = None
    return result


def run_batches(what: str, batches, **kw) -> list[dict]:
    """`run` once per batch size (the model and peak are rebuilt/cached; each is independent)."""
    return [run(what, batch=b, **kw) for b in batches]


def format_result(r: dict) -> str:
    what = r["what"] + (f" --algorithm {r['algorithm']}" if r.get("algorithm") else "")
    lines = [f"bench {what}: preset={r['preset']} params={r['params']:,} dtype={r['dtype']} "
             f"batch={r['batch']} seq_len={r['seq_len']}"
             + (f" new_tokens={r['new_tokens']}" if r["new_tokens"] else "")
             + (f" samples_per_prompt={r['samples_per_prompt']} temperature={r['temperature']}"
                if r["what"] == "rollout" else ""),
             f"  devices: {r['devices']}   host: {r['host']}",
             f"  alignjax (JAX)        {r['alignjax_tokens_per_s']:>12,.1f} tokens/s"
             f"   ({r['alignjax_s_per_call'] * 1e3:.1f} ms/call)" + _mfu(r, "alignjax_mfu")]
    if r.get("torch_tokens_per_s"):
        lines.append(f"  transformers (torch)  {r['torch_tokens_per_s']:>12,.1f} tokens/s"
                     f"   ({r['torch_s_per_call'] * 1e3:.1f} ms/call, {r['torch_device']})"
                     + _mfu(r, "torch_mfu"))
        lines.append(f"  ratio alignjax/torch: {r['speedup']:.2f}x")
    elif "torch_tokens_per_s" in r:
        lines.append("  transformers (torch): not installed")
    if "peak_flops" in r:
        lines.append(f"  MFU = {r['flops_per_token'] / 1e6:,.1f} MFLOP/token x tokens/s / peak "
                     f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_source']})")
    return "\n".join(lines)


def _mfu(r: dict, key: str) -> str:
    return f"   MFU {100 * r[key]:.1f}%" if r.get(key) is not None else ""


def format_table(results: list[dict]) -> str:
    """Several batch sizes of one bench: a header, then one row per batch."""
    first = results[0]
    head = format_result(first).splitlines()[:2]
    head[0] = head[0].replace(f"batch={first['batch']}", "batch=" + ",".join(str(r["batch"]) for r in results))
    has_mfu = "peak_flops" in first
    cols = f"  {'batch':>6} {'alignjax tok/s':>15} {'torch tok/s':>12} {'ratio':>7}"
    cols += f" {'alignjax MFU':>13} {'torch MFU':>10}" if has_mfu else ""
    lines = head + [cols]
    for r in results:
        t, tm = r.get("torch_tokens_per_s"), r.get("torch_mfu")
        torch_tps = f"{t:,.1f}" if t else "-"
        ratio = f"{r['speedup']:.2f}x" if t else "-"
        row = f"  {r['batch']:>6} {r['alignjax_tokens_per_s']:>15,.1f} {torch_tps:>12} {ratio:>7}"
        if has_mfu:
            torch_mfu = f"{100 * tm:.1f}%" if tm is not None else "-"
            row += f" {100 * r['alignjax_mfu']:>12.1f}% {torch_mfu:>10}"
        lines.append(row)
    if has_mfu:
        lines.append(f"  MFU: model FLOPs/s / peak {first['peak_flops'] / 1e9:,.1f} GFLOP/s ({first['peak_source']})")
    return "\n".join(lines)
