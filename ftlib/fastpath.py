"""The fast path: what makes training fast on this device for this recipe, chosen once per run, each part with why.

    fast = choose(recipe)                    # before anything loads (it may change the ZeRO stage): fast.recipe
    for line in fast.lines: say(line)        # "fast path: loss: Liger Kernel's fused linear cross-entropy (...)"
    model = load_model(fast.recipe, for_training=True, fast=fast)   # ftlib.model calls apply(): the parts that act
    for line in fast.model_lines: say(line)                          # on the model, and the layers to checkpoint

The parts (recipe section fast_path; each auto, true or false: auto is decided here, true fails in one line where the
part cannot run, false leaves it out):
  attention   packed rows through a kernel that builds no dense mask and stores no attention probabilities:
              FlashAttention 2 by position ids where it is installed, else torch's flex_attention with a document
              mask. GPU only: flex_attention has no backward on CPU, where sdpa stays (same loss as eager).
  loss        head + cross-entropy without a micro-batch's vocabulary logits in fp32 at once: Liger Kernel's fused
              linear cross-entropy on a GPU; elsewhere ChunkedLoss (torch only, same maths).
  kernels     Liger Kernel's RMSNorm, SwiGLU and RoPE (Triton, CUDA only), through transformers' own integration.
  compile     torch.compile of every decoder layer. auto: off, until bench/gpu_lora.py shows it pays.
  lora_dtype  LoRA matmuls in the mixed-precision dtype: PEFT's own switch (cast_input_dtype_enabled) off, so autocast
              runs them in bf16/fp16 on the layer's input itself instead of on an fp32 copy of it (the LoRA weights
              stay fp32 for the optimizer).
  zero3       with deepspeed.zero_stage 3, ZeRO-3 only where the base does not fit one GPU.
and model.gradient_checkpointing: auto, which checkpoints every n-th decoder layer (transformers' every_n_layers), the
fewest that fit fast_path.memory_gb, from what a probe forward measures autograd saving per token (SavedTensors); every
layer where no probe can run first (ZeRO-3's sharded weights, bitsandbytes' 8-bit layers).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ftlib.errors import UserError

GIB = 2 ** 30
CHUNK_TOKENS = 1024     # ChunkedLoss: logits of this many tokens at a time (32k vocabulary: 128 MiB in fp32)
PROBE_TOKENS = 512      # the probe forward that measures the bytes saved per token
FITS_ONE_GPU = 0.5      # zero3 auto: the base "fits" when its weights take at most this share of the GPU


# ----------------------------------------------------------------------------------------------------- device
@dataclass
class Device:
    """What the parts depend on: a CUDA GPU (and its memory), and which optional libraries are installed."""
    cuda: bool
    name: str = "cpu"
    memory_gb: Optional[float] = None   # the GPU's total memory
    flash_attn: bool = False            # flash-attn >= 2.3.3, usable by transformers
    liger: Optional[str] = None         # liger-kernel's version

    @classmethod
    def here(cls) -> "Device":
        from transformers.utils import is_flash_attn_2_available, is_liger_kernel_available

        liger = None
        if is_liger_kernel_available():
            from importlib.metadata import version

            liger = version("liger-kernel")
        if not torch.cuda.is_available():
            return cls(cuda=False, liger=liger)
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()  # (one GPU per task: index 0)
        props = torch.cuda.get_device_properties(index)
        return cls(cuda=True, name=props.name, memory_gb=props.total_memory / GIB,
                   flash_attn=is_flash_attn_2_available(), liger=liger)


# ----------------------------------------------------------------------------------------------------- the plan
@dataclass
class FastPath:
    """The parts chosen for one run. `recipe` is the run's recipe with the ZeRO stage chosen; `lines` say what each
    part does and why (the train log's first lines), `model_lines` what apply() did to the model."""
    recipe: object
    device: Device
    attention: Optional[str]      # attn_implementation to load the model with (None: transformers' default, sdpa)
    loss: str                     # "liger", "chunked" or "plain"
    kernels: bool
    compile: bool
    lora_dtype: bool
    lines: List[str] = field(default_factory=list)
    model_lines: List[str] = field(default_factory=list)


def choose(recipe, device: Optional[Device] = None) -> FastPath:
    """The parts for this recipe on this device (Device.here() unless given). Raises UserError, naming the key, for
    a part set to true that cannot run here."""
    device = device or Device.here()
    fp = recipe.fast_path
    lines: List[str] = []

    def say(part: str, text: str):
        lines.append(f"fast path: {part}: {text}")

    def refuse(part: str, why: str):
        raise UserError(f"fast_path.{part}: true, but {why}; set it to auto or false")

    recipe = _with_zero_stage(recipe, device, say)
    zero3 = _is_zero3(recipe)

    # attention
    packed = recipe.data.packing
    attention = recipe.model.attn_implementation
    if attention:
        say("attention", f"{attention} (model.attn_implementation)")
    elif fp.attention is False:
        say("attention", "transformers' default, sdpa (fast_path.attention: false)")
    elif not device.cuda:
        if fp.attention is True:
            refuse("attention", "flex_attention has no backward on CPU and FlashAttention needs a GPU")
        say("attention", "sdpa: on CPU flex_attention has no backward; sdpa keeps packed examples apart by their "
                         "position ids")
    elif device.flash_attn:
        attention = "flash_attention_2"
        say("attention", "flash_attention_2: " + ("packed rows as variable-length sequences from their position ids"
                                                  if packed else "padded rows without their padding"))
    elif packed or fp.attention is True:
        attention = "flex_attention"
        say("attention", "flex_attention with a document mask from the position ids: no dense mask, no stored "
                         "probabilities, and no work across examples (FlashAttention 2 is not installed)")
    else:
        say("attention", "sdpa: padded rows, whose mask CUDA's memory-efficient kernel takes without storing "
                         "probabilities (data.packing is false)")

    # loss
    adapted_head = "lm_head" in list(recipe.lora.target_modules)
    if fp.loss is False:
        loss = "plain"
        say("loss", "the model's own cross-entropy over fp32 logits (fast_path.loss: false)")
    elif device.cuda and device.liger and not zero3 and not adapted_head:
        loss = "liger"
        say("loss", f"Liger Kernel's fused linear cross-entropy (liger-kernel {device.liger}): the logits exist a "
                    f"chunk at a time and are never stored")
    else:
        loss = "chunked"
        why = ("ZeRO-3 shards the head, which Liger reads outside its forward" if device.cuda and device.liger and zero3
               else "the head has a LoRA adapter, which Liger's fused loss would leave out" if adapted_head
               else "liger-kernel is not installed" if device.cuda else "Liger's Triton kernels need a CUDA GPU")
        say("loss", f"chunked: head + cross-entropy {CHUNK_TOKENS} tokens at a time, recomputed in the backward "
                    f"({why})")

    # Liger's RMSNorm, SwiGLU, RoPE
    kernels = False
    if fp.kernels is False:
        say("kernels", "off (fast_path.kernels: false)")
    elif not device.cuda or not device.liger:
        why = "Liger's Triton kernels need a CUDA GPU" if not device.cuda else "liger-kernel is not installed"
        if fp.kernels is True:
            refuse("kernels", why)
        say("kernels", f"off: {why}")
    else:
        model_type = _model_type(recipe)
        if model_type not in _liger_model_types():
            if fp.kernels is True:
                refuse("kernels", f"Liger Kernel has no kernels for model type {model_type!r}")
            say("kernels", f"off: Liger Kernel has no kernels for model type {model_type!r}")
        else:
            kernels = True
            say("kernels", f"Liger Kernel's fused RMSNorm, SwiGLU and RoPE ({model_type})")

    # torch.compile
    compile_layers = fp.compile is True
    say("compile", "torch.compile of every decoder layer" if compile_layers else
        "off (" + ("fast_path.compile: false" if fp.compile is False else
                   "auto: not yet shown to pay here; bench/gpu_lora.py measures it") + ")")

    # LoRA in the compute dtype
    lora_dtype = False
    mixed = recipe.train.precision in ("fp16", "bf16")
    if fp.lora_dtype is False:
        say("lora_dtype", "off (fast_path.lora_dtype: false)")
    elif not mixed:
        say("lora_dtype", "off: fp32 training, where the LoRA matmuls already run in the weights' dtype")
    elif recipe.deepspeed.enabled:
        say("lora_dtype", f"DeepSpeed keeps the LoRA weights in {recipe.train.precision} (fp32 copies in its "
                          f"optimizer): the matmuls already run in the compute dtype")
    else:
        lora_dtype = True
        say("lora_dtype", f"LoRA matmuls in {recipe.train.precision} on each layer's input itself (no fp32 copy of "
                          f"it); the LoRA weights stay fp32 for the optimizer")
    return FastPath(recipe=recipe, device=device, attention=attention, loss=loss, kernels=kernels,
                    compile=compile_layers, lora_dtype=lora_dtype, lines=lines)


def _with_zero_stage(recipe, device: Device, say):
    """The recipe, with ZeRO-2 instead of ZeRO-3 where fast_path.zero3 says so."""
    d, choice = recipe.deepspeed, recipe.fast_path.zero3
    if not d.enabled or d.config_file or d.zero_stage != 3:
        return recipe
    if choice is True:
        say("zero3", "ZeRO-3, as deepspeed.zero_stage says (fast_path.zero3: true)")
        return recipe
    if choice == "auto":
        if not device.cuda:
            say("zero3", "ZeRO-3, as deepspeed.zero_stage says (no GPU here for the base to fit in)")
            return recipe
        base = base_bytes(recipe) / GIB
        if base > FITS_ONE_GPU * device.memory_gb:
            say("zero3", f"ZeRO-3: the {_base_name(recipe)} base ({base:.1f} GiB) does not fit one "
                         f"{device.memory_gb:.0f} GiB GPU with room to train")
            return recipe
        why = f"the {_base_name(recipe)} base ({base:.1f} GiB) fits one {device.memory_gb:.0f} GiB GPU"
    else:
        why = "fast_path.zero3: false"
    say("zero3", f"ZeRO-2 instead of deepspeed.zero_stage 3: {why}, so no rank gathers parameters layer by layer")
    recipe = copy.deepcopy(recipe)
    recipe.deepspeed.zero_stage = 2
    return recipe


def _is_zero3(recipe) -> bool:
    from ftlib.model import is_zero3

    return is_zero3(recipe)


def _base_name(recipe) -> str:
    return {"none": recipe.model.dtype, "8bit": "8-bit", "4bit": "4-bit"}[str(recipe.model.quantization)]


def _model_config(recipe):
    from transformers import AutoConfig

    m = recipe.model
    return AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)


