"""The recipe: one YAML file that says everything about a run.

The schema below is the single source of truth: every key, its type, its default and a one-line meaning
(`help`). `load()` reads a recipe, follows its `base:` chain, applies command-line `key=value` overrides,
checks everything, and returns a plain `Recipe` dataclass. Any problem becomes a `RecipeError` whose message
is one line naming the key and the file it came from; the CLI prints it and exits with status 2.

A rule about one section is that section's `__post_init__` (OmegaConf.to_object runs it; it raises `Invalid`
with the key inside the section); files named by the recipe are checked once their paths are resolved
(`_check_files`); only the rules that span sections are in `_check`. Closed sets of values are `Choice` enums.

Relative paths in a recipe are resolved against the current directory (where you run `make`), and the
resolved recipe saved in a run directory holds absolute paths, so `make train RECIPE=runs/<name>/recipe.yaml`
repeats the run from anywhere.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import glob
import os
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class RecipeError(Exception):
    """A problem with a recipe, in one line that names the key and the file."""


class Invalid(ValueError):
    """Raised by a section's `__post_init__`: `key` is inside the section (None: the section itself); `load`
    turns it into a RecipeError naming the full key and the file."""

    def __init__(self, section, key: Optional[str], why: str):
        super().__init__(f"{key or type(section).__name__}: {why}")
        self.section_type, self.key, self.why = type(section), key, why


class Choice(str, Enum):
    """One of a closed set of strings. A member compares, hashes, formats and serializes (json) as its value, and
    its name is its value, so the YAML that OmegaConf writes (names) reads back the same."""

    def __init__(self, value: str):
        if self.name != value:
            raise ValueError(f"{type(self).__name__}.{self.name}: a choice's name must be its value, got {value!r}")

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def opt(default: Any = MISSING, help: str = "", path: bool = False):
    """A schema field with its one-line meaning; `path=True` marks values resolved against the current dir."""
    meta = {"help": help, "path": path}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value):
    import copy

    return copy.deepcopy(value)


# ----------------------------------------------------------------------------------------------------- choices
class Launcher(Choice):
    auto = "auto"
    local = "local"
    slurm = "slurm"


class RowFormat(Choice):
    alpaca = "alpaca"
    messages = "messages"
    completion = "completion"


class PromptStyle(Choice):
    instruct = "instruct"
    chat = "chat"


class TooLong(Choice):
    truncate = "truncate"
    drop = "drop"


class DType(Choice):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class ServeEngine(Choice):
    vllm = "vllm"
    hf = "hf"


# "8bit" is not a Python name, so this one is built by name.
Quantization = Choice("Quantization", [(v, v) for v in ("none", "8bit", "4bit")], module=__name__,
                      qualname="Quantization")


class QuantType(Choice):
    nf4 = "nf4"
    fp4 = "fp4"


class LrScheduler(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class Optimizer(Choice):
    adamw_torch = "adamw_torch"
    adamw_8bit = "adamw_8bit"
    adam_8bit = "adam_8bit"


class Precision(Choice):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def _tristate(section, *names: str) -> None:
    """true, false or auto (YAML reads on/off/yes/no as booleans too)."""
    for name in names:
        value = getattr(section, name)
        if value not in (True, False, "auto"):
            raise Invalid(section, name, f"{value!r} is not one of true, false, auto")


def _positive(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise Invalid(section, name, f"must be positive, got {value}")


# ----------------------------------------------------------------------------------------------------- schema
@dataclass
class RunConfig:
    name: str = opt(help="Name of the run; the run directory is runs/<name> unless run.dir is set.")
    dir: Optional[str] = opt(None, "Run directory (default: runs/<run.name>).", path=True)
    group: Optional[str] = opt(None, "Unix group to share the run directory and the data cache with (default: private "
                               "to you: 0700 dirs, 0600 files).")
    seed: int = opt(42, "Seed for model init, LoRA init, data order and sampling.")
    launcher: Launcher = opt(Launcher.auto, "Executor: slurm, local (this machine, no Slurm), or auto (slurm if "
                             "sbatch is on PATH).")

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise Invalid(self, "name", f"{self.name!r} is not a usable directory name")


@dataclass
class DataSource:
    path: str = opt(help="A JSON/JSONL/Parquet file or glob, a directory saved with `datasets`, or a hub data set name.",
                    path=True)
    format: RowFormat = opt(RowFormat.alpaca, "Row format: alpaca (instruction/input/output), messages (role/content "
                            "turns), completion (raw text).")
    split: str = opt("train", "Split to read when the source is a saved DatasetDict or a hub data set.")
    max_rows: Optional[int] = opt(None, "Read at most this many rows from this source (quick runs).")
    fields: Dict[str, str] = opt({}, "Field names of this source where they differ from the format's, format name: "
                                 "source name (e.g. {output: response, messages: conversations}).")


@dataclass
class DataConfig:
    sources: List[DataSource] = opt(help="Where the examples come from; several sources are mixed.")
    prompt_style: PromptStyle = opt(PromptStyle.instruct, "Alpaca prompt style of the notebook: instruct "
                                    "(### Instruction/### Response) or chat (USER:/ASSISTANT:).")
    chat_template: Optional[str] = opt(None, "Jinja chat template for `messages` rows (default: the tokenizer's, "
                                       "else ftlib.data.formats.DEFAULT_CHAT_TEMPLATE).")
    sequence_len: int = opt(256, "Maximum tokens per training sequence.")
    train_on_inputs: bool = opt(False, "Also train on prompt tokens (default: prompt labels are -100).")
    too_long: TooLong = opt(TooLong.truncate, "What to do with rows longer than sequence_len.")
    num_shards: int = opt(2, "Number of preprocessing shards (array tasks).")
    eval_fraction: float = opt(0.02, "Fraction of rows held out for evaluation.")
    split_seed: int = opt(42, "Seed of the train/eval split (independent of the number of shards).")
    packing: bool = opt(False, "Pack several examples into each sequence_len window (no padding, no cross-attention).")
    pack_to: Optional[int] = opt(None, "With packing: tokens per packed row (default: sequence_len); examples are "
                                 "still cut at sequence_len, so a longer row holds more of the same examples.")
    max_bad_fraction: float = opt(0.01, "Fail preprocessing when more than this fraction of rows is malformed "
                                  "(checked in each shard).")
    cache_dir: str = opt("cache/tokenized", "Where tokenized shards are written, keyed by a fingerprint.", path=True)

    def __post_init__(self):
        if not self.sources:
            raise Invalid(self, "sources", "at least one data source is required")
        _positive(self, "sequence_len", "num_shards")
        if not 0 <= self.eval_fraction < 1:
            raise Invalid(self, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise Invalid(self, "max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        if self.pack_to is not None:
            if not self.packing:
                raise Invalid(self, "pack_to", "needs data.packing: true")
            if self.pack_to < self.sequence_len:
                raise Invalid(self, "pack_to", f"{self.pack_to} is shorter than data.sequence_len "
                              f"({self.sequence_len})")

    @property
    def row_len(self) -> int:
        """Tokens per training row at most: the packed row's length, or sequence_len."""
        return (self.pack_to or self.sequence_len) if self.packing else self.sequence_len


