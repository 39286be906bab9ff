"""Sampling-based data (docs/algorithms.md section 5): sample n responses per prompt from a policy,
score them with a reward, and keep what a method needs.

- ``best_of_n``: the best response per prompt, as SFT records (one round of expert iteration);
  with `min_reward`, only where it earns at least that (rejection-sampling fine-tuning).
- ``filtered``: every distinct response with a reward >= `min_reward`, as SFT records.
- ``all``: every non-empty response, repeats included, with its reward, as SFT records
  (conditional-token data: the reward labels each sample; repeats keep the policy's frequencies).
  SFT records of chat prompts are conversational (``prompt``/``completion`` message lists), so
  SFT renders them with the chat template the samples were drawn with.
- ``pairs``: best vs worst response per prompt, as preference pairs: on-policy data for DPO, whose
  rejected answers are the policy's own mistakes.
- ``ranked``: the distinct responses sorted by reward, as ranked records for RRHF/PRO.
- ``rso``: RSO's statistical rejection sampling toward pi* ~ pi exp(r / beta); the accepted
  samples are paired by reward.

Prompts whose samples all earn the same reward carry no preference and are skipped (counted);
empty responses (EOS first) are never written, since the trainers reject empty responses.
The selection rules are pure NumPy functions; `sample_dataset` is the orchestration.

    alignjax sample --model runs/sft --prompts toy --reward toy --mode pairs --n 4 --out pairs.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from alignjax.errors import UserError

MODES = ("best_of_n", "filtered", "all", "pairs", "ranked", "rso")
SFT_MODES = ("best_of_n", "filtered", "all")  # records for SFT; the others are preference data


# ---- selection rules (pure) -------------------------------------------------------------------

def best_worst(rewards_n: np.ndarray) -> Optional[tuple[int, int]]:
    """(best, worst) sample indices, first occurrence on ties; None when all rewards are equal."""
    r = np.asarray(rewards_n, np.float64)
    best, worst = int(np.argmax(r)), int(np.argmin(r))
    return None if r[best] == r[worst] else (best, worst)


def rso_accept(rewards_n: np.ndarray, num_accept: int, beta: float, rng: np.random.Generator) -> list[int]:
    """RSO statistical rejection sampling: indices of up to `num_accept` accepted candidates.

    Rounds repeat until enough are accepted or none is left: r_max is the largest reward among
    candidates not yet accepted, and each of those is accepted with probability
    exp((r - r_max) / beta), so the candidate holding r_max always is.
    """
    r = np.asarray(rewards_n, np.float64)
    remaining, accepted = list(range(len(r))), []
    while remaining and len(accepted) < num_accept:
        r_max = max(r[i] for i in remaining)
        for i in list(remaining):
            if len(accepted) < num_accept and rng.random() < np.exp((r[i] - r_max) / beta):
                accepted.append(i)
                remaining.remove(i)
    return accepted


def pair_by_reward(indices: Sequence[int], rewards_n: np.ndarray,
                   rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random disjoint pairs of `indices`, each ordered (higher reward, lower); ties dropped."""
    order = [indices[i] for i in rng.permutation(len(indices))]
    pairs = []
    for a, b in zip(order[0::2], order[1::2]):
        if rewards_n[a] != rewards_n[b]:
            pairs.append((a, b) if rewards_n[a] > rewards_n[b] else (b, a))
    return pairs


