"""Reward sources: the one place RL, `alignjax sample` and evaluation get rewards from.

A reward spec is parsed once (`parse_spec`, pure) and built once (`build_reward`, loads models):

    spec   := term ("+" term)*
    term   := [weight "*"] source              weight: a positive finite number, default 1
    source := "toy"                            the toy checker (0/1)
            | "python:" FILE ":" FUNCTION      a user function, batched (see below)
            | PATH                             a reward-model directory: alignjax model dir,
                                               training workdir, or HF
                                               LlamaForSequenceClassification dir

    toy      runs/rm      python:rewards/math.py:exact_match
    "toy + 0.5*runs/rm"   "0.2*python:fmt.py:has_answer+runs/rm"

"+" separates terms and a weight comes first with "*" (as in the formula 1*toy + 0.5*rm), so a
"python:" term keeps its ":"s. Spaces around terms are ignored. Quote a spec with "*" in a shell.
A spec string that as a whole names an existing path is that one path, so a model directory
whose name holds "+" or "*" still works alone; to combine such a path, pass the spec as a list
of terms instead of a string: ["runs/a+b", ("toy", 0.5)] (a string item is one source, taken
verbatim, with weight 1; a (source, weight) pair gives the weight).

Every source has `score(prompts, completions) -> float32 [n]` on text. The combined `Reward`
sums its terms' scores times their weights (`score`, or `score_parts` for each term) and, for
RL, scores token ids straight from the policy (`score_rollout`): a reward model with the
policy's tokenizer reads the ids as they are (`RewardModelSource.score_ids`, no decode and
re-encode); the other sources get the decoded text, and a reward model with a different
tokenizer re-tokenises that text with its own (the log says so once, when the reward is built).

A user function `fn(prompts: list[str], completions: list[str]) -> sequence of floats` is called
once per batch of at most `batch_size` completions, with the raw prompt text (no chat template)
and the completion text (no EOS). It must return one finite number per completion; anything
else (wrong length, a non-number, NaN/inf, an exception) is a one-line UserError naming the
function and the first bad index.

A reward model scores prompt + completion formatted as in its training (its tokenizer's chat
template when it has one, EOS appended), read at the last token; with `normalize=True` the
score is (r - mean) / std with the `reward_stats` stored in its alignjax_model.json.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import numbers
import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from alignjax.errors import UserError

log = logging.getLogger(__name__)

SpecLike = Union[str, Sequence[Union[str, tuple]]]


# ---- parsing (pure) -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Term:
    kind: str  # "toy" | "python" | "model"
    target: str  # "toy", the python file, or the model path
    function: str = ""  # python only
    weight: float = 1.0

    @property
    def name(self) -> str:
        return {"toy": "toy", "python": f"python:{self.target}:{self.function}"}.get(
            self.kind, self.target)


def parse_spec(spec: SpecLike, what: str = "reward") -> list[Term]:
    """The terms of a reward spec (see the module docstring). `what` names the flag or config
    key in errors (e.g. "--reward", "ppo.reward"). Checks syntax and weights only."""
    if isinstance(spec, str):
        whole = spec.strip()
        if ("+" in whole or "*" in whole) and os.path.exists(whole):  # still one path
            return [Term("model", whole)]
        if not whole:
            raise UserError(f"{what}: empty reward spec; give toy, a reward-model directory, "
                            "python:FILE.py:FUNCTION, or a sum such as 'toy + 0.5*runs/rm'")
        items = [_split_weight(t.strip(), spec, what) for t in spec.split("+")]
    else:
        items = [(s, 1.0) if isinstance(s, str) else _pair(s, what) for s in spec]
        if not items:
            raise UserError(f"{what}: empty list of reward terms")
    return [_source(s, w, what) for s, w in items]


def _split_weight(term: str, spec: str, what: str) -> tuple[str, float]:
    if not term:
        raise UserError(f"{what} {spec!r}: empty term (a '+' with nothing on one side)")
    if "*" not in term:
        return term, 1.0
    weight, _, source = term.partition("*")
    return source.strip(), _weight(weight.strip(), term, what)


def _pair(item, what: str) -> tuple[str, float]:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
        raise UserError(f"{what}: list item {item!r} must be a source string or a "
                        "(source, weight) pair")
    return item[0], _weight(item[1], repr(tuple(item)), what)


def _weight(value, term: str, what: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}: weight {value!r} in {term!r} is not a number; write "
                        "WEIGHT*SOURCE, e.g. 0.5*runs/rm") from None
    if isinstance(value, bool) or not math.isfinite(w) or w <= 0:
        raise UserError(f"{what}: weight {value!r} in {term!r} must be a positive finite number "
                        "(drop a term rather than giving it weight 0)")
    return w


def _source(source: str, weight: float, what: str) -> Term:
    if not source:
        raise UserError(f"{what}: a weight with no source after '*'")
    if source == "toy":
        return Term("toy", "toy", weight=weight)
    if source.startswith("python:"):
        path, sep, fn = source[len("python:"):].rpartition(":")
        if not sep or not path or not fn.isidentifier():
            raise UserError(f"{what} {source!r}: write python:FILE.py:FUNCTION (e.g. "
                            "python:rewards/math.py:exact_match)")
        return Term("python", path, fn, weight)
    return Term("model", source, weight=weight)


# ---- sources ------------------------------------------------------------------------------------

class ToySource:
    """The toy checker: 1.0 for the exact answer, else 0.0."""

    name = "toy"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        from alignjax.data import toy
        _check_lengths(prompts, completions)
        return toy.reward_fn(list(prompts), list(completions)).astype(np.float32)


class PythonSource:
    """A user function `fn(prompts, completions) -> sequence of floats`, one call per batch."""

    def __init__(self, path: str, function: str, batch_size: int = 64, what: str = "reward"):
        self.path, self.function, self.batch_size = path, function, int(batch_size)
        self.name = f"python:{path}:{function}"
        self._where = f"{what} {self.name}"
        self.fn = _load_function(path, function, self._where)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        _check_lengths(prompts, completions)
        out = [self._call(list(prompts[i:i + self.batch_size]),
                          list(completions[i:i + self.batch_size]), i)
               for i in range(0, len(prompts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _call(self, prompts: list, completions: list, start: int) -> np.ndarray:
        try:
            out = self.fn(prompts, completions)
        except Exception as e:
            raise UserError(f"{self._where}: {self.function}() raised {type(e).__name__}: "
                            f"{_one_line(e)} (at {_frame(e, self.path)})") from e
        return _check_scores(out, len(prompts), start, f"{self._where}: {self.function}()")


def _check_scores(out, n: int, start: int, who: str) -> np.ndarray:
    """float32 [n] from a user function's result, or a UserError naming the first bad index."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise UserError(f"{who} returned {type(out).__name__}, not a sequence of {n} floats "
                        "(one per completion)")
    shape = tuple(getattr(out, "shape", (len(out),)))
    if len(shape) != 1:
        raise UserError(f"{who} returned an array of shape {shape}; return one float per "
                        f"completion (shape ({n},))")
    values = list(out)
    if len(values) != n:
        raise UserError(f"{who} returned {len(values)} scores for a batch of {n} completions; "
                        "return one float per completion, in order")
    for i, v in enumerate(values):
        if not isinstance(v, (numbers.Real, str)) and hasattr(v, "item"):
            try:  # numpy / jax / torch scalars
                v = v.item()
            except (TypeError, ValueError, RuntimeError):
                pass
        if not isinstance(v, numbers.Real):
            raise UserError(f"{who} returned a non-numeric value at index {start + i}: "
                            f"{v!r:.60} ({type(v).__name__})")
        if not math.isfinite(float(v)):
            raise UserError(f"{who} returned {float(v)} at index {start + i}; scores must be "
                            "finite")
    return np.asarray([float(v) for v in values], np.float32)