@dataclass
class ModelConfig:
    name_or_path: str = opt(help="Base model: a local directory or a hub name.", path=True)
    tokenizer: Optional[str] = opt(None, "Tokenizer (default: the model's).", path=True)
    trust_remote_code: bool = opt(False, "Run code shipped with the model (only for models you trust).")
    dtype: DType = opt(DType.float32, "Dtype of the unquantized weights.")
    quantization: Quantization = opt(Quantization["none"], "Quantize the frozen base with bitsandbytes.")
    quant_type: QuantType = opt(QuantType.nf4, "4-bit quantization type.")
    double_quant: bool = opt(True, "4-bit: also quantize the quantization constants.")
    compute_dtype: DType = opt(DType.bfloat16, "4-bit: dtype of the matmuls.")
    gradient_checkpointing: Union[bool, str] = opt("auto", "Recompute activations in the backward pass to save memory: "
                                                   "true (every decoder layer), false, or auto (every n-th layer, the "
                                                   "fewest that fit fast_path.memory_gb; see ftlib/fastpath.py).")
    pad_token: Optional[str] = opt(None, "Pad token to use when the tokenizer has none (default: the EOS token).")
    attn_implementation: Optional[str] = opt(None, "Attention kernel (eager, sdpa, flash_attention_2, flex_attention); "
                                             "default: the fast path's choice (fast_path.attention).")

    def __post_init__(self):
        _tristate(self, "gradient_checkpointing")


@dataclass
class LoraConfig:
    r: int = opt(8, "LoRA rank.")
    alpha: int = opt(16, "LoRA alpha (scaling = alpha / r).")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: List[str] = opt(["all-linear"], "Modules that get adapters (names, or all-linear).")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).")

    def __post_init__(self):
        _positive(self, "r")


