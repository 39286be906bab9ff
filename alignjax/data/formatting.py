"""SFT records -> token ids + per-token loss mask, with a Hugging Face tokenizer.

Formats (auto-detected from the record keys unless the config names one):
- ``text``: loss on every token;
- ``prompt`` + ``completion`` (strings, tokenized apart and concatenated; or lists of chat
  messages as in TRL's conversational prompt-completion): loss on the completion only;
- ``messages`` (list of ``{"role", "content"}``), rendered with the tokenizer's chat template:
  loss on assistant turns only.

``loss_mask[i]`` says whether token ``i`` is a target (predicted from tokens ``< i``). EOS (or
the template's end-of-turn token) closes every completion and is a target. BOS comes from the
tokenizer (its post-processor) or from the chat template, exactly as the tokenizer would do it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from alignjax.data.sources import DataError

FORMATS = ("auto", "text", "prompt_completion", "messages")
TRUNCATIONS = ("truncate_left_prompt", "truncate_right", "drop")
PACKINGS = ("pack", "pad")  # how the SFT pipeline fills rows (data.packing)
FORMAT_KEYS = {"text": ("text",), "prompt_completion": ("prompt", "completion"),
               "messages": ("messages",)}
_EXPECTED = "one of {'text'}, {'prompt', 'completion'}, {'messages'}"


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    format: str = "auto"
    truncation: str = "truncate_left_prompt"
    completion_only_loss: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataError(f"data format {self.format!r} unknown; choose from {FORMATS}")
        if self.truncation not in TRUNCATIONS:
            raise DataError(f"truncation {self.truncation!r} unknown; choose from {TRUNCATIONS}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "FormatConfig":
        """From a plain dict or an ml_collections ConfigDict; other keys are ignored."""
        cfg = cfg or {}
        get = cfg.get if hasattr(cfg, "get") else lambda k, d: getattr(cfg, k, d)
        return cls(
            format=get("format", "auto") or "auto",
            truncation=get("truncation", "truncate_left_prompt") or "truncate_left_prompt",
            completion_only_loss=bool(get("completion_only_loss", True)),
        )


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """One example. ``prompt_len``: leading tokens before the first completion token."""

    ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # bool [L]; True where the token is a target
    prompt_len: int
    n_special_prefix: int  # leading BOS-like tokens that truncation keeps

    def __len__(self) -> int:
        return len(self.ids)


def detect_format(record: Mapping[str, Any]) -> str | None:
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _lcp(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before a text (BOS for Llama), found by encoding a probe."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_sp) - len(plain) + 1):
        if with_sp[start:start + len(plain)] == plain:
            return list(with_sp[:start])
    return []


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content']).__name__}")
    return [dict(m) for m in messages]


class SFTFormatter:
    """Callable: ``formatter(record, where) -> Tokenized``. Holds the tokenizer's constants."""

    def __init__(self, tokenizer, cfg: FormatConfig | Mapping[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg if isinstance(cfg, FormatConfig) else FormatConfig.from_config(cfg)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
        self.bos_id = tokenizer.bos_token_id
        self.prefix_ids = _special_prefix(tokenizer)
        from alignjax.data.tokenizer import TextEncoder, stop_token_ids

        self.stop_ids = set(stop_token_ids(tokenizer))
        self.encode = TextEncoder(tokenizer)  # text -> ids, no special tokens

    def ends_turn(self, ids: Sequence[int]) -> bool:
        """True when `ids` already end with a stop token, perhaps followed by whitespace the chat
        template puts after it (ChatML's "<|im_end|>\n"): then no EOS is appended."""
        for i in reversed(ids):
            if i in self.stop_ids:
                return True
            if self.tokenizer.decode([i]).strip():
                return False
        return False

    def closed(self, ids: list[int]) -> list[int]:
        """`ids` ending in EOS: appended unless the text already ends its turn (e.g. a completion
        whose text ends with the EOS string)."""
        return ids if self.ends_turn(ids) else ids + [self.eos_id]

    def _make(self, ids: list[int], mask: list[bool], prompt_len: int, n_prefix: int) -> Tokenized:
        if not self.cfg.completion_only_loss:
            mask = [True] * len(ids)
        return Tokenized(np.asarray(ids, np.int32), np.asarray(mask, bool), prompt_len, n_prefix)

    def text(self, text: str) -> Tokenized:
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, got {type(text).__name__}")
        body = self.closed(self.encode(text))
        p = len(self.prefix_ids)
        return Tokenized(np.asarray(self.prefix_ids + body, np.int32),
                         np.asarray([False] * p + [True] * len(body), bool), p, p)

    def prompt_completion(self, prompt: str, completion: str) -> Tokenized:
        # Prompt and completion are tokenized apart, as at generation time: the model sees
        # exactly the prompt ids it will be given later, and decode(completion ids) == completion.
        # A joining space, if wanted, belongs in the data (e.g. completion " yes").
        prompt_ids = self.prefix_ids + self.encode(prompt)
        completion_ids = self.closed(self.encode(completion))
        p = len(prompt_ids)
        return self._make(prompt_ids + completion_ids, [False] * p + [True] * len(completion_ids),
                          p, len(self.prefix_ids))

    def messages(self, messages: list[dict], trainable: list[int] | None = None) -> Tokenized:
        """Assistant spans found by rendering prefixes and diffing their ids with the whole."""
        tok = self.tokenizer
        if tok.chat_template is None:
            raise DataError(f"tokenizer {tok.name_or_path!r} has no chat_template; cannot render "
                            "'messages' records")
        if trainable is None:
            trainable = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

        def render(msgs, gen):
            if not msgs:
                return []
            return self.encode(tok.apply_chat_template(msgs, tokenize=False,
                                                       add_generation_prompt=gen))

        full = render(messages, False)
        mask = [False] * len(full)
        for i in trainable:
            start = _lcp(full, render(messages[:i], True))
            last = i + 1 == len(messages)  # its prefix is the whole conversation, rendered above
            end = len(full) if last else _lcp(full, render(messages[:i + 1], False))
            mask[start:end] = [True] * (end - start)
        if trainable and trainable[-1] == len(messages) - 1 and full and not self.ends_turn(full):
            full, mask = full + [self.eos_id], mask + [True]  # template without an end-of-turn
        n_prefix = 1 if full and self.bos_id is not None and full[0] == self.bos_id else 0
        prompt_len = mask.index(True) if any(mask) else len(full)
        return self._make(full, mask, prompt_len, n_prefix)

    def __call__(self, record: Mapping[str, Any], where: str = "record") -> Tokenized:
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a dict record, got {type(record).__name__}")
        fmt = self.cfg.format if self.cfg.format != "auto" else detect_format(record)
        if fmt is None:
            raise DataError(f"{where}: cannot tell the record format from keys {sorted(record)}; "
                            f"expected keys {_EXPECTED}")
        missing = [k for k in FORMAT_KEYS[fmt] if k not in record]
        wrong = [f"{k!r} is {'null' if record[k] is None else type(record[k]).__name__}"
                 for k in FORMAT_KEYS[fmt] if k in record and not isinstance(record[k], (str, list))]
        if wrong and not missing:
            raise DataError(f"{where}: {', '.join(wrong)}; format {fmt!r} needs "
                            f"{' and '.join(map(repr, FORMAT_KEYS[fmt]))} as text (a string) or "
                            "a list of messages")
        if missing:
            raise DataError(f"{where}: record lacks {missing} for format {fmt!r}; expected keys "
                            f"{list(FORMAT_KEYS[fmt])} (present: {sorted(record)})")
        try:
            if fmt == "text":
                return self.text(record["text"])
            if fmt == "messages":
                return self.messages(_check_messages(record["messages"]))
            prompt, completion = record["prompt"], record["completion"]
            if isinstance(prompt, list) and isinstance(completion, list):
                msgs = _check_messages(prompt + completion)
                train = [i for i in range(len(prompt), len(msgs)) if msgs[i]["role"] == "assistant"]
                return self.messages(msgs, train)
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ValueError(f"'prompt' is {type(prompt).__name__} and 'completion' is "
                                 f"{type(completion).__name__}; both must be strings or both "
                                 "lists of messages")
            return self.prompt_completion(prompt, completion)
        except DataError:
            raise
        except Exception as e:  # jinja raise_exception, bad types: always the user's data
            raise DataError(f"{where}: cannot format {fmt!r} record: {e}") from e


def truncate(ex: Tokenized, max_length: int, policy: str) -> tuple[Tokenized | None, str]:
    """Fit ``ex`` into ``max_length`` tokens. Returns (example or None, "ok"|"truncated"|"dropped").

    truncate_left_prompt: drop the start of the prompt (keeping BOS) so the end of the prompt and
    the completion survive; if the completion alone is too long, then cut on the right.
    truncate_right: keep the first ``max_length`` tokens. drop: discard the example.
    """
    if len(ex) <= max_length:
        return ex, "ok"
    if policy == "drop":
        return None, "dropped"
    ids, mask = ex.ids, ex.loss_mask
    prompt_len = ex.prompt_len
    if policy == "truncate_left_prompt":
        keep = ex.n_special_prefix
        cut = min(len(ids) - max_length, max(prompt_len - keep, 0))
        ids = np.concatenate([ids[:keep], ids[keep + cut:]])
        mask = np.concatenate([mask[:keep], mask[keep + cut:]])
        prompt_len -= cut
    elif policy != "truncate_right":
        raise DataError(f"truncation {policy!r} unknown; choose from {TRUNCATIONS}")
    ids, mask = ids[:max_length], mask[:max_length]
    return Tokenized(ids, mask, min(prompt_len, max_length), ex.n_special_prefix), "truncated"


def num_targets(ex: Tokenized) -> int:
    """Tokens that carry loss (token 0 never does: nothing predicts it)."""
    return int(ex.loss_mask[1:].sum())
