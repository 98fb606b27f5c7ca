"""Training throughput: the notebook's batching versus packing, measured side by side in one run.

    .venv/bin/python bench/train.py [--layers 1] [--steps 6] [--ranks 2] [--repeats 1] [--data FILE]

Same data, model and machine for both: the full training pipeline (`ftlib.train.train` in --ranks processes, DeepSpeed
ZeRO-2, LoRA r=8 on all linear layers, fp32, micro-batch 4, sequence_len 256) on a random-initialised model in the
OpenLLaMA-3B shape (hidden 3200, intermediate 8640, 32 heads, vocab 32001) cut to --layers layers, with OpenLLaMA's
tokenizer; compute (the 3200 x 32001 head and the layers' matmuls) dominates every step.

  padded   the notebook's batching: micro-batches of 4 rows padded to the longest, to a multiple of 8
  packed   data.packing: several examples per 256-token window, position ids restarting per example

The two runs train AT THE SAME TIME (2 x --ranks processes, one thread each): whatever else loads the machine slows
both alike, so their ratio holds on a shared machine where back-to-back runs differ by 2x. Only steps that both runs
trained through are measured (by the wall time of their TensorBoard events), after each run's first (warm-up) step.
Throughput is non-padding tokens per second over all ranks (train/tokens / train/tokens_per_second, which exclude
evaluation and checkpoint time). It prints both, their ratio, the ideal speed-up 1/(1-p) where p is the padding the
padded run paid on its measured steps, the share of that ideal which packing reaches (target: >= 90%), and the peak
memory (RSS) of every rank (about 3.2 GiB per rank with 1 layer, 4.2 GiB with 2).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ROOT.parent / "shared" / "models" / "open_llama_3b_shape"
DEFAULT_DATA = ROOT / "assets" / "data" / "alpaca_gpt4_sample.jsonl"
sys.path.insert(0, str(ROOT))

from ftlib.rundir import RunDir  # noqa: E402  (after the path: the bench runs from a checkout)

RANK_MAIN = """
import sys
from ftlib import recipe
from ftlib.train import train
print("OUTCOME", train(recipe.load(sys.argv[1])), flush=True)
"""


def build_model(folder: Path, layers: int, seed: int = 0) -> Path:
    """OpenLLaMA-3B's shape with `layers` layers and random weights, plus its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(SHAPE)
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(SHAPE / name, folder / name)
    return folder


def make_recipe(args, work: Path, mode: str, repeat: int):
    from ftlib import recipe as recipe_mod

    micro = 4
    return recipe_mod.load(ROOT / "recipes" / "demo.yaml", [
        f"run.dir={work / f'{mode}-{repeat}'}", f"data.cache_dir={work / 'cache'}",
        f"data.sources=[{{path: '{args.data}', format: alpaca}}]", "data.sequence_len=256",
        f"data.packing={mode == 'packed'}", "data.eval_fraction=0",  # no evaluation: only training is measured
        f"model.name_or_path={work / 'model'}", "model.dtype=float32",
        "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[all-linear]",
        "deepspeed.zero_stage=2", f"resources.train.nodes={args.ranks}", "resources.train.tasks_per_node=1",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * args.ranks}",
        f"train.max_steps={args.steps}", "train.logging_steps=1", "train.warmup_steps=1",
        "train.save_steps=1000000", "train.precision=fp32",
    ])


def start_training(recipe, ranks: int) -> list:
    """train() in `ranks` processes (one thread each); returns [(process, log file)]."""
    from ftlib import recipe as recipe_mod

    path = RunDir.of(recipe).root.with_suffix(".yaml")
    recipe_mod.save(recipe, path)
    rendezvous = RunDir.of(recipe).rendezvous(f"bench-{time.monotonic_ns()}")  # rank 0 publishes port and secret
    ranks_started = []
    for rank in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                   LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT="0", FTLIB_RENDEZVOUS=str(rendezvous),
                   HF_HUB_OFFLINE="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
                   TOKENIZERS_PARALLELISM="false")
        log = RunDir.of(recipe).root.with_suffix(f".rank{rank}.log")
        with open(log, "w") as out:
            ranks_started.append((subprocess.Popen([sys.executable, "-c", RANK_MAIN, str(path)], env=env, cwd=ROOT,
                                                   stdout=out, stderr=subprocess.STDOUT), log))
    return ranks_started


