"""Packing: several examples in each window of data.pack_to tokens (default: data.sequence_len, the longest an example
may be), without padding and without attention across them.

Each pack holds whole examples one after another, with position ids that restart at 0 for every example. Given
position ids and no attention mask (and no cache, as in training), transformers builds a block-diagonal causal mask
from where the positions restart, so an example attends only to itself; every example's first label is -100
(tokenize.py), so no example is trained to predict the next one's first token. An example's loss inside a pack is its
loss alone.

Examples go into packs by best fit in dataset order (each into the open pack with the least room that still fits
it), which fills windows to ~99% on instruction data while keeping the shuffled order's mix.
"""
from __future__ import annotations

from typing import List

import numpy as np
import pyarrow as pa


def best_fit(lengths: np.ndarray, capacity: int) -> List[List[int]]:
    """Indices of the examples in each pack; every length must be <= capacity."""
    open_with = np.zeros(capacity + 1, dtype=np.int64)  # open_with[s]: how many packs have exactly s tokens free
    packs_with: List[List[int]] = [[] for _ in range(capacity + 1)]
    packs: List[List[int]] = []
    for i, n in enumerate(lengths.tolist()):
        room = np.flatnonzero(open_with[n:])
        if room.size:
            free = n + int(room[0])
            p = packs_with[free].pop()
            open_with[free] -= 1
        else:
            free, p = capacity, len(packs)
            packs.append([])
        packs[p].append(i)
        if free - n > 0:
            packs_with[free - n].append(p)
            open_with[free - n] += 1
    return packs


def pack_dataset(ds, sequence_len: int):
    """A Dataset of packs (input_ids, labels, position_ids) from a Dataset of examples (input_ids, labels)."""
    import datasets
    from datasets.table import InMemoryTable

    fingerprint = f"{ds._fingerprint}-packed-{sequence_len}"  # named, or `datasets` would hash every row for one
    if len(ds) == 0:
        empty = pa.array([], pa.list_(pa.int32()))
        table = pa.table({"input_ids": empty, "labels": empty, "position_ids": empty})
        return datasets.Dataset(InMemoryTable(table), fingerprint=fingerprint)
    table = ds.with_format("arrow")[:]
    ids = table.column("input_ids").combine_chunks()
    labels = table.column("labels").combine_chunks()
    lengths = ids.value_lengths().to_numpy().astype(np.int64)
    if lengths.max() > sequence_len:
        raise ValueError(f"an example has {lengths.max()} tokens, more than sequence_len={sequence_len}")
    packs = best_fit(lengths, sequence_len)
    order = pa.array(np.fromiter((i for p in packs for i in p), dtype=np.int64, count=len(lengths)))
    ids_flat = ids.take(order).flatten()
    labels_flat = labels.take(order).flatten()
    example_lengths = lengths[order.to_numpy()]
    starts = np.concatenate([[0], np.cumsum(example_lengths)[:-1]])
    positions = np.arange(int(example_lengths.sum()), dtype=np.int64) - np.repeat(starts, example_lengths)
    pack_lengths = np.fromiter((lengths[p].sum() for p in packs), dtype=np.int64, count=len(packs))
    offsets = pa.array(np.concatenate([[0], np.cumsum(pack_lengths)]).astype(np.int32))
    packed = pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets, ids_flat.cast(pa.int32())),
        "labels": pa.ListArray.from_arrays(offsets, labels_flat.cast(pa.int32())),
        "position_ids": pa.ListArray.from_arrays(offsets, pa.array(positions.astype(np.int32))),
    })
    return datasets.Dataset(InMemoryTable(packed), fingerprint=fingerprint)
