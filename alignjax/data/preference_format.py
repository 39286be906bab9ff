"""Preference records -> token ids: a shared prompt plus K responses (pairs, ranked groups, KTO).

Record formats, auto-detected from the keys (``cfg["format"]`` may name one):
- ``pairwise``: ``prompt`` + ``chosen`` + ``rejected``. Strings; or message lists, either whole
  conversations ending with the assistant turn (UltraFeedback-binarized: the prompt is the
  conversation before the last assistant message, ``prompt`` is then ignored) or lists holding
  only the assistant message (``prompt`` a string or a message list). Optional ``margin``.
- ``transcripts`` (HH-RLHF): only ``chosen`` + ``rejected``, whole transcripts (strings with
  "\\n\\nHuman:"/"\\n\\nAssistant:" turns, or message lists). The prompt is their longest shared
  prefix cut back to the last assistant boundary (``split_shared_prefix``).
- ``ranked`` (RRHF/PRO): ``prompt``, ``responses`` (list), ``scores`` (numbers, same length, >= 2).
- ``unpaired`` (KTO): ``prompt``, ``completion``, ``label`` (bool).

Rendering: message records always use the tokenizer's chat template; string records use it when
``cfg["chat_template"]`` (default: the tokenizer has one) as a user turn + generation prompt.
HH transcripts carry their own turn markers and are always tokenized as plain text. The prompt is
tokenized once, apart from the responses (as at generation time), so every response of an example
shares exactly the same prompt ids; each response ends with EOS (or the template's end of turn).
Plain strings are tokenized like SFT's prompt_completion: BOS + prompt ids, response ids + EOS.

Problems with a record raise ``InvalidRecord`` (a ``DataError``) that names its location and
what is wrong; the pipeline can skip and count those instead (``skip_invalid``). Config problems
(no chat template, unknown format) raise a plain ``DataError`` and are never skipped.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from alignjax.data.formatting import TRUNCATIONS, SFTFormatter, _check_messages, _lcp
from alignjax.data.pipeline import _get  # one reader for dicts and ConfigDicts
from alignjax.data.sources import DataError

KIND_FORMATS = {"pair": ("pairwise", "transcripts"), "ranked": ("ranked",), "kto": ("unpaired",)}
FORMAT_KEYS = {"pairwise": ("prompt", "chosen", "rejected"),
               "transcripts": ("chosen", "rejected"),
               "ranked": ("prompt", "responses", "scores"),
               "unpaired": ("prompt", "completion", "label")}
HH_ASSISTANT = "\n\nAssistant:"


class InvalidRecord(DataError):
    """A record that cannot be used (missing keys, empty or identical responses, bad types)."""


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class PrefExample:
    """One prompt with its responses, best first (pairs: chosen, rejected; KTO: the completion)."""

    prompt: np.ndarray  # int32 [P]: BOS / template header included
    responses: tuple[np.ndarray, ...]  # int32 [R_k] each, EOS included
    scores: np.ndarray  # float32 [n_responses], sorted best first
    margin: float = 0.0
    label: float = 0.0  # KTO: 1.0 desirable, 0.0 undesirable
    n_keep: int = 0  # leading special tokens (BOS) that left truncation keeps
    dropped_responses: int = 0  # ranked: responses beyond num_responses (lowest scores)
    index: int = -1  # global record index (precomputed reference log-probs are looked up by it)


def split_shared_prefix(chosen: str | list, rejected: str | list) -> tuple[Any, Any, Any]:
    """HH-RLHF: (prompt, chosen reply, rejected reply) from two whole transcripts.

    Strings: the prompt is the longest shared prefix cut back to (and including) its last
    "\\n\\nAssistant:", so the replies start right after it (usually with a space). Message lists:
    the shared leading messages cut back so the prompt ends right before an assistant message.
    Raises ValueError when no such boundary exists.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = chosen[:_lcp(chosen, rejected)].rfind(HH_ASSISTANT)
        if cut < 0:
            raise ValueError(f"the transcripts share no {HH_ASSISTANT!r} turn before they differ")
        cut += len(HH_ASSISTANT)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = _lcp(chosen, rejected)  # shared leading messages
        for k in range(min(n, len(chosen) - 1, len(rejected) - 1), 0, -1):
            if all(isinstance(m[k], Mapping) and m[k].get("role") == "assistant"
                   for m in (chosen, rejected)):
                return chosen[:k], chosen[k:], rejected[k:]
        raise ValueError("the conversations share no prompt ending right before an assistant turn")
    raise ValueError("'chosen' and 'rejected' must both be strings or both be message lists")


def _response(value: Any, prompt: Any, name: str) -> tuple[Any, Any]:
    """(prompt, response) where the response is a string or one assistant message.

    A whole conversation (list ending with the assistant turn) brings its own prompt.
    """
    if isinstance(value, list):
        if not value:
            raise ValueError(f"empty {name}")
        if len(value) > 1:
            prompt, value = _check_messages(value[:-1]), value[-1]
        else:
            value = value[0]
    if isinstance(value, Mapping):
        value = _check_messages([value])[0]
        if value["role"] != "assistant":
            raise ValueError(f"{name} must end with an assistant message, got role "
                             f"{value['role']!r}")
        content = value["content"]
    elif isinstance(value, str):
        content = value
    else:
        raise ValueError(f"{name} must be a string or message list, got {type(value).__name__}")
    if not content.strip():
        raise ValueError(f"empty {name}")
    return prompt, value


def _number(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r:.40}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _content(response: Any) -> str:
    return response["content"] if isinstance(response, Mapping) else response


class PreferenceFormatter:
    """Record -> ``PrefExample`` for one kind ("pair" | "ranked" | "kto"); holds tokenizer ids."""

    def __init__(self, tokenizer, cfg: Mapping[str, Any] | None = None, kind: str = "pair"):
        if kind not in KIND_FORMATS:
            raise DataError(f"preference kind {kind!r} unknown; choose from {list(KIND_FORMATS)}")
        self.tokenizer, self.kind = tokenizer, kind
        self.sft = SFTFormatter(tokenizer, {})  # BOS prefix, EOS, stop ids, prompt_completion
        self.format = _get(cfg, "format", "auto")
        if self.format != "auto" and self.format not in KIND_FORMATS[kind]:
            raise DataError(f"format {self.format!r} does not fit kind {kind!r}; choose from "
                            f"{('auto',) + KIND_FORMATS[kind]}")
        has_template = tokenizer.chat_template is not None
        self.chat = bool(_get(cfg, "chat_template", has_template))
        if self.chat and not has_template:
            raise DataError(f"chat_template=True but tokenizer {tokenizer.name_or_path!r} has none")
        self.num_responses = _get(cfg, "num_responses", None)
        if self.num_responses is not None and int(self.num_responses) < 2:
            raise DataError(f"num_responses must be >= 2, got {self.num_responses}")

    # ------------------------------------------------------------------ tokenization

    def _render(self, messages: list, generation_prompt: bool) -> str:
        if self.tokenizer.chat_template is None:  # a config problem, not a record problem
            raise DataError(f"tokenizer {self.tokenizer.name_or_path!r} has no chat_template; "
                            "cannot render message records")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raise_exception (e.g. roles must alternate): the data's
            raise ValueError(f"chat template rejects the conversation: {e}") from e

    def encode(self, prompt: Any, responses: Sequence[Any], plain: bool = False
               ) -> tuple[list[int], list[list[int]], int]:
        """(prompt ids, response ids, n_keep); responses are strings or assistant messages."""
        chat = not plain and (self.chat or isinstance(prompt, list)
                              or any(isinstance(r, Mapping) for r in responses))
        if not chat:
            if not isinstance(prompt, str):
                raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
            pieces = [self.sft.prompt_completion(prompt, r) for r in responses]
            p = pieces[0].prompt_len
            return (pieces[0].ids[:p].tolist(), [x.ids[p:].tolist() for x in pieces],
                    len(self.sft.prefix_ids))
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else _check_messages(prompt))
        prompt_text = self._render(messages, True)
        out = []
        for r in responses:
            turn = dict(r) if isinstance(r, Mapping) else {"role": "assistant", "content": r}
            full = self._render(messages + [turn], False)
            # Splitting the text (not the ids) keeps one prompt tokenization for all responses.
            if not full.startswith(prompt_text):
                raise DataError("the chat template does not render the prompt (with generation "
                                "prompt) as a prefix of prompt + response; use chat_template=False")
            out.append(self.sft.closed(self.sft.encode(full[len(prompt_text):])))
        prompt_ids = self.sft.encode(prompt_text)
        bos = self.sft.bos_id
        return prompt_ids, out, int(bool(prompt_ids) and bos is not None and prompt_ids[0] == bos)

    # ------------------------------------------------------------------ records

    def _detect(self, record: Mapping[str, Any], where: str) -> str:
        fmt = self.format
        if fmt == "auto":
            fmt = KIND_FORMATS[self.kind][0]
            if self.kind == "pair" and record.get("prompt") is None:
                fmt = "transcripts"
        null = [k for k in FORMAT_KEYS[fmt] if k in record and record[k] is None]
        if null:  # present but null is a wrong value, not a missing key
            raise InvalidRecord(f"{where}: {', '.join(repr(k) + ' is null' for k in null)} for "
                                f"{self.kind!r} data; give it a value")
        missing = [k for k in FORMAT_KEYS[fmt] if record.get(k) is None]
        if missing:
            expected = " or ".join(str(list(FORMAT_KEYS[f])) for f in KIND_FORMATS[self.kind])
            raise InvalidRecord(f"{where}: record lacks {missing} for {self.kind!r} data; expected "
                                f"keys {expected} (present: {sorted(record)})")
        return fmt

    def _build(self, prompt, responses, scores, plain=False, **extra) -> PrefExample:
        prompt_ids, response_ids, n_keep = self.encode(prompt, responses, plain)
        if not prompt_ids:
            raise ValueError("empty prompt and no BOS: nothing predicts the first response token")
        return PrefExample(np.asarray(prompt_ids, np.int32),
                           tuple(np.asarray(r, np.int32) for r in response_ids),
                           np.asarray(scores, np.float32), n_keep=n_keep, **extra)

    def pair(self, record: Mapping[str, Any], fmt: str = "pairwise") -> PrefExample:
        chosen, rejected = record["chosen"], record["rejected"]
        margin = 0.0 if record.get("margin") is None else _number(record["margin"], "'margin'")
        plain = False
        if fmt == "transcripts":
            if chosen == rejected:
                raise ValueError("chosen and rejected are identical")
            prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
            plain = isinstance(prompt, str)
            if not plain and (len(chosen) != 1 or len(rejected) != 1):
                raise ValueError("chosen and rejected differ before their last assistant message")
            prompt_c, prompt_r = prompt, prompt
        else:
            prompt_c, chosen = _response(chosen, record["prompt"], "chosen")
            prompt_r, rejected = _response(rejected, record["prompt"], "rejected")
        _, chosen = _response(chosen, None, "chosen")
        _, rejected = _response(rejected, None, "rejected")
        if prompt_c != prompt_r:
            raise ValueError("chosen and rejected conversations differ before the last "
                             "assistant message")
        if _content(chosen) == _content(rejected):
            raise ValueError("chosen and rejected are identical")
        return self._build(prompt_c, [chosen, rejected], [1.0, 0.0], plain, margin=margin)

    def ranked(self, record: Mapping[str, Any], fmt: str = "ranked") -> PrefExample:
        responses, scores = record["responses"], record["scores"]
        if not isinstance(responses, list) or not isinstance(scores, list):
            raise ValueError("'responses' and 'scores' must be lists")
        if len(responses) != len(scores):
            raise ValueError(f"'responses' has {len(responses)} items but 'scores' {len(scores)}")
        if len(responses) < 2:
            raise ValueError(f"a ranked group needs >= 2 responses, got {len(responses)}")
        pairs = [_response(r, record["prompt"], f"responses[{i}]") for i, r in enumerate(responses)]
        if any(p != pairs[0][0] for p, _ in pairs):
            raise ValueError("the responses' conversations differ before the last assistant "
                             "message")
        scores_n = np.asarray([_number(s, f"scores[{i}]") for i, s in enumerate(scores)])
        order = np.argsort(-scores_n, kind="stable")  # best first; ties keep the record's order
        k = len(order) if self.num_responses is None else min(len(order), int(self.num_responses))
        return self._build(pairs[0][0], [pairs[i][1] for i in order[:k]], scores_n[order[:k]],
                           dropped_responses=len(order) - k)

    def kto(self, record: Mapping[str, Any], fmt: str = "unpaired") -> PrefExample:
        label = record["label"]
        if not isinstance(label, (bool, np.bool_)):
            raise ValueError(f"'label' must be a bool (true = desirable), got {label!r:.40}")
        prompt, completion = _response(record["completion"], record["prompt"], "completion")
        return self._build(prompt, [completion], [float(label)], label=float(label))

    def __call__(self, record: Any, where: str = "record") -> PrefExample:
        if not isinstance(record, Mapping):
            raise InvalidRecord(f"{where}: expected a dict record, got {type(record).__name__}")
        fmt = self._detect(record, where)
        try:
            return getattr(self, self.kind)(record, fmt)
        except DataError as e:
            raise type(e)(f"{where}: {e}") from e
        except Exception as e:  # bad types and values: always the user's data
            raise InvalidRecord(f"{where}: bad {fmt!r} record: {e}") from e


