"""Training: LoRA fine-tuning with the Hugging Face Trainer under DeepSpeed, one call per rank.

    outcome = train(recipe)     # in EVERY rank, with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
                                # MASTER_PORT set by the launcher (or none of them: a single process)

What one call does, top to bottom:
  1. installs SIGUSR1/SIGUSR2/SIGTERM handlers that only raise a flag (ftlib.stopping; restored before returning);
  2. joins the torch.distributed group (ftlib.distributed: fails within train.rendezvous_timeout_s naming the ranks
     that never came, instead of hanging);
  3. writes the DeepSpeed JSON generated from the recipe (or a copy of deepspeed.config_file) to the run directory;
  4. loads data, tokenizer and model (+ quantization + LoRA + the fast path's parts, chosen for this device and
     recipe by ftlib.fastpath and named in the log's first lines), builds the Trainer;
  5. resumes from the latest COMPLETE checkpoint in the run directory, if any (model, optimizer, scheduler, RNG,
     data position: the loss trajectory continues exactly), once rank 0 has checked its files against the sizes and
     sha256 its marker recorded: a damaged one is moved aside (one line naming it and the file) for the one before;
     with none intact, every rank stops (DamagedCheckpoint) instead of training on it. A checkpoint of the last
     step gives the adapter directly (resuming there would train a step past max_steps);
  6. trains. After every optimizer step the ranks agree (all-reduce) whether any of them got a signal; if so rank 0
     asks the launcher why (StopReason: launcher/jobs.py asks Slurm). A time limit or preemption: all save a complete
     checkpoint of this step and stop -> returns "interrupted" (the launcher requeues; the next call resumes by
     itself). A cancel: they save one if it fits in the site's grace time and stop -> returns "cancelled", for good.
     Meanwhile a watchdog thread on every rank (ftlib.watchdog) ends the job, naming the rank, when no rank has made
     progress for train.stall_timeout_s; collectives time out a minute after that, so nothing waits forever;
  7. otherwise writes the adapter atomically to adapter/ (with trained.json: the step it reached) -> "completed".
     A finished run whose recipe now asks for more steps continues from its last checkpoint instead.
A full disk or quota while a checkpoint is written fails every rank with one line (checkpoints.NoSpace: the folder,
the checkpoint, the space left) and leaves no marker; the rerun resumes from the last complete checkpoint.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import resource
import secrets
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import transformers
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from ftlib import checkpoints, fastpath, progress
from ftlib.data.collate import make_collator
from ftlib.data.formats import build_prompt
from ftlib.data.merge import load_splits
from ftlib.distributed import DistEnv, all_ranks_any, all_ranks_sum, backend, barrier, from_rank0, join, use_cpu_threads
from ftlib.errors import UserError
from ftlib.model import is_zero3, load_model, load_tokenizer
from ftlib.rundir import TRAINED, RunDir, more_steps_asked, publish_dir, read_json, trained_steps, write_json
from ftlib.stopping import Stop, stop_on
from ftlib.watchdog import Watchdog

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
JOB_ID_ENV = "FTLIB_JOB_ID"  # the launcher's id of this job ("12" or an array task's "12_3"), for the run's records
COLLECTIVE_MARGIN_S = 60  # collectives time out this long after the watchdog would have named a stalled rank
# Recipe optimizer -> TrainingArguments.optim ("adam_8bit", the notebook's bnb Adam8bit, is passed as a class).
OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}


def train(recipe, why_stopped: Optional[Callable[[Optional[int]], "StopReason"]] = None) -> str:
    """Train (or resume) the run of `recipe` in this rank. Returns "completed", "interrupted" (stopped by a signal
    after a complete checkpoint: the launcher requeues) or "cancelled" (stopped for good).

    `why_stopped(signum)` is the launcher's answer to "why did this stop signal come?" (launcher/jobs.py asks Slurm),
    called on rank 0 once the ranks agree to stop; without it every stop signal checkpoints and ends "interrupted"."""
    env = DistEnv.from_environ()
    run = RunDir.of(recipe)
    _quiet_libraries()
    threads = use_cpu_threads(env)  # before Accelerate would give every rank all the node's cores
    if recipe.deepspeed.enabled and recipe.resources.train.gpus_per_node == 0:
        _without_deepspeed_shm_op()
    with StopSignals() as stop, _single_process_env(env):
        # A collective that waits longer than the stall budget fails instead of hanging (the watchdog names the
        # stalled rank first); no stop path can hang until the time limit.
        join(env, recipe.train.rendezvous_timeout_s,
             collective_timeout=datetime.timedelta(seconds=recipe.train.stall_timeout_s + COLLECTIVE_MARGIN_S))
        _printer(env)(threads)
        try:
            outcome = _train(recipe, env, run, stop, why_stopped or interrupted)
            barrier()  # nobody leaves while another rank still writes
            return outcome
        finally:
            torch.distributed.destroy_process_group()


def _without_deepspeed_shm_op() -> None:
    """DeepSpeed on CPU JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm) when it sets up its
    communication: ~40 s of g++ on 2 cores the first time, again for every checkout or venv path, and a compiler on
    every node. Only its inference_all_reduce uses the op, which training never calls (gradients go through
    torch.distributed); where the op cannot be built, build_shm_op returns None and DeepSpeed runs without it, as
    training does here. The op would also share each rank's buffers through /dev/shm objects with predictable names
    (uid, address, port, rank) opened without O_EXCL, which another user could create first."""
    import importlib

    # By its module name: the attribute deepspeed.comm.torch is the torch package, which deepspeed.comm imports.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _train(recipe, env: DistEnv, run: RunDir, stop: Stop, why_stopped) -> str:
    say = _printer(env)
    if run.training_done:
        more = more_steps_asked(recipe)
        if more is None:
            say(f"already trained: {run.adapter} exists; nothing to do")
            return "completed"
        if checkpoints.latest_complete(run.checkpoints) is None:
            raise UserError(f"{more.split(':')[0]}, but {run.checkpoints} holds no complete checkpoint to continue "
                            f"from: start a new run (another run.name) to train that long")
        say(more)
        barrier()  # every rank has seen adapter/ before rank 0 moves it aside
        if env.rank == 0:
            publish_dir(run.adapter, run.root / f"adapter.step-{trained_steps(run)}")
    fast = fastpath.choose(recipe)  # what runs fast on this device, and why (ftlib/fastpath.py)
    for line in fast.lines:
        say(line)
    recipe = fast.recipe  # with the ZeRO stage the fast path chose
    refusal: Optional[UserError] = None
    if env.rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        for p in checkpoints.remove_incomplete(run.checkpoints):
            say(f"removed incomplete checkpoint {p.name} (no {checkpoints.MARKER} marker)")
        try:  # checks the newest complete checkpoint against its marker; moves damaged ones aside
            for note in checkpoints.resume_point(run.checkpoints)[1]:
                say(note)
        except checkpoints.DamagedCheckpoint as e:
            refusal = e
        if recipe.deepspeed.enabled:
            write_json(run.deepspeed, deepspeed_config(recipe, env.world_size))
    barrier()  # the DeepSpeed JSON exists, and no rank looks at a checkpoint rank 0 is removing or moving aside
    resume = checkpoints.latest_complete(run.checkpoints)  # on every rank: rank 0's choice

    tokenizer = load_tokenizer(recipe)
    train_ds, eval_ds = load_splits(recipe)
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    # TrainingArguments come before the model: under ZeRO-3 they make from_pretrained load it already sharded.
    args = training_arguments(recipe, env, run, evaluate=eval_ds is not None)
    if recipe.deepspeed.enabled:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend())  # adopts the group joined above (ZeRO-3 init needs it)
    refused = from_rank0(str(refusal) if refusal is not None else None)
    if refused is not None:  # every rank stops with the same line naming the file, none waits for the others
        raise checkpoints.DamagedCheckpoint(refused)
    if resume is not None and _finished_at(recipe, resume):
        # The run ended at this checkpoint but the adapter was never written: take it from the checkpoint. Resuming
        # would make the Trainer run one step past max_steps.
        if env.rank == 0:
            publish_adapter_from(resume, run, recipe)
        barrier()
        say(f"training had finished at {resume.name} (train.max_steps={recipe.train.max_steps}); adapter written "
            f"from it to {run.adapter}")
        return "completed"
    transformers.set_seed(recipe.run.seed)  # LoRA initialisation
    model = load_model(recipe, for_training=True, fast=fast)
    for line in fast.model_lines:
        say(line)
    if env.rank == 0:
        trainable, total = model.get_nb_trainable_parameters()
        say(f"model {recipe.model.name_or_path}: {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / total:.3f}%); {len(train_ds):,} training and "
            f"{len(eval_ds) if eval_ds is not None else 0:,} evaluation sequences; world size {env.world_size}, "
            f"gradient accumulation {args.gradient_accumulation_steps}")

    signal_stop = StopOnSignal(stop, say, why_stopped, env)
    rungs = SweepRungs(recipe, env, say)  # a sweep's trial: report eval losses, stop early if among the worst
    # A rank that stops making progress ends the job, named (ftlib.watchdog); started once training begins.
    watch = Watchdog(run, env, recipe.train.stall_timeout_s, from_rank0(secrets.token_hex(8)), say)
    writer = _tensorboard_writer(run, resume) if env.rank == 0 else None
    callbacks = [signal_stop, ProgressLines(say), SampleGenerations(recipe, tokenizer, writer, env, watch),
                 WatchProgress(watch)] + ([rungs] if recipe.sweep.trial else [])
    if writer is not None:
        callbacks.append(TensorBoardCallback(tb_writer=writer))
    trainer = LoraTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=make_collator(recipe, tokenizer), processing_class=tokenizer, callbacks=callbacks,
        optimizer_cls_and_kwargs=_notebook_adam8bit(recipe), keep_checkpoints=recipe.train.save_total_limit,
        watchdog=watch)
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; ProgressLines prints readable lines
    signal_stop.last_save_s = lambda: trainer.last_save_s
    if resume is not None:
        say(f"resuming from {resume} (step {checkpoints.step_of(resume)})")
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        say(f"peak memory: {_peak_memory_text()}", every_rank=True)
        if signal_stop.stopped:
            return _record_stop(signal_stop, trainer.state.global_step, run, env, say)
        if rungs.stopped is not None:
            return rungs.record(run, trainer.state.global_step)
        watch.progress()
        save_adapter(trainer, run, env)
    finally:
        watch.stop()
    say(f"adapter written to {run.adapter}")
    return "completed"


# ----------------------------------------------------------------------------------------------------- config
def deepspeed_config(recipe, world_size: Optional[int] = None) -> dict:
    """The DeepSpeed JSON for the recipe, or the user's own `deepspeed.config_file` (batch sizes, precision and
    clipping left as "auto" there are filled in by the Trainer)."""
    if recipe.deepspeed.config_file:
        with open(recipe.deepspeed.config_file) as f:
            return json.load(f)
    t, d = recipe.train, recipe.deepspeed
    world_size = world_size or recipe.world_size
    cuda = torch.cuda.is_available()
    zero: dict = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if d.zero_stage == 3:
        # The adapter is written from the gathered (unsharded) weights at the end and in every checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if d.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(recipe, world_size),
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,  # the Trainer prints progress; DeepSpeed's own lines would only repeat it
        "wall_clock_breakdown": False,
    }
    if d.offload_optimizer:
        # Offloaded optimizer states need DeepSpeed's CPU Adam: name the optimizer here (the schedule stays the
        # Trainer's). The recipe check rejects 8-bit optimizers with offload.
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": t.weight_decay}}
    return config


def gradient_accumulation_steps(recipe, world_size: int) -> int:
    """Global batch = micro-batch x accumulation x world size, for the world size we actually run with."""
    t = recipe.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size × "
                        f"world size = {t.micro_batch_size} × {world_size}")
    return t.global_batch_size // per_step


def training_arguments(recipe, env: DistEnv, run: RunDir, evaluate: bool = True) -> TrainingArguments:
    t = recipe.train
    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps(recipe, env.world_size),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        optim=OPTIMIZERS.get(t.optimizer, "adamw_torch"),
        max_grad_norm=t.max_grad_norm,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps,
        prediction_loss_only=True,  # evaluation needs the loss only; never gather vocabulary-sized logits
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # LoraTrainer rotates, counting only complete checkpoints
        seed=recipe.run.seed,
        data_seed=recipe.run.seed,
        deepspeed=str(run.deepspeed) if recipe.deepspeed.enabled else None,
        use_cpu=not torch.cuda.is_available(),  # else the Trainer reads world size 1 on a CPU-only host
        report_to="none",  # TensorBoard is added as a callback with our own writer (rank 0 only)
        disable_tqdm=True,  # Slurm logs get one plain line per logging step instead
        remove_unused_columns=False,  # the collator knows the columns (packing adds position_ids)
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        log_level="warning",
    )


def _notebook_adam8bit(recipe):
    """The notebook's optimizer (bitsandbytes Adam8bit), which TrainingArguments.optim has no name for."""
    if recipe.train.optimizer != "adam_8bit":
        return None
    import bitsandbytes as bnb

    return bnb.optim.Adam8bit, {"lr": recipe.train.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8}