def _load_function(path: str, function: str, where: str) -> Callable:
    """Imports FILE and returns FUNCTION, with one-line errors naming file:line."""
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file {path}" + (
            " (it is a directory; give the .py file)" if os.path.isdir(path) else ""))
    module_name = f"alignjax_reward_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{where}: {path} cannot be imported as Python (name it *.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # what dataclasses and pickling in the file look up
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(module_name, None)
        raise UserError(f"{where}: {e.filename}:{e.lineno}: SyntaxError: {e.msg}") from e
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise UserError(f"{where}: importing {path} failed at {_frame(e, path)}: "
                        f"{type(e).__name__}: {_one_line(e)}") from e
    fn = getattr(module, function, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_") and
                         getattr(v, "__module__", None) == module_name)
        raise UserError(f"{where}: {path} has no function {function!r} (it defines: "
                        f"{', '.join(defined) or 'none'})")
    if not callable(fn):
        raise UserError(f"{where}: {path}: {function} is not a function (it is "
                        f"{type(fn).__name__})")
    return fn


def _frame(e: BaseException, path: str) -> str:
    """file:line where `e` happened: the innermost frame in `path`, else the innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)]
    f = (mine or frames or [None])[-1]
    return f"{f.filename}:{f.lineno}" if f is not None else path


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _check_lengths(prompts, completions) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


class RewardModelSource:
    """A scalar-head model (`load_reward_model`, or any LoadedModel with head "scalar").

    `score` formats text as in reward training; `score_ids` takes ids in this model's tokenizer:
    prompt ids as the generator's prompt (chat template with generation prompt, BOS included) and
    completion ids as generated (cut after the first stop token; EOS appended when there is
    none, as the text path does). Rows go `batch_size` at a time, each batch padded to the same
    number of rows, so one call compiles one program.
    """

    def __init__(self, model, tokenizer, name: str, seq_len: int = 1024, batch_size: int = 64,
                 normalize: bool = False, chat_template: Optional[bool] = None,
                 what: str = "reward"):
        from alignjax.data.formatting import SFTFormatter
        if model.head != "scalar":
            raise UserError(_lm_head_message(what, name))
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.chat_template = (tokenizer.chat_template is not None if chat_template is None
                              else bool(chat_template))
        self.stats = model.extra.get("reward_stats")
        self.normalize = bool(normalize)
        if self.normalize:
            _check_stats(self.stats, name, what)
        sft = SFTFormatter(tokenizer, {})
        self._stop_ids, self._eos_id, self._bos_id = sft.stop_ids, sft.eos_id, sft.bos_id

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        from alignjax.data.preference import format_pair_batch
        _check_lengths(prompts, completions)
        cfg = {"chat_template": self.chat_template}
        return self._run(len(prompts), lambda s, e: format_pair_batch(
            self.tokenizer, list(prompts[s:e]), list(completions[s:e]), self.seq_len, cfg))

    def score_ids(self, prompt_ids: Sequence[Sequence[int]],
                  completion_ids: Sequence[Sequence[int]]) -> np.ndarray:
        _check_lengths(prompt_ids, completion_ids)
        return self._run(len(prompt_ids), lambda s, e: self._ids_batch(
            prompt_ids[s:e], completion_ids[s:e]))

    def _ids_batch(self, prompt_ids, completion_ids) -> dict:
        """The batch `format_pair_batch` builds, from ids: same truncation, same EOS rule."""
        from alignjax.data.preference import _Collate
        from alignjax.data.preference_format import PrefExample, fit_example
        examples = []
        for p, c in zip(prompt_ids, completion_ids):
            p, c = [int(t) for t in p], [int(t) for t in c]
            if not p:
                raise ValueError("empty prompt ids: a prompt holds at least BOS or the template")
            stop = next((i for i, t in enumerate(c) if t in self._stop_ids), None)
            c = c[:stop + 1] if stop is not None else c + [self._eos_id]
            n_keep = int(self._bos_id is not None and p[0] == self._bos_id)
            if len(p) >= self.seq_len:  # as format_pair_batch: the prompt loses its start
                p = p[:n_keep] + p[len(p) - self.seq_len + 1 + n_keep:]
            ex = PrefExample(np.asarray(p, np.int32), (np.asarray(c, np.int32),),
                             np.zeros(1, np.float32), n_keep=n_keep)
            examples.append(fit_example(ex, self.seq_len, "truncate_left_prompt")[0])
        pad_id = self.tokenizer.pad_token_id
        return _Collate("pair", 1, len(examples), self.seq_len, pad_id)(examples)

    def _run(self, n: int, make_batch: Callable[[int, int], dict]) -> np.ndarray:
        from alignjax import sharding as shd
        from alignjax.train.grouped import SEQ_KEYS
        if n == 0:
            return np.zeros(0, np.float32)
        model = self.model
        dp = shd.axis_size(model.mesh, dict(model.rules).get("batch"))
        rows = -(-min(self.batch_size, n) // dp) * dp  # every batch of this call has this shape
        out = []
        for s in range(0, n, rows):
            batch = make_batch(s, min(s + rows, n))
            real = batch["tokens"].shape[0]
            batch = {k: batch[k] for k in SEQ_KEYS}
            if real < rows:  # fill with copies of the last row
                batch = {k: np.concatenate([v, np.repeat(v[-1:], rows - real, axis=0)])
                         for k, v in batch.items()}
            with shd.mesh_context(model.mesh, model.rules):
                r = _sequence_rewards_jit()(model.module, model.params,
                                            shd.shard_batch(batch, model.mesh, model.rules))
            out.append(shd.to_host(r)[:real, 0])
        r = np.concatenate(out).astype(np.float32)
        if self.normalize:
            r = ((r - self.stats["mean"]) / self.stats["std"]).astype(np.float32)
        return r


@functools.cache
def _sequence_rewards_jit():
    """One jitted forward for every reward model: equal modules and shapes share a compile."""
    import jax
    from alignjax.train.grouped import sequence_rewards
    return jax.jit(sequence_rewards, static_argnums=0)


def _lm_head_message(what: str, path: str) -> str:
    return (f"{what}: {path} is a causal LM (lm head), not a reward model; train one with "
            "configs/reward.py or pass a scalar-head model")


def _check_stats(stats, name: str, what: str) -> None:
    ok = isinstance(stats, dict) and all(
        isinstance(stats.get(k), numbers.Real) and math.isfinite(stats[k]) for k in ("mean", "std"))
    if not ok:
        raise UserError(f"{what}: {name} has no reward_stats (mean, std) in its "
                        "alignjax_model.json to normalise with; reward training with an eval set "
                        "stores them. "
                        "Turn normalisation off or train the reward model with data.eval")
    if stats["std"] <= 0:
        raise UserError(f"{what}: {name}: reward_stats std is {stats['std']}; cannot normalise "
                        "with it. Turn normalisation off")


def model_head(path: str, what: str = "reward") -> str:
    """"lm" or "scalar" for a model path, read from its metadata (no weights loaded)."""
    from alignjax.model.config import ConfigError
    from alignjax.model.store import MODEL_FILE, _hf_head, path_kind
    from alignjax import fs
    if not fs.exists(path):
        raise UserError(f"{what}: {path}: no such file or directory; give toy, "
                        "python:FILE.py:FUNCTION or a reward-model directory")
    if not fs.isdir(path):
        raise UserError(f"{what}: {path} is a file, not a model directory (a Python reward is "
                        f"written python:{path}:FUNCTION)")
    try:
        kind = path_kind(path)
    except ConfigError as e:
        raise UserError(f"{what}: {e}") from None
    if kind == "hf":
        return _hf_head(path)
    return json.loads(fs.read_text(fs.join(path, MODEL_FILE))).get("head", "lm")


def load_reward_model(path: str, mesh=None, rules=None, seq_len: int = 1024,
                      batch_size: int = 64, normalize: bool = False,
                      chat_template: Optional[bool] = None, what: str = "reward",
                      **runtime) -> RewardModelSource:
    """Loads a scalar-head model and its tokenizer; refuses an LM before reading weights."""
    from alignjax import sharding as shd
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.model.store import load_model
    if model_head(path, what) != "scalar":
        raise UserError(_lm_head_message(what, path))
    model = load_model(path, mesh, rules or shd.DEFAULT_RULES, head="scalar", **runtime)
    if model.tokenizer_dir is None:
        raise UserError(f"{what}: {path}: no tokenizer stored with the reward model; copy its "
                        "tokenizer files into the directory")
    return RewardModelSource(model, load_tokenizer(model.tokenizer_dir), path, seq_len,
                             batch_size, normalize, chat_template, what)


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids and back (vocab, merges, normaliser,
    special tokens, chat template): then token ids can pass between their models unchanged."""
    if a is b:
        return True
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    if any(getattr(a, k) != getattr(b, k) for k in ids) or a.chat_template != b.chat_template:
        return False
    fast_a, fast_b = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if fast_a is not None and fast_b is not None:
        return json.loads(fast_a.to_str()) == json.loads(fast_b.to_str())
    return type(a) is type(b) and a.get_vocab() == b.get_vocab()


