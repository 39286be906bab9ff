"""Batched sampling with a KV cache, jitted once per (batch, prompt, new-token, top-k) bucket.

Prompts are left-padded into fixed buckets; positions come from the mask, so padding never shifts
RoPE. Outputs have a static [B, max_new_tokens] shape; everything after a row's first EOS is masked
and set to the pad id, and decoding stops as soon as every row is done. Temperature, top-p and the
seed are traced values, so changing them does not recompile; top-k is static (`lax.top_k` needs a
static k), so a new top-k compiles once more.

Cost per decoded token: one forward of one token per row; each layer's KV cache buffers are
carried through the decode loop and only the new token's K/V is written (in place). Greedy
decoding and pure-temperature sampling sort nothing; top-k costs a `lax.top_k`, top-p one sort
(of the k kept logits when top-k is on, of the vocabulary otherwise), only when it is on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from alignjax import sharding as shd
from alignjax.errors import UserError
from alignjax.model.llama import Llama, constrain_cache, init_cache, project_logits, unstack_layers

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0            # 0 = off; static: a new value compiles once more
    top_p: float = 1.0        # 1 = off
    seed: int = 0

    def __post_init__(self):
        # Named after the CLI flags (`alignjax generate` / `alignjax sample`) that set them.
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def filter_logits(logits_bv, top_k: int, top_p):
    """Masks logits outside the top-k set and outside the top-p nucleus (k=0 / p=1 disable).

    `top_k` is a static int; `top_p` may be traced: the nucleus sort runs only when top_p < 1.
    """
    top_k = int(top_k)
    v = logits_bv.shape[-1]
    top_desc = None
    if 0 < top_k < v:
        top_desc = jax.lax.top_k(logits_bv, top_k)[0]  # [B, k], descending
        logits_bv = jnp.where(logits_bv < top_desc[:, -1:], -jnp.inf, logits_bv)

    def nucleus(l_bv):
        # Keep the smallest prefix of sorted tokens whose mass reaches top_p. After top-k the
        # prefix lies within the k kept values, so only those are sorted (already, by top_k).
        sorted_bv = top_desc if top_desc is not None else -jnp.sort(-l_bv, axis=-1)
        probs = jnp.exp(sorted_bv - jax.nn.logsumexp(l_bv, axis=-1, keepdims=True))
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(l_bv < cutoff, -jnp.inf, l_bv)

    return jax.lax.cond(top_p < 1, nucleus, lambda l_bv: l_bv, logits_bv)


def _picked_logp(logits_bv, token_b):
    return jnp.take_along_axis(jax.nn.log_softmax(logits_bv, axis=-1), token_b[:, None], axis=-1)[:, 0]


def sample_token(rng, logits_bv, temperature, top_k: int, top_p):
    """Returns (token_b, logp_b) with logp under the temperature-scaled, unfiltered distribution.

    temperature == 0 is greedy (argmax, logp under the raw logits). `top_k` is a static int.
    """
    return _sample_token(rng, logits_bv, temperature, int(top_k), top_p)


@functools.partial(jax.jit, static_argnums=(3,))  # jitted: called eagerly, lax.cond would retrace
def _sample_token(rng, logits_bv, temperature, top_k: int, top_p):
    logits_bv = logits_bv.astype(jnp.float32)

    def greedy(l_bv):
        token = jnp.argmax(l_bv, axis=-1).astype(jnp.int32)
        return token, _picked_logp(l_bv, token)

    def sample(l_bv):
        scaled = l_bv / jnp.maximum(temperature, 1e-6)
        token = jax.random.categorical(rng, filter_logits(scaled, top_k, top_p), axis=-1)
        token = token.astype(jnp.int32)
        return token, _picked_logp(scaled, token)

    return jax.lax.cond(temperature > 0, sample, greedy, logits_bv)


def block_logits(logits_bv, blocked_ids: tuple):
    """Sets the logits of `blocked_ids` to -inf: they are never picked, greedy or sampled."""
    if not blocked_ids:
        return logits_bv
    return logits_bv.astype(jnp.float32).at[:, jnp.asarray(blocked_ids, jnp.int32)].set(-jnp.inf)


def _generate(module: Llama, params, prompt_bp, prompt_mask_bp, rng, temperature, top_p,
              *, top_k: int, max_new_tokens: int, eos_ids: tuple, pad_id: int, cache_dtype,
              blocked_ids: tuple = ()):
    b, p = prompt_bp.shape
    n = max_new_tokens
    # Per-layer weights, sliced once per call: the decode loop then reads them in place.
    params = unstack_layers(params, module.config.num_hidden_layers)
    module = module.clone(scan_layers=False)
    cache = constrain_cache(init_cache(module.config, b, p + n, cache_dtype))
    mask = prompt_mask_bp.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    # Prefill in one pass; only the last position needs logits.
    hidden, cache = module.apply(params, prompt_bp, positions, mask, cache=cache, output="hidden")
    logits_bv = project_logits(params, module.config, hidden[:, -1])
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def not_finished(carry):
        t, done_b = carry[0], carry[4]
        return (t < n) & ~jnp.all(done_b)

    def step(carry):
        t, cache, logits_bv, pos_b, done_b, tokens_nb, valid_nb, logps_nb = carry
        token, logp = sample_token(jax.random.fold_in(rng, t), block_logits(logits_bv, blocked_ids),
                                   temperature, top_k, top_p)
        valid = ~done_b
        token = jnp.where(valid, token, pad_id)
        done_b = done_b | jnp.isin(token, eos)
        tokens_nb = jax.lax.dynamic_update_index_in_dim(tokens_nb, token, t, 0)
        valid_nb = jax.lax.dynamic_update_index_in_dim(valid_nb, valid, t, 0)
        logps_nb = jax.lax.dynamic_update_index_in_dim(logps_nb, jnp.where(valid, logp, 0.0), t, 0)
        out_logits, cache = module.apply(params, token[:, None], pos_b[:, None],
                                         jnp.ones((b, 1), jnp.int32), cache=cache)
        return (t + 1, cache, out_logits[:, -1], pos_b + 1, done_b, tokens_nb, valid_nb, logps_nb)

    # Rows stay [n, B] until the end (a step writes one contiguous row); unwritten steps after
    # an early stop keep the pad id / invalid / 0.
    init = (jnp.zeros((), jnp.int32), cache, logits_bv, positions[:, -1] + 1, jnp.zeros((b,), bool),
            jnp.full((n, b), pad_id, jnp.int32), jnp.zeros((n, b), bool), jnp.zeros((n, b), jnp.float32))
    _, _, _, _, _, tokens, valid, logps = jax.lax.while_loop(not_finished, step, init)
    return dict(tokens=tokens.T, mask=valid.T.astype(jnp.int32), logps=logps.T)


class Generator:
    """Holds one jitted sampler per bucket shape; reuse it across calls to avoid recompiles.

    `blocked_ids`: token ids that are never generated (e.g. control tokens of conditional
    training); their logits are -inf before greedy/sampling, so the returned `logps` are under
    the distribution renormalised over the allowed tokens.

    `overflow`: a prompt whose length + max_new_tokens exceeds the model's max_position_embeddings
    is refused ("error", a UserError) or left-truncated with a warning ("truncate").
    """

    def __init__(self, module: Llama, mesh: Mesh, rules=shd.DEFAULT_RULES, eos_ids: Sequence[int] = (),
                 pad_id: int = 0, prompt_buckets: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024,
                                                                    2048, 4096, 8192),
                 cache_dtype=None, blocked_ids: Sequence[int] = (), overflow: str = "error"):
        if overflow not in ("error", "truncate"):
            raise ValueError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
        self.module, self.mesh, self.rules = module, mesh, rules
        self.overflow = overflow
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
            static_argnames=("top_k", "max_new_tokens", "eos_ids", "pad_id", "cache_dtype",
                             "blocked_ids"))
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
        room = self._prompt_room([len(x) for x in prompts], sampling.max_new_tokens)
        prompts = [ids[len(ids) - room:] if len(ids) > room else ids for ids in prompts]
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

    def _prompt_room(self, lengths: Sequence[int], max_new_tokens: int) -> int:
        """How many prompt tokens fit before max_position_embeddings; longer prompts are refused
        (overflow="error") or left-truncated to that many tokens with a warning ("truncate")."""
        limit = self.module.config.max_position_embeddings
        room = limit - max_new_tokens
        if room < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model's "
                            f"max_position_embeddings is {limit}")
        long = [i for i, n in enumerate(lengths) if n > room]
        if long and self.overflow == "error":
            raise UserError(
                f"prompt {long[0]} has {lengths[long[0]]} tokens; with --max-new-tokens {max_new_tokens} that "
                f"exceeds the model's max_position_embeddings {limit} ({len(long)} prompt(s) too long): "
                f"shorten the prompts, lower --max-new-tokens, or pass --truncate-prompts to keep the "
                f"last {room} tokens of each")
        if long:
            log.warning("left-truncated %d prompt(s) to their last %d tokens (max_position_embeddings %d "
                        "- max_new_tokens %d)", len(long), room, limit, max_new_tokens)
        return room

    def generate_padded(self, params, tokens_bp, mask_bp, sampling: SamplingParams, n_rows=None):
        """Samples from left-padded [B, P] prompts (mask 1 = token)."""
        lengths = np.asarray(mask_bp).sum(-1).tolist()
        room = self._prompt_room(lengths, sampling.max_new_tokens)
        if max(lengths, default=0) > room:  # left padding: the last `room` columns hold the tails
            tokens_bp, mask_bp = tokens_bp[:, -room:], mask_bp[:, -room:]
        with shd.mesh_context(self.mesh, self.rules):
            out = self._jitted(*self._args(params, tokens_bp, mask_bp, sampling),
                               **self._static(sampling))
        out = shd.to_host(out)  # every process samples the same global batch and reads all of it
        n = tokens_bp.shape[0] if n_rows is None else n_rows
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def lower(self, params, tokens_bp, mask_bp, sampling: SamplingParams):
        """The lowered sampler of this bucket (`.compile().as_text()` is the optimised HLO)."""
        with shd.mesh_context(self.mesh, self.rules):
            return self._jitted.lower(*self._args(params, tokens_bp, mask_bp, sampling),
                                      **self._static(sampling))

    def _args(self, params, tokens_bp, mask_bp, sampling: SamplingParams):
        batch = shd.shard_batch(dict(tokens=tokens_bp, mask=mask_bp), self.mesh, self.rules)
        return (self.module, params, batch["tokens"], batch["mask"], jax.random.PRNGKey(sampling.seed),
                jnp.float32(sampling.temperature), jnp.float32(sampling.top_p))

    def _static(self, sampling: SamplingParams) -> dict:
        return dict(top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens, eos_ids=self.eos_ids,
                    pad_id=self.pad_id, cache_dtype=self.cache_dtype, blocked_ids=self.blocked_ids)


def completions_to_text(tokenizer, tokens_bn, mask_bn, eos_ids=()) -> list[str]:
    """Decodes each row up to (not including) its EOS, special tokens skipped."""
    texts = []
    for row, m in zip(tokens_bn, mask_bn):
        ids = [int(t) for t, v in zip(row, m) if v and int(t) not in eos_ids]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts
