"""Rollouts for online RL (docs/algorithms.md section 6, steps 1-2): sample, score, and the
per-token log-probs and values the update needs, with static shapes.

    roller = Roller(policy_module, mesh, rules, tokenizer, settings, reward=..., value_module=...,
                    ref_module=...)
    batch, info = roller.rollout(params, frozen, prompts, seed)

`params` is the train state's trainable dict ({"policy": ..., "value": ...}): the sampler and the
forward passes read the very arrays the trainer updates (no weight copy). `frozen` holds the
frozen slots ({"reference": ...}). Each prompt is sampled `samples_per_prompt` times; its copies
are consecutive rows (row b*k + j), as the critic-free methods' groups expect.

The batch (global numpy, the same on every process; shapes fixed by the settings, so nothing
recompiles):

    query [R, P] int32, query_mask [R, P]     the prompt, left-padded to P = max_prompt_len
    response [R, N] int32                      sampled tokens, pad after the first EOS
    response_mask [R, N] int32                 1 up to and including the first EOS
    logps, ref_logps, values [R, N] float32    old policy / reference log-probs of the response
                                               tokens (logits / temperature, float32), values V_t
                                               read at the position that predicts token t
    scores [R] float32                         the reward (rewards.Reward), before any shaping
    contains_eos [R] int32                     1 when the response ended with a stop token
with R = prompts * samples_per_prompt and N = max_new_tokens.

Log-probs come from one full-sequence forward (as the update computes them), not from the
sampler's per-step log-probs, so old and new log-probs are computed the same way and the first
update's ratio is exactly 1.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import sharding as shd
from alignjax.errors import UserError
from alignjax.losses.logprobs import token_logps
from alignjax.model.llama import head_kernel


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    max_prompt_len: int = 128     # P: prompts are left-padded to it; a longer prompt is an error
    max_new_tokens: int = 64      # N
    samples_per_prompt: int = 1   # k
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0


# ---- prompts ------------------------------------------------------------------------------------

def pad_prompts(prompt_ids: Sequence[Sequence[int]], length: int, pad_id: int,
                what: str = "ppo.max_prompt_len") -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token-id prompts to [B, length] (tokens, mask); a longer prompt is a UserError."""
    tokens = np.full((len(prompt_ids), length), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), length), np.int32)
    for i, ids in enumerate(prompt_ids):
        if len(ids) > length:
            raise UserError(f"{what}={length}: a prompt has {len(ids)} tokens (prompt {i} of the "
                            f"batch); raise {what} or drop longer prompts")
        if len(ids):
            tokens[i, length - len(ids):] = ids
            mask[i, length - len(ids):] = 1
    return tokens, mask


# ---- forward passes over prompt + response (shared with the update) ------------------------------

