"""Preprocessing throughput, measured side by side in one run.

    .venv/bin/python bench/preprocess.py [DATA] [--tokenizer DIR] [--sequence-len 256] [--repeats 2]

DATA defaults to ../shared/data/alpaca_cleaned_full.jsonl.gz (52k Alpaca rows; .jsonl, .json, .parquet work too),
the tokenizer to OpenLLaMA's (../shared/models/open_llama_3b_shape). It prints:

  ceiling      the raw batched tokenizer: `tokenizer(texts)` over the same rows' prompt+response texts, 1,000 a call,
               texts built beforehand (and, for reference, the backend's ids-only call without offsets)
  1 shard      run_shard(recipe, 0, 1) end to end: read, validate, format, tokenize, mask, save
  2 shards     run_shard(recipe, 0, 2) and run_shard(recipe, 1, 2) in two processes at once
  ratios       1 shard / ceiling, and 2 shards / (2 x 1 shard) (scaling efficiency)
  padding      share of padding under the notebook's batching (micro-batches of 4, padded to the longest, to a
               multiple of 8) and under packing, on the same rows

Cores: every process is one shard on one core, as a Slurm array task with cpus_per_task=1: it is pinned to its own
core and runs with TOKENIZERS_PARALLELISM=false (the ceiling too). Imports and start-up are excluded. Because the
machine may be shared, each run also reports how much of its core every process got: the wall-clock figures come from
the quietest of --repeats runs, and the same ratios are printed in CPU time, which other load hardly changes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "alpaca_cleaned_full.jsonl.gz"
DEFAULT_TOKENIZER = SHARED / "models" / "open_llama_3b_shape"
sys.path.insert(0, str(ROOT))


def make_recipe(args, cache_dir: str):
    from ftlib import recipe as recipe_mod

    return recipe_mod.load(ROOT / "recipes" / "demo.yaml", [
        f"data.sources=[{{path: '{args.data}', format: alpaca}}]",
        f"model.name_or_path={args.tokenizer}",
        f"data.sequence_len={args.sequence_len}",
        f"data.cache_dir={cache_dir}",
        f"run.dir={cache_dir}/run",
    ])


# ----------------------------------------------------------------------------------------------------- workers
def worker(args) -> None:
    """One measurement in this process: print 'ready' after start-up, wait for 'go' on stdin, print JSON."""
    if args.core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # not the "longer than the model's maximum" note on long rows
    logging.getLogger("ftlib.data").setLevel(logging.WARNING)  # no progress lines in the benchmark's output
    recipe = make_recipe(args, args.cache_dir)
    if args.worker == "ceiling":
        from ftlib.data.formats import alpaca_example
        from ftlib.data.sources import list_files, read_part, shard_parts
        from ftlib.model import load_tokenizer

        texts = []
        for part in shard_parts(list_files(recipe), 0, 1):
            for _, _, row in read_part(part):
                try:
                    texts.append(alpaca_example(row, recipe.data.prompt_style)[0])
                except Exception:
                    pass
        tokenizer = load_tokenizer(recipe)
        tokenizer(texts[:1000])  # warm up
        print("ready", flush=True)
        sys.stdin.readline()
        t0, cpu0 = time.time(), time.process_time()
        for i in range(0, len(texts), 1000):
            tokenizer(texts[i:i + 1000])
        t1, cpu1 = time.time(), time.process_time()
        backend = tokenizer.backend_tokenizer
        for i in range(0, len(texts), 1000):
            [e.ids for e in backend.encode_batch_fast(texts[i:i + 1000])]
        t2 = time.time()
        print(json.dumps({"rows": len(texts), "seconds": t1 - t0, "cpu": cpu1 - cpu0, "ids_only_seconds": t2 - t1}),
              flush=True)
        return
    import datasets  # noqa: F401  (start-up, like the imports load_tokenizer triggers: not throughput)

    import ftlib.data.tokenize  # noqa: F401
    from ftlib.data.preprocess import read_json, run_shard
    from ftlib.model import load_tokenizer

    load_tokenizer(recipe)
    print("ready", flush=True)
    sys.stdin.readline()
    t0, cpu0 = time.time(), time.process_time()
    path = run_shard(recipe, args.index, args.num_shards)
    t1, cpu1 = time.time(), time.process_time()
    stats = read_json(path.with_name(path.name + ".done.json"))
    print(json.dumps({"rows": stats["rows_read"], "t0": t0, "t1": t1, "cpu": cpu1 - cpu0}), flush=True)


def start(args, role: str, core, cache_dir: str, index: int = 0, num_shards: int = 1):
    cmd = [sys.executable, __file__, str(args.data), "--tokenizer", str(args.tokenizer), "--sequence-len",
           str(args.sequence_len), "--worker", role, "--cache-dir", cache_dir, "--index", str(index),
           "--num-shards", str(num_shards)] + (["--core", str(core)] if core is not None else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.wait()
        raise SystemExit(f"{role} worker failed to start (exit {p.returncode})")
    return p


def finish(procs) -> list:
    for p in procs:  # all start at once
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out = p.stdout.readline()
        if p.wait() != 0 or not out:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        results.append(json.loads(out))
    return results


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", default=str(DEFAULT_DATA), type=os.path.abspath)
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), type=os.path.abspath)
    ap.add_argument("--sequence-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["ceiling", "shard"], help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--num-shards", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    pin = cores if len(cores) >= 2 else [None, None]
    print(f"data {args.data}\ntokenizer {args.tokenizer}, sequence_len {args.sequence_len}")
    print(f"cores: {len(cores)}; each process = one shard on one core (pinned: {pin[0] is not None}), "
          f"TOKENIZERS_PARALLELISM=false; {args.repeats} runs")
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        runs = []
        for r in range(args.repeats):
            c = finish([start(args, "ceiling", pin[0], f"{tmp}/c{r}")])[0]
            s = finish([start(args, "shard", pin[0], f"{tmp}/one{r}")])[0]
            pair = finish([start(args, "shard", pin[k], f"{tmp}/two{r}", k, 2) for k in range(2)])
            span = max(p["t1"] for p in pair) - min(p["t0"] for p in pair)
            busy = [c["cpu"] / c["seconds"]] + [p["cpu"] / (p["t1"] - p["t0"]) for p in [s] + pair]
            run = {"rows": s["rows"], "ceiling": c["rows"] / c["seconds"], "ids_only": c["rows"] / c["ids_only_seconds"],
                   "one": s["rows"] / (s["t1"] - s["t0"]), "two": sum(p["rows"] for p in pair) / span,
                   "ceiling_cpu": c["cpu"], "one_cpu": s["cpu"], "two_cpu": max(p["cpu"] for p in pair),
                   "quiet": min(busy)}
            runs.append(run)
            print(f"  run {r + 1}: ceiling {run['ceiling']:,.0f} rows/s, 1 shard {run['one']:,.0f} rows/s, 2 shards "
                  f"{run['two']:,.0f} rows/s; CPU time / wall time of the 4 processes: "
                  f"{', '.join(f'{b:.0%}' for b in busy)} (under ~95%: other load on the machine)", flush=True)

        # Wall-clock figures from the quietest run (all its processes closest to a full core); CPU figures from
        # the least CPU time each measurement took over all runs.
        q = max(runs, key=lambda run: run["quiet"])
        ceiling, one, two = q["ceiling"], q["one"], q["two"]
        ceiling_cpu, one_cpu = min(r["ceiling_cpu"] for r in runs), min(r["one_cpu"] for r in runs)
        two_cpu = min(r["two_cpu"] for r in runs)  # the slower shard of the pair sets the pace
        print(f"\nrows: {q['rows']:,}; wall-clock figures from run {runs.index(q) + 1}, the quietest "
              f"(every process got >= {q['quiet']:.0%} of its core)")
        print(f"ceiling, tokenizer(texts) batched:     {ceiling:9,.0f} rows/s")
        print(f"  (ids only, backend without offsets: {q['ids_only']:9,.0f} rows/s; exact masking needs offsets)")
        print(f"1 shard, end to end:                   {one:9,.0f} rows/s   = {one / ceiling:.0%} of the ceiling "
              f"(target >= 85%)")
        print(f"2 shards side by side, together:       {two:9,.0f} rows/s   = {two / (2 * one):.0%} scaling "
              f"efficiency (target >= 90%)")
        print("the same in CPU time (what each would take on a core of its own, whatever else runs):")
        print(f"  1 shard / ceiling: {ceiling_cpu:.2f} s / {one_cpu:.2f} s = {ceiling_cpu / one_cpu:.0%}; "
              f"2-shard efficiency: {one_cpu:.2f} s / (2 x {two_cpu:.2f} s, the slower shard) = "
              f"{one_cpu / (2 * two_cpu):.0%}")

        recipe = make_recipe(args, f"{tmp}/one0")
        from ftlib.data.collate import padding_fraction, row_lengths
        from ftlib.data.merge import load_splits

        micro = recipe.train.micro_batch_size
        train, _ = load_splits(recipe)
        recipe.data.packing = True
        packed, _ = load_splits(recipe)
        plain, packs = row_lengths(train), row_lengths(packed)
        print(f"\npadding, training split ({len(plain):,} rows, micro-batches of {micro}, to a multiple of 8):")
        print(f"  notebook batching (pad to the longest): {padding_fraction(plain, micro):.1%} of token slots")
        print(f"  packing ({len(packs):,} packs of <= {args.sequence_len}):       {padding_fraction(packs, micro):.1%}"
              f" of token slots, {len(plain) / len(packs):.2f} examples per pack")


if __name__ == "__main__":
    main()
