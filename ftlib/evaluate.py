"""`make eval`: what fine-tuning bought. The base model and the fine-tuned adapter on the same held-out data.

    evaluate(recipe, data=None)   held-out loss and perplexity of the base and of the adapter, and greedy generations
                                  of both side by side -> runs/<name>/eval/results.json and eval/generations.md

The data is the run's own evaluation split (the rows training held out), or with `data=file.jsonl` another
Alpaca-format file, tokenized by the preprocessing code itself (one shard, cached by fingerprint like any other), so
prompts, masking, truncation and packing are exactly the training's.

Loss: the token-weighted mean cross-entropy over the trained (label != -100) tokens of all examples, i.e. over the
responses; perplexity = exp(loss). It differs slightly from the `eval/loss` curve of training, which averages
per-batch means. One model is loaded: the adapter is switched off (`model.disable_adapter()`) for the base, so both
see the very same batches.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ftlib import progress
from ftlib.errors import UserError
from ftlib.rundir import RunDir, write_atomic, write_json

log = progress.logger("eval")

LOSS_DEFINITION = ("token-weighted mean cross-entropy over the trained tokens (labels != -100: the responses) of "
                   "all examples; perplexity = exp(loss).")
ADAPTER = "adapter"  # the name the run's adapter is loaded under


# ----------------------------------------------------------------------------------------------------- data
def eval_dataset(recipe, data: Optional[str] = None, data_format: str = "alpaca"):
    """(dataset, description): the run's evaluation split, or the file `data` tokenized like the training data."""
    if data is None:
        from ftlib.data.merge import load_splits

        _, evaluation = load_splits(recipe)
        if evaluation is None or len(evaluation) == 0:
            raise UserError("data.eval_fraction is 0, so the run has no evaluation split; pass DATA=file.jsonl")
        return evaluation, "the run's evaluation split"
    import datasets

    from ftlib.data.preprocess import run_shard
    from ftlib.recipe import DataSource

    path = Path(data).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"DATA: no such file: {path}")
    # The preprocessing stage's own code on a one-source, one-shard recipe: same templates, masking and truncation.
    single = copy.deepcopy(recipe)
    single.data.sources = [DataSource(path=str(path), format=data_format)]
    shard = datasets.load_from_disk(str(run_shard(single, 0, 1)))
    if recipe.data.packing:
        from ftlib.data.packing import pack_dataset

        shard = pack_dataset(shard, recipe.data.row_len)
    return shard, str(path)


def examples(row: Dict[str, List[int]]) -> List[Tuple[List[int], List[int]]]:
    """(input_ids, labels) of each example in a row: the row itself, or each example of a pack (its positions
    restart at 0)."""
    ids, labels = list(row["input_ids"]), list(row["labels"])
    if "position_ids" not in row:
        return [(ids, labels)]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]


def count_examples(dataset) -> int:
    """Examples in a dataset of rows, or of packs (one example starts wherever the positions restart at 0)."""
    if "position_ids" not in dataset.column_names:
        return len(dataset)
    import pyarrow.compute as pc

    positions = dataset.with_format("arrow")[:]["position_ids"].combine_chunks().flatten()
    return int(pc.sum(pc.equal(positions, 0)).as_py() or 0)


def prompt_and_reference(ids: List[int], labels: List[int]) -> Optional[Tuple[List[int], List[int]]]:
    """The prompt (the tokens before the first trained one) and the reference response (the first trained run);
    None when the example has no untrained prompt (completion rows, or data.train_on_inputs)."""
    first = next((i for i, label in enumerate(labels) if label != -100), None)
    if first is None or first < 2:  # position 0 is never trained, so < 2 means the prompt is trained too
        return None
    end = next((i for i in range(first, len(labels)) if labels[i] == -100), len(labels))
    return ids[:first], ids[first:end]


