"""Conditional-token training (Quark / "conditional tokens"; docs/algorithms.md section 5).

Two control tokens join the vocabulary; every training example's prompt is prefixed by the token
its score earns (<|good|> or <|bad|>), with probability `drop_prob` (0.01) by none so the model
keeps generating unconditionally; at inference the prompt is prefixed by <|good|> and both control
tokens are forbidden. Training itself is plain SFT on the conditioned records.

    tok = load_tokenizer(src); model = load_model(src, mesh)
    model = add_control_tokens_to_model(model, tok, "out/tokenizer")     # tokens + vocab resize
    save_model_dir("out", model.params, model.config, tokenizer_dir=model.tokenizer_dir)
    records = condition_records(records, threshold=0.5, seed=0)         # or ConditionedSource(...)
    ...SFT on records...
    alignjax generate --model out --prompt "..." --condition good

or from the shell: `python -m alignjax.conditional prepare --model SRC --out DST` and
`python -m alignjax.conditional toy-data --out data/toy_cond`.

Where the token goes: it is prepended to the prompt *text* (the first user message for chat
records), and inference prepends it to the prompt text the same way, so training and generation
see identical ids by construction (tests check it for plain and chat prompts). With sentencepiece
(Llama 2) the word right after the token loses its leading-space marker (`<|good|>sort` ->
`<|good|>`, `s`, ...); that is consistent between training and inference, just slightly less
natural than `▁sort`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from alignjax.data.sources import DataError
from alignjax.errors import UserError

GOOD, BAD = "<|good|>", "<|bad|>"
CONTROL_TOKENS = (GOOD, BAD)
CONDITIONS = ("good", "bad")  # names of CONTROL_TOKENS[0], CONTROL_TOKENS[1]
# transformers' mean_resizing samples new rows from N(mean, 1e-9 * covariance); with an rng we
# use the same scale with a diagonal covariance (no E x E Cholesky on the host).
_NEW_ROW_NOISE_VAR = 1e-9


# ---- tokenizer -------------------------------------------------------------------------------

def add_control_tokens(tokenizer, tokens: Sequence[str] = CONTROL_TOKENS) -> tuple[int, ...]:
    """Adds `tokens` as special tokens (never split, skipped by decode(skip_special_tokens=True)).

    Idempotent: tokens already in the vocabulary keep their ids (so Llama 3's reserved special
    tokens, e.g. "<|reserved_special_token_10|>", can be reused without growing the vocabulary).
    Returns their ids; the model needs `len(tokenizer)` embedding rows afterwards.
    """
    tokens = tuple(tokens)
    if len(set(tokens)) != len(tokens) or not all(isinstance(t, str) and t for t in tokens):
        raise UserError(f"control tokens must be distinct non-empty strings, got {tokens}")
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return control_token_ids(tokenizer, tokens)


def control_token_ids(tokenizer, tokens: Sequence[str] = CONTROL_TOKENS) -> tuple[int, ...]:
    """Ids of `tokens`; a UserError when the tokenizer lacks any (not a conditional model)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise UserError(
            f"the tokenizer has no control tokens {missing}: this model was not prepared for "
            "conditional-token training (python -m alignjax.conditional prepare, or "
            "alignjax.conditional.add_control_tokens_to_model)")
    ids = tuple(int(vocab[t]) for t in tokens)
    probe = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in tokens]
    if any(p != [i] for p, i in zip(probe, ids)):
        raise UserError(f"control tokens {list(tokens)} are not encoded as single tokens ({probe}); "
                        "add them with add_control_tokens (special tokens)")
    return ids


# ---- vocabulary resize -----------------------------------------------------------------------