def format_pair(record, tokenizer, cfg=None, where: str = "record") -> PrefExample:
    """One pairwise / HH record -> ``PrefExample`` (build a ``PreferenceFormatter`` for many)."""
    return PreferenceFormatter(tokenizer, cfg, "pair")(record, where)


def format_ranked(record, tokenizer, cfg=None, where: str = "record") -> PrefExample:
    """One ranked record -> responses sorted best first, the top ``cfg["num_responses"]`` kept."""
    return PreferenceFormatter(tokenizer, cfg, "ranked")(record, where)


def format_kto(record, tokenizer, cfg=None, where: str = "record") -> PrefExample:
    """One unpaired (KTO) record -> ``PrefExample`` with a single response and its label."""
    return PreferenceFormatter(tokenizer, cfg, "kto")(record, where)


def fit_example(ex: PrefExample, seq_len: int, policy: str = "truncate_left_prompt",
                min_response_tokens: int = 1) -> tuple[PrefExample | None, str]:
    """Fit prompt + every response into ``seq_len``: (example or None, status).

    status: "ok" | "truncated" | "dropped" (too long under policy "drop") | "prompt_too_long"
    (the prompt alone leaves fewer than ``min_response_tokens``: skipped under every policy).
    The prompt is cut once for all responses so they keep sharing it: truncate_left_prompt drops
    the start of the prompt (after BOS) until the longest response fits, then cuts responses on
    the right; truncate_right keeps the prompt and cuts responses on the right.
    """
    if policy not in TRUNCATIONS:
        raise DataError(f"truncation {policy!r} unknown; choose from {TRUNCATIONS}")
    n_prompt, longest = len(ex.prompt), max(len(r) for r in ex.responses)
    if n_prompt + max(min_response_tokens, 1) > seq_len:
        return None, "prompt_too_long"
    if n_prompt + longest <= seq_len:
        return ex, "ok"
    if policy == "drop":
        return None, "dropped"
    prompt = ex.prompt
    if policy == "truncate_left_prompt":
        cut = min(n_prompt + longest - seq_len, n_prompt - ex.n_keep)
        prompt = np.concatenate([prompt[:ex.n_keep], prompt[ex.n_keep + cut:]])
    room = seq_len - len(prompt)
    return dataclasses.replace(ex, prompt=prompt,
                               responses=tuple(r[:room] for r in ex.responses)), "truncated"
