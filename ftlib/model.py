"""The tokenizer, the base model (optionally quantized) and its LoRA adapter.

Three entry points:
  load_tokenizer(recipe)                    the tokenizer, with a pad token
  load_model(recipe, for_training=True)     the base (+ bitsandbytes quantization) wrapped in a fresh LoRA adapter, with
                                            the fast path's parts applied (ftlib/fastpath.py)
                                            (for_training=False: the plain base, in eval mode)
  load_for_inference(recipe, adapters)      the base plus several named PEFT adapters, for serving:
                                                model = load_for_inference(recipe, {"demo": "runs/demo/adapter"})
                                                model.set_adapter("demo")            # choose the adapter
                                                with model.disable_adapter(): ...    # the bare base model
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ftlib.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_tokenizer(recipe):
    """The recipe's tokenizer, with a pad token (padding is only ever masked: labels -100, attention 0)."""
    m = recipe.model
    tok = AutoTokenizer.from_pretrained(m.tokenizer or m.name_or_path, trust_remote_code=m.trust_remote_code)
    if m.pad_token is not None:
        if m.pad_token not in tok.get_vocab():
            # Adding a token would resize the embeddings, which a LoRA run does not train.
            raise UserError(f"model.pad_token: {m.pad_token!r} is not in the tokenizer's vocabulary")
        tok.pad_token = m.pad_token
    elif tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def quantization_config(recipe, sharded: bool = False) -> Optional[BitsAndBytesConfig]:
    """bitsandbytes settings for `model.quantization` (None when the base stays in `model.dtype`)."""
    m = recipe.model
    if m.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if m.quantization == "4bit":
        compute = DTYPES[m.compute_dtype]
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=m.quant_type, bnb_4bit_use_double_quant=m.double_quant,
            bnb_4bit_compute_dtype=compute,
            # ZeRO-3 shards parameters by dtype: storing the 4-bit weights as the compute dtype lets it shard them.
            bnb_4bit_quant_storage=compute if sharded else torch.uint8,
        )
    return None


def load_base(recipe, device: Optional[str] = None, sharded: bool = False, attention: Optional[str] = None):
    """The base model in `model.dtype`, quantized if the recipe says so. Quantized weights cannot be moved after
    loading, so they are placed on `device` (default: this rank's GPU, or the CPU) while loading; unless `sharded`
    (training under ZeRO-3), where DeepSpeed places the shards itself. `attention`: the attention kernel when
    model.attn_implementation names none (the fast path's choice)."""
    m = recipe.model
    quant = quantization_config(recipe, sharded)
    kwargs = {}
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not sharded:
            kwargs["device_map"] = {"": device or _default_device()}
    elif device is not None:
        kwargs["device_map"] = {"": device}
    if m.attn_implementation or attention:
        kwargs["attn_implementation"] = m.attn_implementation or attention
    model = AutoModelForCausalLM.from_pretrained(
        m.name_or_path, dtype=DTYPES[m.dtype], trust_remote_code=m.trust_remote_code, **kwargs)
    if m.quantization == "4bit":
        _keep_generic_cpu_kernel_where_needed(model, sharded)
    return model


def _keep_generic_cpu_kernel_where_needed(model, sharded: bool) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first no-grad forward (an
    evaluation). That needs out_features % 32 == 0 and in_features divisible by the quantization block (64), and
    weights stored as uint8 (saving a repacked ZeRO-3 shard stored as the compute dtype fails). Other layers (the
    tiny demo model's MLP is 172 wide) keep the generic kernel instead of crashing; OpenLLaMA's 3200/8640 qualify."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and (sharded or module.out_features % 32 or module.in_features % 64):
            module.support_avx512bf16_for_cpu = False


def lora_config(recipe):
    from peft import LoraConfig

    lo = recipe.lora
    targets = lo.target_modules
    # PEFT spells "every linear layer except the output head" as the plain string "all-linear".
    target_modules = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=target_modules,
                      use_dora=lo.use_dora, bias="none", task_type="CAUSAL_LM")


def load_model(recipe, for_training: bool = True, fast=None):
    """The base model; for training also prepared for k-bit training and wrapped in a new LoRA adapter initialised
    from the current torch seed (call transformers.set_seed first for reproducibility), with the fast path applied:
    `fast` from ftlib.fastpath.choose (default: chosen here), which also decides the activation checkpointing."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ftlib import fastpath

    if not for_training:
        return load_base(recipe).eval()
    fast = fast or fastpath.choose(recipe)
    recipe = fast.recipe  # with the ZeRO stage the fast path chose
    model = load_base(recipe, sharded=is_zero3(recipe), attention=fast.attention)
    if recipe.model.quantization != "none":
        # Casts the remaining 16-bit layers (norms, head) to fp32 for stable training. Checkpointing comes with the
        # fast path: non-reentrant, it needs no input gradients forced on the frozen embedding.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Training never uses the KV cache, and packed batches need it off: the block-diagonal mask built from
    # position_ids is only used when no cache is in play.
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(recipe))
    fastpath.apply(model, fast)
    return model


def load_for_inference(recipe, adapters: Optional[Dict[str, str]] = None, device: Optional[str] = None):
    """The base model in eval mode with the named PEFT adapters loaded (the first one active).

    adapters: {name: adapter directory} (e.g. {"demo": RunDir(run).adapter}); None or {} gives the bare base.
    Switch with `model.set_adapter(name)`; `with model.disable_adapter():` runs the base alone."""
    from peft import PeftModel

    base = load_base(recipe, device=device or _default_device())
    base.eval()
    if not adapters:
        return base
    names = list(adapters)
    for name in names:
        if not os.path.isfile(os.path.join(adapters[name], "adapter_config.json")):
            raise FileNotFoundError(f"adapter {name!r}: no adapter_config.json in {adapters[name]}")
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name, is_trainable=False)
    model.set_adapter(names[0])
    return model.eval()


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def is_zero3(recipe) -> bool:
    """Whether training shards the parameters (DeepSpeed ZeRO stage 3, from the recipe or its own config file)."""
    d = recipe.deepspeed
    if not d.enabled:
        return False
    if d.config_file:
        import json

        with open(d.config_file) as f:
            return json.load(f).get("zero_optimization", {}).get("stage") == 3
    return d.zero_stage == 3
