"""The tokenizer, the base model (optionally quantized) and its LoRA adapter."""
from __future__ import annotations

from transformers import AutoTokenizer


def load_tokenizer(recipe):
    """The recipe's tokenizer, with a pad token (padding is only ever masked: labels -100, attention 0)."""
    m = recipe.model
    tok = AutoTokenizer.from_pretrained(m.tokenizer or m.name_or_path, trust_remote_code=m.trust_remote_code)
    if m.pad_token is not None:
        if m.pad_token not in tok.get_vocab():
            # Adding a token would resize the embeddings, which a LoRA run does not train.
            raise ValueError(f"model.pad_token: {m.pad_token!r} is not in the tokenizer's vocabulary")
        tok.pad_token = m.pad_token
    elif tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok
