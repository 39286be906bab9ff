"""On-the-spot tokenizers: save/reload offline, pad != eos, chat templates, load_tokenizer."""
from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from alignjax.data.sources import DataError
from alignjax.data.tokenizer import (
    TextEncoder, ensure_pad_token, load_tokenizer, tokenizer_info, train_sentencepiece_tokenizer,
)

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]
TEXT = "The quick brown fox jumps over the lazy dog. 12 times 12 is 144."


def _roundtrip(tok, path):
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", ["bpe_tokenizer", "spm_tokenizer"])
def test_save_reload_offline(name, request, tmp_path, monkeypatch):
    tok = request.getfixturevalue(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = _roundtrip(tok, tmp_path / "tok")
    assert again(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert again.decode(tok(TEXT, add_special_tokens=False)["input_ids"]) == TEXT
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(again, attr) == getattr(tok, attr)
    assert len(again) == len(tok)
    assert again.apply_chat_template(MSGS, tokenize=False) == tok.apply_chat_template(MSGS, tokenize=False)
    reloaded = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer_info(reloaded) == tokenizer_info(tok)


@pytest.mark.parametrize("name", ["bpe_tokenizer", "spm_tokenizer"])
def test_special_tokens(name, request):
    tok = request.getfixturevalue(name)
    info = tokenizer_info(tok)
    assert info.pad_id != info.eos_id
    assert info.bos_id is not None and info.pad_id < info.vocab_size
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == info.bos_id and ids.count(info.bos_id) == 1  # BOS prepended, once
    assert info.eos_id not in ids  # EOS is the data pipeline's job, not the tokenizer's
    assert info.eos_id in info.stop_ids


@pytest.mark.parametrize("name", ["bpe_tokenizer", "spm_tokenizer"])
def test_text_encoder_gives_transformers_ids(name, request):
    """TextEncoder calls the Rust tokenizer directly: the same ids as transformers' call, also
    for special-token strings inside the text and for a tokenizer saved with truncation on."""
    import pickle

    tok = request.getfixturevalue(name)
    chat = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    texts = [TEXT, "", " leading space", "trailing\n", chat, chat * 40, tok.eos_token + " x",
             "é ü 中文 🙂", "a" * 3000]
    truncating = _roundtrip(tok, request.getfixturevalue("tmp_path") / "t")
    truncating.backend_tokenizer.enable_truncation(max_length=8)  # what some hub files ship
    for t in (tok, truncating):
        encode = TextEncoder(t)
        expected = [list(tok(x, add_special_tokens=False)["input_ids"]) for x in texts]
        assert [encode(x) for x in texts] == expected
        assert [pickle.loads(pickle.dumps(encode))(x) for x in texts] == expected  # grain workers


def test_bpe_llama3_layout(bpe_tokenizer):
    tok = bpe_tokenizer
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.pad_token == "<|pad|>"
    vocab = tok.get_vocab()
    for t in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert t in vocab
        assert tok(t, add_special_tokens=False)["input_ids"] == [vocab[t]]  # one special token
    assert len(tok) <= 512
    # Byte-level: any unicode round-trips.
    s = "naïve café 東京 🙂"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_bpe_chat_template(bpe_tokenizer):
    text = bpe_tokenizer.apply_chat_template(MSGS[:3], tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
    )
    gen = bpe_tokenizer.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert gen.endswith("And of Spain?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not bpe_tokenizer.apply_chat_template(MSGS, tokenize=False).endswith("\n\n")


def test_spm_llama2_layout(spm_tokenizer):
    tok = spm_tokenizer
    assert type(tok).__name__ == "LlamaTokenizer"
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert os.path.isfile(os.path.join(tok.name_or_path, "tokenizer.model"))
    text = tok.apply_chat_template(MSGS[:3], tokenize=False)
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris. </s>"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([MSGS[2], MSGS[1]], tokenize=False)


def test_spm_too_small_vocab_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="sentencepiece"):
        train_sentencepiece_tokenizer(vocab_size=50, out_dir=tmp_path)


def test_load_tokenizer_errors_and_pad(tmp_path, spm_tokenizer, bpe_tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer here"):
        load_tokenizer(str(tmp_path / "empty"))

    # pad == eos on disk (a common mistake): reuse the existing <|pad|> entry, vocab unchanged.
    bad = AutoTokenizer.from_pretrained(_save(bpe_tokenizer, tmp_path / "b"))
    bad.pad_token = bad.eos_token
    tok = load_tokenizer(_save(bad, tmp_path / "bad"))
    assert tok.pad_token_id != tok.eos_token_id and len(tok) == len(bpe_tokenizer)

    # A raw Llama-2 model has no pad at all: one is added and the vocabulary grows by one.
    from transformers import LlamaTokenizer

    raw = LlamaTokenizer.from_pretrained(spm_tokenizer.name_or_path)
    assert raw.pad_token_id is None
    n = len(raw)
    assert ensure_pad_token(raw) is True
    assert raw.pad_token == "<pad>" and raw.pad_token_id == n and len(raw) == n + 1
    assert ensure_pad_token(raw) is False  # idempotent


def _save(tok, path):
    tok.save_pretrained(path)
    return str(path)
