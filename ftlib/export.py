"""`make export RUN=...`: the base model with the LoRA adapter merged in, as one ordinary model in merged/.

The adapter comes from adapter/ (written at the end of training); when a run has no adapter yet (stopped early,
or only checkpoints were copied), it comes from the latest complete checkpoint whose files match its marker (a
damaged newer one is skipped, with a line saying which file; see ftlib.checkpoints): ZeRO checkpoints (stages
1-3) are consolidated from every rank's shards with DeepSpeed's zero_to_fp32 (the fp32 master weights); others
carry the adapter files the Trainer saved in them. The merge happens on an unquantized base in `model.dtype`: merging
into 8-/4-bit weights would round the adapter away. merged/ is written to a temporary folder and renamed.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from ftlib import checkpoints, progress
from ftlib.errors import UserError
from ftlib.rundir import RunDir, publish_dir


def export(recipe) -> Path:
    """Write merged/ for the run of `recipe` and return its path."""
    from ftlib.model import load_base, load_tokenizer

    run = RunDir.of(recipe)
    full_precision = copy.deepcopy(recipe)
    full_precision.model.quantization = "none"
    base = load_base(full_precision, device="cpu")
    model = _with_adapter(base, recipe, run)
    merged = model.merge_and_unload()

    partial = run.root / "merged.partial"
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial)
    load_tokenizer(recipe).save_pretrained(partial)
    return publish_dir(partial, run.merged)


def _with_adapter(base, recipe, run: RunDir):
    from peft import PeftModel, get_peft_model

    if run.training_done:
        return PeftModel.from_pretrained(base, str(run.adapter))
    checkpoint, damaged = checkpoints.newest_intact(run.checkpoints)
    if checkpoint is None and damaged:
        raise UserError(f"{run.root}: no adapter/ and {checkpoints.nothing_intact(damaged, 'to export')}")
    if checkpoint is None:
        raise FileNotFoundError(f"{run.root}: nothing to export: no adapter/ and no complete checkpoint in "
                                f"{run.checkpoints}")
    for bad, why in damaged:
        progress.logger("export").info(f"{bad} is damaged: {why}; exporting {checkpoint.name} instead")
    if not any(checkpoint.glob("global_step*/*zero_pp_rank_*")):
        # Not a ZeRO checkpoint (DDP, or ZeRO stage 0): the Trainer saved the adapter itself in the checkpoint.
        return PeftModel.from_pretrained(base, str(checkpoint))
    from ftlib.model import lora_config

    model = get_peft_model(base, lora_config(recipe))
    weights = lora_weights_from_checkpoint(checkpoint)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    not_loaded = [k for k in missing if "lora_" in k]
    if not_loaded or unexpected:
        raise UserError(f"{checkpoint}: the checkpoint does not match the recipe's LoRA settings "
                         f"(missing {not_loaded[:3]}, unexpected {list(unexpected)[:3]})")
    return model


def lora_weights_from_checkpoint(checkpoint: Path) -> dict:
    """The trained (LoRA) weights of a DeepSpeed checkpoint, gathered from all ranks' shards, in fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), exclude_frozen_parameters=True)
    return {k: v for k, v in state.items() if "lora_" in k and isinstance(v, torch.Tensor)}