@dataclass
class DeepSpeedConfig:
    enabled: bool = opt(True, "Train under DeepSpeed (otherwise plain DDP).")
    zero_stage: int = opt(2, "ZeRO stage: 0, 1, 2 or 3.")
    offload_optimizer: bool = opt(False, "Keep optimizer states on the CPU.")
    offload_params: bool = opt(False, "ZeRO-3: keep parameters on the CPU.")
    config_file: Optional[str] = opt(None, "Your own DeepSpeed JSON instead of the generated one.", path=True)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise Invalid(self, "zero_stage", f"{self.zero_stage!r} is not one of 0, 1, 2, 3")
        if self.offload_params and self.zero_stage != 3:
            raise Invalid(self, "offload_params", "parameter offload needs zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise Invalid(self, "offload_optimizer", "optimizer offload needs zero_stage 1, 2 or 3")


@dataclass
class FastPathConfig:
    """Each part: auto (ftlib/fastpath.py decides for the device and recipe), true (fail where it cannot run), false."""
    attention: Union[bool, str] = opt("auto", "Attention over packed rows that builds no dense mask and stores no "
                                      "attention probabilities: FlashAttention 2 (by position ids) where installed, "
                                      "else torch's flex_attention; GPU only (auto keeps sdpa on CPU). "
                                      "model.attn_implementation, if set, wins.")
    loss: Union[bool, str] = opt("auto", "Head + cross-entropy without a micro-batch's vocabulary logits in fp32 at "
                                 "once: Liger Kernel's fused linear cross-entropy on a GPU, a chunked loss elsewhere.")
    kernels: Union[bool, str] = opt("auto", "Liger Kernel's fused RMSNorm, SwiGLU and RoPE (Triton: CUDA GPUs, the "
                                    "model types Liger supports).")
    compile: Union[bool, str] = opt("auto", "torch.compile of every decoder layer (auto: off until bench/gpu_lora.py "
                                    "shows it pays).")
    lora_dtype: Union[bool, str] = opt("auto", "LoRA matmuls in the mixed-precision dtype (fp16/bf16) on the layer's "
                                       "input itself, instead of on an fp32 copy of it.")
    zero3: Union[bool, str] = opt("auto", "With deepspeed.zero_stage 3: auto keeps ZeRO-3 only where the base does not "
                                  "fit one GPU (else ZeRO-2: no parameters gathered per layer); true keeps it; false "
                                  "uses ZeRO-2.")
    memory_gb: Optional[float] = opt(None, "Memory one training rank may use, GB, for model.gradient_checkpointing: "
                                     "auto (default: 90% of the GPU's; on CPU resources.train.mem_gb per task).")

    def __post_init__(self):
        _tristate(self, "attention", "loss", "kernels", "compile", "lora_dtype", "zero3")
        if self.memory_gb is not None:
            _positive(self, "memory_gb")


@dataclass
class TrainConfig:
    epochs: float = opt(3.0, "Passes over the training set.")
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: use epochs).")
    global_batch_size: int = opt(16, "Sequences per optimizer step over all ranks.")
    micro_batch_size: int = opt(4, "Sequences per forward pass per rank.")
    learning_rate: float = opt(2e-4, "Peak learning rate.")
    weight_decay: float = opt(0.0, "Weight decay.")
    lr_scheduler: LrScheduler = opt(LrScheduler.cosine, "Learning-rate schedule after warmup.")
    warmup_steps: int = opt(10, "Linear warmup steps.")
    optimizer: Optimizer = opt(Optimizer.adamw_torch, "Optimizer: adamw_torch, or bitsandbytes' adamw_8bit / "
                               "adam_8bit (the notebook's).")
    precision: Precision = opt(Precision.fp32, "Mixed precision.")
    max_grad_norm: float = opt(1.0, "Gradient clipping (0 disables).")
    logging_steps: int = opt(10, "Log train loss every this many steps.")
    eval_steps: int = opt(50, "Evaluate every this many steps.")
    save_steps: int = opt(1000, "Checkpoint every this many steps.")
    save_total_limit: int = opt(3, "Keep at most this many checkpoints.")
    rendezvous_timeout_s: int = opt(300, "Fail, naming the missing ranks, if not all ranks join within this time.")
    stall_timeout_s: int = opt(300, "End the job, naming the rank, when no rank has made progress for this long (at "
                               "least 3x the slowest step, evaluation or checkpoint seen in the run); collectives time "
                               "out 60 s later. Raise it for runs whose single steps take minutes.")
    sample_prompts: List[str] = opt(["Give three tips for staying healthy."],
                                    "Instructions whose generations are logged at each evaluation.")
    sample_max_new_tokens: int = opt(32, "Tokens generated per sample prompt.")

    def __post_init__(self):
        _positive(self, "global_batch_size", "micro_batch_size", "eval_steps", "save_steps", "logging_steps",
                  "learning_rate")
        if self.stall_timeout_s < 10:
            raise Invalid(self, "stall_timeout_s", f"must be at least 10 s, got {self.stall_timeout_s}")


