"""Tokenizer lookup for a loaded model, and prompt encoding for generation."""

from __future__ import annotations

from typing import Sequence

from alignjax.errors import UserError


def load_model_tokenizer(model, path: str):
    """The tokenizer stored with the model (HF directory or alignjax `tokenizer/`)."""
    if model.tokenizer_dir is None:
        raise UserError(f"{path}: no tokenizer files found with the model (tokenizer.json or "
                        "tokenizer.model); copy them into the directory and retry")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model.tokenizer_dir)


def encode_prompts(tokenizer, texts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids per prompt; with `chat`, each text is one user turn plus the generation prompt."""
    if not chat:
        return [tokenizer(t)["input_ids"] for t in texts]
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this tokenizer has no chat_template; drop --chat or use an "
                        "instruct model's tokenizer")
    out = []
    for t in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        out.append(list(ids))
    return out