def _new_rows(old, n_new: int, axis: int, key):
    """n_new slices along `axis` equal to the mean of the old ones (+ tiny noise with a key)."""
    import jax
    import jax.numpy as jnp
    x = old.astype(jnp.float32)
    mean = jnp.mean(x, axis=axis, keepdims=True)
    shape = list(old.shape)
    shape[axis] = n_new
    rows = jnp.broadcast_to(mean, shape)
    if key is not None:
        std = jnp.std(x, axis=axis, keepdims=True)
        rows = rows + math.sqrt(_NEW_ROW_NOISE_VAR) * std * jax.random.normal(key, shape)
    return jnp.concatenate([old, rows.astype(old.dtype)], axis=axis)


def _mesh_of(params, mesh):
    if mesh is not None:
        return mesh
    from jax.sharding import NamedSharding
    emb = params["params"]["embed"]["embedding"]
    sharding = getattr(emb, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        raise UserError("resize_vocab: the params are not on a mesh (no NamedSharding); pass mesh=")
    return sharding.mesh


def resize_vocab(params, config, new_vocab_size: int, rng=None, *, pad_to_multiple_of: int = 1,
                 mesh=None, rules=None, head: Optional[str] = None):
    """Grows the embedding (and an untied lm_head) to `new_vocab_size` rows -> (params, config).

    Old rows are kept bit for bit; new rows (and columns of the [E, V] lm_head) are the mean of
    the old ones, as transformers' `resize_token_embeddings(mean_resizing=True)` does, so a new
    token starts as an "average" token and does not dominate the softmax. With `rng` (a PRNG key
    or an int) they get a ~3e-5 * std perturbation so several new tokens do not start identical.

    `pad_to_multiple_of` rounds the size up (TPU users want 128: the vocab axis is sharded over
    `tensor` and the MXU tiles are 128 wide); the extra rows are never produced by the tokenizer.
    The new arrays are built under jit with the shardings `abstract_params` gives the new config
    on the same mesh (taken from the params unless `mesh` is passed); a size the mesh's vocab axis
    does not divide raises its ShardingError. Other leaves are returned as they are (not copied).
    Growing only: a smaller size is an error, the same size returns the inputs.
    """
    import jax
    from alignjax import sharding as shd
    from alignjax.model.config import ConfigError
    from alignjax.model.params import abstract_params, build_module

    if pad_to_multiple_of < 1:
        raise ConfigError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    new_vocab_size = -(-int(new_vocab_size) // pad_to_multiple_of) * pad_to_multiple_of
    old_vocab_size = config.vocab_size
    if new_vocab_size < old_vocab_size:
        raise ConfigError(f"resize_vocab: new vocab size {new_vocab_size} is smaller than the "
                          f"model's {old_vocab_size}; shrinking would drop trained rows")
    if new_vocab_size == old_vocab_size:
        return params, config
    p = params["params"]
    head = head or ("scalar" if "score" in p else "lm")
    new_config = config.replace(vocab_size=new_vocab_size)
    mesh = _mesh_of(params, mesh)
    rules = rules or shd.DEFAULT_RULES
    abstract, shardings = abstract_params(build_module(new_config, head), mesh, rules)

    untied = "lm_head" in p
    n_new = new_vocab_size - old_vocab_size
    old = {"embed": p["embed"]["embedding"]}
    out_shardings = {"embed": shardings["params"]["embed"]["embedding"]}
    if untied:
        old["lm_head"] = p["lm_head"]["kernel"]
        out_shardings["lm_head"] = shardings["params"]["lm_head"]["kernel"]

    def grow(old, key):
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        out = {"embed": _new_rows(old["embed"], n_new, 0, keys[0])}  # [V, E]
        if "lm_head" in old:
            out["lm_head"] = _new_rows(old["lm_head"], n_new, 1, keys[1])  # [E, V]
        return out

    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    new = jax.jit(grow, out_shardings=out_shardings)(old, key)
    new_p = dict(p)
    new_p["embed"] = {**p["embed"], "embedding": new["embed"]}
    if untied:
        new_p["lm_head"] = {**p["lm_head"], "kernel": new["lm_head"]}
    out = {**params, "params": new_p}
    # Everything else must already have the layout the new config asks for.
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), out)
    want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), abstract)
    if shapes != want:
        raise ValueError(f"resize_vocab: params do not match the {head!r} model of this config")
    return out, new_config


