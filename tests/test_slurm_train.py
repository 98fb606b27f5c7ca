"""Multi-node training on the REAL two-node Slurm cluster: ZeRO-3 across both nodes, and preemption —
`scancel --signal=USR2` mid-run makes every rank save a checkpoint, submitit requeues the job, the restarted job
resumes from that checkpoint, and its loss trajectory equals an uninterrupted run of the same recipe."""
import os
import re
import subprocess
import time

import pytest

from ftlib.data.preprocess import run_shard
from ftlib.report import read_events, series
from ftlib.rundir import RunDir
from launcher import launch, status
from tests.test_slurm import cluster, sacct, wait_for_jobs  # noqa: F401 (cluster: the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def two_node_recipe(make_recipe, *extra):
    # No sample generations at each evaluation (test_train.py and test_report.py test them): under ZeRO-3 each
    # took seconds of all-gathers per token.
    recipe = make_recipe("run.launcher=slurm", "data.sources[0].max_rows=300", "serve.enabled=false",
                         "train.logging_steps=1", "train.sample_prompts=[]", *extra)
    for k in range(recipe.data.num_shards):  # preprocessing is not what these tests are about
        run_shard(recipe, k, recipe.data.num_shards)
    return recipe


def losses(recipe):
    return [(p.step, round(p.value, 6)) for p in series(read_events(RunDir.of(recipe).tensorboard), "train_loss")]


@pytest.mark.timeout(600)
def test_zero3_across_two_nodes(make_recipe):
    recipe = two_node_recipe(make_recipe, "deepspeed.zero_stage=3", "train.max_steps=8", "train.eval_steps=4",
                             "train.save_steps=4")
    (job,) = launch.submit(recipe, ["train"])
    states = wait_for_jobs([job.job_id], timeout=480)
    assert states[job.job_id] == "COMPLETED", status.status(RunDir.of(recipe))
    step = next(r for r in sacct(job.job_id, "JobID", "NodeList", steps=True) if r["JobID"] == f"{job.job_id}.0")
    assert step["NodeList"] == "node[1-2]"
    run = RunDir.of(recipe)
    curve = losses(recipe)
    assert len(curve) == 8 and curve[-1][1] < curve[0][1], curve
    assert series(read_events(run.tensorboard), "eval_loss")
    assert '"stage": 3' in run.deepspeed.read_text().replace("\n", "").replace("  ", " ") or \
        '"stage":3' in run.deepspeed.read_text().replace(" ", "")
    assert (run.adapter / "adapter_model.safetensors").is_file()
    # One process group of two ranks, not two groups of one: rank 0 reports world size 2, rank 1 reports as rank 1
    # and never as a rank 0 of its own.
    rank0, rank1 = (rank_log(run, k) for k in (0, 1))
    assert re.search(r"world size 2\b", rank0) and "world size 1" not in rank0, rank0[-3000:]
    assert re.search(r"rank 1\b.*peak memory", rank1) and "world size" not in rank1, rank1[-3000:]
    # Each rank runs the one thread its 1-CPU task was given, not one per core of the node (the nodes of the test
    # cluster share the machine's cores: more threads than that spun against each other, 10-40x slower steps).
    if "OMP_NUM_THREADS" not in os.environ:
        assert "CPU threads: 1 per rank (Slurm gave this task 1 CPU(s)" in rank0, rank0[-3000:]


def rank_log(run: RunDir, rank: int) -> str:
    """stdout and stderr of one training rank."""
    return "".join(_read(status.log_path(run, "train", rank, err=err)) for err in (False, True))


@pytest.mark.timeout(900)
def test_preemption_checkpoints_requeues_and_resumes_exactly(make_recipe, tmp_path_factory):
    schedule = ("data.sequence_len=128", "train.max_steps=24", "train.eval_steps=12", "train.save_steps=100", "train.warmup_steps=2")
    preempted = two_node_recipe(make_recipe, *schedule)
    reference = make_recipe(*preempted_overrides(preempted, tmp_path_factory.mktemp("reference")), *schedule)
    (job,) = launch.submit(preempted, ["train"])
    (ref_job,) = launch.submit(reference, ["train"])

    # Signal once the run is a few steps in: Slurm delivers USR2 to every task of the job step.
    log = status.log_path(RunDir.of(preempted), "train", 0)
    deadline = time.time() + 300
    while time.time() < deadline and not re.search(r"step ([4-9]|\d\d)/24", _read(log)):
        time.sleep(0.5)
    assert re.search(r"step \d+/24", _read(log)), _read(log)[-2000:]
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)

    states = wait_for_jobs([job.job_id, ref_job.job_id], timeout=780)
    assert set(states.values()) == {"COMPLETED"}, (states, status.status(RunDir.of(preempted)),
                                                   status.status(RunDir.of(reference)))
    # Requeued exactly once: scontrol counts the restarts (while slurmctld still holds the job); sacct --duplicates
    # lists every run of the job id, the preempted one as REQUEUED.
    restarts = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True).stdout
    runs = [r["State"].split()[0] for r in sacct(job.job_id, "JobID", "State", duplicates=True)]
    assert runs == ["REQUEUED", "COMPLETED"], (runs, restarts)
    assert "Restarts=1" in restarts or not restarts, restarts  # empty: slurmctld already forgot the job
    text = _read(log)
    assert "resum" in text.lower(), text[-3000:]  # the restarted job said it resumed from a checkpoint

    interrupted, uninterrupted = losses(preempted), losses(reference)
    assert [s for s, _ in interrupted] == list(range(1, 25))
    assert interrupted == uninterrupted


def preempted_overrides(recipe, where):
    """The same recipe in another run directory (same tokenized data)."""
    return ["run.launcher=slurm", "data.sources[0].max_rows=300", "serve.enabled=false", "train.logging_steps=1",
            "train.sample_prompts=[]", f"run.dir={where / 'run'}"]


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