def finish_training(recipe, ranks_started: list) -> dict:
    """Wait for the ranks; returns the per-step events (tokens, tokens/s, padding, wall time) and each rank's
    peak RSS."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for rank, (p, log) in enumerate(ranks_started):
        if p.wait() != 0:
            sys.exit(f"rank {rank} failed; see {log}:\n{log.read_text()[-3000:]}")
    peaks = []
    for _, log in ranks_started:
        found = re.search(r"peak memory: ([\d.]+) GiB", log.read_text())
        peaks.append(float(found.group(1)) if found else float("nan"))
    acc = EventAccumulator(str(RunDir.of(recipe).tensorboard), size_guidance={"scalars": 0})
    acc.Reload()
    steps = {}
    for tag in ("tokens", "tokens_per_second", "padding_fraction"):
        for e in acc.Scalars(f"train/{tag}"):
            steps.setdefault(e.step, {})[tag] = e.value
            steps[e.step]["wall_time"] = e.wall_time
    return {"steps": steps, "peak_rss_gib": peaks}


def summarize(result: dict, window: tuple) -> dict:
    """Throughput over the steps logged inside `window` (wall times), after the first (warm-up) step."""
    steps = result["steps"]
    order = sorted(steps)
    measured = [s for prev, s in zip(order, order[1:])
                if steps[prev]["wall_time"] >= window[0] and steps[s]["wall_time"] <= window[1]]
    if not measured:
        sys.exit("no step was measured while both runs were training: use more --steps")
    real = sum(steps[s]["tokens"] for s in measured)
    seconds = sum(steps[s]["tokens"] / steps[s]["tokens_per_second"] for s in measured)
    slots = sum(steps[s]["tokens"] / (1 - steps[s]["padding_fraction"]) for s in measured)
    return {"tokens_per_second": real / seconds, "padding": 1 - real / slots, "steps_measured": len(measured),
            "peak_rss_gib": result["peak_rss_gib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the OpenLLaMA-3B-shaped model")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (one per core)")
    parser.add_argument("--repeats", type=int, default=1, help="measure this many times, keep the best of each")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca-format JSONL file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (model, runs, logs)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not measured)")

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        started = time.monotonic()
        build_model(work / "model", args.layers)
        print(f"model: OpenLLaMA-3B shape, {args.layers} layer(s), random weights ({time.monotonic() - started:.0f} s "
              f"to build); data: {args.data}; padded and packed side by side, {args.ranks} ranks x 1 thread each, "
              f"ZeRO-2, fp32, LoRA r=8 all-linear, micro-batch 4, sequence_len 256, {args.steps} steps", flush=True)
        from ftlib.data.preprocess import run_shard

        first = make_recipe(args, work, "padded", 0)
        for i in range(first.data.num_shards):
            run_shard(first, i, first.data.num_shards)

        best = {}
        for repeat in range(args.repeats):
            # Both runs at once: whatever else loads this machine slows them alike, so their ratio holds.
            recipes = {mode: make_recipe(args, work, mode, repeat) for mode in ("padded", "packed")}
            started_runs = {mode: start_training(r, args.ranks) for mode, r in recipes.items()}
            results = {mode: finish_training(recipes[mode], started_runs[mode]) for mode in recipes}
            walls = {mode: sorted(step["wall_time"] for step in r["steps"].values()) for mode, r in results.items()}
            window = (max(w[0] for w in walls.values()), min(w[-1] for w in walls.values()))
            for mode, result in results.items():
                summary = summarize(result, window)
                print(f"  {mode:<7} run {repeat + 1}: {summary['tokens_per_second']:8.1f} tokens/s over "
                      f"{summary['steps_measured']} steps, padding {100 * summary['padding']:5.1f}%, peak RSS per "
                      f"rank {', '.join(f'{g:.2f}' for g in summary['peak_rss_gib'])} GiB", flush=True)
                if mode not in best or summary["tokens_per_second"] > best[mode]["tokens_per_second"]:
                    best[mode] = summary
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    padded, packed = best["padded"], best["packed"]
    ratio = packed["tokens_per_second"] / padded["tokens_per_second"]
    ideal = 1 / (1 - padded["padding"])
    recovered = (ratio - 1) / (ideal - 1) if ideal > 1 else float("nan")
    print(json.dumps({"padded": padded, "packed": packed}, indent=1))
    print(f"packed / padded tokens/s: {ratio:.3f}")
    print(f"ideal speed-up 1/(1-p), p = {100 * padded['padding']:.1f}% padding of the notebook's batching: {ideal:.3f}")
    print(f"packing reaches {100 * ratio / ideal:.1f}% of the ideal speed (target >= 90%); "
          f"it recovers {100 * recovered:.1f}% of the possible gain")


if __name__ == "__main__":
    main()
