"""What training saves for the backward, per token, on the plain and the fast path: measured on a CPU, no GPU needed.

    .venv/bin/python bench/memory.py [--layers 2] [--tokens 2048] [--json FILE]

The model: OpenLLaMA-3B's shape (assets/models/open_llama_3b_shape/config.json: hidden 3200, MLP 8640, 32 heads,
vocabulary 32001) cut to --layers decoder layers, random bf16 weights, loaded by ftlib.model.load_model from the fast
recipe (recipes/openllama3b-alpaca-fast.yaml: LoRA r=8 on every linear layer of the blocks, bf16 mixed precision):

  plain   every part of the fast path off, no activation checkpointing: the training step as it was
  fast    the fast path as it chooses itself on this machine (on a CPU: the chunked loss and LoRA in bf16; Liger's
          kernels and flex_attention need a GPU) with the recipe's model.gradient_checkpointing: auto
  fast, every layer checkpointed   the same with model.gradient_checkpointing: true

Each path in a process of its own: one packed row of --tokens tokens (examples of 256 tokens, position ids restarting,
as the data stage packs them), forward with labels and backward under bf16 autocast, as the Trainer runs a step. It
prints per path the bytes autograd saves per token (torch.autograd.graph.saved_tensors_hooks, counted by
ftlib.fastpath.SavedTensors: each storage once, weights not at all) in a decoder layer, outside the layers (embedding,
final norm, head, loss) and in all, and the step's peak memory above the loaded model (the process's peak RSS, reset
just before the step). Then what that means for the whole 26-layer model at the fast recipe's 8,192 tokens per
micro-step: the layers the fast path checkpoints to stay under fast_path.memory_gb (ftlib.fastpath.checkpoint_every,
as training decides it) and the saved bytes per token of both paths, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ROOT / "assets" / "models" / "open_llama_3b_shape"
FAST_RECIPE = ROOT / "recipes" / "openllama3b-alpaca-fast.yaml"
sys.path.insert(0, str(ROOT))

PATHS = {
    "plain": ["fast_path.attention=false", "fast_path.loss=false", "fast_path.kernels=false", "fast_path.compile=false",
              "fast_path.lora_dtype=false", "model.gradient_checkpointing=false"],
    "fast": [],
    "fast, every layer checkpointed": ["model.gradient_checkpointing=true"],
}
MIB = 2 ** 20
# glibc serves every allocation over 64 KiB with its own mmap and unmaps it when freed, so the peak RSS follows the
# tensors alive at once (by default it keeps freed memory around, and the peak would count it).
WORKER_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def build_model(folder: Path, layers: int) -> Path:
    """OpenLLaMA-3B's shape with `layers` decoder layers and random bf16 weights (made in bf16: no fp32 copy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(SHAPE)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        LlamaForCausalLM(config).save_pretrained(folder)
    finally:
        torch.set_default_dtype(torch.float32)
    return folder


def recipe_for(path: str, model_dir: Path, work: Path):
    from ftlib import recipe as recipe_mod

    return recipe_mod.load(FAST_RECIPE, [f"run.dir={work / 'run'}", f"model.name_or_path={model_dir}",
                                         "lora.dropout=0.0", *PATHS[path]])


def measure(path: str, model_dir: Path, tokens: int, step: bool = True) -> dict:
    """One path in this process: saved bytes per token and (with `step`) the peak memory of one training step."""
    import torch

    from ftlib import fastpath
    from ftlib.model import load_model

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    recipe = recipe_for(path, model_dir, work)
    fast = fastpath.choose(recipe)
    model = load_model(recipe, for_training=True, fast=fast)
    model.train()  # as the Trainer does: checkpointing (and dropout) act only in training mode
    layers = fastpath.decoder_layers(model)
    batch = fastpath.sample_batch(model.config.vocab_size, 1, tokens, recipe.data.sequence_len, packed=True,
                                  generator=torch.Generator().manual_seed(0))
    autocast = fastpath.mixed_precision(recipe, torch.device("cpu"))  # as the Trainer runs train.precision bf16
    if step:
        with autocast:  # a first step: one-time allocations (thread pools, kernels' scratch) come out of it
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    before = _rss()
    _reset_peak_rss()
    with autocast, fastpath.SavedTensors(model) as saved:
        loss = model(**batch).loss
    if step:
        loss.backward()
    peak = _peak_rss() - before
    per_layer = [saved.bytes.get(f"layer {i}", 0.0) / tokens for i in range(len(layers))]
    return {"path": path, "lines": fast.lines + fast.model_lines, "tokens": tokens,
            "per_layer": per_layer, "other": saved.bytes.get("other", 0.0) / tokens,
            "total": sum(saved.bytes.values()) / tokens,
            "checkpointed": [layer.gradient_checkpointing for layer in layers],
            "peak_bytes": peak, "loss": float(loss)}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss() -> int:
    return _status("VmRSS")


def _peak_rss() -> int:
    return _status("VmHWM")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS


def full_model(results: dict, layers_full: int = 26) -> dict:
    """The whole model at the fast recipe's micro-step: saved bytes per token of the plain path, and of the fast path
    with the layers ftlib.fastpath.checkpoint_every would checkpoint under the recipe's fast_path.memory_gb."""
    from ftlib import fastpath, recipe as recipe_mod

    recipe = recipe_mod.load(FAST_RECIPE)
    tokens = recipe.train.micro_batch_size * recipe.data.row_len
    budget = recipe.fast_path.memory_gb * fastpath.GIB
    plain, fast, ckpt = results["plain"], results["fast"], results["fast, every layer checkpointed"]
    resident = _resident_bytes(layers_full)
    per_checkpointed = max(ckpt["per_layer"])
    every, need = fastpath.checkpoint_every(max(fast["per_layer"]), per_checkpointed, fast["other"], layers_full,
                                            tokens, budget, resident)
    checkpointed = 0 if every == 0 else -(-layers_full // every)
    plain_total = layers_full * max(plain["per_layer"]) + plain["other"]
    fast_total = ((layers_full - checkpointed) * max(fast["per_layer"]) + checkpointed * per_checkpointed
                  + fast["other"])
    return {"layers": layers_full, "tokens": tokens, "budget_gib": budget / fastpath.GIB, "every": every,
            "checkpointed": checkpointed, "plain_per_token": plain_total, "fast_per_token": fast_total,
            "ratio": fast_total / plain_total, "fast_peak_estimate_gib": need / fastpath.GIB,
            "plain_saved_gib": plain_total * tokens / fastpath.GIB}


def _resident_bytes(layers: int) -> float:
    """What training keeps resident for the OpenLLaMA-3B shape with `layers` layers: its bf16 weights, and AdamW's
    share (gradient and two moments, fp32) for LoRA r=8 on every linear layer of the blocks (as training counts it)."""
    from transformers import LlamaConfig

    c = LlamaConfig.from_pretrained(SHAPE)
    h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    linears = [(h, h)] * 4 + [(h, i)] * 2 + [(i, h)]  # q, k, v, o; gate, up; down
    weights = layers * (sum(a * b for a, b in linears) + 2 * h) + 2 * v * h + h
    lora = layers * sum(8 * (a + b) for a, b in linears)
    return 2 * weights + 12 * lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the OpenLLaMA-3B shape")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the packed row of the step")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=list(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one path, printed as JSON on the last line
        print(json.dumps(measure(args.worker, Path(args.model_dir), args.tokens)), flush=True)
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-model-") as tmp:
        model_dir = build_model(Path(tmp) / "model", args.layers)
        print(f"OpenLLaMA-3B shape cut to {args.layers} layers, random bf16 weights; one packed row of {args.tokens:,} "
              f"tokens; bf16 autocast; LoRA r=8 on every linear layer of the blocks", flush=True)
        for path in PATHS:
            done = subprocess.run([sys.executable, __file__, "--worker", path, "--model-dir", str(model_dir),
                                   "--tokens", str(args.tokens)], capture_output=True, text=True, env=WORKER_ENV)
            if done.returncode != 0:
                sys.exit(f"{path}: failed\n{done.stderr[-3000:]}")
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    for line in results["fast"]["lines"]:
        print(f"  {line}")

    plain = results["plain"]["total"]
    print(f"\n{'path':<32} {'per layer':>10} {'outside':>9} {'all':>9} {'vs plain':>9} {'peak':>10}")
    print(f"{'':<32} {'MiB/token':>10} {'MiB/token':>9} {'MiB/token':>9} {'':>9} {'MiB':>10}")
    for path, r in results.items():
        print(f"{path:<32} {max(r['per_layer']) / MIB:10.4f} {r['other'] / MIB:9.4f} {r['total'] / MIB:9.4f} "
              f"{r['total'] / plain:9.3f} {r['peak_bytes'] / MIB:10.0f}")
    full = full_model(results)
    results["full_model"] = full
    print(f"\nthe whole {full['layers']}-layer model at the fast recipe's {full['tokens']:,} tokens per micro-step, "
          f"fast_path.memory_gb {full['budget_gib']:.0f}: the fast path checkpoints "
          f"{full['checkpointed']} of {full['layers']} layers (estimated peak {full['fast_peak_estimate_gib']:.1f} "
          f"GiB); saved per token: plain {full['plain_per_token'] / MIB:.3f} MiB ({full['plain_saved_gib']:.1f} GiB "
          f"a micro-step), fast {full['fast_per_token'] / MIB:.3f} MiB; fast / plain = {full['ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