def select(mode: str, prompt: str, texts: Sequence[str], rewards_n: np.ndarray,
           rng: np.random.Generator, rso_beta: float = 0.5, rso_accept_n: int = 8,
           min_reward: Optional[float] = None) -> list[dict]:
    """The records one prompt's scored samples yield under `mode` (possibly none).

    `min_reward` (best_of_n, filtered, all): responses scoring less are never kept."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    texts, rewards_n = [texts[i] for i in keep], np.asarray(rewards_n, np.float64)[keep]
    if not texts:
        return []
    if mode in SFT_MODES:
        if mode == "best_of_n":
            indices = [int(np.argmax(rewards_n))]
        elif mode == "all":
            indices = list(range(len(texts)))
        else:
            first = {}
            for i, t in enumerate(texts):  # one record per distinct response
                first.setdefault(t, i)
            indices = sorted(first.values())
        floor = -np.inf if min_reward is None else min_reward
        return [{"prompt": prompt, "completion": texts[i], "reward": float(rewards_n[i])}
                for i in indices if rewards_n[i] >= floor]
    if mode == "pairs":
        bw = best_worst(rewards_n)
        return [] if bw is None else [_pair(prompt, texts, rewards_n, *bw)]
    if mode == "ranked":
        first = {}
        for i, t in enumerate(texts):  # one entry per distinct response
            first.setdefault(t, i)
        idx = sorted(first.values(), key=lambda i: -rewards_n[i])
        if len(idx) < 2 or rewards_n[idx[0]] == rewards_n[idx[-1]]:
            return []
        return [{"prompt": prompt, "responses": [texts[i] for i in idx],
                 "scores": [float(rewards_n[i]) for i in idx]}]
    if mode == "rso":
        accepted = rso_accept(rewards_n, rso_accept_n, rso_beta, rng)
        return [_pair(prompt, texts, rewards_n, w, l) for w, l in pair_by_reward(accepted, rewards_n, rng)
                if texts[w] != texts[l]]
    raise UserError(f"--mode {mode!r}: choose from {', '.join(MODES)}")


def _pair(prompt, texts, rewards_n, w, l) -> dict:
    return {"prompt": prompt, "chosen": texts[w], "rejected": texts[l],
            "chosen_reward": float(rewards_n[w]), "rejected_reward": float(rewards_n[l])}


# ---- rewards and prompts ----------------------------------------------------------------------

def reward_function(spec: str, mesh=None, max_length: int = 1024) -> Callable:
    """fn(prompts, responses) -> float32 [n] for a reward spec (alignjax.rewards: toy, a
    reward-model directory, python:FILE.py:FUNCTION, or a weighted sum of them)."""
    from alignjax.rewards import build_reward
    return build_reward(spec, mesh=mesh, seq_len=max_length, what="--reward")


def read_prompts(spec: str, limit: int = 0) -> list[str]:
    """`toy` (the toy suite's training prompts) or any data source with a string `prompt` field."""
    if spec == "toy":
        from alignjax.data import toy
        return [e.prompt for e in toy.toy_splits(n_train=limit or 20000)["train"]]
    from alignjax.data.sources import DataError, open_sources, where
    source = open_sources(spec)
    n = len(source) if not limit else min(limit, len(source))
    prompts = []
    for i in range(n):
        record = source[i]
        p = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{where(source, i)}: needs a non-empty string field 'prompt' "
                            f"(got keys {sorted(record) if isinstance(record, dict) else type(record)})")
        prompts.append(p)
    return prompts


# ---- orchestration ----------------------------------------------------------------------------

@dataclasses.dataclass
class SampleReport:
    prompts: int
    samples: int
    records: int
    skipped: int            # prompts that yielded no record: all samples scored the same, all
                            # were empty, or (best_of_n, filtered) none reached min_reward
    empty: int              # empty responses, never written
    mean_reward: float      # over all samples: the policy's average reward
    best_of_n_reward: float  # mean over prompts of the best sample's reward