# ----------------------------------------------------------------------------------------------------- trainer
class LoraTrainer(Trainer):
    """The HF Trainer plus: checkpoints marked complete after all ranks saved (and rotated only among complete
    ones), and tokens/s and padding fraction added to every training log."""

    def __init__(self, *args, keep_checkpoints: Optional[int] = None, watchdog: Optional[Watchdog] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.watchdog = watchdog
        self._tokens = torch.zeros(2, dtype=torch.float64)  # non-padding tokens, all tokens (this rank)
        self._clock: Optional[float] = None  # starts with the first training step, after all the set-up
        self._paused = 0.0  # seconds spent evaluating and saving since the last log
        self.last_save_s: Optional[float] = None  # how long the last checkpoint took (a cancel's grace time check)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._clock is None:
            self._clock = time.monotonic()
        if self.watchdog is not None:
            self.watchdog.progress(micro=True)
        real = count_real_tokens(inputs, self.processing_class.pad_token_id)
        self._tokens += torch.tensor([real, inputs["input_ids"].numel()], dtype=torch.float64)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log: the same call happens on every rank, so a collective is safe
            real, total = all_ranks_sum(self._tokens.tolist(), device=self.args.device)
            now = time.monotonic()
            seconds = max(now - (self._clock or now) - self._paused, 1e-9)
            logs["tokens"] = real  # non-padding tokens since the last log, all ranks
            logs["tokens_per_second"] = real / seconds
            logs["padding_fraction"] = 1 - real / total if total else 0.0
            self._tokens.zero_()
            self._clock, self._paused = now, 0.0
        super().log(logs, start_time)

    def prediction_step(self, *args, **kwargs):
        if self.watchdog is not None:
            self.watchdog.progress()  # each evaluation batch
        return super().prediction_step(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        started = time.monotonic()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._paused += time.monotonic() - started

    def _save_checkpoint(self, model, trial):
        started = time.monotonic()
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        # A full disk or quota on any rank: "no space left on <checkpoints>: writing checkpoint-N (... free)" and
        # no marker. A rank whose peer died of it gets a broken connection instead; its probe of the disk finds the
        # same. The rerun removes the partial folder and resumes from the last complete checkpoint.
        if self.watchdog is not None:
            self.watchdog.progress()
        with checkpoints.no_space_in_one_line(folder.parent, folder.name):
            super()._save_checkpoint(model, trial)
            barrier()  # every rank has written its shards and RNG state
            if self.args.should_save:
                checkpoints.mark_complete(folder, self.state.global_step)  # sizes and sha256 of every file
                checkpoints.rotate(folder.parent, self.keep_checkpoints)
        self.last_save_s = time.monotonic() - started
        self._paused += self.last_save_s


def count_real_tokens(batch, pad_token_id: int) -> int:
    """Tokens of a batch that are not padding. Padded batches say so in attention_mask; packed batches have none
    and end each row with a block of pad tokens that are never trained (labels -100), counted from the end."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    pad = (batch["input_ids"] == pad_token_id) & (batch["labels"] == -100)
    trailing = pad.flip(1).int().cumprod(1).sum()  # per row: length of the run of padding at its end
    return int(batch["input_ids"].numel() - trailing)


def save_adapter(trainer: Trainer, run: RunDir, env: DistEnv) -> None:
    """The LoRA adapter in PEFT format (adapter_config.json + adapter_model.safetensors) in adapter/, written to a
    temporary folder and renamed, so adapter/ is either absent or complete. All ranks call this (ZeRO-3 gathers)."""
    partial = run.root / "adapter.partial"
    if env.rank == 0 and partial.exists():
        shutil.rmtree(partial)
    barrier()
    trainer.save_model(str(partial))  # gathers ZeRO-3 shards; only rank 0 writes
    barrier()
    if env.rank == 0:
        (partial / "training_args.bin").unlink(missing_ok=True)  # the Trainer's extra, not part of an adapter
        t = trainer.args
        write_json(partial / TRAINED, {"global_step": trainer.state.global_step, "max_steps": t.max_steps,
                                       "epochs": t.num_train_epochs})
        publish_dir(partial, run.adapter)
    barrier()


def _finished_at(recipe, checkpoint: Path) -> bool:
    """The checkpoint is of the run's last step (train.max_steps) and holds the adapter. (Epoch-based runs end on an
    epoch boundary, where the Trainer itself trains no further.)"""
    steps = recipe.train.max_steps
    return 0 < steps <= checkpoints.step_of(checkpoint) and bool(checkpoints.adapter_files(checkpoint))


def publish_adapter_from(checkpoint: Path, run: RunDir, recipe) -> None:
    """adapter/ from the adapter files saved in a checkpoint (the same files save_adapter writes at that step)."""
    partial = run.root / "adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for f in checkpoints.adapter_files(checkpoint):
        shutil.copy2(f, partial / f.name)
    write_json(partial / TRAINED, {"global_step": checkpoints.step_of(checkpoint), "max_steps": recipe.train.max_steps,
                                   "epochs": recipe.train.epochs})
    publish_dir(partial, run.adapter)


# ----------------------------------------------------------------------------------------------------- signals
def StopSignals():  # noqa: N802 (the name callers know; it used to be a class)
    """While active, SIGUSR1 (Slurm's warning before the time limit), SIGUSR2 (preemption) and SIGTERM only set
    `received` (handlers in the main thread, see ftlib.stopping); the previous handlers come back on exit (the
    launcher's, e.g. submitit's requeue). Handlers, not a blocked mask: the data loaders and compilers training
    starts must still receive these signals."""
    return stop_on(STOP_SIGNALS)


@dataclass(frozen=True)
class StopReason:
    """Why a stop signal came, as the launcher tells it (launcher/jobs.py asks Slurm, never the signal alone).

    requeue=True   the job will run again (time limit near, preemption): every rank saves a checkpoint of this step
                   and training ends "interrupted"; the launcher requeues and the next run resumes there.
    requeue=False  the job is ending for good (cancelled): a checkpoint of this step is still written if it fits in
                   `grace_s` (the seconds Slurm leaves between its SIGTERM and its SIGKILL, KillWait), so that a later
                   `make train` resumes from it; training ends "cancelled" and nothing requeues it."""
    what: str
    requeue: bool
    grace_s: Optional[float] = None


def interrupted(signum: Optional[int]) -> StopReason:
    """Without a launcher to ask: checkpoint and end "interrupted"; the caller decides what follows."""
    name = signal.Signals(signum).name if signum else "a stop signal on another rank"
    return StopReason(name, requeue=True)


class StopOnSignal(TrainerCallback):
    """At every optimizer-step boundary all ranks agree whether any of them got a stop signal; if so, rank 0 asks
    the launcher why (StopReason) and every rank follows its answer: save a checkpoint of this step (skipping an
    evaluation that was due, to stay inside Slurm's grace time) unless a cancel leaves no time for one, and stop."""

    def __init__(self, stop: Stop, say, why_stopped: Callable[[Optional[int]], StopReason], env: DistEnv):
        self.stop, self.say, self.why_stopped, self.env = stop, say, why_stopped, env
        self.stopped = False
        self.reason: Optional[StopReason] = None
        self.saved = False  # a checkpoint of the stopping step was asked for
        self.signalled_at: Optional[float] = None  # time.time() of the signal, for the record
        self.last_save_s: Callable[[], Optional[float]] = lambda: None  # how long the run's last checkpoint took

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            return control  # the last step: training ends (with a checkpoint) and the adapter is written anyway
        if not all_ranks_any(self.stop.received is not None, device=args.device):
            return control
        decision = None
        if self.env.rank == 0:
            reason = self.why_stopped(self.stop.received)
            save, note = self._checkpoint_fits(reason)
            decision = (reason, save, note, time.time() - self._seconds_since_signal())
        self.reason, save, note, self.signalled_at = from_rank0(decision)
        self.stopped, self.saved = True, save
        step = state.global_step
        self.say(f"stop requested ({self.reason.what}): "
                 + (f"saving checkpoint-{step} on every rank" if save else f"no checkpoint of step {step}: {note}")
                 + ("" if self.reason.requeue else "; the job will not be requeued"))
        control.should_save = save
        control.should_evaluate = False
        control.should_training_stop = True
        return control

    def _seconds_since_signal(self) -> float:
        return time.monotonic() - self.stop.received_at if self.stop.received_at is not None else 0.0

    def _checkpoint_fits(self, reason: StopReason) -> Tuple[bool, str]:
        """Whether to write a checkpoint of this step, and if not, why. A requeue always saves (the next run needs
        it); a cancel saves if the last checkpoint's duration fits in what is left of the grace time (when nothing
        says how long one takes, it tries: an unfinished checkpoint has no marker and is never resumed from)."""
        if reason.requeue or reason.grace_s is None:
            return True, ""
        left = reason.grace_s - self._seconds_since_signal()
        took = self.last_save_s()
        if took is None or took * 1.2 < left:
            return True, ""
        return False, (f"the last checkpoint took {took:.0f} s and only {max(left, 0):.0f} s of the site's "
                       f"{reason.grace_s:.0f} s grace time (KillWait) are left")


def _record_stop(signal_stop: StopOnSignal, step: int, run: RunDir, env: DistEnv, say) -> str:
    """After a stop: say what happened and, on rank 0, write it to the run's stopped.json for `make status` and
    `make cancel` ({"how", "at", "step", "checkpoint", "job"}). Returns the outcome."""
    reason = signal_stop.reason
    kept = checkpoints.latest_complete(run.checkpoints)
    if env.rank == 0:
        at = datetime.datetime.fromtimestamp(signal_stop.signalled_at).isoformat(timespec="seconds")
        write_json(run.stopped, {"how": reason.what, "requeue": reason.requeue, "at": at, "step": step,
                                 "checkpoint": kept.name if kept else None,
                                 "job": os.environ.get(JOB_ID_ENV)})
    if reason.requeue:
        say(f"stopped ({reason.what}) after a complete checkpoint at step {step}")
        return "interrupted"
    say(f"{reason.what}: stopped after step {step}; "
        + (f"{kept.name} kept: `make train` with this recipe resumes from it" if kept else "no checkpoint kept"))
    return "cancelled"


# ----------------------------------------------------------------------------------------------------- logging
class ProgressLines(TrainerCallback):
    """One plain line per logging step (rank 0): readable in a Slurm log, unlike carriage-return progress bars."""

    def __init__(self, say):
        self.say = say

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.monotonic(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        head = f"step {state.global_step}/{state.max_steps}"
        if "loss" in logs:
            done = state.global_step - self.first_step
            eta = (time.monotonic() - self.started) / done * (state.max_steps - state.global_step) if done else 0
            self.say(f"{head} | loss {logs['loss']:.4f} | lr {logs.get('learning_rate', 0):.3g} | "
                     f"grad_norm {logs.get('grad_norm', float('nan')):.3g} | "
                     f"tokens/s {logs.get('tokens_per_second', 0):,.0f} | "
                     f"padding {100 * logs.get('padding_fraction', 0):.1f}% | eta {_duration(eta)}")
        elif "eval_loss" in logs:
            self.say(f"{head} | eval_loss {logs['eval_loss']:.4f}")


class SampleGenerations(TrainerCallback):
    """At each evaluation, greedy generations from the fixed `train.sample_prompts` (in the recipe's prompt style)
    go to TensorBoard as text, so a run's progress can be read, not only plotted."""

    def __init__(self, recipe, tokenizer, writer, env: DistEnv, watch: Optional[Watchdog] = None):
        self.watch = watch
        self.prompts = list(recipe.train.sample_prompts)
        self.max_new_tokens = recipe.train.sample_max_new_tokens
        self.recipe, self.tokenizer, self.writer, self.env = recipe, tokenizer, writer, env
        # ZeRO-3 shards the weights: every rank must take part in every forward pass of the generation.
        self.all_ranks = is_zero3(recipe)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.prompts or model is None or not (self.all_ranks or self.env.rank == 0):
            return
        was_training = model.training
        model.eval()
        texts = []
        with torch.no_grad():
            for instruction in self.prompts:
                if self.watch is not None:
                    self.watch.progress()
                prompt = build_prompt(instruction, self.recipe.data.prompt_style)  # as serving formats it
                enc = self.tokenizer(prompt, return_tensors="pt").to(args.device)
                out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=self.tokenizer.pad_token_id, synced_gpus=self.all_ranks)
                completion = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                texts.append(f"**{instruction}**\n\n{completion.strip()}")
        model.train(was_training)
        if self.writer is not None:
            for i, text in enumerate(texts):
                self.writer.add_text(f"samples/{i}", text, state.global_step)
            self.writer.flush()


class SweepRungs(TrainerCallback):
    """A sweep trial's side of early stopping (ftlib.sweep): rank 0 adds each eval loss to the trial's report in the
    sweep's folder; at a rung (sweep.early_stopping.rungs) it applies the successive-halving rule to the losses
    every trial reported there, and all ranks stop (checkpoint kept) if this trial is among the worst."""

    def __init__(self, recipe, env: DistEnv, say):
        self.recipe, self.env, self.say = recipe, env, say
        self.rule = recipe.sweep.early_stopping
        self.stopped: Optional[dict] = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        from ftlib import sweep

        step, loss = state.global_step, (metrics or {}).get("eval_loss")
        if loss is None:
            return control
        why = None
        if self.env.rank == 0:
            reports = sweep.record_eval(self.recipe, step, float(loss))
            if step in self.rule.rungs:
                at_rung = {t: r[str(step)] for t, r in reports.items() if str(step) in r}
                why = sweep.early_stop(step, self.recipe.sweep.trial, at_rung, self.rule)
        if step in self.rule.rungs:  # (every rank knows the rungs: the collective is called by all or none)
            why = from_rank0(why)
        if why:
            self.stopped = {"how": "stopped early", "why": why, "rung": step, "loss": float(loss)}
            self.say(f"{why}; saving checkpoint-{step} and stopping")
            control.should_save = True
            control.should_training_stop = True
        return control

    def record(self, run: RunDir, step: int) -> str:
        if self.env.rank == 0:
            kept = checkpoints.latest_complete(run.checkpoints)
            write_json(run.stopped, {**self.stopped, "requeue": False, "step": step, "job": os.environ.get(JOB_ID_ENV),
                                     "at": datetime.datetime.now().isoformat(timespec="seconds"),
                                     "checkpoint": kept.name if kept else None})
        return "stopped early"


class WatchProgress(TrainerCallback):
    """Starts the watchdog once training begins (after the model, optimizer and DeepSpeed are set up) and marks the
    end of every optimizer step, evaluation and checkpoint as progress."""

    def __init__(self, watch: Watchdog):
        self.watch = watch

    def on_train_begin(self, args, state, control, **kwargs):
        self.watch.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.watch.progress(step=state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.watch.progress()

    def on_save(self, args, state, control, **kwargs):
        self.watch.progress()


def _tensorboard_writer(run: RunDir, resume: Optional[Path]):
    from torch.utils.tensorboard import SummaryWriter

    # Resuming from step N: TensorBoard drops the events of steps after N that the interrupted attempt logged (and
    # a fresh start drops everything an attempt that never reached a checkpoint logged).
    purge = checkpoints.step_of(resume) + 1 if resume is not None else 0
    return SummaryWriter(log_dir=str(run.tensorboard), purge_step=purge)


# ----------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _single_process_env(env: DistEnv):
    """Without a launcher (WORLD_SIZE unset) Accelerate and DeepSpeed still want the variables of a 1-process
    group; set them for the duration of the call only."""
    if "WORLD_SIZE" in os.environ:
        yield
        return
    added = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    added = {k: v for k, v in added.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_libraries() -> None:
    """Keep Slurm logs readable: no weight-loading progress bars, no per-call bitsandbytes cast warnings."""
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: "inputs will be cast" not in record.getMessage())
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.\w+` is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing` is deprecated")


def _printer(env: DistEnv):
    """say(text): a progress line from rank 0; say(text, every_rank=True): one from each rank, naming it."""
    log = progress.logger("train")

    def say(text: str, every_rank: bool = False):
        if every_rank:
            log.info(f"rank {env.rank}: {text}")
        elif env.rank == 0:
            log.info(text)

    return say


def _peak_memory_text() -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    text = f"{rss:.2f} GiB RSS"
    if torch.cuda.is_available():
        text += f", {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB GPU"
    return text


def _duration(seconds: float) -> str:
    seconds = int(seconds) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
