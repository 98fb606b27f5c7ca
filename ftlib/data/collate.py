"""Batching for the Trainer, and how much of a batching is padding.

Unpacked rows use the notebook's collator: pad to the longest row of the micro-batch, to a multiple of 8, labels
padded with -100 (`DataCollatorForSeq2Seq`). Packed rows use PackedCollator: position ids and no attention mask, so
transformers keeps the examples of a pack apart (see packing.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

PAD_TO_MULTIPLE_OF = 8


def make_collator(recipe, tokenizer):
    if recipe.data.packing:
        return PackedCollator(pad_token_id=tokenizer.pad_token_id)
    import copy

    from transformers import DataCollatorForSeq2Seq

    # Pad on the right, as the notebook's tokenizer did, so that positions start at 0 (LlamaTokenizer's class default
    # is the left). A copy: the caller's tokenizer may pad on the left on purpose, for generation.
    right = copy.copy(tokenizer)
    right.padding_side = "right"
    return DataCollatorForSeq2Seq(right, padding=True, pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
                                  label_pad_token_id=-100, return_tensors="pt")


@dataclass
class PackedCollator:
    """Pads packs to the longest in the batch (multiple of 8). The padding is a block of its own (its positions
    restart at 0) and is never trained (labels -100); causal attention keeps the real tokens from seeing it."""
    pad_token_id: int
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF

    def __call__(self, features: List[Dict[str, Sequence[int]]]):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        position_ids = torch.arange(width, dtype=torch.long).repeat(len(features), 1)
        for r, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[r, :n] = torch.as_tensor(f["input_ids"])
            labels[r, :n] = torch.as_tensor(f["labels"])
            position_ids[r, :n] = torch.as_tensor(f["position_ids"])
            position_ids[r, n:] = torch.arange(width - n)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def row_lengths(dataset) -> np.ndarray:
    """Tokens per row of a dataset with an `input_ids` column (read from Arrow offsets, without decoding rows)."""
    if dataset is None or len(dataset) == 0:
        return np.zeros(0, dtype=np.int64)
    column = dataset.with_format("arrow")[:]["input_ids"].combine_chunks()
    return column.value_lengths().to_numpy().astype(np.int64)


def padding_fraction(lengths: Sequence[int], batch_size: int, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> float:
    """Share of the token slots that are padding when consecutive rows form micro-batches of `batch_size`, each
    padded to its longest row rounded up to `pad_to_multiple_of`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return 0.0
    slots = 0
    for start in range(0, lengths.size, batch_size):
        batch = lengths[start:start + batch_size]
        width = -(-int(batch.max()) // pad_to_multiple_of) * pad_to_multiple_of
        slots += width * batch.size
    return 1.0 - lengths.sum() / slots
