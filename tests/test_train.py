"""Training with real DeepSpeed: two OS processes with the launcher's env vars, the tiny model, the sample data.

Each training test starts `python -c "... train(recipe) ..."` once per rank with RANK/LOCAL_RANK/WORLD_SIZE/
LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (what slurm/ sets per task), or without them (a single process), and
reads back what a user would: the outcome line, the run directory, TensorBoard events.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlib import checkpoints
from ftlib import recipe as recipe_mod
from ftlib.errors import UserError
from ftlib.rundir import RunDir
from tests.conftest import DEMO, ROOT

# A tiny schedule: 2 ranks x micro-batch 2 x accumulation 2 = 8 sequences per step.
TINY = ["train.max_steps=8", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
        "train.logging_steps=1", "train.eval_steps=4", "train.save_steps=4", "train.save_total_limit=1",
        "train.sample_max_new_tokens=8", "resources.train.nodes=2", "resources.train.tasks_per_node=1"]
SINGLE = ["resources.train.nodes=1", "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=4",
          "train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1", "train.warmup_steps=1",
          "train.sample_max_new_tokens=8", "train.save_total_limit=3"]

RANK_MAIN = """
import sys
from ftlib import recipe
from ftlib.train import train
print("OUTCOME", train(recipe.load(sys.argv[1])), flush=True)
"""


# ----------------------------------------------------------------------------------------------------- helpers
def make(folder: Path, *overrides: str):
    """A recipe whose run dir is folder/run, sharing one tokenized-data cache between the tests of this module."""
    cache = folder.parent / "shared-cache"
    return recipe_mod.load(DEMO, [f"run.dir={folder / 'run'}", f"data.cache_dir={cache}", *overrides])


def preprocess(recipe):
    from ftlib.data.preprocess import run_shard

    for i in range(recipe.data.num_shards):
        run_shard(recipe, i, recipe.data.num_shards)


class Ranks:
    """The training processes of one launch; `logs[rank]` is that rank's stdout+stderr."""

    def __init__(self, recipe, ranks=(0, 1), world_size=2, single=False, extra_env=None):
        self.folder = RunDir.of(recipe).root.parent
        path = self.folder / f"recipe-{time.monotonic_ns()}.yaml"
        recipe_mod.save(recipe, path)
        # Where rank 0 publishes the rendezvous (its port, the secret): what launcher.jobs.rank_environment sets.
        rendezvous = self.folder / f"rendezvous-{time.monotonic_ns()}.json"
        self.procs, self.log_paths = {}, {}
        for rank in ranks:
            env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k, None)
            if not single:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                           LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0",
                           FTLIB_RENDEZVOUS=str(rendezvous))
            log = self.folder / f"rank{rank}-{time.monotonic_ns()}.log"
            self.log_paths[rank] = log
            with open(log, "w") as out:
                self.procs[rank] = subprocess.Popen([sys.executable, "-c", RANK_MAIN, str(path)], env=env, cwd=ROOT,
                                                    stdout=out, stderr=subprocess.STDOUT)

    def log(self, rank=0) -> str:
        return self.log_paths[rank].read_text()

    def wait_for(self, text: str, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while text not in self.log(0):
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise AssertionError(f"{text!r} never appeared in rank 0's log:\n{self.log(0)[-3000:]}")
            time.sleep(0.2)

    def signal(self, sig):
        for p in self.procs.values():
            p.send_signal(sig)

    def finish(self, timeout: float = 240) -> dict:
        """{rank: outcome}; fails with the logs if a rank crashed or hung."""
        deadline = time.monotonic() + timeout
        for rank, p in self.procs.items():
            try:
                p.wait(max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in self.procs.values():
                    q.kill()
                raise AssertionError(f"rank {rank} hung:\n{self.log(rank)[-3000:]}")
        outcomes = {}
        for rank, p in self.procs.items():
            lines = [ln for ln in self.log(rank).splitlines() if ln.startswith("OUTCOME ")]
            assert p.returncode == 0 and lines, f"rank {rank} failed (exit {p.returncode}):\n{self.log(rank)[-4000:]}"
            outcomes[rank] = lines[-1].split()[1]
        return outcomes


def scalars(run_dir, tag: str) -> dict:
    """{step: value} of a TensorBoard scalar, across all event files of the run (later writes win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def tensor_tags(run_dir) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tags()["tensors"]


def logits(model, text="### Instruction:\nTell me a story.\n\n### Response:\n"):
    import torch

    from ftlib.model import load_tokenizer

    ids = load_tokenizer(_any_recipe()).encode(text, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids).logits


def _any_recipe():
    return recipe_mod.load(DEMO, ["run.dir=/tmp/unused"])


# ----------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    """The reference run: ZeRO-2, 2 ranks, 8 steps, uninterrupted."""
    folder = tmp_path_factory.mktemp("zero2")
    recipe = make(folder, *TINY, "deepspeed.zero_stage=2")
    preprocess(recipe)
    outcomes = Ranks(recipe, extra_env={"TORCH_EXTENSIONS_DIR": str(folder / "torch_extensions")}).finish()
    return recipe, outcomes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero2_two_ranks_train_log_and_checkpoint(zero2_run):
    recipe, outcomes = zero2_run
    run = RunDir.of(recipe)
    assert outcomes == {0: "completed", 1: "completed"}
    # DeepSpeed on CPU compiled nothing: its shared-memory op (~40 s of g++) serves inference only.
    assert not list((run.root.parent / "torch_extensions").rglob("*.so"))

    loss = scalars(run.root, "train/loss")
    assert sorted(loss) == list(range(1, 9))
    assert sum(loss[s] for s in (6, 7, 8)) < sum(loss[s] for s in (1, 2, 3)), f"loss did not fall: {loss}"
    eval_loss = scalars(run.root, "eval/loss")
    assert sorted(eval_loss) == [4, 8] and eval_loss[8] < eval_loss[4], eval_loss
    for tag in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/padding_fraction"):
        assert len(scalars(run.root, tag)) == 8, tag
    assert all(v > 0 for v in scalars(run.root, "train/tokens_per_second").values())
    assert all(0 <= v < 1 for v in scalars(run.root, "train/padding_fraction").values())
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= set(tensor_tags(run.root))

    ds = json.loads(run.deepspeed.read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)

    # save_total_limit=1: only the last complete checkpoint is kept.
    assert [p.name for p in checkpoints.all_checkpoints(run.checkpoints)] == ["checkpoint-8"]
    assert checkpoints.is_complete(run.checkpoints / "checkpoint-8")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in run.adapter.iterdir()}
    assert not (run.root / "adapter.partial").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_adapter_loads_with_peft_and_changes_the_output(zero2_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, _ = zero2_run
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path)
    before = logits(base)
    tuned = PeftModel.from_pretrained(base, str(RunDir.of(recipe).adapter))
    after = logits(tuned)
    assert (after - before).abs().max() > 1e-3
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned), before)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_interrupt_saves_everywhere_and_resume_reproduces_the_uninterrupted_run(zero2_run, tmp_path):
    """Same recipe and seed as the reference run; SIGUSR2 (Slurm's preemption) arrives at both ranks mid-run."""
    reference, _ = zero2_run
    recipe = make(tmp_path, *TINY, "deepspeed.zero_stage=2")
    run = RunDir.of(recipe)
    previous = signal.getsignal(signal.SIGUSR2)

    first = Ranks(recipe)
    first.wait_for("step 3/8")
    first.signal(signal.SIGUSR2)
    assert first.finish() == {0: "interrupted", 1: "interrupted"}
    saved = checkpoints.latest_complete(run.checkpoints)
    stopped_at = checkpoints.step_of(saved)
    assert 3 <= stopped_at < 8, first.log(0)
    assert f"stopped (SIGUSR2) after a complete checkpoint at step {stopped_at}" in first.log(0)
    assert {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json"} <= \
        {p.name for p in saved.iterdir()}
    assert not run.adapter.exists()

    # Determinism: a second run of the same recipe and seed has the same losses, exactly (CPU).
    ref_loss = scalars(RunDir.of(reference).root, "train/loss")
    interrupted_loss = scalars(run.root, "train/loss")
    assert {s: interrupted_loss[s] for s in range(1, stopped_at + 1)} == \
        {s: ref_loss[s] for s in range(1, stopped_at + 1)}

    second = Ranks(recipe)
    assert second.finish() == {0: "completed", 1: "completed"}
    assert f"resuming from {saved}" in second.log(0)
    for tag in ("train/loss", "train/grad_norm", "train/learning_rate"):
        assert scalars(run.root, tag) == scalars(RunDir.of(reference).root, tag), tag
    assert scalars(run.root, "eval/loss")[8] == scalars(RunDir.of(reference).root, "eval/loss")[8]
    assert run.adapter.is_dir()
    assert signal.getsignal(signal.SIGUSR2) == previous  # (this process was never touched)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_larger_max_steps_continues_a_finished_run(zero2_run, tmp_path):
    """A finished run resubmitted with a larger train.max_steps used to print "already done, skipped" and ignore it.
    Now it continues from the run's last checkpoint (checkpoint-8) to the new end; the old adapter is kept aside."""
    from launcher.stages import STAGES

    reference, _ = zero2_run
    shutil.copytree(RunDir.of(reference).root, tmp_path / "run")
    same = make(tmp_path, *TINY, "deepspeed.zero_stage=2")
    assert STAGES["train"].todo(same) == []  # nothing more asked: still skipped
    longer = make(tmp_path, *[o for o in TINY if not o.startswith("train.max_steps")], "train.max_steps=10",
                  "deepspeed.zero_stage=2")
    assert STAGES["train"].todo(longer) == [0]
    ranks = Ranks(longer)
    assert ranks.finish() == {0: "completed", 1: "completed"}
    run = RunDir.of(longer)
    assert f"{run.adapter} was trained to step 8 and the recipe now asks for train.max_steps=10: continuing" \
        in ranks.log(0), ranks.log(0)[-3000:]
    assert f"resuming from {run.checkpoints / 'checkpoint-8'} (step 8)" in ranks.log(0)
    assert sorted(scalars(run.root, "train/loss")) == list(range(1, 11))
    assert json.loads((run.adapter / "trained.json").read_text())["global_step"] == 10
    assert (run.root / "adapter.step-8" / "adapter_model.safetensors").is_file()
    assert STAGES["train"].todo(longer) == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_plain_ddp_without_deepspeed_matches_zero2(zero2_run, tmp_path):
    reference, _ = zero2_run
    recipe = make(tmp_path, *TINY, "deepspeed.enabled=false", "train.max_steps=3")
    assert Ranks(recipe).finish() == {0: "completed", 1: "completed"}
    assert not RunDir.of(recipe).deepspeed.exists()
    ref = scalars(RunDir.of(reference).root, "train/loss")
    assert scalars(RunDir.of(recipe).root, "train/loss") == pytest.approx({s: ref[s] for s in (1, 2, 3)}, rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_two_ranks_packed_and_export_consolidates_the_checkpoint(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftlib.export import export

    recipe = make(tmp_path, *TINY, "deepspeed.zero_stage=3", "train.max_steps=6", "train.save_steps=3",
                  "train.eval_steps=3", "data.packing=true")
    preprocess(recipe)
    assert Ranks(recipe).finish() == {0: "completed", 1: "completed"}
    run = RunDir.of(recipe)
    loss = scalars(run.root, "train/loss")
    assert sorted(loss) == list(range(1, 7))
    eval_loss = scalars(run.root, "eval/loss")
    assert sorted(eval_loss) == [3, 6] and eval_loss[6] < eval_loss[3], eval_loss
    assert json.loads(run.deepspeed.read_text())["zero_optimization"]["stage"] == 3
    # Sample generations under ZeRO-3 (every rank takes part in the all-gathers; the other ZeRO-3 tests skip them).
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= set(tensor_tags(run.root))

    # Without adapter/, export gathers the LoRA weights from the ZeRO-3 shards of checkpoint-6.
    final_adapter = tmp_path / "final-adapter"
    os.replace(run.adapter, final_adapter)
    merged_dir = export(recipe)
    assert merged_dir == run.merged and not (run.root / "merged.partial").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path),
                                                str(final_adapter)))
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_8bit_base_and_fallback_to_the_previous_complete_checkpoint(tmp_path):
    """A single process (WORLD_SIZE unset) with an 8-bit base and the notebook's Adam8bit; then a resume whose latest
    checkpoint lost its completion marker (a save cut short) starts from the one before and ends the same."""
    recipe = make(tmp_path, *SINGLE, "model.quantization=8bit", "train.optimizer=adam_8bit")
    preprocess(recipe)
    once = Ranks(recipe, ranks=(0,), single=True)
    assert once.finish() == {0: "completed"}
    assert "world size 1, gradient accumulation 2" in once.log(0)
    run = RunDir.of(recipe)
    first = scalars(run.root, "train/loss")
    assert sorted(first) == [1, 2, 3, 4]

    (run.checkpoints / "checkpoint-4" / checkpoints.MARKER).unlink()
    shutil.rmtree(run.adapter)
    again = Ranks(recipe, ranks=(0,), single=True)
    assert again.finish() == {0: "completed"}
    log = again.log(0)
    assert "removed incomplete checkpoint checkpoint-4" in log
    assert f"resuming from {run.checkpoints / 'checkpoint-2'}" in log
    assert scalars(run.root, "train/loss") == first
    assert checkpoints.is_complete(run.checkpoints / "checkpoint-4")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_4bit_base_under_zero3_with_gradient_checkpointing_trains(tmp_path):
    """QLoRA sharded by ZeRO-3 (the 4-bit weights stored as the compute dtype so that DeepSpeed can shard them)."""
    recipe = make(tmp_path, *TINY, "train.max_steps=3", "deepspeed.zero_stage=3", "model.quantization=4bit",
                  "model.quant_type=nf4", "model.double_quant=true", "model.compute_dtype=float32",
                  "model.gradient_checkpointing=true")
    preprocess(recipe)
    assert Ranks(recipe).finish() == {0: "completed", 1: "completed"}
    loss = scalars(RunDir.of(recipe).root, "train/loss")
    assert sorted(loss) == [1, 2, 3] and all(v == v for v in loss.values())
    assert sorted(scalars(RunDir.of(recipe).root, "eval/loss")) == [3]
    assert (RunDir.of(recipe).adapter / "adapter_model.safetensors").is_file()


@pytest.mark.timeout(120)
def test_rendezvous_names_the_rank_that_never_came(tmp_path):
    recipe = make(tmp_path, *TINY, "train.rendezvous_timeout_s=3")
    started = time.monotonic()
    alone = Ranks(recipe, ranks=(0,), world_size=2)
    alone.procs[0].wait(90)
    elapsed = time.monotonic() - started
    log = alone.log(0)
    assert alone.procs[0].returncode != 0
    assert "RendezvousError" in log and "1 of 2 ranks did not join within 3 s: rank 1 (node 1)" in log, log[-2000:]
    assert "joined: rank 0 on" in log
    assert elapsed < 60  # the timeout plus interpreter start-up, not the 30-minute default


# ----------------------------------------------------------------------------------------------------- units
def test_rank_without_rank_zero_fails_within_the_timeout(tmp_path):
    from ftlib.distributed import DistEnv, RendezvousError, join

    started = time.monotonic()
    with pytest.raises(RendezvousError, match="rank 0 did not open the rendezvous within 1 s"):
        join(DistEnv(rank=1, local_rank=0, world_size=2, local_world_size=1, master_addr="127.0.0.1",
                     master_port=0, rendezvous_file=str(tmp_path / "rendezvous.json")), timeout_s=1)
    assert time.monotonic() - started < 15


def test_deepspeed_config_follows_the_recipe(make_recipe):
    from ftlib.train import deepspeed_config

    r = make_recipe("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
                    "train.precision=bf16", "model.dtype=bfloat16", "train.max_grad_norm=0.5",
                    "train.global_batch_size=32", "train.micro_batch_size=4")
    ds = deepspeed_config(r, world_size=2)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu" and zero["stage3_gather_16bit_weights_on_model_save"]
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW"  # offloaded states need DeepSpeed's CPU Adam

    plain = deepspeed_config(make_recipe("deepspeed.zero_stage=1"), world_size=2)
    assert plain["zero_optimization"] == {"stage": 1} and "optimizer" not in plain
    assert not plain["bf16"]["enabled"] and not plain["fp16"]["enabled"]


def test_gradient_accumulation_comes_from_the_actual_world_size(make_recipe):
    from ftlib.train import gradient_accumulation_steps

    r = make_recipe("train.global_batch_size=16", "train.micro_batch_size=4")
    assert [gradient_accumulation_steps(r, w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(UserError, match="train.global_batch_size: 16 is not divisible by .* 4 × 3"):
        gradient_accumulation_steps(r, 3)


@pytest.mark.parametrize("environ, visible, ranks_on_node, expected", [
    ({}, 2, 2, 1),                                   # the local launcher: two ranks share the machine's 2 cores
    ({}, 8, 2, 4),
    ({"SLURM_CPUS_PER_TASK": "1"}, 2, 1, 1),         # a 1-CPU task on a node whose other cores are someone else's
    ({"SLURM_CPUS_PER_TASK": "4"}, 64, 8, 4),
    ({"SLURM_CPUS_PER_TASK": "16"}, 8, 1, 8),        # never more threads than cores it can run on
    ({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "1"}, 2, 1, 3),  # the user's own setting wins
])
def test_a_cpu_rank_runs_as_many_threads_as_its_task_has_cpus(environ, visible, ranks_on_node, expected):
    from ftlib.distributed import DistEnv, cpu_threads

    env = DistEnv(rank=0, local_rank=0, world_size=2 * ranks_on_node, local_world_size=ranks_on_node,
                  master_addr="127.0.0.1", master_port=0)
    n, why = cpu_threads(env, environ, visible)
    assert n == expected, why
    assert ("OMP_NUM_THREADS" in why) == ("OMP_NUM_THREADS" in environ), why


def test_own_deepspeed_file_is_used_as_given(make_recipe, tmp_path):
    from ftlib.train import deepspeed_config

    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}))
    assert deepspeed_config(make_recipe(f"deepspeed.config_file={own}")) == json.loads(own.read_text())


def test_offload_settings_that_cannot_work_are_rejected(make_recipe):
    with pytest.raises(recipe_mod.RecipeError, match="deepspeed.offload_optimizer: optimizer offload needs zero"):
        make_recipe("deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true")
    with pytest.raises(recipe_mod.RecipeError, match="train.optimizer: adam_8bit cannot run on offloaded"):
        make_recipe("deepspeed.offload_optimizer=true", "train.optimizer=adam_8bit")


def test_only_marked_checkpoints_count(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    for step in (2, 4, 6):
        checkpoints.mark_complete(tmp_path / f"checkpoint-{step}", step)
    assert checkpoints.latest_complete(tmp_path) == tmp_path / "checkpoint-6"  # 8 was cut short
    (tmp_path / "checkpoint-3").mkdir()  # an old half-written one
    deleted = checkpoints.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-3"]
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert [p.name for p in checkpoints.remove_incomplete(tmp_path)] == ["checkpoint-8"]
    assert checkpoints.latest_complete(tmp_path / "missing") is None


def test_real_tokens_are_counted_without_padding(make_recipe):
    from ftlib.data.collate import make_collator
    from ftlib.model import load_tokenizer
    from ftlib.train import count_real_tokens

    tok = load_tokenizer(make_recipe())
    rows = [{"input_ids": [1, 5, 6, 2], "labels": [-100, 5, 6, 2]}, {"input_ids": [1, 7, 2], "labels": [-100, 7, 2]}]
    padded = make_collator(make_recipe(), tok)([dict(r, attention_mask=[1] * len(r["input_ids"])) for r in rows])
    assert padded["input_ids"].numel() == 16 and count_real_tokens(padded, tok.pad_token_id) == 7
    packs = [{"input_ids": [1, 5, 6, 2, 1, 7, 2], "labels": [-100, 5, 6, 2, -100, 7, 2],
              "position_ids": [0, 1, 2, 3, 0, 1, 2]}, {"input_ids": [1, 7, 2], "labels": [-100, 7, 2],
                                                       "position_ids": [0, 1, 2]}]
    packed = make_collator(make_recipe("data.packing=true"), tok)(packs)
    assert "attention_mask" not in packed and packed["input_ids"].numel() == 16
    assert count_real_tokens(packed, tok.pad_token_id) == 10


def test_stop_signals_only_raise_a_flag_and_restore_the_previous_handlers():
    from ftlib.train import StopSignals

    def previous(signum, frame):
        raise AssertionError("the previous handler must not run while training")

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            assert stop.received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, old)


# ----------------------------------------------------------------------------------------------------- damaged
# checkpoints and exact resume under ZeRO-3 + packing and with a quantized base
def scalars_of_last_attempt(run_dir, tag: str) -> dict:
    """{step: value} of a scalar as written by the newest TensorBoard events file only: what the last launch itself
    logged (scalars() merges all attempts, so an old attempt's values could stand in for steps the last one never
    logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = max(RunDir(run_dir).tensorboard.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    acc = EventAccumulator(str(newest), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CURVES = ("train/loss", "train/grad_norm", "train/learning_rate", "eval/loss")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_zero3_packed_resume_falls_back_past_a_garbled_checkpoint_and_reproduces_the_run(tmp_path, caplog):
    """ZeRO-3 with packed sequences: one byte of rank 1's optimizer state in the newest complete checkpoint is
    flipped (same size). The rerun says so in one line, falls back to the checkpoint before, and its steps after it
    equal the uninterrupted run's, step for step."""
    recipe = make(tmp_path, *TINY, "deepspeed.zero_stage=3", "data.packing=true", "data.sequence_len=128",
                  "train.max_steps=6", "train.save_steps=3", "train.eval_steps=3", "train.save_total_limit=2",
                  "train.sample_prompts=[]")
    preprocess(recipe)
    run = RunDir.of(recipe)
    assert Ranks(recipe).finish() == {0: "completed", 1: "completed"}
    uninterrupted = {tag: scalars(run.root, tag) for tag in CURVES}
    assert sorted(uninterrupted["train/loss"]) == list(range(1, 7)) and sorted(uninterrupted["eval/loss"]) == [3, 6]

    last, before = run.checkpoints / "checkpoint-6", run.checkpoints / "checkpoint-3"
    bad = "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = (last / bad).stat().st_size
    flip_byte(last / bad)
    assert (last / bad).stat().st_size == size
    final_weights = (run.adapter / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(run.adapter)  # as if the job had died before the end

    again = Ranks(recipe)
    assert again.finish() == {0: "completed", 1: "completed"}
    log = again.log(0)
    damage = [line for line in log.splitlines() if "is damaged" in line]
    assert len(damage) == 1 and damage[0].endswith(
        f"{last} is damaged: {bad} does not match the sha256 recorded when it was saved (same size, different "
        f"content); moved to checkpoint-6.damaged, resuming from checkpoint-3"), log[-3000:]
    assert f"resuming from {before} (step 3)" in log
    for tag in CURVES:
        resumed = scalars_of_last_attempt(run.root, tag)
        assert resumed == {s: v for s, v in uninterrupted[tag].items() if s > 3}, tag  # steps 4-6, exactly
        assert scalars(run.root, tag) == uninterrupted[tag], tag
    assert checkpoints.verify(last) is None and (run.checkpoints / "checkpoint-6.damaged" / bad).is_file()
    assert (run.adapter / "adapter_model.safetensors").read_bytes() == final_weights

    # Killed after the last checkpoint but before the adapter: the rerun takes the adapter from checkpoint-6
    # instead of resuming, which made the Trainer train a step 7 of 6.
    written = {p.name: p.read_bytes() for p in run.adapter.iterdir()}
    shutil.rmtree(run.adapter)
    events = sorted(run.tensorboard.iterdir())
    third = Ranks(recipe)
    assert third.finish() == {0: "completed", 1: "completed"}
    assert f"training had finished at checkpoint-6 (train.max_steps=6); adapter written from it to {run.adapter}" \
        in third.log(0), third.log(0)[-3000:]
    assert "step 7/6" not in third.log(0) and sorted(run.tensorboard.iterdir()) == events
    assert {p.name: p.read_bytes() for p in run.adapter.iterdir()} == written  # the files save_adapter writes

    # Export without adapter/ takes the newest intact checkpoint as well (and moves nothing).
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftlib.export import export

    shutil.rmtree(run.adapter)
    flip_byte(last / "global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt")  # the fp32 weights export reads
    with caplog.at_level("INFO", logger="ftlib.export"):
        merged = AutoModelForCausalLM.from_pretrained(str(export(recipe)))
    assert (f"{last} is damaged: global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt does not match the sha256 "
            f"recorded when it was saved (same size, different content); exporting checkpoint-3 instead") \
        in caplog.text
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path), str(before))
    torch.testing.assert_close(logits(merged), logits(expected), atol=1e-4, rtol=1e-4)
    assert checkpoints.latest_complete(run.checkpoints) == last


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_4bit_base_resume_falls_back_past_a_truncated_adapter_file_and_stops_when_nothing_is_intact(tmp_path):
    """QLoRA (4-bit nf4 base) under ZeRO-3, 2 ranks: the newest checkpoint's adapter weights cut short -> the
    rerun resumes from the one before and reproduces the run exactly. Then with every checkpoint damaged, both ranks
    stop at once with the one-line reason and train nothing."""
    recipe = make(tmp_path, *TINY, "deepspeed.zero_stage=3", "model.quantization=4bit", "model.quant_type=nf4",
                  "model.compute_dtype=float32", "data.sequence_len=128", "train.max_steps=4", "train.save_steps=2",
                  "train.eval_steps=2", "train.save_total_limit=2", "train.sample_prompts=[]")
    preprocess(recipe)
    run = RunDir.of(recipe)
    assert Ranks(recipe).finish() == {0: "completed", 1: "completed"}
    uninterrupted = {tag: scalars(run.root, tag) for tag in CURVES}
    assert sorted(uninterrupted["train/loss"]) == [1, 2, 3, 4]

    last, before = run.checkpoints / "checkpoint-4", run.checkpoints / "checkpoint-2"
    weights = last / "adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    shutil.rmtree(run.adapter)
    again = Ranks(recipe)
    assert again.finish() == {0: "completed", 1: "completed"}
    log = again.log(0)
    assert (f"{last} is damaged: adapter_model.safetensors is {size // 2:,} bytes, {size:,} when it was saved "
            f"(truncated); moved to checkpoint-4.damaged, resuming from checkpoint-2") in log, log[-3000:]
    for tag in CURVES:
        assert scalars_of_last_attempt(run.root, tag) == {s: v for s, v in uninterrupted[tag].items() if s > 2}, tag

    # Nothing intact left: the newest checkpoint cut short, the one before garbled.
    shutil.rmtree(run.adapter)
    state = last / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:10])
    flip_byte(before / "adapter_model.safetensors")
    events = sorted(run.tensorboard.iterdir())
    stopped = Ranks(recipe)
    for rank, p in stopped.procs.items():
        assert p.wait(120) != 0, stopped.log(rank)[-3000:]
    reason = (f"{last} is damaged: trainer_state.json is 10 bytes, {size_of(state, last)} when it was saved "
              f"(truncated); no intact earlier checkpoint to resume from (checkpoint-2 is damaged too: "
              f"adapter_model.safetensors does not match the sha256 recorded when it was saved (same size, different "
              f"content)); not training on it: restore the files, or delete {run.checkpoints} to train from the start")
    for rank in (0, 1):  # every rank says what is damaged, in one line (it was rank 0 alone)
        assert f"DamagedCheckpoint: {reason}\n" in stopped.log(rank), stopped.log(rank)[-3000:]
    assert "step 1/4" not in stopped.log(0) and sorted(run.tensorboard.iterdir()) == events
    assert [p.name for p in checkpoints.complete_checkpoints(run.checkpoints)] == ["checkpoint-2", "checkpoint-4"]

    import re

    from ftlib.export import export

    nothing = reason.split("; not training")[0].replace("to resume from", "to export")
    with pytest.raises(UserError, match=f"^{re.escape(f'{run.root}: no adapter/ and {nothing}')}$"):
        export(recipe)
    assert not run.merged.exists()


def size_of(path: Path, checkpoint: Path) -> str:
    """A file's size as its checkpoint's marker recorded it, in the messages' format."""
    marker = json.loads((checkpoint / checkpoints.MARKER).read_text())
    return f"{marker['files'][path.relative_to(checkpoint).as_posix()]['bytes']:,}"