def _model_type(recipe) -> str:
    return _model_config(recipe).model_type


def _liger_model_types():
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN


def base_bytes(recipe) -> float:
    """Bytes of the base model's weights as training holds them: its linear layers in model.dtype or quantized (1 or
    ~0.53 bytes a weight), the rest (embeddings, head, norms) in model.dtype, or fp32 once quantized (PEFT's
    prepare_model_for_kbit_training casts them). Counted on the meta device: nothing is allocated."""
    from transformers import AutoModelForCausalLM

    from ftlib.model import DTYPES

    config = _model_config(recipe)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    total = sum(p.numel() for p in model.parameters())
    quantization = str(recipe.model.quantization)
    if quantization == "none":
        return total * DTYPES[str(recipe.model.dtype)].itemsize
    per_weight = 1.0 if quantization == "8bit" else 0.5 + 4 / 64  # NF4 + one fp32 scale per 64-weight block
    return linear * per_weight + (total - linear) * 4


# ----------------------------------------------------------------------------------------------------- the model
def apply(model, fast: FastPath) -> None:
    """The parts that act on a loaded model with its LoRA adapter: LoRA dtype, Liger kernels, the loss, activation
    checkpointing (model.gradient_checkpointing: true, false, or auto: measured here) and torch.compile. Call
    before the Trainer is built; appends what it did to fast.model_lines."""
    say = fast.model_lines.append
    if fast.lora_dtype:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False  # PEFT's own switch (peft.helpers.disable_input_dtype_casting)
    if fast.kernels or fast.loss == "liger":
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, {"rope": fast.kernels, "swiglu": fast.kernels, "rms_norm": fast.kernels,
                                   "cross_entropy": False, "fused_linear_cross_entropy": fast.loss == "liger"})
    if fast.loss == "chunked":
        ChunkedLoss.install(causal_lm(model))
    every = _checkpoint_every(model, fast, say)
    if every:
        causal_lm(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                                          every_n_layers=every)
    if fast.compile:
        for layer in decoder_layers(model):
            layer.compile()


