"""Tokenizers: load real ones safely, or train tiny Llama-style ones on the spot (tests, demos).

Two rules hold for every tokenizer this module returns:
- pad id != eos id (padding is masked everywhere; EOS is a target the model must learn);
- the result is a ``transformers`` tokenizer that ``save_pretrained`` / ``AutoTokenizer``
  round-trip offline, with a chat template.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Iterable, Sequence

from alignjax.data.sources import DataError

log = logging.getLogger(__name__)

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
LLAMA3_SPECIAL_TOKENS = (BOS, END_OF_TEXT, PAD, START_HEADER, END_HEADER, EOT)

# The pre-tokenizer regex of Llama 3 (tiktoken cl100k-style).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta-Llama-3-8B-Instruct's template, plus the usual add_generation_prompt tail.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-2-chat's template. The generation prompt is implicit (a turn ends with ' [/INST]').
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Existing vocabulary entries that make a good pad (no new embedding row needed), best first.
_PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>", PAD, "<pad>", "[PAD]", "<|reserved_special_token_0|>",
)

DEMO_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices, the tide keeps its time.",
    "Explain photosynthesis simply. Plants turn light, water and air into sugar and oxygen.",
    "How many legs does a spider have? A spider has eight legs.",
    "Translate 'good morning' to Spanish. Buenos días.",
    "List three primary colors: red, blue and yellow.",
    "What is 12 times 12? 12 times 12 is 144.",
    "Summarise: the meeting moved to Tuesday because the room was booked on Monday.",
    "Give me a synonym for happy. Joyful.",
    "def add(a, b):\n    return a + b\n",
    "Is the earth flat? No, the earth is an oblate spheroid.",
    "Name a mammal that can fly. The bat.",
    "Why is the sky blue? Shorter wavelengths of sunlight scatter more in the atmosphere.",
    "Count from one to five: one, two, three, four, five.",
    "Hello! How can I help you today? I would like to learn about tokenizers.",
    "system user assistant: you are a helpful, honest and harmless assistant.",
    "[INST] <<SYS>> Be brief. <</SYS>> Say hi. [/INST] Hi!",
)


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """Ids a trainer needs. ``vocab_size`` = len(tokenizer): the embedding needs at least this many rows."""

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None
    stop_ids: tuple[int, ...]  # EOS plus end-of-turn tokens (generation stops on any)


def tokenizer_info(tokenizer) -> TokenizerInfo:
    return TokenizerInfo(
        vocab_size=len(tokenizer),
        pad_id=int(tokenizer.pad_token_id),
        eos_id=int(tokenizer.eos_token_id),
        bos_id=None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        stop_ids=stop_token_ids(tokenizer),
    )


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS and any end-of-turn token of the usual chat formats that the vocabulary holds."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    for tok in (EOT, END_OF_TEXT, "<|im_end|>", "<end_of_turn>", "</s>"):
        if tok in vocab:
            ids.append(vocab[tok])
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


class TextEncoder:
    """`encoder(text) -> list[int]`: the ids of `tokenizer(text, add_special_tokens=False)`.

    For a fast tokenizer it calls the Rust tokenizer directly, on a copy with truncation and
    padding off (what transformers sets on every call). transformers' call goes through
    `encode_batch` and builds a `BatchEncoding`: 3x slower per text on one thread, and slower
    still in grain's prefetch threads, where it took most of an SFT run's input pipeline.
    Picklable, for grain's worker processes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.rust = tokenizer, None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            self.rust = Tokenizer.from_str(backend.to_str())
            self.rust.no_truncation()
            self.rust.no_padding()
            self.rust.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def __call__(self, text: str) -> list[int]:
        if self.rust is None:  # a slow (Python) tokenizer
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self.rust.encode(text, add_special_tokens=False).ids


