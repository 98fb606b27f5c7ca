"""LoRA training speed and memory on a GPU: OpenLLaMA-3B's full shape with 16-bit, 8-bit and 4-bit bases.

    .venv/bin/python bench/gpu_lora.py                     # on a GPU machine (CUDA torch and bitsandbytes)
    .venv/bin/python bench/gpu_lora.py --smoke             # a tiny shape on the CPU: checks that the script runs

For each base (bfloat16, bitsandbytes 8-bit, 4-bit NF4 with bfloat16 compute), in a fresh process so that its peak
memory is its own: the model built by ftlib.model.load_model (quantization, prepare_model_for_kbit_training, LoRA r=8
on every linear layer) from random weights in the OpenLLaMA-3B shape (26 layers, hidden 3200, vocab 32001), then a
plain loop of forward + backward + AdamW step on packed 2048-token sequences (several examples per row, position ids
restarting per example, no attention mask, as data.packing makes them). It prints per base:

  tokens/s   timed steps only (after --warmup steps), synchronised with the GPU
  TFLOPS     model FLOPs per token x tokens/s, with FLOPs/token = 4 x (base matmul weights)   forward + input grads
                                                             + 6 x (LoRA weights)           forward + both grads
                                                             + 12 x layers x window x hidden  attention scores/values
             (the frozen base needs no weight gradients; recomputation under gradient checkpointing is not counted)
  MFU        TFLOPS / the GPU's dense bf16 peak (from the table below by device name, or --peak-tflops)
  memory     torch.cuda.max_memory_allocated (on the CPU: the process's peak RSS)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ROOT.parent / "shared" / "models" / "open_llama_3b_shape"
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (TFLOPS, no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,  # plain "H100 80GB HBM3" = SXM
               "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 125.0, "A10": 125.0, "L4": 121.0,
               "RTX 4090": 165.0, "RTX 6000 Ada": 364.0}
BASES = {"16bit": "none", "8bit": "8bit", "4bit": "4bit"}
SMOKE_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)


# ----------------------------------------------------------------------------------------------------- model
def build_model(folder: Path, smoke: bool) -> Path:
    """Random weights in OpenLLaMA-3B's shape (or a tiny one with --smoke), saved with the OpenLLaMA tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(SHAPE)
    if smoke:
        for k, v in SMOKE_SHAPE.items():
            setattr(config, k, v)
    dtype = torch.float32 if smoke else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialising 3.4B weights is much faster on the GPU
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(SHAPE / name, folder / name)
    return folder


def make_recipe(model_dir: Path, base: str, args, work: Path):
    from ftlib import recipe as recipe_mod

    dtype = "float32" if args.smoke else "bfloat16"
    return recipe_mod.load(ROOT / "recipes" / "demo.yaml", [
        f"run.dir={work / 'run'}", f"model.name_or_path={model_dir}", f"model.dtype={dtype}",
        f"model.quantization={BASES[base]}", "model.quant_type=nf4", "model.double_quant=true",
        f"model.compute_dtype={dtype}", f"model.gradient_checkpointing={args.gradient_checkpointing}",
        "model.attn_implementation=sdpa", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
        "lora.target_modules=[all-linear]", "deepspeed.enabled=false", "resources.train.nodes=1",
    ])


# ----------------------------------------------------------------------------------------------------- data
def packed_batch(batch: int, window: int, vocab: int, generator):
    """Rows of `window` random tokens made of examples of 64-512 tokens, positions restarting per example; every
    example's first label is -100 (as the data stage makes them)."""
    import torch

    input_ids = torch.randint(3, vocab - 1, (batch, window), generator=generator)
    position_ids = torch.empty((batch, window), dtype=torch.long)
    labels = input_ids.clone()
    for row in range(batch):
        start = 0
        while start < window:
            n = min(int(torch.randint(64, 513, (1,), generator=generator)), window - start)
            position_ids[row, start:start + n] = torch.arange(n)
            labels[row, start] = -100
            start += n
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def flops_per_token(model, window: int) -> float:
    """4 x base matmul weights + 6 x LoRA weights + attention (see the module docstring)."""
    import torch

    config = model.config
    base, lora = 0, 0
    for name, module in model.named_modules():
        if "lora_" in name:
            if isinstance(module, torch.nn.Linear):
                lora += module.in_features * module.out_features
        elif hasattr(module, "in_features") and hasattr(module, "out_features") and not hasattr(module, "base_layer"):
            base += module.in_features * module.out_features  # nn.Linear, Linear8bitLt, Linear4bit, lm_head
    attention = 12 * config.num_hidden_layers * window * config.hidden_size
    return 4 * base + 6 * lora + attention


# ----------------------------------------------------------------------------------------------------- worker
def measure(base: str, model_dir: Path, args) -> dict:
    """One base, in this process: load, warm up, time the steps."""
    import torch

    from ftlib.model import load_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    work = Path(tempfile.mkdtemp(prefix="gpu-lora-"))
    recipe = make_recipe(model_dir, base, args, work)
    torch.manual_seed(0)
    model = load_model(recipe, for_training=True)
    if recipe.model.quantization == "none":
        model.to(device)  # quantized bases were placed on the device while loading
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [{k: v.to(device) for k, v in packed_batch(args.micro_batch, args.window, vocab, generator).items()}
               for _ in range(min(args.steps, 4))]

    def step(i):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_s = args.steps * args.micro_batch * args.window / seconds
    tflops = flops_per_token(model, args.window) * tokens_per_s / 1e12
    if cuda:
        memory = torch.cuda.max_memory_allocated() / 2 ** 30
        name = torch.cuda.get_device_name()
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        name = "cpu"
    return {"base": base, "device": name, "tokens_per_s": tokens_per_s, "tflops": tflops, "peak_memory_gib": memory,
            "loss": float(loss), "trainable": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in model.parameters())}


def peak_for(device: str, override):
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():  # ordered: specific names before general ones
        if key in device:
            return value
    return None


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, CPU allowed, 2 steps: checks the script")
    parser.add_argument("--bases", default="16bit,8bit,4bit", help="comma-separated subset of 16bit,8bit,4bit")
    parser.add_argument("--window", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--micro-batch", type=int, default=4, help="packed rows per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from the device name)")
    parser.add_argument("--worker", choices=list(BASES), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.window, args.micro_batch = min(args.window, 256), min(args.micro_batch, 2)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker:  # one measurement, printed as JSON on the last line
        print(json.dumps(measure(args.worker, Path(args.model_dir), args)), flush=True)
        return

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("no CUDA device: run this on a GPU machine, or pass --smoke for a tiny CPU check")
    bases = [b.strip() for b in args.bases.split(",")]
    unknown = [b for b in bases if b not in BASES]
    if unknown:
        parser.error(f"--bases: unknown {unknown}; choose from {', '.join(BASES)}")

    with tempfile.TemporaryDirectory(prefix="gpu-lora-model-") as tmp:
        started = time.monotonic()
        model_dir = build_model(Path(tmp) / "model", args.smoke)
        shape = "tiny smoke shape" if args.smoke else "OpenLLaMA-3B shape"
        print(f"{shape}, random weights, built in {time.monotonic() - started:.0f} s; LoRA r=8 all-linear; "
              f"{args.micro_batch} x {args.window}-token packed rows; {args.warmup} warm-up + {args.steps} timed "
              f"steps; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}", flush=True)
        results = []
        for base in bases:
            command = [sys.executable, __file__, "--worker", base, "--model-dir", str(model_dir),
                       "--window", str(args.window), "--micro-batch", str(args.micro_batch),
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]
            command += ["--smoke"] if args.smoke else []
            command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"  {base}: FAILED\n{done.stderr[-3000:]}", flush=True)
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {base:>5} base: {r['tokens_per_s']:10,.0f} tokens/s  {r['tflops']:7.2f} TFLOPS  "
                  f"peak memory {r['peak_memory_gib']:6.2f} GiB  (loss {r['loss']:.3f})", flush=True)

    if not results:
        sys.exit("every base failed")
    peak = peak_for(results[0]["device"], args.peak_tflops)
    print(f"\ndevice: {results[0]['device']}; peak {peak or 'unknown (pass --peak-tflops)'} TFLOPS bf16 dense; "
          f"{results[0]['trainable']:,} trainable of {results[0]['params']:,} parameters (LoRA r=8)")
    print(f"{'base':>6} {'tokens/s':>10} {'TFLOPS':>8} {'MFU':>7} {'memory GiB':>11}")
    for r in results:
        mfu = f"{100 * r['tflops'] / peak:6.1f}%" if peak else "    n/a"
        print(f"{r['base']:>6} {r['tokens_per_s']:10,.0f} {r['tflops']:8.2f} {mfu:>7} {r['peak_memory_gib']:11.2f}")


if __name__ == "__main__":
    main()
