"""The training job's side of the data stage: check the shards are complete, join them, split train/eval.

The split is the notebook's: shuffle all rows with data.split_seed (42), then the last data.eval_fraction (2%) are
the evaluation set (`Dataset.shuffle(seed).train_test_split(test_size, shuffle=False)`). The shards joined in index
order are the input rows in input order whatever their number, so 1 shard and 8 shards give the same two sets.

The shards are only read: the split is computed as index arrays and applied with `select(keep_in_memory=True)`,
because `datasets` otherwise writes cache files into the folder a data set was loaded from.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from ftlib.data import DataError
from ftlib.data.preprocess import complete_shards, has_manifest, invalidate_shard, rows_rejected, verify_shard
from ftlib.rundir import read_json


def split_indices(num_rows: int, eval_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and eval sets, as `shuffle(seed)` + `train_test_split(shuffle=False)` make them."""
    order = np.random.default_rng(seed).permutation(num_rows)
    n_eval = math.ceil(eval_fraction * num_rows)
    return order[: num_rows - n_eval], order[num_rows - n_eval:]


def load_splits(recipe):
    """(train, eval) datasets: input_ids, attention_mask, labels; or, with data.packing, packs of input_ids, labels,
    position_ids. `eval` is None when data.eval_fraction is 0."""
    import datasets

    dirs = complete_shards(recipe)
    if not has_manifest(dirs[0].parent, len(dirs)):  # written by the last shard of the data stage
        raise DataError(f"{dirs[0].parent}: every shard is done but manifest.json is missing (the last shard was "
                        f"stopped before writing it); run the preprocess stage again, it writes only the manifest")
    rejected = rows_rejected(recipe, dirs[0].parent)
    if rejected:
        raise DataError(rejected)
    parts = []
    for index, d in enumerate(dirs):
        why = verify_shard(d.parent, index, len(dirs))
        try:
            shard = datasets.load_from_disk(str(d)) if why is None else None
        except Exception as e:  # sizes intact, content not: Arrow's own error, which names no shard
            shard, why = None, f"it cannot be read: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        expected = read_json(d.with_name(d.name + ".done.json"))["rows_written"]
        if why is None and len(shard) != expected:
            why = f"it holds {len(shard)} rows, {expected} when written"
        if why is not None:
            raise DataError(invalidate_shard(d.parent, index, len(dirs), why))
        if len(shard):  # (an empty shard's table has no record batches, which concatenation cannot take)
            parts.append(shard)
    if not parts:
        raise DataError(f"{dirs[0].parent}: no rows left after preprocessing; see manifest.json")
    rows = datasets.concatenate_datasets(parts)
    d = recipe.data
    train_idx, eval_idx = split_indices(len(rows), d.eval_fraction, d.split_seed)
    if len(train_idx) == 0:
        raise DataError(f"only {len(rows)} row(s): nothing left to train on after the "
                        f"data.eval_fraction={d.eval_fraction} evaluation split")
    train = rows.select(train_idx, keep_in_memory=True)
    evaluation: Optional[object] = rows.select(eval_idx, keep_in_memory=True) if len(eval_idx) else None
    if d.packing:
        from ftlib.data.packing import pack_dataset

        train = pack_dataset(train, d.row_len)
        evaluation = pack_dataset(evaluation, d.row_len) if evaluation is not None else None
    return train, evaluation