def ensure_pad_token(tokenizer) -> bool:
    """Give ``tokenizer`` a pad token distinct from EOS, in place. Returns True if the vocabulary grew.

    An existing unused token (e.g. ``<|finetune_right_pad_id|>``) is preferred; otherwise a new
    ``<pad>``/``<|pad|>`` token is added and the model's embedding must be resized to
    ``len(tokenizer)`` rows (the pad row is never a target, so its values do not matter).
    """
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    vocab = tokenizer.get_vocab()
    for cand in _PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != tokenizer.eos_token_id:
            tokenizer.pad_token = cand
            return False
    new = PAD if (tokenizer.bos_token or "").startswith("<|") else "<pad>"
    tokenizer.add_special_tokens({"pad_token": new})
    log.warning(
        "tokenizer %r had no pad token distinct from eos: added %r (id %d); the embedding needs "
        "%d rows", tokenizer.name_or_path, new, tokenizer.pad_token_id, len(tokenizer),
    )
    return True


# A Hugging Face Hub repo id: "name" or "namespace/name" (anything else can only be a local path).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)`` with a clear error and a pad token != eos.

    ``path`` may be a local directory or a hub name (needs network once). Use
    ``tokenizer_info(tok).vocab_size`` to check the model's embedding is large enough: it grows
    by one row when a pad token had to be added (see ``ensure_pad_token``).
    """
    from transformers import AutoTokenizer

    path = str(path)
    from alignjax import fs
    path = fs.without_file_scheme(path)
    if "://" in path:  # a bucket (gs://...): transformers reads only local folders
        if not fs.isdir(path):
            raise DataError(f"{path}: no such tokenizer folder; check the path")
        path = fs.get_dir(path, fs.temp_dir("alignjax-tokenizer-"))
    if not os.path.exists(path) and not _HUB_ID.fullmatch(path):
        raise DataError(f"{path}: no such tokenizer directory (and not a Hub name such as "
                        "meta-llama/Llama-3.2-1B); check the path (tokenizer.path in a config)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{path}: is a file; give the tokenizer's directory (tokenizer.json, "
                        "tokenizer_config.json, ...)")
    if os.path.isdir(path):
        files = set(os.listdir(path))
        known = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json"}
        if not files & known:
            raise DataError(
                f"{path}: no tokenizer here (expected one of {sorted(known)}); save one with "
                "tokenizer.save_pretrained(dir) or pass a hub name"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        where = "" if os.path.isdir(path) else "no such local directory, and from the Hub: "
        reason = " ".join(str(e).split())  # transformers' messages span lines
        raise DataError(f"{path}: cannot load a tokenizer ({where}{reason})") from e
    ensure_pad_token(tokenizer)
    if tokenizer.chat_template is None:
        log.info("tokenizer %r has no chat template; the messages format will not work", path)
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str] = DEMO_CORPUS, vocab_size: int = 512):
    """A Llama-3-style byte-level BPE trained on ``texts`` (fast: milliseconds on a small corpus).

    Special tokens: bos ``<|begin_of_text|>``, eos ``<|eot_id|>`` (as in Llama-3-Instruct, so a
    chat turn and a plain text both end with the same EOS), ``<|end_of_text|>``, pad ``<|pad|>``,
    header tokens. BOS is prepended by the post-processor, exactly like Llama 3.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        additional_special_tokens=[END_OF_TEXT, START_HEADER, END_HEADER],
        clean_up_tokenization_spaces=False, model_max_length=1 << 20,
    )
    hf.chat_template = LLAMA3_CHAT_TEMPLATE
    assert hf.pad_token_id != hf.eos_token_id
    return hf


def train_sentencepiece_tokenizer(
    texts: Sequence[str] = DEMO_CORPUS, vocab_size: int = 512, out_dir: str | os.PathLike = "."
):
    """A Llama-2-style tokenizer: sentencepiece BPE with byte fallback, ``<s>``/``</s>``/``<unk>``.

    The sentencepiece model is written to ``out_dir/tokenizer.model`` (like Llama 2, it has no
    pad piece) and loaded with transformers' ``LlamaTokenizer``; a ``<pad>`` token is then added
    the way one is added to a real Llama-2 tokenizer. ``vocab_size`` must leave room for the 256
    byte-fallback pieces plus the corpus characters (about 300 at least).
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_prefix=os.path.join(out_dir, "tokenizer"),
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
            allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", hard_vocab_limit=False, num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed: {e}") from e
    hf = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False)
    hf.chat_template = LLAMA2_CHAT_TEMPLATE
    hf.add_special_tokens({"pad_token": "<pad>"})
    assert hf.pad_token_id != hf.eos_token_id
    return hf