def sample_dataset(model, tokenizer, prompts: Sequence[str], reward_fn: Callable, mode: str, n: int,
                   out_path: str, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   max_new_tokens: int = 64, batch_size: int = 256, seed: int = 0, chat: bool = True,
                   rso_beta: float = 0.5, rso_accept_n: int = 8, min_reward: Optional[float] = None,
                   progress: bool = True, run_key: Optional[dict] = None) -> SampleReport:
    """Samples `n` responses per prompt with the KV-cache generator, scores them, writes JSONL.

    Prompts go in chunks of about `batch_size` sequences; each chunk's scored samples are appended
    to OUT.partial as soon as they exist, so a run that stops (crash, Ctrl-C, full disk) continues
    from there when the same command runs again. `run_key` (e.g. the model and reward paths) and
    the sampling settings must match for a partial file to be reused. OUT itself is written
    atomically (temporary file + rename) at the end.
    """
    from alignjax.data.tokenizer import stop_token_ids
    from alignjax.model.generate import Generator, SamplingParams
    from alignjax.model.tokenize import encode_prompts
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    if mode == "filtered" and min_reward is None:
        raise UserError("--mode filtered keeps the responses scoring at least --min-reward: set it")
    if n < 2 and mode not in SFT_MODES:
        raise UserError(f"--n {n}: mode {mode} compares samples, it needs n >= 2")
    gen = Generator(model.module, model.mesh, model.rules, eos_ids=stop_token_ids(tokenizer),
                    pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    ids = encode_prompts(tokenizer, prompts, chat=chat)
    key = {**(run_key or {}), "prompts_sha1": _sha1(prompts), "n": n, "temperature": temperature,
           "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
           "batch_size": batch_size, "seed": seed, "chat": chat}
    partial = out_path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    done = _read_partial(partial, key)  # prompt index -> (texts, rewards) of an earlier run
    per_chunk = max(1, batch_size // n)  # whole prompts: a prompt's n copies side by side
    chunks = [range(s, min(s + per_chunk, len(prompts))) for s in range(0, len(prompts), per_chunk)]
    todo = [(c, ch) for c, ch in enumerate(chunks) if any(p not in done for p in ch)]
    if done and todo:
        print(f"resuming from {partial}: {len(done)} of {len(prompts)} prompts already sampled")
    if not done:
        _write_lines(partial, [{"partial_of": out_path, "key": key}], mode="w")
    from tqdm import tqdm
    for c, chunk in tqdm(todo, desc="sample", unit="chunk", disable=not progress):
        rows = [p for p in chunk for _ in range(n)]
        # A chunk's draws depend only on its index, so a resumed run samples what this one would.
        sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed * 1_000_003 + c)
        texts = gen.generate_texts(model.params, tokenizer, [ids[p] for p in rows], sp, batch_size)
        rewards = np.asarray(reward_fn([prompts[p] for p in rows], texts), np.float64).reshape(-1, n)
        lines = [{"i": p, "texts": texts[j * n:(j + 1) * n], "rewards": rewards[j].tolist()}
                 for j, p in enumerate(chunk)]
        _write_lines(partial, lines, mode="a")
        done.update({line["i"]: (line["texts"], line["rewards"]) for line in lines})
    texts = [t for p in range(len(prompts)) for t in done[p][0]]
    rewards = np.asarray([done[p][1] for p in range(len(prompts))], np.float64)
    rng = np.random.default_rng(seed)
    records, skipped = [], 0
    for p, prompt in enumerate(prompts):
        got = select(mode, prompt, texts[p * n:(p + 1) * n], rewards[p], rng, rso_beta, rso_accept_n,
                     min_reward)
        if chat and mode in SFT_MODES:  # as messages: SFT then renders the chat template sampling used
            got = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}],
                    "completion": [{"role": "assistant", "content": r["completion"]}]} for r in got]
        skipped += not got
        records += got
    _write_lines(out_path + ".tmp", records, mode="w")
    os.replace(out_path + ".tmp", out_path)
    os.remove(partial)
    empty = sum(not t.strip() for t in texts)
    return SampleReport(len(prompts), len(texts), len(records), int(skipped), empty, float(rewards.mean()),
                        float(rewards.max(axis=1).mean()))


def _sha1(texts: Sequence[str]) -> str:
    import hashlib
    h = hashlib.sha1()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def _write_lines(path: str, rows: Sequence[dict], mode: str) -> None:
    """JSONL rows, flushed to disk before returning (a crash after it keeps them)."""
    with open(path, mode, encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_partial(path: str, key: dict) -> dict:
    """{prompt index: (texts, rewards)} from an earlier run's OUT.partial with the same settings;
    {} when there is none or it was made with other settings (it is then started afresh)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = {}
    if header.get("key") != json.loads(json.dumps(key)):
        print(f"{path}: made with other settings; sampling again from the start")
        return {}
    done = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:  # the line a crash cut short: sampled again
            continue
        done[int(row["i"])] = (row["texts"], row["rewards"])
    return done