@dataclass
class ServeConfig:
    enabled: bool = opt(False, "Run the serve stage after training in `make train`.")
    model_name: Optional[str] = opt(None, "Name clients use for this run's adapter (default: run.name).")
    adapters: Dict[str, str] = opt({}, "More LoRA adapters to serve, name: path.")
    replicas: int = opt(1, "Serve replicas (fixed) when autoscaling is off.")
    autoscaling: bool = opt(False, "Scale replicas between min_replicas and max_replicas.")
    min_replicas: int = opt(1, "Autoscaling lower bound.")
    max_replicas: int = opt(2, "Autoscaling upper bound.")
    cpus_per_replica: float = opt(1.0, "CPUs each replica reserves.")
    gpus_per_replica: float = opt(0.0, "GPUs each replica reserves.")
    max_batch_size: int = opt(8, "Concurrent requests batched into one generate call (1: no batching).")
    batch_wait_timeout_s: float = opt(0.01, "How long a batch waits to fill (a lone request waits this long).")
    port: int = opt(0, "HTTP port (0: a free port chosen per job).")
    http_host: Optional[str] = opt(None, "Address the HTTP proxy binds (default: the head node's address; 0.0.0.0: "
                                   "every interface).")
    max_new_tokens: int = opt(256, "Upper limit a request may ask for.")
    default_max_new_tokens: int = opt(64, "max_tokens when a request gives none.")
    max_num_beams: int = opt(4, "Upper limit on beams.")
    max_prompts_per_request: int = opt(16, "Prompts one request may carry (a list in `POST /` or in `prompt`).")
    max_concurrent_requests: int = opt(64, "Requests a replica works on at once; as many more wait, then 503.")
    startup_timeout_s: int = opt(600, "Fail, naming the missing nodes, if the Ray nodes have not all joined and the "
                                 "app is not answering within this time.")
    dashboard: bool = opt(False, "Run Ray's dashboard (loopback only; costs about 1 GB of memory).")
    engine: ServeEngine = opt(ServeEngine.vllm, "vllm: vLLM under Ray Serve's LLM library (continuous batching, "
                              "multi-LoRA); hf: ftlib's batched HF generate. vllm falls back to hf, saying why, where "
                              "it cannot run (e.g. a head size vLLM's CPU backend lacks).")
    python: Optional[str] = opt(None, "serve.engine=vllm: the serving environment's Python (default: "
                                ".venv-serve/bin/python of this checkout).", path=True)
    max_lora_rank: Optional[int] = opt(None, "serve.engine=vllm: largest adapter rank (default: the largest of "
                                       "lora.r and the served adapters').")
    max_adapters: int = opt(8, "serve.engine=vllm: adapters held per replica (and per batch); more are swapped in.")
    vllm_kv_cache_gb: int = opt(1, "serve.engine=vllm on CPU: KV cache per replica, GiB.")
    vllm_env: Dict[str, str] = opt({}, "serve.engine=vllm: more environment variables of the engine's processes "
                                   "(vLLM's own tuning, e.g. VLLM_CPU_OMP_THREADS_BIND: 0-1).")

    def __post_init__(self):
        _positive(self, "max_batch_size", "replicas", "max_adapters", "vllm_kv_cache_gb", "max_new_tokens",
                  "default_max_new_tokens", "max_num_beams",
                  "max_prompts_per_request", "max_concurrent_requests")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise Invalid(self, "default_max_new_tokens", f"exceeds serve.max_new_tokens ({self.max_new_tokens})")
        if self.batch_wait_timeout_s < 0:
            raise Invalid(self, "batch_wait_timeout_s", f"must not be negative, got {self.batch_wait_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise Invalid(self, "port", f"must be 0 (choose one) or a port number, got {self.port}")
        if self.autoscaling and not 1 <= self.min_replicas <= self.max_replicas:
            raise Invalid(self, "min_replicas", "need 1 <= min_replicas <= max_replicas")


@dataclass
class StageResources:
    time_min: int = opt(60, "Time limit in minutes.")
    nodes: int = opt(1, "Nodes.")
    tasks_per_node: int = opt(1, "Tasks per node (one per GPU; in CPU mode, one process per task).")
    gpus_per_node: int = opt(0, "GPUs per node.")
    cpus_per_task: int = opt(1, "CPUs per task.")
    mem_gb: Optional[float] = opt(None, "Memory per node in GB (default: the cluster's default).")
    exclusive: bool = opt(False, "Whole nodes only (--exclusive).")
    array_parallelism: int = opt(64, "Array stage: at most this many tasks at once.")
    max_requeues: int = opt(20, "Times a job stopped by its time limit is requeued to continue where it stopped "
                            "(training checkpoints first); preemptions do not count.")
    stop_signal_s: int = opt(90, "Seconds before the time limit that Slurm signals the job (USR2), for training to "
                             "save a checkpoint and be requeued; allow for a slow filesystem.")

    def __post_init__(self):
        if self.nodes < 1 or self.tasks_per_node < 1 or self.cpus_per_task < 1 or self.time_min < 1:
            raise Invalid(self, None, "nodes, tasks_per_node, cpus_per_task and time_min must be at least 1")
        if not 10 <= self.stop_signal_s < self.time_min * 60:
            raise Invalid(self, "stop_signal_s", f"must be at least 10 and below time_min × 60 = {self.time_min * 60}"
                          f", got {self.stop_signal_s}")


class GpuRequest(Choice):
    gpus_per_node = "gpus_per_node"  # --gpus-per-node=[type:]N
    gres = "gres"                    # --gres=gpu[:type]:N (sites without cons_tres GPU options)
    gpus_per_task = "gpus_per_task"  # --gpus-per-task=[type:]1: Slurm binds one GPU to each task


@dataclass
class SiteSettings:
    partition: Optional[str] = opt(None, "Partition (default: the cluster's default).")
    account: Optional[str] = opt(None, "Account to charge.")
    qos: Optional[str] = opt(None, "Quality of service.")
    constraint: Optional[str] = opt(None, "Node features required (--constraint).")
    gpu_request: GpuRequest = opt(GpuRequest.gpus_per_node, "How the site asks for resources.<stage>.gpus_per_node "
                                  "GPUs: gpus_per_node (--gpus-per-node), gres (--gres=gpu:N) or gpus_per_task "
                                  "(--gpus-per-task=1, one task per GPU).")
    gpu_type: Optional[str] = opt(None, "GPU type in the request where the site has several (e.g. a100).")
    additional: Dict[str, str] = opt({}, "More #SBATCH options, name: value (e.g. reservation: myres).")
    setup: List[str] = opt([], "Shell lines run before the task (module load, source venv/bin/activate).")


@dataclass
class EarlyStopping:
    rungs: List[int] = opt([], "Optimizer steps at which a sweep's trials are compared (each an evaluation step: a "
                           "multiple of train.eval_steps); none: no early stopping.")
    stop_fraction: float = opt(0.5, "At a rung, a trial whose eval loss is among the worst this fraction of the trials "
                               "that reached the rung stops (successive halving).")
    min_trials: int = opt(2, "Compare only when at least this many trials (this one included) reached the rung.")

    def __post_init__(self):
        if not 0 < self.stop_fraction < 1:
            raise Invalid(self, "stop_fraction", f"must be in (0, 1), got {self.stop_fraction}")
        if self.min_trials < 2:
            raise Invalid(self, "min_trials", f"must be at least 2, got {self.min_trials}")
        if any(r <= 0 for r in self.rungs):
            raise Invalid(self, "rungs", f"must be positive steps, got {list(self.rungs)}")


@dataclass
class SweepConfig:
    grid: Dict[str, List[Any]] = opt({}, "Recipe keys and the values to try: every combination is a trial "
                                     "(e.g. {train.learning_rate: [1e-4, 3e-4], lora.r: [8, 16]}).")
    random: Dict[str, Dict[str, Any]] = opt({}, "Recipe keys and how to draw them: {log_uniform: [lo, hi]}, "
                                            "{uniform: [lo, hi]}, {int_uniform: [lo, hi]} or {choice: [a, b]}; "
                                            "sweep.samples draws per grid point.")
    samples: int = opt(0, "Random draws of the `random` keys (per grid point when there is a grid).")
    seed: int = opt(0, "Seed of the random draws.")
    parallelism: int = opt(4, "Trials that train at once (the training array's %limit).")
    max_trials: int = opt(64, "Refuse sweeps of more trials than this.")
    early_stopping: EarlyStopping = opt(EarlyStopping(), "Stop the worst trials at rungs (successive halving).")
    trial: Optional[str] = opt(None, "Set in each trial's own recipe: its name in the sweep, whose folder is the run "
                               "directory's parent.")

    def __post_init__(self):
        if self.parallelism < 1 or self.max_trials < 1 or self.samples < 0:
            raise Invalid(self, None, "parallelism and max_trials must be at least 1, samples at least 0")

    @property
    def enabled(self) -> bool:
        """This recipe describes a sweep (not a single run, nor one trial of a sweep)."""
        return bool(self.grid or self.samples)


STAGES = ("preprocess", "train", "serve")


@dataclass
class ResourcesConfig:
    preprocess: StageResources = opt(StageResources(time_min=30, cpus_per_task=1), "Tokenization array job.")
    train: StageResources = opt(StageResources(time_min=240), "Training job.")
    serve: StageResources = opt(StageResources(time_min=120), "Ray Serve job.")

    def __post_init__(self):
        t = self.train
        if t.gpus_per_node and t.gpus_per_node != t.tasks_per_node:
            raise Invalid(self, "train.tasks_per_node", f"training runs one task per GPU: set it to gpus_per_node "
                          f"({t.gpus_per_node}), got {t.tasks_per_node}")


@dataclass
class SlurmConfig:
    preprocess: SiteSettings = opt(SiteSettings(), "Tokenization array job.")
    train: SiteSettings = opt(SiteSettings(), "Training job.")
    serve: SiteSettings = opt(SiteSettings(), "Ray Serve job.")


@dataclass
class Recipe:
    run: RunConfig = opt(RunConfig(), "The run: name, directory, group, seed, executor.")
    data: DataConfig = opt(DataConfig(), "Data sources, prompt format, tokenization and preprocessing.")
    model: ModelConfig = opt(ModelConfig(), "Base model and quantization.")
    lora: LoraConfig = opt(LoraConfig(), "LoRA adapter.")
    deepspeed: DeepSpeedConfig = opt(DeepSpeedConfig(), "DeepSpeed (ZeRO, offload).")
    fast_path: FastPathConfig = opt(FastPathConfig(), "What makes training fast, part by part (ftlib/fastpath.py "
                                    "decides auto per device and recipe; the train log's first lines say what and "
                                    "why).")
    train: TrainConfig = opt(TrainConfig(), "Optimization, evaluation and checkpointing.")
    serve: ServeConfig = opt(ServeConfig(), "The Ray Serve endpoint.")
    resources: ResourcesConfig = opt(ResourcesConfig(), "Resources per stage: these size every stage, on Slurm and "
                                     "in local runs.")
    slurm: SlurmConfig = opt(SlurmConfig(), "Site settings per stage: only the Slurm launcher reads these.")
    sweep: SweepConfig = opt(SweepConfig(), "A sweep: many trainings of this recipe with other values "
                             "(`make sweep`); each trial is a run of its own.")

    # Not part of the schema: the values load() took from the environment through ${oc.env:NAME} (a token, say),
    # which redact() keeps out of the saved recipe and the dry run.
    env_values = {}

    # Derived values used by several stages (one place computes them).
    @property
    def world_size(self) -> int:
        return self.resources.train.nodes * self.resources.train.tasks_per_node

    @property
    def served_model_name(self) -> str:
        return self.serve.model_name or self.run.name


# ----------------------------------------------------------------------------------------------------- loading
def load(path: str | os.PathLike, overrides: List[str] = ()) -> Recipe:
    """Read a recipe file (following `base:`), apply `key=value` overrides, validate, resolve paths."""
    cfg = OmegaConf.structured(Recipe)
    for layer, source in _layers(Path(path)):
        cfg = _merge(cfg, layer, source)
    for override in overrides:
        cfg = _apply_override(cfg, override)
    top = f"{path} (with command-line overrides)" if overrides else str(path)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeError(f"{top}: {missing[0]}: required value is missing")
    try:
        recipe: Recipe = OmegaConf.to_object(cfg)  # runs every section's __post_init__
    except Invalid as e:
        raise RecipeError(f"{top}: {_locate(cfg, e)}: {e.why}") from None
    except OmegaConfBaseException as e:
        raise RecipeError(f"{top}: {_key(e)}: {_reason(e, cfg)}") from None
    _resolve_paths(recipe)
    _check_files(recipe, top)
    _check(recipe, top)
    recipe.env_values = _env_values(cfg)
    return recipe


ENV_REFERENCE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")


def _env_values(cfg: DictConfig) -> Dict[str, str]:
    """{NAME: value} of every environment variable the recipe's files interpolate with ${oc.env:NAME}."""
    names = set(ENV_REFERENCE.findall(OmegaConf.to_yaml(cfg)))  # unresolved: the interpolations as written
    return {name: os.environ[name] for name in sorted(names) if os.environ.get(name)}


def redact(text: str, recipe: Recipe) -> str:
    """`text` with each value the recipe took from the environment written back as ${oc.env:NAME}, so that a
    secret passed that way appears in no file or output of ours; loading the text again resolves it again.
    Values under 4 characters are left alone (they would match everywhere and are no secret)."""
    for name, value in sorted(recipe.env_values.items(), key=lambda kv: -len(kv[1])):
        if len(value) >= 4:
            text = text.replace(value, "${oc.env:" + name + "}")
    return text


def _layers(path: Path, seen: tuple = ()) -> List[tuple]:
    """The recipe's YAML layers, base first, each with its file name (for error messages)."""
    if not path.is_file():
        where = f"{seen[-1]}: base" if seen else "recipe"
        raise RecipeError(f"{where}: file not found: {path}")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: base: recipes inherit from each other in a cycle")
    try:
        layer = OmegaConf.load(path)  # a safe YAML loader: no code runs
    except Exception as e:  # yaml.YAMLError and friends
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(layer, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(layer).__name__}")
    base = layer.pop("base", None)
    if base is None:
        return [(layer, str(path))]
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: expected a file name, got {base!r}")
    parent = (path.parent / base) if not os.path.isabs(base) else Path(base)
    return _layers(parent, seen + (path.resolve(),)) + [(layer, str(path))]


def _apply_override(cfg: DictConfig, override: str) -> DictConfig:
    """`key=value` from the command line; value is parsed as YAML (numbers, lists, mappings)."""
    key, eq, text = override.partition("=")
    if not eq or not key:
        raise RecipeError(f"command line: override {override!r} is not of the form key=value")
    try:
        value = OmegaConf.from_dotlist([f"v={text}"]).v
        OmegaConf.update(cfg, key.strip(), value, merge=True)
    except OmegaConfBaseException as e:
        raise RecipeError(f"command line: {_key(e) or key}: {_reason(e, cfg)}") from None
    except Exception as e:  # a YAML syntax error in the value
        raise RecipeError(f"command line: {key}: cannot parse value {text!r}: {' '.join(str(e).split())}") from None
    return cfg


def _merge(cfg: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as e:
        raise RecipeError(f"{source}: {_key(e)}: {_reason(e, cfg)}") from None
    except TypeError as e:  # e.g. a mapping where the schema has a list
        raise RecipeError(f"{source}: {e}") from None


def _key(e: OmegaConfBaseException) -> str:
    return getattr(e, "full_key", None) or "?"


# Keys of the old schema, where slurm.<stage> held the resources too: slurm.train.nodes -> resources.train.nodes.
MOVED = {f"slurm.{stage}.{f.name}": f"resources.{stage}.{f.name}"
         for stage in STAGES for f in dataclasses.fields(StageResources)}


def _reason(e: OmegaConfBaseException, cfg: DictConfig) -> str:
    msg = str(e).split("\n")[0]
    if "Key '" in msg and "not in" in msg:
        if _key(e) in MOVED:
            return f"moved to {MOVED[_key(e)]}"
        return "unknown key" + _suggest(cfg, _key(e))
    choice = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)  # a Choice field
    if choice:
        return f"{choice[1]!r} is not one of {choice[2]}"
    return msg.replace("Value '", "value '").rstrip(".")


def _locate(cfg: DictConfig, e: Invalid) -> str:
    """The full key of an `Invalid` raised by a section's __post_init__: the first section of that type (in schema
    order) whose construction fails, e.g. resources.train or data.sources[1], then the key inside it."""
    def sections(node, where: str):
        if isinstance(node, DictConfig):
            yield where, node
        for k in (node.keys() if isinstance(node, DictConfig) else range(len(node))):
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from sections(child, node._get_full_key(k))  # data.sources[1], resources.train

    for where, node in sections(cfg, ""):
        if OmegaConf.get_type(node) is e.section_type:
            try:
                OmegaConf.to_object(node)
            except Invalid as again:
                if again.section_type is e.section_type:
                    return ".".join(k for k in (where, e.key) if k)
    return e.key or "?"


def _suggest(cfg: DictConfig, full_key: str) -> str:
    parent_key, _, name = full_key.rpartition(".")
    node = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if "[" in name:  # list element: sources[0].pth -> the element's schema
        name = name.split("]")[-1].lstrip(".")
    if isinstance(node, ListConfig) and len(node):
        node = node[0]
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(name, [str(k) for k in keys], n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(map(str, keys))})"


