"""Shared pytest fixtures. Keep each fixture small, offline and fast; session scope for anything
that trains or loads (tokenizers, tiny models)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """Llama-3-style byte-level BPE (bos <|begin_of_text|>, eos <|eot_id|>, pad <|pad|>), vocab 512."""
    from alignjax.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(vocab_size=512)


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """Llama-2-style sentencepiece BPE (<s>, </s>, <unk>, added <pad>, [INST] template)."""
    from alignjax.data.tokenizer import train_sentencepiece_tokenizer

    return train_sentencepiece_tokenizer(vocab_size=512, out_dir=tmp_path_factory.mktemp("spm"))