def sequence_inputs(query, query_mask, response, response_mask):
    """Prompt + response -> (tokens, positions, segment_ids) [R, P+N]; padding is segment 0 and
    positions count real tokens only, as in the sampler."""
    tokens = jnp.concatenate([query, response], axis=1)
    mask = jnp.concatenate([query_mask, response_mask], axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    return tokens, positions, mask


def response_token_stats(module, params, batch: dict, temperature: float, chunk_size: int = 512):
    """(logps, entropy) [R, N] of the response tokens under softmax(logits / temperature)."""
    tokens, positions, segs = sequence_inputs(batch["query"], batch["query_mask"],
                                              batch["response"], batch["response_mask"])
    hidden, _ = module.apply(params, tokens, positions, segs, output="hidden")
    p = batch["query"].shape[1]
    # The hidden state at column c predicts the token at column c + 1.
    return token_logps(hidden[:, p - 1:-1], head_kernel(params, module.config), batch["response"],
                       temperature=temperature, chunk_size=chunk_size)


def response_values(module, params, batch: dict):
    """V_t [R, N] float32 of a scalar-head model, read where the policy predicts token t."""
    tokens, positions, segs = sequence_inputs(batch["query"], batch["query_mask"],
                                              batch["response"], batch["response_mask"])
    scores, _ = module.apply(params, tokens, positions, segs)
    p = batch["query"].shape[1]
    return scores[:, p - 1:-1].astype(jnp.float32)


def _temperature(t: float) -> float:
    return t if t > 0 else 1.0  # greedy: log-probs under the raw logits, as the sampler's


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _forward(policy_module, ref_module, value_module, temperature, params, frozen, batch):
    """Old log-probs, reference log-probs and values of one rollout, in one program."""
    out = {"logps": response_token_stats(policy_module, params["policy"], batch, temperature)[0]}
    if ref_module is not None:
        out["ref_logps"] = response_token_stats(ref_module, frozen["reference"], batch, temperature)[0]
    if value_module is not None:
        out["values"] = response_values(value_module, params["value"], batch)
    return out


# ---- the rollout --------------------------------------------------------------------------------

class Roller:
    """One sampler (the fast KV-cache engine) and one scoring program per rollout shape."""

    def __init__(self, policy_module, mesh, rules, tokenizer, settings: RolloutSettings, *,
                 reward=None, value_module=None, ref_module=None, cache_dtype=None,
                 eos_ids=None, pad_id=None, old_logps: bool = True):
        """`eos_ids` / `pad_id`: default the tokenizer's stop tokens and pad (given both, `sample`
        needs no tokenizer: `alignjax bench rollout` samples without stop tokens).
        `old_logps=False` skips the scoring forward when no reference or value model needs it
        (online DPO computes its log-probs in the update)."""
        from alignjax.data.tokenizer import stop_token_ids
        from alignjax.model.generate import Generator
        self.policy_module, self.value_module, self.ref_module = policy_module, value_module, ref_module
        self.mesh, self.rules, self.tokenizer = mesh, rules, tokenizer
        self.settings, self.reward = settings, reward
        self.scoring_forward = old_logps or ref_module is not None or value_module is not None
        self.pad_id = int(tokenizer.pad_token_id if pad_id is None else pad_id)
        self.eos_ids = stop_token_ids(tokenizer) if eos_ids is None else tuple(eos_ids)
        self.generator = Generator(policy_module, mesh, rules, eos_ids=self.eos_ids,
                                   pad_id=self.pad_id, prompt_buckets=(settings.max_prompt_len,),
                                   cache_dtype=cache_dtype)

    def sample(self, policy_params, query, query_mask, seed: int) -> dict:
        """Samples k responses per prompt row -> query/response fields of the batch (numpy)."""
        from alignjax.model.generate import SamplingParams
        s = self.settings
        query = np.repeat(np.asarray(query, np.int32), s.samples_per_prompt, axis=0)
        query_mask = np.repeat(np.asarray(query_mask, np.int32), s.samples_per_prompt, axis=0)
        out = self.generator.generate_padded(
            policy_params, query, query_mask,
            SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, seed=int(seed)))
        response, response_mask = out["tokens"].astype(np.int32), out["mask"].astype(np.int32)
        contains_eos = (np.isin(response, self.eos_ids) & (response_mask > 0)).any(axis=1)
        return dict(query=query, query_mask=query_mask, response=response,
                    response_mask=response_mask, contains_eos=contains_eos.astype(np.int32))

    def forward(self, params: dict, frozen: dict, batch: dict) -> dict:
        """logps / ref_logps / values of a sampled batch (numpy)."""
        keys = ("query", "query_mask", "response", "response_mask")
        with shd.mesh_context(self.mesh, self.rules):
            out = _forward(self.policy_module, self.ref_module, self.value_module,
                           _temperature(self.settings.temperature), params, frozen,
                           shd.shard_batch({k: batch[k] for k in keys}, self.mesh, self.rules))
        return {k: np.asarray(v, np.float32) for k, v in shd.to_host(out).items()}

    def score(self, prompt_texts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
              batch: dict) -> np.ndarray:
        """Rewards of each row: token ids straight to a same-tokenizer reward model, text for the
        rest (rewards.Reward.score_rollout). Prompt texts/ids are per prompt, not per row."""
        k = self.settings.samples_per_prompt
        completions = [row[m > 0].tolist() for row, m in zip(batch["response"], batch["response_mask"])]
        texts = [t for t in prompt_texts for _ in range(k)]
        ids = [list(p) for p in prompt_ids for _ in range(k)]
        return np.asarray(self.reward.score_rollout(texts, ids, completions), np.float32)

    def rollout(self, params: dict, frozen: dict, prompt_texts: Sequence[str],
                prompt_ids: Sequence[Sequence[int]], seed: int) -> tuple[dict, dict]:
        """(batch, info): the batch described in the module docstring; info has the completion
        texts (for sample logs) and the time split {"timing/rollout", "timing/score"}."""
        from alignjax.rewards import decode_completions
        t0 = time.perf_counter()
        query, query_mask = pad_prompts(prompt_ids, self.settings.max_prompt_len, self.pad_id)
        batch = self.sample(params["policy"], query, query_mask, seed)
        t1 = time.perf_counter()
        if self.scoring_forward:
            batch.update(self.forward(params, frozen, batch))
        batch["scores"] = self.score(prompt_texts, prompt_ids, batch)
        t2 = time.perf_counter()
        completions = [row[m > 0].tolist() for row, m in zip(batch["response"], batch["response_mask"])]
        info = {"completions": decode_completions(self.tokenizer, completions),
                "prompts": [t for t in prompt_texts for _ in range(self.settings.samples_per_prompt)],
                "timing/rollout": t1 - t0, "timing/score": t2 - t1,
                "rollout_tokens": int(batch["response_mask"].sum())}
        return batch, info


def rollout_program(policy_module, ref_module, value_module, settings: RolloutSettings,
                    eos_ids: tuple, pad_id: int, cache_dtype=None):
    """program(state, frozen, query, query_mask, rng) -> sampled response, its mask, old and
    reference log-probs and values: a rollout's device work (the sampler's prefill and decode,
    then the scoring forwards) as one function of the whole train state, for `alignjax compile`
    to check that sampling fits with all four models and the optimizer state resident. Training
    runs the same two pieces as separate programs (`Roller`)."""
    from alignjax.model.generate import _generate
    s = settings
    temperature = _temperature(s.temperature)

    def program(state, frozen, query, query_mask, rng):
        params = state["params"]
        out = _generate(policy_module, params["policy"], query, query_mask, rng,
                        jnp.float32(s.temperature), jnp.float32(s.top_p), top_k=s.top_k,
                        max_new_tokens=s.max_new_tokens, eos_ids=tuple(eos_ids), pad_id=int(pad_id),
                        cache_dtype=cache_dtype or jnp.dtype(policy_module.config.dtype))
        batch = dict(query=query, query_mask=query_mask, response=out["tokens"],
                     response_mask=out["mask"])
        scored = _forward(policy_module, ref_module, value_module, temperature, params, frozen, batch)
        return {**batch, **scored}

    return program


def encode_chat_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Prompt texts as the SFT model saw them: one user turn plus the generation prompt."""
    from alignjax.model.tokenize import encode_prompts
    return encode_prompts(tokenizer, texts, chat=bool(getattr(tokenizer, "chat_template", None)))

