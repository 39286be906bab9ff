"""Batched sampling with a KV cache, jitted once per (batch, prompt, new-token) bucket.

Prompts are left-padded into fixed buckets; positions come from the mask, so padding never shifts
RoPE. Exactly `max_new_tokens` are produced; everything after the first EOS is masked and set to
the pad id. Temperature, top-k and top-p are traced values, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from alignjax import sharding as shd
from alignjax.model.llama import CACHE_AXES, Llama, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int = 0


def filter_logits(logits_bv, top_k, top_p):
    """Masks logits outside the top-k set and outside the top-p nucleus (k=0 / p=1 disable)."""
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    v = logits_bv.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(sorted_bv, jnp.broadcast_to(k - 1, (logits_bv.shape[0], 1)), axis=-1)
    logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    # Nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p.
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)


def sample_token(rng, logits_bv, temperature, top_k, top_p):
    """Returns (token_b, logp_b) with logp under the temperature-scaled, unfiltered distribution."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy = jnp.argmax(logits_bv, axis=-1)
    t = jnp.maximum(temperature, 1e-6)
    scaled = logits_bv / t
    sampled = jax.random.categorical(rng, filter_logits(scaled, top_k, top_p), axis=-1)
    token = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
    logp_bv = jax.nn.log_softmax(jnp.where(temperature > 0, scaled, logits_bv), axis=-1)
    return token, jnp.take_along_axis(logp_bv, token[:, None], axis=-1)[:, 0]


def block_logits(logits_bv, blocked_ids: tuple):
    """Sets the logits of `blocked_ids` to -inf: they are never picked, greedy or sampled."""
    if not blocked_ids:
        return logits_bv
    return logits_bv.astype(jnp.float32).at[:, jnp.asarray(blocked_ids, jnp.int32)].set(-jnp.inf)


def _generate(module: Llama, params, prompt_bp, prompt_mask_bp, rng, temperature, top_k, top_p,
              *, max_new_tokens: int, eos_ids: tuple, pad_id: int, cache_dtype,
              blocked_ids: tuple = ()):
    b, p = prompt_bp.shape
    cache = init_cache(module.config, b, p + max_new_tokens, cache_dtype)
    cache = {k: nn.with_logical_constraint(v, CACHE_AXES[k]) for k, v in cache.items()}
    mask = prompt_mask_bp.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    logits, cache = module.apply(params, prompt_bp, positions, mask, cache=cache)
    next_pos = positions[:, -1] + 1
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def step(carry, t):
        cache, logits_bv, pos_b, done_b = carry
        token, logp = sample_token(jax.random.fold_in(rng, t), block_logits(logits_bv, blocked_ids),
                                   temperature, top_k, top_p)
        valid = ~done_b
        token = jnp.where(valid, token, pad_id)
        done_b = done_b | jnp.isin(token, eos)
        out_logits, cache = module.apply(params, token[:, None], pos_b[:, None],
                                         jnp.ones((b, 1), jnp.int32), cache=cache)
        return (cache, out_logits[:, -1], pos_b + 1, done_b), (token, valid, logp)

    init = (cache, logits[:, -1], next_pos, jnp.zeros((b,), bool))
    _, (tokens, valid, logps) = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
    valid = valid.T
    return dict(tokens=tokens.T, mask=valid.astype(jnp.int32), logps=jnp.where(valid, logps.T, 0.0))


class Generator:
    """Holds one jitted sampler per bucket shape; reuse it across calls to avoid recompiles.

    `blocked_ids`: token ids that are never generated (e.g. control tokens of conditional
    training); their logits are -inf before greedy/sampling, so the returned `logps` are under
    the distribution renormalised over the allowed tokens.
    """

    def __init__(self, module: Llama, mesh: Mesh, rules=shd.DEFAULT_RULES, eos_ids: Sequence[int] = (),
                 pad_id: int = 0, prompt_buckets: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024,
                                                                    2048, 4096, 8192),
                 cache_dtype=None, blocked_ids: Sequence[int] = ()):
        self.module, self.mesh, self.rules = module, mesh, rules
        self.blocked_ids = tuple(sorted({int(i) for i in blocked_ids}))
        bad = [i for i in self.blocked_ids if not 0 <= i < module.config.vocab_size]
        if bad:
            raise ValueError(f"blocked_ids {bad} are outside the vocabulary [0, "
                             f"{module.config.vocab_size})")
        self.eos_ids, self.pad_id = tuple(int(e) for e in eos_ids), int(pad_id)
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.cache_dtype = cache_dtype or jnp.dtype(module.config.dtype)
        self._jitted = jax.jit(
            _generate, static_argnums=(0,),
            static_argnames=("max_new_tokens", "eos_ids", "pad_id", "cache_dtype", "blocked_ids"))
        self.batch_multiple = shd.axis_size(mesh, dict(rules).get("batch"))

    def compile_count(self) -> int:
        return self._jitted._cache_size()

    def bucket(self, n_prompts: int, max_len: int) -> tuple[int, int]:
        m = self.batch_multiple
        b = max(m, math.ceil(n_prompts / m) * m)
        fits = [x for x in self.prompt_buckets if x >= max_len]
        if not fits:
            raise ValueError(f"prompt of {max_len} tokens is longer than the largest bucket "
                             f"{self.prompt_buckets[-1]}")
        return b, fits[0]

    def generate_ids(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams):
        """Left-pads token-id prompts into a bucket, samples, returns numpy arrays per prompt row."""
        if not prompts:
            return dict(tokens=np.zeros((0, sampling.max_new_tokens), np.int32))
        b, p = self.bucket(len(prompts), max(len(x) for x in prompts))
        tokens = np.full((b, p), self.pad_id, np.int32)
        mask = np.zeros((b, p), np.int32)
        for i, ids in enumerate(prompts):
            if len(ids):
                tokens[i, p - len(ids):] = ids
                mask[i, p - len(ids):] = 1
        return self.generate_padded(params, tokens, mask, sampling, n_rows=len(prompts))

    def generate_texts(self, params, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                       batch_size: int = 64, progress: bool = False, desc: str = "generate") -> list[str]:
        """Decoded completions of token-id `prompts`, `batch_size` at a time. Every batch has one
        shape (the last is padded with copies), so nothing recompiles; batch c samples with seed
        sampling.seed * 1_000_003 + c, so batches do not repeat each other's random draws."""
        from tqdm import tqdm
        texts = []
        with tqdm(total=len(prompts), desc=desc, unit="seq", disable=not progress) as bar:
            for c, start in enumerate(range(0, len(prompts), batch_size)):
                chunk = list(prompts[start:start + batch_size])
                real = len(chunk)
                chunk += [chunk[-1]] * (batch_size - real)
                out = self.generate_ids(params, chunk,
                                        dataclasses.replace(sampling, seed=sampling.seed * 1_000_003 + c))
                texts += completions_to_text(tokenizer, out["tokens"][:real], out["mask"][:real], self.eos_ids)
                bar.update(real)
        return texts

    def generate_padded(self, params, tokens_bp, mask_bp, sampling: SamplingParams, n_rows=None):
        batch = shd.shard_batch(dict(tokens=tokens_bp, mask=mask_bp), self.mesh, self.rules)
        with shd.mesh_context(self.mesh, self.rules):
            out = self._jitted(
                self.module, params, batch["tokens"], batch["mask"],
                jax.random.PRNGKey(sampling.seed), jnp.float32(sampling.temperature),
                jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
                max_new_tokens=sampling.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
                cache_dtype=self.cache_dtype, blocked_ids=self.blocked_ids)
        out = jax.device_get(out)
        n = tokens_bp.shape[0] if n_rows is None else n_rows
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def completions_to_text(tokenizer, tokens_bn, mask_bn, eos_ids=()) -> list[str]:
    """Decodes each row up to (not including) its EOS, special tokens skipped."""
    texts = []
    for row, m in zip(tokens_bn, mask_bn):
        ids = [int(t) for t, v in zip(row, m) if v and int(t) not in eos_ids]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts
