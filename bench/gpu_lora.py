"""LoRA training speed and memory on a GPU, through the real training stage, side by side in one run.

    bash bench/gpu_check.sh                          # on a GPU machine: what one device call runs (it calls this)
    .venv/bin/python bench/gpu_lora.py [--json FILE] [--deadline-s 420] [--only 'fast recipe,...']
    .venv/bin/python bench/gpu_lora.py --smoke       # a tiny model on the CPU: checks that the script runs

The model: OpenLLaMA-3B's shape (26 layers, hidden 3200, vocabulary 32001) with random bf16 weights and OpenLLaMA's
tokenizer (from --shape); the data: the 1,274 GPT-4 Alpaca rows shipped in assets/. Each configuration trains in a
process of its own, under its own time limit, for a few optimizer steps:

  notebook loop              the notebook's own code, as the baseline: HF Trainer + PEFT, 8-bit base, fp16, bnb
                             Adam8bit, LoRA r=8 on every linear layer, rows of <= 256 tokens padded per micro-batch of
                             4, gradient accumulation 4, gradient checkpointing
  notebook recipe            ftlib's training stage (ftlib.train.train) with recipes/openllama3b-alpaca.yaml as
                             shipped: the fast path chooses its parts (same training, same maths)
  notebook recipe + packing  ... data.packing: true
  fast recipe                recipes/openllama3b-alpaca-fast.yaml: bf16 base, packed 2,048-token rows, the fast path
  4-bit QLoRA                recipes/llama7b-qlora-zero3.yaml's settings on this model and one GPU (4-bit NF4,
                             packing to 1,024, LoRA r=16), global batch 4; the fast path drops ZeRO-3 where it fits
  4-bit QLoRA + ZeRO-3        the same with fast_path.zero3: true (ZeRO-3 as the recipe says)
and, as time allows, the controls:
  notebook recipe (fast path off)   every fast_path part false: the stage as it was before the fast path
  fast recipe + compile      the fast recipe with fast_path.compile: true (whether torch.compile pays)

Per configuration: real tokens/s (non-padding tokens per second; the median over the optimizer steps after the first
--warmup), TFLOPS = model FLOPs per real token x tokens/s, MFU = TFLOPS / the GPU's dense bf16 peak, and the peak GPU
memory (torch.cuda.max_memory_allocated, as the train log's last line says it). Model FLOPs per token (the same for
every configuration but for its LoRA rank): 4 x the base's matmul weights (forward + input gradients; the frozen base
needs no weight gradients) + 6 x the LoRA weights + 12 x layers x hidden x the mean example length (attention within
an example); recomputation under activation checkpointing is not counted. Ratios are against the notebook loop, measured
in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CARRIED_SHAPE = ROOT / ".whl" / "open_llama_3b_shape"          # what bench/gpu_prepare.sh puts in .whl/
SHARED_SHAPE = ROOT.parent / "shared" / "models" / "open_llama_3b_shape"
DATA = ROOT / "assets" / "data" / "alpaca_gpt4_sample.jsonl"
NOTEBOOK = ROOT / "recipes" / "openllama3b-alpaca.yaml"
FAST = ROOT / "recipes" / "openllama3b-alpaca-fast.yaml"
QLORA = ROOT / "recipes" / "llama7b-qlora-zero3.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# Dense bf16 tensor-core peaks (TFLOPS, no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,  # plain "H100 80GB HBM3" = SXM
               "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 125.0, "A10": 125.0, "L4": 121.0,
               "RTX 4090": 165.0, "RTX 6000 Ada": 364.0}
SMOKE_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
OFF = ["fast_path.attention=false", "fast_path.loss=false", "fast_path.kernels=false", "fast_path.compile=false",
       "fast_path.lora_dtype=false", "fast_path.zero3=true"]
ONE_GPU = ["resources.train.nodes=1", "resources.train.tasks_per_node=1", "resources.train.gpus_per_node=1",
           "train.global_batch_size=4"]
# name: (recipe, overrides, optimizer steps, time limit in seconds); recipe None: the notebook's own loop.
CONFIGS = {  # in the order they run: the table first, then the controls (skipped first when time runs out)
    "notebook loop": (None, [], 5, 120),
    "notebook recipe": (NOTEBOOK, [], 5, 110),
    "notebook recipe + packing": (NOTEBOOK, ["data.packing=true"], 5, 100),
    "fast recipe": (FAST, [], 10, 100),
    "4-bit QLoRA": (QLORA, ONE_GPU, 6, 100),
    "4-bit QLoRA + ZeRO-3": (QLORA, ONE_GPU + ["fast_path.zero3=true"], 6, 120),
    "notebook recipe (fast path off)": (NOTEBOOK, OFF, 5, 110),
    "fast recipe + compile": (FAST, ["fast_path.compile=true"], 10, 150),
}
RANK_MAIN = """
import sys
from ftlib import recipe
from ftlib.train import train
print("OUTCOME", train(recipe.load(sys.argv[1])), flush=True)
"""


# ----------------------------------------------------------------------------------------------------- set-up
def build_model(folder: Path, shape: Path, smoke: bool) -> Path:
    """Random weights in OpenLLaMA-3B's shape (a tiny one with --smoke), saved with OpenLLaMA's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(shape)
    if smoke:
        for k, v in SMOKE_SHAPE.items():
            setattr(config, k, v)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialising 3.4B weights is much faster on the GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    for name in TOKENIZER_FILES:
        shutil.copy(shape / name, folder / name)
    return folder


def make_recipe(name: str, model_dir: Path, work: Path, smoke: bool):
    from ftlib import recipe as recipe_mod

    path, overrides, steps, _ = CONFIGS[name]
    path = path or NOTEBOOK  # the notebook's loop trains the notebook recipe's tokenized examples
    folder = re.sub(r"[^A-Za-z0-9.-]+", "-", name)
    common = [f"run.dir={work / 'runs' / folder}", f"data.cache_dir={work / 'cache'}",
              f"data.sources=[{{path: '{DATA}', format: alpaca}}]", "data.num_shards=1",
              f"model.name_or_path={model_dir}", f"train.max_steps={steps}", "train.logging_steps=1",
              "train.eval_steps=1000000", "train.save_steps=1000000", "train.sample_prompts=[]",
              "serve.enabled=false"]
    if smoke:  # the CPU: no fp16 mixed precision kernels worth timing, no GPU to ask for
        common += ["resources.train.gpus_per_node=0", "fast_path.memory_gb=8"]
    return recipe_mod.load(path, common + overrides)


def preprocess(recipe) -> None:
    from ftlib.data.preprocess import run_shard

    for i in range(recipe.data.num_shards):
        run_shard(recipe, i, recipe.data.num_shards)


def flops_per_token(model_dir: Path, lora_r: int, mean_example: float) -> float:
    """4 x base matmul weights + 6 x LoRA weights + 12 x layers x hidden x mean example length (module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    base = sum(m.in_features * m.out_features for m in linears)
    lora = sum(lora_r * (m.in_features + m.out_features) for m in linears if m is not head)
    return 4 * base + 6 * lora + 12 * config.num_hidden_layers * config.hidden_size * mean_example


# ----------------------------------------------------------------------------------------------------- the stage
def run_stage(name: str, recipe, work: Path, limit: float) -> dict:
    """ftlib.train.train in one process (no launcher variables: a single rank); per-step tokens/s from its
    TensorBoard events, its peak GPU memory from its log."""
    from ftlib import recipe as recipe_mod
    from ftlib.rundir import RunDir

    run = RunDir.of(recipe)
    path = run.root.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe_mod.save(recipe, path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log = run.root.with_suffix(".log")
    with open(log, "w") as out:
        try:
            done = subprocess.run([sys.executable, "-c", RANK_MAIN, str(path)], env=env, cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=limit)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text()
    if code != 0 or "OUTCOME completed" not in text:
        return {"name": name, "error": f"exit {code}", "log_tail": text[-2500:]}
    per_step = _scalars(run.tensorboard, "train/tokens_per_second")
    peak = re.search(r"peak memory: [\d.]+ GiB RSS(?:, ([\d.]+) GiB GPU)?", text)
    return {"name": name, "per_step": per_step, "peak_gib": float(peak.group(1)) if peak and peak.group(1) else None,
            "fast_path": [line.split("[train] ", 1)[1] for line in text.splitlines() if "fast path:" in line]}


def _scalars(folder: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)] if tag in acc.Tags()["scalars"] else []


# ----------------------------------------------------------------------------------------------------- the notebook
NOTEBOOK_MAIN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from bench.gpu_lora import notebook_loop
print("RESULT", json.dumps(notebook_loop(sys.argv[2], sys.argv[3], int(sys.argv[4]))), flush=True)
"""


def notebook_loop(model_dir: str, recipe_path: str, steps: int) -> dict:
    """The course notebook's training, written as it is there (not ftlib's): the 8-bit base prepared by PEFT, LoRA r=8
    on every linear layer, the HF Trainer with fp16, bitsandbytes' Adam8bit, cosine schedule, micro-batch 4 x
    accumulation 4, gradient checkpointing, padding per micro-batch. The rows are the stage's tokenized examples
    (the notebook's prompt format, cut at 256 tokens), so both train the same tokens."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainerCallback, TrainingArguments)

    from ftlib import recipe as recipe_mod
    from ftlib.data.merge import load_splits

    recipe = recipe_mod.load(recipe_path)
    train, _ = load_splits(recipe)
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token_id, tokenizer.padding_side = 0, "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16 if cuda else torch.float32,
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 device_map={"": 0 if cuda else "cpu"})
    model.gradient_checkpointing_enable()
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj",
                                                             "k_proj", "o_proj"]))
    collate = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)

    class Clock(TrainerCallback):  # the measurement: time and real tokens of each optimizer step
        def __init__(self):
            self.times, self.tokens, self.real = [], [], 0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.started, self.real = time.perf_counter(), 0

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)
            self.tokens.append(self.real)

    clock = Clock()

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            clock.real += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="notebook-"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, max_steps=steps, learning_rate=2e-4, warmup_steps=10,
                             lr_scheduler_type="cosine", fp16=cuda, logging_steps=1, save_strategy="no",
                             report_to="none", disable_tqdm=True, use_cpu=not cuda, remove_unused_columns=False)
    optimizer = bnb.optim.Adam8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    trainer = CountingTrainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[clock],
                              optimizers=(optimizer, None))
    trainer.train()
    return {"per_step": [t / s for t, s in zip(clock.tokens, clock.times)],
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}


def run_notebook(recipe, model_dir: Path, limit: float) -> dict:
    from ftlib import recipe as recipe_mod
    from ftlib.rundir import RunDir

    path = RunDir.of(recipe).root.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe_mod.save(recipe, path)
    try:
        done = subprocess.run([sys.executable, "-c", NOTEBOOK_MAIN, str(ROOT), str(model_dir), str(path),
                               str(CONFIGS["notebook loop"][2])], capture_output=True, text=True, timeout=limit,
                              cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    except subprocess.TimeoutExpired as e:
        return {"name": "notebook loop", "error": "timeout", "log_tail": str(e.stdout or "")[-2500:]}
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not found:
        return {"name": "notebook loop", "error": f"exit {done.returncode}", "log_tail": done.stderr[-2500:]}
    return {"name": "notebook loop", **json.loads(found[-1][len("RESULT "):])}


# ----------------------------------------------------------------------------------------------------- main
def summarize(result: dict, warmup: int, flops: float) -> dict:
    steps = result.get("per_step", [])[warmup:]
    if "error" in result or not steps:
        return {**result, "error": result.get("error", "no step measured")}
    tokens_per_s = statistics.median(steps)
    return {**result, "tokens_per_s": tokens_per_s, "tflops": flops * tokens_per_s / 1e12}


def peak_for(device: str, override):
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():  # ordered: specific names before general ones
        if key in device:
            return value
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, 2 steps: checks the script")
    parser.add_argument("--only", help="comma-separated configurations (default: all, in order)")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps not measured, at the start")
    parser.add_argument("--deadline-s", type=float, default=480, help="stop starting configurations after this")
    parser.add_argument("--shape", help="folder with OpenLLaMA-3B's config and tokenizer (default: .whl/ or ../shared)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("no CUDA device: run this on a GPU machine (bench/gpu_check.sh), or pass --smoke for a CPU check")
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.smoke:
        names = [n for n in names if "compile" not in n]  # compiling on 2 CPU cores says nothing
        for name in CONFIGS:
            recipe, overrides, _, limit = CONFIGS[name]
            CONFIGS[name] = (recipe, overrides, 2, 600)
    shape = Path(args.shape) if args.shape else CARRIED_SHAPE if CARRIED_SHAPE.is_dir() else SHARED_SHAPE
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    work = Path(tempfile.mkdtemp(prefix="gpu-lora-"))
    try:
        t = time.monotonic()
        model_dir = build_model(work / "model", shape, args.smoke)
        recipes = {name: make_recipe(name, model_dir, work, args.smoke) for name in names}
        for recipe in recipes.values():
            preprocess(recipe)
        from ftlib.data.collate import row_lengths
        from ftlib.data.merge import load_splits

        notebook_rows = load_splits(make_recipe("notebook recipe", model_dir, work, args.smoke))[0]
        mean_example = float(row_lengths(notebook_rows).mean())
        print(f"{'tiny smoke shape' if args.smoke else 'OpenLLaMA-3B shape'}, random bf16 weights, and the data "
              f"({len(notebook_rows):,} training examples, {mean_example:.1f} tokens on average) ready in "
              f"{time.monotonic() - t:.0f} s on {device}", flush=True)
        results = []
        for name in names:
            recipe = recipes[name]
            limit = CONFIGS[name][3]
            left = args.deadline_s - (time.monotonic() - started)
            if left < 0.6 * limit:
                print(f"  {name}: skipped, {left:.0f} s left of --deadline-s", flush=True)
                results.append({"name": name, "error": "skipped: out of time"})
                continue
            flops = flops_per_token(model_dir, recipe.lora.r, mean_example)
            t = time.monotonic()
            raw = (run_notebook(recipe, model_dir, min(limit, left)) if CONFIGS[name][0] is None
                   else run_stage(name, recipe, work, min(limit, left)))
            result = summarize({**raw, "name": name, "seconds": time.monotonic() - t}, args.warmup, flops)
            results.append(result)
            if args.json:  # after every configuration: a run cut short still leaves what it measured
                Path(args.json).write_text(json.dumps({"device": device, "results": results}, indent=1))
            if "error" in result:
                print(f"  {name}: FAILED ({result['error']}) after {result['seconds']:.0f} s\n"
                      f"{result.get('log_tail', '')}", flush=True)
                continue
            peak = f"{result['peak_gib']:6.1f} GiB" if result["peak_gib"] is not None else "   n/a"
            print(f"  {name}: {result['tokens_per_s']:9,.0f} real tokens/s  {result['tflops']:6.1f} TFLOPS  peak "
                  f"{peak}  ({len(result['per_step'])} steps, {result['seconds']:.0f} s)", flush=True)
            for line in result.get("fast_path", []):
                print(f"      {line}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    peak = peak_for(device, args.peak_tflops)
    base = next((r for r in results if r["name"] == "notebook loop" and "error" not in r), None)
    print(f"\ndevice: {device}; dense bf16 peak {peak or 'unknown (pass --peak-tflops)'} TFLOPS; real tokens/s = "
          f"median over the optimizer steps after the first {args.warmup}")
    print(f"{'configuration':<32} {'tokens/s':>10} {'vs notebook':>12} {'TFLOPS':>8} {'MFU':>7} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<32} {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:11.2f}x" if base else f"{'n/a':>12}"
        mfu = f"{100 * r['tflops'] / peak:6.1f}%" if peak else f"{'n/a':>7}"
        gib = f"{r['peak_gib']:9.1f}" if r["peak_gib"] is not None else f"{'n/a':>9}"
        print(f"{r['name']:<32} {r['tokens_per_s']:10,.0f} {ratio} {r['tflops']:8.1f} {mfu} {gib}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "peak_tflops": peak, "results": results}, indent=1))
    if not any("error" not in r for r in results):
        sys.exit("every configuration failed")


if __name__ == "__main__":
    main()
