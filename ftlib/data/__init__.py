"""The data stage: raw rows -> prompt text -> tokens with masked labels -> shards -> train/eval splits.

  formats.py     the prompt templates (the notebook's Alpaca styles, chat templates) and row validation
  sources.py     where rows come from (JSONL/JSON/Parquet/gzip files, saved datasets, hub) and which rows a shard reads
  tokenize.py    batched tokenization with exact prompt masking, as Arrow columns
  preprocess.py  one array task: fingerprint, run_shard, completion markers, manifest.json
  merge.py       load_splits: join the shards, the notebook's 2% split, optional packing
  packing.py     several examples per sequence_len window, position ids restarting per example
  collate.py     batching for the Trainer, and the padding fraction of a batching

On disk (`data.cache_dir`):

  <fingerprint>/
    fingerprint.json                 what the fingerprint was computed from
    shard-00003-of-00008/            a finished shard: `datasets.save_to_disk` (input_ids, attention_mask, labels)
    shard-00003-of-00008.done.json   its completion marker and statistics; without it the shard does not exist
    manifest.json                    all shards' statistics together (written once every shard is done)
"""


from ftlib.errors import UserError


class DataError(UserError):
    """Bad data or an incomplete preprocessing output, in one line naming the file, the reason and examples."""