def _walk(obj, prefix=""):
    """(dotted key, owner dataclass, field) for every schema field, lists of dataclasses included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        yield key, obj, f
        if dataclasses.is_dataclass(value):
            yield from _walk(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _walk(item, f"{key}[{i}].")


DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".gz", ".arrow")


def _looks_local(value: str) -> bool:
    """A hub name ("org/name") stays as it is; anything that exists or looks like a path is a local path."""
    return (value.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(value))
            or value.endswith(DATA_SUFFIXES) or any(ch in value for ch in "*?["))


def _resolve_paths(recipe: Recipe) -> None:
    for key, owner, f in _walk(recipe):
        value = getattr(owner, f.name)
        if f.metadata.get("path") and isinstance(value, str) and value:
            # A hub name (org/model) stays as it is; anything that exists or looks like a path becomes absolute.
            if f.name in ("name_or_path", "tokenizer", "path") and not _looks_local(value):
                continue
            setattr(owner, f.name, str(Path(os.path.expanduser(value)).resolve()))
    recipe.serve.adapters = {k: str(Path(os.path.expanduser(v)).resolve()) for k, v in recipe.serve.adapters.items()}
    if recipe.run.dir is None:  # after load(), run.dir is always set and absolute
        recipe.run.dir = str(Path("runs").resolve() / recipe.run.name)


def _check_files(r: Recipe, top: str) -> None:
    """Local files the recipe names must exist (checked once their paths are resolved)."""

    def fail(key: str, why: str):
        raise RecipeError(f"{top}: {key}: {why}")

    for i, s in enumerate(r.data.sources):
        local = s.path.startswith("/")
        if local and not glob.glob(s.path):
            fail(f"data.sources[{i}].path", f"no file matches {s.path}")
    for key in ("model.name_or_path", "model.tokenizer", "deepspeed.config_file"):
        section, name = key.split(".")
        value = getattr(getattr(r, section), name)
        if value and value.startswith("/") and not os.path.exists(value):
            fail(key, f"not found: {value}")
    for name, p in r.serve.adapters.items():
        if not os.path.exists(p):
            fail(f"serve.adapters.{name}", f"not found: {p}")


def _check(r: Recipe, top: str) -> None:
    """The rules that span sections (each section checks its own values in its __post_init__)."""

    def fail(key: str, why: str):
        raise RecipeError(f"{top}: {key}: {why}")

    if r.train.global_batch_size % (r.train.micro_batch_size * r.world_size):
        fail("train.global_batch_size", f"{r.train.global_batch_size} is not divisible by micro_batch_size × world "
             f"size = {r.train.micro_batch_size} × {r.world_size} (resources.train.nodes × tasks_per_node)")
    if r.model.quantization == "8bit" and r.deepspeed.enabled and r.deepspeed.zero_stage == 3:
        fail("model.quantization", "8-bit bases cannot be sharded by ZeRO-3; use 4bit (QLoRA) or zero_stage <= 2")
    if r.deepspeed.offload_optimizer and r.train.optimizer != "adamw_torch":
        fail("train.optimizer", f"{r.train.optimizer} cannot run on offloaded optimizer states (DeepSpeed's CPU "
             "Adam does); use adamw_torch or deepspeed.offload_optimizer: false")
    if r.train.precision == "fp16" and r.model.dtype == "bfloat16":
        fail("train.precision", "fp16 mixed precision with bfloat16 weights; use bf16")
    off = [s for s in r.sweep.early_stopping.rungs if s % r.train.eval_steps]
    if off:
        fail("sweep.early_stopping.rungs", f"step {off[0]} is not an evaluation step (a multiple of "
             f"train.eval_steps={r.train.eval_steps}): trials are compared on their eval loss")
    if r.fast_path.lora_dtype is True and r.train.precision == "fp32":
        fail("fast_path.lora_dtype", "true needs mixed precision (train.precision fp16 or bf16): in fp32 the LoRA "
             "matmuls already run in the weights' dtype")


# ----------------------------------------------------------------------------------------------------- saving
def to_yaml(recipe: Recipe) -> str:
    return redact(OmegaConf.to_yaml(OmegaConf.structured(recipe)), recipe)


def save(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe atomically (a reader never sees half a file)."""
    from ftlib.rundir import write_atomic

    write_atomic(path, to_yaml(recipe))


