"""Batched tokenization with exact prompt masking.

Each example is a text plus the character spans to train (the response; the assistant turns). The whole text is
tokenized once, in batches, with the tokenizer's Rust backend; a token is trained when it holds at least one
character of a trained span, so a token that straddles the prompt/response junction is trained and every token made
only of prompt characters gets label -100. (Tokenizing the prompt alone to count its tokens, as the notebook does,
costs a second pass over about half the text and is off by one wherever the junction merges.)

Like the notebook, the end-of-sequence token is appended after the response (and trained) unless the text already
ends with it, and a sequence longer than data.sequence_len keeps its first sequence_len tokens, without EOS
(data.too_long: truncate) or is dropped (drop). The first token's label is always -100: nothing before it predicts
it, which also keeps an example's loss the same whether it is alone or packed after another.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import chain
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow as pa

from ftlib.data import DataError

Spans = List[Tuple[int, int]]  # character [start, end) ranges to train


@dataclass
class Skipped:
    index: int                # position of the example in the batch
    reason: str               # a key of formats.REASONS
    detail: str


@dataclass
class Encoded:
    """One batch of tokenized examples, as flat arrays (row r is values[offsets[r]:offsets[r+1]])."""
    offsets: np.ndarray       # int32, rows + 1
    input_ids: np.ndarray     # int32
    labels: np.ndarray        # int32, -100 where not trained
    skipped: List[Skipped] = field(default_factory=list)
    truncated: int = 0

    def table(self) -> pa.Table:
        offsets = pa.array(self.offsets, pa.int32())
        ones = np.ones(len(self.input_ids), dtype=np.int8)
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(self.input_ids, pa.int32())),
            "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(ones, pa.int8())),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(self.labels, pa.int32())),
        })


class Encoder:
    def __init__(self, tokenizer, sequence_len: int, too_long: str = "truncate", train_on_inputs: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{tokenizer.name_or_path}: preprocessing needs a fast tokenizer (a tokenizer.json)")
        self.backend = tokenizer.backend_tokenizer
        self.eos = tokenizer.eos_token_id
        self.sequence_len = sequence_len
        self.too_long = too_long
        self.train_on_inputs = train_on_inputs

    def encode(self, texts: Sequence[str], spans: Sequence[Spans], add_special_tokens: bool,
               add_eos: bool) -> Encoded:
        """Tokenize a batch; `add_special_tokens` adds the tokenizer's BOS (off for chat templates, which write
        their own), `add_eos` appends EOS to each example."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        rows: List[List[int]] = []
        trained: List[Tuple[int, int]] = []  # token spans, as offsets into the flat output
        skipped, truncated, total = [], 0, 0
        limit = self.sequence_len
        for i, (enc, text, char_spans) in enumerate(zip(encodings, texts, spans)):
            ids = enc.ids
            n_text = len(ids)
            if add_eos and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            n, cut = len(ids), False
            if self.train_on_inputs:
                token_spans = [(0, n)]
            elif len(char_spans) == 1 and char_spans[0][1] >= len(text):  # a response to the end: alpaca, completion
                token_spans = [(_first_token(enc, char_spans[0][0], n_text), n)]
            else:
                token_spans = [(_first_token(enc, a, n_text), n if b >= len(text) else _end_token(enc, b))
                               for a, b in char_spans]
            if n > limit:
                if self.too_long == "drop":
                    skipped.append(Skipped(i, "too_long", f"{n} tokens, more than data.sequence_len={limit}"))
                    continue
                ids, n, cut = ids[:limit], limit, True
            # Clip to the kept tokens; position 0 is never a target.
            token_spans = [(max(a, 1), min(b, n)) for a, b in token_spans if min(b, n) > max(a, 1)]
            if not token_spans:
                if cut:
                    skipped.append(Skipped(i, "too_long", f"the prompt fills data.sequence_len={limit}: "
                                                          f"no response token is left to train"))
                else:
                    skipped.append(Skipped(i, "empty_output", "the response is empty once tokenized"))
                continue
            truncated += cut
            trained += [(total + a, total + b) for a, b in token_spans]
            rows.append(ids)
            total += n
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        input_ids = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=total)
        # Mark trained tokens: +1 at each span start, -1 at its end, running sum > 0 inside spans.
        edges = np.zeros(total + 1, dtype=np.int32)
        if trained:
            starts, ends = np.array(trained, dtype=np.int64).T
            np.add.at(edges, starts, 1)
            np.add.at(edges, ends, -1)
        labels = np.where(np.cumsum(edges[:total]) > 0, input_ids, np.int32(-100)).astype(np.int32)
        return Encoded(offsets, input_ids, labels, skipped, truncated)


def _first_token(enc, char: int, n_text: int) -> int:
    """Index of the first token holding character `char` or a later one."""
    t = enc.char_to_token(char)
    if t is not None:
        return t
    # `char` itself made no token (e.g. a normalizer dropped it): the first token ending after it.
    return min(bisect_right([e for _, e in enc.offsets], char), n_text)


def _end_token(enc, char: int) -> int:
    """One past the last token that starts before character `char`."""
    return bisect_left([s for s, _ in enc.offsets], char)