def causal_lm(model):
    """The *ForCausalLM model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> List[torch.nn.Module]:
    """The repeated decoder layers (transformers' GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpoint_every(model, fast: FastPath, say) -> int:
    """Checkpoint every n-th decoder layer (0: none), as model.gradient_checkpointing says or, for auto, the fewest
    layers whose estimated peak fits the memory budget."""
    recipe = fast.recipe
    choice = recipe.model.gradient_checkpointing
    layers = len(decoder_layers(model))
    if choice != "auto":
        say(f"fast path: activation checkpointing: {'every decoder layer' if choice else 'none'} "
            f"(model.gradient_checkpointing: {str(choice).lower()})")
        return 1 if choice else 0
    if _is_zero3(recipe):
        say("fast path: activation checkpointing: every decoder layer (auto under ZeRO-3, whose sharded weights "
            "cannot run a probe forward before DeepSpeed starts; a model that needs ZeRO-3 has little memory to spare)")
        return 1
    if str(recipe.model.quantization) == "8bit":
        # bitsandbytes' 8-bit layers move their quantization state at their first forward, after which they refuse
        # to load a checkpoint's: a probe would break resuming.
        say("fast path: activation checkpointing: every decoder layer (auto with an 8-bit base: a probe forward "
            "before training would keep bitsandbytes' 8-bit layers from loading a checkpoint to resume from)")
        return 1
    budget = memory_budget(recipe, fast.device)
    if budget is None:
        say("fast path: activation checkpointing: none (auto: no memory limit known; set fast_path.memory_gb or "
            "resources.train.mem_gb)")
        return 0
    device = _training_device()
    if device.type == "cuda" and recipe.model.quantization == "none":
        model.to(device)  # where the probe must run (the Trainer would move it there anyway; quantized bases are)
    measured = probe(model, recipe, device)
    tokens = recipe.train.micro_batch_size * recipe.data.row_len
    resident = _resident_bytes(model, device)
    every, need = checkpoint_every(measured.per_layer, measured.per_checkpointed_layer, measured.other, layers,
                                   tokens, budget, resident)
    if every == 0:
        done = "none"
    else:
        done = f"every {_nth(every)}decoder layer ({math.ceil(layers / every)} of {layers})"
    say(f"fast path: activation checkpointing: {done}; the probe measured {measured.per_layer / 2 ** 20:.3f} MiB "
        f"saved per token per layer ({measured.per_checkpointed_layer / 2 ** 20:.4f} checkpointed) and "
        f"{measured.other / 2 ** 20:.3f} outside the layers; {tokens:,} tokens per micro-step need ~{need / GIB:.2f} "
        f"GiB of the {budget / GIB:.2f} GiB budget" + ("" if need <= budget else
                                                      " and do NOT fit: lower train.micro_batch_size"))
    return every


def checkpoint_every(per_layer: float, per_checkpointed: float, other: float, layers: int, tokens: int,
                     budget: float, resident: float):
    """(n, bytes): checkpoint every n-th of `layers` decoder layers (0: none), the least recomputation whose
    estimated peak fits `budget`, and that peak: what stays resident, plus per token what the forward saves outside
    the layers and in each layer (checkpointed or not), plus one layer's activations and their gradients while it
    runs backward. Every layer checkpointed when nothing fits."""
    def need(checkpointed: int) -> float:
        saved = other + (layers - checkpointed) * per_layer + checkpointed * per_checkpointed
        return resident + tokens * (saved + 2 * per_layer)

    if need(0) <= budget:
        return 0, need(0)
    for every in range(layers, 0, -1):  # ceil(layers / every) layers checkpointed: more as `every` shrinks
        if need(math.ceil(layers / every)) <= budget:
            return every, need(math.ceil(layers / every))
    return 1, need(layers)


def memory_budget(recipe, device: Device) -> Optional[float]:
    """Bytes one rank may use: fast_path.memory_gb, else 90% of the GPU, else (CPU) resources.train.mem_gb per task."""
    if recipe.fast_path.memory_gb:
        return recipe.fast_path.memory_gb * GIB
    if device.cuda:
        return 0.9 * device.memory_gb * GIB
    r = recipe.resources.train
    return r.mem_gb * GIB / r.tasks_per_node if r.mem_gb else None


def _training_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _resident_bytes(model, device: torch.device) -> float:
    """Memory that stays for the whole run: the model (all of the process's allocations on a GPU) and the
    optimizer's share for the trainable weights (their gradients and AdamW's two moments, fp32)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
    else:
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return held + 12 * trainable


def _nth(n: int) -> str:
    return {1: "", 2: "2nd ", 3: "3rd "}.get(n, f"{n}th ")


# ----------------------------------------------------------------------------------------------------- measuring
@dataclass
class Measured:
    """Bytes autograd saves per token in one forward: in each decoder layer (the largest), in a layer under
    activation checkpointing (what it keeps for the recompute: its input), and outside the layers (embedding, final
    norm, head, loss)."""
    per_layer: float
    per_checkpointed_layer: float
    other: float


def probe(model, recipe, device: torch.device, tokens: int = PROBE_TOKENS) -> Measured:
    """One forward (with labels, no backward) of a row of random tokens shaped like the training rows, counting what
    autograd saves. The RNG state is left as it was (LoRA dropout would draw from it)."""
    config = causal_lm(model).config
    tokens = min(tokens, recipe.data.row_len)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        batch = {k: v.to(device) for k, v in sample_batch(config.vocab_size, 1, tokens,
                                                           recipe.data.sequence_len, recipe.data.packing).items()}
        was_training = model.training
        model.train()
        with mixed_precision(recipe, device), SavedTensors(model) as saved:
            model(**batch)
        model.train(was_training)
    per_token = {k: v / tokens for k, v in saved.bytes.items()}
    layers = [v for k, v in per_token.items() if k.startswith("layer")]
    hidden = config.hidden_size * next(p for p in model.parameters() if p.is_floating_point()).element_size()
    checkpointed = saved.layer_input_bytes / tokens or hidden
    return Measured(per_layer=max(layers, default=0.0), per_checkpointed_layer=checkpointed,
                    other=per_token.get("other", 0.0))


def mixed_precision(recipe, device: torch.device):
    """The autocast the Trainer runs the forward under for train.precision (none for fp32)."""
    if recipe.train.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if recipe.train.precision == "bf16" else torch.float16)


def sample_batch(vocab_size: int, rows: int, tokens: int, example_len: int, packed: bool, generator=None):
    """Random-token training rows: packed (examples of example_len tokens, positions restarting, no attention mask)
    or plain (attention mask of ones). Labels are the inputs, every example's first one -100."""
    input_ids = torch.randint(3, vocab_size, (rows, tokens), generator=generator)
    labels = input_ids.clone()
    if not packed:
        labels[:, 0] = -100
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    positions = torch.arange(tokens) % example_len
    labels[:, positions == 0] = -100
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions.repeat(rows, 1)}


class SavedTensors:
    """Counts the bytes autograd saves for the backward while active (torch.autograd.graph.saved_tensors_hooks):
    `bytes` by where they were saved, "layer <i>" for decoder layer i and "other" for the rest. Each storage counts
    once, parameters not at all. A decoder layer under activation checkpointing saves nothing the hooks see; what
    it keeps is its input, counted in `layer_input_bytes` (input of each layer, counted for checkpointed layers in
    `bytes` too)."""

    def __init__(self, model):
        self.model = model
        self.bytes: Dict[str, float] = {}
        self.layer_input_bytes = 0.0
        self._seen = set()
        self._where = "other"
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}

    def _count(self, tensor, where: str) -> int:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key in self._seen or storage.data_ptr() in self._params or storage.data_ptr() == 0:
            return 0
        self._seen.add(key)
        self.bytes[where] = self.bytes.get(where, 0) + storage.nbytes()
        return storage.nbytes()

    def _pack(self, tensor):
        self._count(tensor, self._where)
        return tensor

    def __enter__(self):
        self._handles = []
        for i, layer in enumerate(decoder_layers(self.model)):
            self._handles.append(layer.register_forward_pre_hook(self._entering(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._leaving, with_kwargs=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def _entering(self, index: int):
        def hook(layer, args, kwargs):
            self._where = f"layer {index}"
            hidden = args[0] if args else kwargs.get("hidden_states")
            if index == 0 and torch.is_tensor(hidden):
                self.layer_input_bytes = hidden.numel() * hidden.element_size()
            if layer.gradient_checkpointing and layer.training and torch.is_tensor(hidden):
                self._count(hidden, self._where)  # kept by the checkpoint for the recompute
        return hook

    def _leaving(self, layer, args, kwargs, output):
        self._where = "other"

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------- the loss
class ChunkedLoss:
    """The causal-LM loss of `model(..., labels=...)` without a micro-batch's vocabulary logits in fp32 at once.

    Installed on a *ForCausalLM model. Its forward, given labels, lets the head see an empty slice of the hidden
    states (a pre-hook keeps the full ones); its loss_function (transformers' hook for a model's loss) then runs the
    head and the cross-entropy CHUNK_TOKENS tokens at a time, each chunk under torch.utils.checkpoint, so the
    backward recomputes a chunk's logits instead of keeping them. The maths of transformers' ForCausalLMLoss (labels
    shifted, fp32 logits, the sum over num_items_in_batch or the mean); `outputs.logits` is empty. Calling the head
    module (not its weight) keeps a LoRA on the head, quantized heads and ZeRO-3's gathering working."""

    def __init__(self, head: torch.nn.Module, chunk_tokens: int = CHUNK_TOKENS):
        self.head, self.chunk_tokens = head, chunk_tokens
        self.wanted = False
        self.hidden: Optional[torch.Tensor] = None

    @classmethod
    def install(cls, model, chunk_tokens: int = CHUNK_TOKENS) -> "ChunkedLoss":
        import types

        loss = cls(model.get_output_embeddings(), chunk_tokens)
        loss.head.register_forward_pre_hook(loss._keep_hidden)
        inner = model.forward

        def forward(self, *args, **kwargs):
            loss.wanted = kwargs.get("labels") is not None
            try:
                return inner(*args, **kwargs)
            finally:
                loss.wanted, loss.hidden = False, None

        model.forward = types.MethodType(forward, model)  # an instance attribute: PEFT calls model.forward(...)
        model.loss_function = loss
        return loss

    def _keep_hidden(self, head, args):
        if self.wanted:  # the forward of a loss: the head computes nothing here, the loss does it chunk by chunk
            self.wanted, self.hidden = False, args[0]
            return (args[0][..., :0, :],)
        return None

    def __call__(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):
        if self.hidden is None:  # not a forward we prepared (e.g. called directly): the plain loss
            from transformers.loss.loss_utils import ForCausalLMLoss

            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)
        hidden, self.hidden = self.hidden, None
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = shift_labels.reshape(-1).to(hidden.device)
        total = None
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            end = start + self.chunk_tokens
            args = (hidden[start:end], targets[start:end], ignore_index)
            part = (torch.utils.checkpoint.checkpoint(self._chunk, *args, use_reentrant=False)
                    if torch.is_grad_enabled() else self._chunk(*args))
            total = part if total is None else total + part
        if num_items_in_batch is None:
            return total / (targets != ignore_index).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def _chunk(self, hidden, targets, ignore_index: int):
        logits = self.head(hidden).float()
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