README_START, README_END = "<!-- recipe reference: generated by `make schema` -->", "<!-- end of recipe reference -->"


def update_readme(readme: str | os.PathLike) -> None:
    """Replace the README's recipe reference with the one generated from the schema (so they cannot drift)."""
    text = Path(readme).read_text()
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    Path(readme).write_text(f"{head}{README_START}\n{schema_reference()}{README_END}{tail}")


def schema_reference() -> str:
    """Markdown table of every key (the README's recipe reference is generated from this)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls, defaults, prefix):
        """`defaults`: the section's default instance (per-stage defaults differ), or None for list items."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, t, help = prefix + f.name, hints[f.name], f.metadata.get("help", "")
            default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
            if dataclasses.is_dataclass(t):
                lines.append(f"| `{key}` | section | | {help} |")
                walk(t, default, key + ".")
                continue
            shown = "required" if default is MISSING else f"`{json.dumps(default)}`".replace("|", "\\|")
            values = [c.value for c in _choice_of(t) or ()]
            extra = f" One of: {', '.join(values)}." if values else ""
            lines.append(f"| `{key}` | {_type_name(t)} | {shown} | {help}{extra} |")
            item = typing.get_args(t)[0] if typing.get_origin(t) is list else None
            if dataclasses.is_dataclass(item):  # data.sources: a list of sections
                walk(item, None, key + "[].")

    walk(Recipe, Recipe(), "")
    return "\n".join(lines) + "\n"


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING


def _choice_of(t) -> Optional[type]:
    """The Choice enum of a field type (Launcher, or Optional[Launcher]), else None."""
    for candidate in (t, *typing.get_args(t)):
        if isinstance(candidate, type) and issubclass(candidate, Choice):
            return candidate
    return None


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        return names + " or null" if type(None) in args else names
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if isinstance(t, type) and issubclass(t, Choice):
        return "str"  # written as a string; the allowed values follow the meaning
    return getattr(t, "__name__", str(t))