def add_control_tokens_to_model(model, tokenizer, tokenizer_dir: str,
                                tokens: Sequence[str] = CONTROL_TOKENS, *,
                                pad_to_multiple_of: int = 1, rng=None):
    """Adds the control tokens to `tokenizer`, saves it to `tokenizer_dir` and returns the
    `LoadedModel` with its vocabulary grown to `len(tokenizer)` (rounded up to the multiple).

    The result goes to `save_model_dir(...)` or `export_hf(...)` as it is: both copy the
    tokenizer files (with the added tokens) from `tokenizer_dir`.
    """
    from alignjax.model.params import build_module
    add_control_tokens(tokenizer, tokens)
    params, config = model.params, model.config
    if len(tokenizer) > config.vocab_size:
        params, config = resize_vocab(params, config, len(tokenizer), rng,
                                      pad_to_multiple_of=pad_to_multiple_of, mesh=model.mesh,
                                      rules=model.rules, head=model.head)
    tokenizer.save_pretrained(tokenizer_dir)
    return dataclasses.replace(model, config=config, params=params, tokenizer_dir=tokenizer_dir,
                               module=build_module(config, model.head))


def prepare_model_dir(src: str, out: str, tokens: Sequence[str] = CONTROL_TOKENS, *,
                      mesh=None, pad_to_multiple_of: int = 1, seed: Optional[int] = None):
    """HF or alignjax model at `src` -> alignjax model directory `out` with the control tokens."""
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.model.store import load_model, save_model_dir
    model = load_model(src, mesh)
    if model.tokenizer_dir is None:
        raise UserError(f"{src}: no tokenizer files found with the model; they are needed to add "
                        "the control tokens")
    tokenizer = load_tokenizer(model.tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:  # save_model_dir copies it into out/tokenizer
        model = add_control_tokens_to_model(model, tokenizer, tmp, tokens,
                                            pad_to_multiple_of=pad_to_multiple_of, rng=seed)
        save_model_dir(out, model.params, model.config, model.head, model.tokenizer_dir,
                       model.extra.get("generation_config"),
                       extra={"control_tokens": list(tokens)})
    return dataclasses.replace(model, tokenizer_dir=os.path.join(out, "tokenizer"))


# ---- data ------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(seed: int, index: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, index): record i gets the same draw
    whether the records are conditioned as a list or lazily through `ConditionedSource`."""
    return (_splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(index)) >> 11) / float(1 << 53)


def _prefix_messages(messages: Any, token: str, where: str) -> list:
    if not isinstance(messages, list):
        raise DataError(f"{where}: messages must be a list, got {type(messages).__name__}")
    out = [dict(m) if isinstance(m, Mapping) else m for m in messages]
    for m in out:
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] = token + m["content"]
            return out
    raise DataError(f"{where}: no user message (with string content) to put the control token in")


def prefix_record(record: Mapping[str, Any], token: Optional[str], where: str = "record") -> dict:
    """A copy of `record` whose prompt starts with `token` (None: unchanged copy).

    prompt/completion records: the prompt string (or the first user message of a conversational
    prompt); messages records: the first user message. Text records have no prompt: error.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a dict record, got {type(record).__name__}")
    out = dict(record)
    if token is None:
        return out
    if "messages" in out:
        out["messages"] = _prefix_messages(out["messages"], token, where)
    elif "prompt" in out and "completion" in out:
        prompt = out["prompt"]
        if isinstance(prompt, str):
            out["prompt"] = token + prompt
        else:
            out["prompt"] = _prefix_messages(prompt, token, where)
    elif "text" in out:
        raise DataError(f"{where}: a plain 'text' record has no prompt to condition; use "
                        "prompt/completion or messages records")
    else:
        raise DataError(f"{where}: cannot tell the record format from keys {sorted(out)}; expected "
                        "{'prompt', 'completion'} or {'messages'}")
    return out


def _earns_good(record: Mapping[str, Any], threshold, score_key: str, label_key: str,
                where: str) -> bool:
    if threshold is not None:
        if score_key not in record:
            raise DataError(f"{where}: no {score_key!r} field to compare with threshold={threshold} "
                            f"(keys {sorted(record)})")
        score = record[score_key]
        if isinstance(score, bool) or not isinstance(score, (int, float, np.number)) or \
                not math.isfinite(float(score)):
            raise DataError(f"{where}: {score_key}={score!r} is not a finite number")
        return float(score) >= threshold
    if label_key not in record:
        raise DataError(f"{where}: no {label_key!r} field (pass threshold= to condition on "
                        f"{score_key!r} instead; keys {sorted(record)})")
    label = record[label_key]
    if not isinstance(label, (bool, np.bool_)) and label not in (0, 1):
        raise DataError(f"{where}: {label_key}={label!r} must be a boolean")
    return bool(label)


@dataclasses.dataclass(frozen=True)
class Conditioner:
    """record, index -> conditioned record (see `condition_records`). Picklable for grain."""

    threshold: Optional[float] = None
    score_key: str = "score"
    label_key: str = "label"
    good: str = GOOD
    bad: str = BAD
    drop_prob: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.drop_prob <= 1.0:
            raise DataError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.good == self.bad:
            raise DataError(f"good and bad control tokens must differ, both are {self.good!r}")

    def token_for(self, record: Mapping[str, Any], index: int, where: str = "record") -> Optional[str]:
        good = _earns_good(record, self.threshold, self.score_key, self.label_key, where)
        if _uniform(self.seed, index) < self.drop_prob:
            return None
        return self.good if good else self.bad

    def __call__(self, record: Mapping[str, Any], index: int, where: Optional[str] = None) -> dict:
        where = where or f"record {index}"
        token = self.token_for(record, index, where)
        out = prefix_record(record, token, where)
        out["control_token"] = token  # ignored by the SFT formatter; handy for statistics
        return out


def condition_records(records: Iterable[Mapping[str, Any]], *, threshold: Optional[float] = None,
                      score_key: str = "score", label_key: str = "label", good: str = GOOD,
                      bad: str = BAD, drop_prob: float = 0.01, seed: int = 0) -> list[dict]:
    """Prefixes each record's prompt with the control token it earns.

    Good when `record[score_key] >= threshold` (if `threshold` is given), else when
    `record[label_key]` is true (KTO-style labels). With probability `drop_prob` a record gets no
    token (keeps unconditional generation); the draw depends only on (seed, record index).
    Each output record is a copy with the prefixed prompt and `control_token` (the token or None).
    """
    cond = Conditioner(threshold, score_key, label_key, good, bad, drop_prob, seed)
    return [cond(r, i) for i, r in enumerate(records)]


class ConditionedSource:
    """A random-access record source (JSONL, Parquet, ...; see alignjax.data.sources) whose
    records come out conditioned, lazily; pass it to `make_sft_iterator` like any source.
    Record i is conditioned exactly as `condition_records` would condition it."""

    def __init__(self, source, **kwargs):
        from alignjax.data.sources import open_sources
        self.source = open_sources(source)
        self.conditioner = Conditioner(**kwargs)

    def __len__(self) -> int:
        return len(self.source)

    def where(self, index: int) -> str:
        from alignjax.data.sources import where
        return where(self.source, index)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return self.conditioner(self.source[index], index, self.where(index))

    def __repr__(self) -> str:
        return f"ConditionedSource({self.source!r})"


def toy_condition_records(examples, seed: int = 0, *, style: str = "prompt_completion",
                          drop_prob: float = 0.01, good: str = GOOD, bad: str = BAD) -> list[dict]:
    """Two records per toy example: the correct answer under `good`, a plausible wrong answer
    (`toy.wrong_answer`) under `bad` (each with probability `drop_prob` unconditioned).
    Records also carry `label` and the toy `score` of their completion."""
    from alignjax.data import toy
    if style not in ("prompt_completion", "messages"):
        raise ValueError(f"unknown style {style!r}; use 'prompt_completion' or 'messages'")
    rng = np.random.default_rng(seed)
    raw = []
    for e in examples:
        wrong = toy.wrong_answer(e, rng)
        for completion, label in ((e.answer, True), (wrong, False)):
            r = {"prompt": e.prompt, "completion": completion}
            if style == "messages":
                r = {"messages": [{"role": "user", "content": e.prompt},
                                  {"role": "assistant", "content": completion}]}
            raw.append({**r, "label": label, "score": round(toy.score(e, completion), 4)})
    return condition_records(raw, label_key="label", good=good, bad=bad, drop_prob=drop_prob,
                             seed=seed)


# ---- inference -------------------------------------------------------------------------------

def generation_setup(tokenizer, texts: Sequence[str], condition: Optional[str] = None, *,
                     chat: bool = False, vocab_size: Optional[int] = None,
                     tokens: Sequence[str] = CONTROL_TOKENS):
    """(prompt ids, blocked ids) for generating from a conditional model.

    `condition` ("good" | "bad" | None) prefixes each prompt text (inside the user turn with
    `chat`) with that control token, exactly where `prefix_record` put it in training. Control
    tokens the tokenizer holds are always blocked (never generated), conditioned or not. A
    condition without control tokens in the tokenizer, or tokens beyond `vocab_size` (the model
    was not resized), is a UserError.
    """
    from alignjax.model.tokenize import encode_prompts
    if condition is not None and condition not in CONDITIONS:
        raise UserError(f"condition={condition!r}: use one of {CONDITIONS}")
    vocab = tokenizer.get_vocab()
    present = [t for t in tokens if t in vocab]
    if condition is None and not present:
        return encode_prompts(tokenizer, texts, chat=chat), ()
    ids = control_token_ids(tokenizer, tokens if condition is not None else present)
    if vocab_size is not None and max(ids) >= vocab_size:
        raise UserError(f"control token ids {list(ids)} do not fit the model's vocab_size "
                        f"{vocab_size}: the model was not resized after adding them")
    if condition is not None:
        token = tokens[CONDITIONS.index(condition)]
        texts = [token + t for t in texts]
    return encode_prompts(tokenizer, texts, chat=chat), ids


# ---- shell -----------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m alignjax.conditional",
                                 description="Conditional-token training helpers.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="add <|good|>/<|bad|> to a model and its tokenizer")
    p.add_argument("--model", required=True, help="HF directory or alignjax model directory")
    p.add_argument("--out", required=True, help="output alignjax model directory")
    p.add_argument("--pad-to-multiple-of", type=int, default=1, help="128 on TPU")
    p.add_argument("--seed", type=int, default=None, help="perturb the new rows (default: exact mean)")
    p.add_argument("--mesh", default="", help="e.g. data=2,fsdp=2,tensor=2")
    p = sub.add_parser("toy-data", help="write conditioned toy-suite JSONL (train/eval)")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=("prompt_completion", "messages"), default="prompt_completion")
    args = ap.parse_args(argv)
    if args.command == "prepare":
        from alignjax import sharding as shd
        mesh = shd.make_mesh(shd.parse_mesh_flag(args.mesh))
        model = prepare_model_dir(args.model, args.out, mesh=mesh,
                                  pad_to_multiple_of=args.pad_to_multiple_of, seed=args.seed)
        print(f"wrote {args.out}: vocab_size {model.config.vocab_size}, control tokens "
              f"{list(CONTROL_TOKENS)}")
    else:
        from alignjax.data import toy
        splits = toy.toy_splits(args.n_train, args.n_eval, args.seed)
        for split, exs in splits.items():
            toy.write_jsonl(toy_condition_records(exs, args.seed, style=args.style),
                            os.path.join(args.out, f"conditional_{split}.jsonl"))
        print(f"wrote conditional_train.jsonl / conditional_eval.jsonl to {args.out}")


if __name__ == "__main__":
    main()