# ----------------------------------------------------------------------------------------------------- loss
@torch.no_grad()
def held_out_loss(model, dataset, collator, batch_size: int, log_every_s: float = 30.0) -> Dict[str, Dict]:
    """{"base": {...}, "adapter": {...}}, each {loss, perplexity, tokens}: the same batches through the model with
    and without its adapter."""
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    sums = {"base": 0.0, ADAPTER: 0.0}
    tokens = 0
    started = last_line = time.monotonic()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    for i, batch in enumerate(loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        # The model shifts labels by one inside; these are the tokens its mean is taken over.
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        # use_cache=False: packed rows keep their examples apart only without a cache (see ftlib/data/packing.py).
        sums[ADAPTER] += float(model(**batch, use_cache=False).loss) * n
        with model.disable_adapter():
            sums["base"] += float(model(**batch, use_cache=False).loss) * n
        tokens += n
        if time.monotonic() - last_line > log_every_s:
            last_line = time.monotonic()
            log.info(f"batch {i + 1} of {len(loader)}, {time.monotonic() - started:.0f} s")
    if tokens == 0:
        raise UserError("the evaluation data has no trained tokens (every label is -100)")
    return {name: {"loss": s / tokens, "perplexity": math.exp(s / tokens), "tokens": tokens}
            for name, s in sums.items()}


# ----------------------------------------------------------------------------------------------------- generations
@torch.no_grad()
def side_by_side(model, tokenizer, prompts: List[List[int]], max_new_tokens: int) -> List[Dict[str, str]]:
    """Greedy completions of each prompt (token ids) by the base model and by the fine-tuned adapter."""
    device = next(model.parameters()).device
    out = []
    for ids in prompts:
        inputs = torch.tensor([ids], device=device)
        kwargs = dict(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tuned = model.generate(**kwargs)
        with model.disable_adapter():
            base = model.generate(**kwargs)
        completion = lambda seq: tokenizer.decode(seq[0, len(ids):], skip_special_tokens=True).strip()  # noqa: E731
        out.append({"prompt": tokenizer.decode(ids, skip_special_tokens=True), "base": completion(base),
                    ADAPTER: completion(tuned)})
    return out


def generation_prompts(recipe, tokenizer, dataset, count: int) -> List[Tuple[List[int], Optional[List[int]]]]:
    """(prompt ids, reference ids) of the first `count` examples that have a prompt; when none has one
    (data.train_on_inputs, completion data), the recipe's train.sample_prompts without references."""
    found = []
    for row in dataset:
        for ids, labels in examples(row):
            pair = prompt_and_reference(ids, labels)
            if pair is not None and len(found) < count:
                found.append(pair)
        if len(found) >= count:
            return found
    if found:
        return found
    from ftlib.data.formats import alpaca_prompt

    texts = [alpaca_prompt(p, style=recipe.data.prompt_style) for p in recipe.train.sample_prompts[:count]]
    return [(tokenizer(t)["input_ids"], None) for t in texts]


# ----------------------------------------------------------------------------------------------------- the step
def evaluate(recipe, data: Optional[str] = None, num_generations: int = 4, max_new_tokens: Optional[int] = None,
             batch_size: Optional[int] = None) -> Dict:
    """Evaluate the run's adapter against its base model; writes eval/results.json and eval/generations.md and
    returns the results. `max_new_tokens` defaults to train.sample_max_new_tokens, `batch_size` to
    train.micro_batch_size."""
    from ftlib.data.collate import make_collator
    from ftlib.model import load_for_inference, load_tokenizer

    run = RunDir.of(recipe)
    if not run.training_done:
        raise FileNotFoundError(f"{run.root}: no trained adapter in {run.adapter} (train the run first)")
    max_new_tokens = max_new_tokens or recipe.train.sample_max_new_tokens
    started = time.monotonic()
    tokenizer = load_tokenizer(recipe)
    dataset, described = eval_dataset(recipe, data)
    model = load_for_inference(recipe, {ADAPTER: str(run.adapter)})
    log.info(f"{len(dataset):,} rows of {described}; base {recipe.model.name_or_path} vs adapter {run.adapter}")

    scores = held_out_loss(model, dataset, make_collator(recipe, tokenizer),
                           batch_size or recipe.train.micro_batch_size)
    prompts = generation_prompts(recipe, tokenizer, dataset, num_generations)
    generations = side_by_side(model, tokenizer, [p for p, _ in prompts], max_new_tokens)
    for g, (_, reference) in zip(generations, prompts):
        g["reference"] = tokenizer.decode(reference, skip_special_tokens=True).strip() if reference else None

    results = {
        "run": recipe.run.name, "data": described, "examples": count_examples(dataset),
        "tokens": scores[ADAPTER]["tokens"], "loss_definition": LOSS_DEFINITION,
        "base": {k: scores["base"][k] for k in ("loss", "perplexity")},
        "adapter": {k: scores[ADAPTER][k] for k in ("loss", "perplexity")},
        "base_model": recipe.model.name_or_path, "adapter_dir": str(run.adapter),
        "max_new_tokens": max_new_tokens, "generations": generations,
        "seconds": round(time.monotonic() - started, 1),
    }
    write_json(run.eval_results, results)
    write_atomic(run.eval_generations, generations_markdown(results))
    b, a = results["base"], results["adapter"]
    log.info(f"loss base {b['loss']:.4f} (perplexity {b['perplexity']:.2f}) -> adapter {a['loss']:.4f} "
             f"(perplexity {a['perplexity']:.2f}) on {results['tokens']:,} tokens; written to {run.eval}")
    return results


def generations_markdown(results: Dict) -> str:
    lines = [f"# Base model vs fine-tuned adapter: run `{results['run']}`", "",
             f"Greedy decoding, at most {results['max_new_tokens']} new tokens; prompts from {results['data']}.", "",
             "| | loss | perplexity |", "|---|---|---|",
             f"| base | {results['base']['loss']:.4f} | {results['base']['perplexity']:.2f} |",
             f"| adapter | {results['adapter']['loss']:.4f} | {results['adapter']['perplexity']:.2f} |", "",
             f"Loss: {results['loss_definition']}", ""]
    for i, g in enumerate(results["generations"], 1):
        lines += [f"## Example {i}", "", "**Prompt**", "", _block(g["prompt"]), ""]
        if g.get("reference") is not None:
            lines += ["**Reference (from the data)**", "", _block(g["reference"]), ""]
        lines += ["**Base model**", "", _block(g["base"]), "", "**Fine-tuned (adapter)**", "", _block(g[ADAPTER]), ""]
    return "\n".join(lines)


def _block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}text\n{text or '(nothing)'}\n{fence}"