# ---- the combined reward ------------------------------------------------------------------------

@dataclasses.dataclass
class Reward:
    """A weighted sum of sources. `ids_ok[i]`: source i reads the policy's token ids directly."""

    spec: str
    sources: list
    weights: list
    policy_tokenizer: Any = None
    ids_ok: list = dataclasses.field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def score_parts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[np.ndarray]:
        """Each term's unweighted scores, float32 [n], in the order of the spec."""
        return [s.score(prompts, completions) for s in self.sources]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return self.combine(self.score_parts(prompts, completions))

    def __call__(self, prompts, completions) -> np.ndarray:  # the old reward_fn interface
        return self.score(prompts, completions)

    def combine(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        total = sum(w * np.asarray(p, np.float64) for w, p in zip(self.weights, parts))
        return np.asarray(total, np.float32)

    def score_rollout_parts(self, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
                            completion_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Each term's scores for policy samples: raw prompt texts, the policy's prompt ids and
        completion ids. Completions are decoded (once) only for sources that need text."""
        if self.policy_tokenizer is None:
            raise ValueError("score_rollout needs the policy tokenizer: build_reward(..., "
                             "policy_tokenizer=...)")
        texts = None
        parts = []
        for source, direct in zip(self.sources, self.ids_ok):
            if direct:
                parts.append(source.score_ids(prompt_ids, completion_ids))
                continue
            if texts is None:
                texts = decode_completions(self.policy_tokenizer, completion_ids)
            parts.append(source.score(prompts, texts))
        return parts

    def score_rollout(self, prompts, prompt_ids, completion_ids) -> np.ndarray:
        return self.combine(self.score_rollout_parts(prompts, prompt_ids, completion_ids))


def decode_completions(tokenizer, completion_ids: Sequence[Sequence[int]]) -> list[str]:
    """Generated ids -> text, as the generator decodes: up to the first stop token, special
    tokens skipped."""
    from alignjax.data.tokenizer import stop_token_ids
    stop = set(stop_token_ids(tokenizer))
    texts = []
    for ids in completion_ids:
        ids = [int(t) for t in ids]
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        texts.append(tokenizer.decode(ids[:cut], skip_special_tokens=True))
    return texts


def build_reward(spec: SpecLike, *, mesh=None, rules=None, policy_tokenizer=None,
                 seq_len: int = 1024, batch_size: int = 64, normalize: bool = False,
                 chat_template: Optional[bool] = None, what: str = "reward",
                 runtime: Optional[dict] = None) -> Reward:
    """Parses `spec` and builds its sources once. Reward models load onto `mesh` (default: all
    devices, data-parallel) with `runtime` LlamaConfig overrides (e.g. {"dtype": "bfloat16"});
    `normalize` applies each one's stored reward_stats. With `policy_tokenizer` given,
    `score_rollout` works, and a reward model whose tokenizer differs is logged once here."""
    terms = parse_spec(spec, what)
    sources, loaded = [], {}
    for t in terms:
        if t.kind == "toy":
            sources.append(ToySource())
        elif t.kind == "python":
            sources.append(PythonSource(t.target, t.function, batch_size, what))
        else:
            if t.target not in loaded:  # one model read once, however often it is named
                loaded[t.target] = load_reward_model(t.target, mesh, rules, seq_len, batch_size,
                                                     normalize, chat_template, what,
                                                     **(runtime or {}))
            sources.append(loaded[t.target])
    same = {path: policy_tokenizer is not None and same_tokenizer(s.tokenizer, policy_tokenizer)
            for path, s in loaded.items()}
    for path in loaded:
        if policy_tokenizer is not None and not same[path]:
            log.warning("reward model %s has a different tokenizer from the policy: its "
                        "completions are decoded and re-tokenised with its own tokenizer", path)
    ids_ok = [t.kind == "model" and same[t.target] for t in terms]
    text = spec if isinstance(spec, str) else " + ".join(f"{t.weight}*{t.name}" for t in terms)
    return Reward(text, sources, [t.weight for t in terms], policy_tokenizer, ids_ok)
