"""Faults of a training job on the REAL two-node Slurm cluster: a rank that dies after the rendezvous (its memory
limit, or kill -9) ends the whole job within two minutes, `make status` names the rank, the node and the cause,
and a resubmission resumes from the last complete checkpoint. A node that stops answering ends the job as
NODE_FAIL, status names the node, and the job Slurm requeues resumes from the last complete checkpoint. A real
time limit checkpoints, requeues and finishes with the losses of an uninterrupted run.

The fault is injected from outside the product, as a real one would come: a `sitecustomize` module on the job's
PYTHONPATH (set in the recipe's slurm.train.setup lines) starts a thread in rank 1 that waits for the first complete
checkpoint and then allocates memory until the job's cgroup limit kills it, or kills itself with SIGKILL.
"""
import getpass
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ftlib import checkpoints
from ftlib.rundir import RunDir, read_json
from launcher import launch, status
from launcher.status import first_dead_task
from tests.conftest import ROOT
from tests.test_slurm import cluster, sacct, squeue_states, wait_for_jobs  # noqa: F401 (cluster: a fixture)
from tests.test_slurm_train import losses, rank_log, two_node_recipe

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

INJECT = '''
import os, threading, time
from pathlib import Path
armed = Path({armed!r})
if os.environ.get("SLURM_PROCID") == "1" and os.environ.get("SUBMITIT_EXECUTOR") and armed.exists():
    def fault():
        while not list(Path({checkpoints!r}).glob("checkpoint-*/{marker}")):
            time.sleep(0.2)
        armed.unlink()
        Path({fired!r}).write_text(str(time.time()))
        if {mode!r} == "oom":
            hog = []
            while True:
                hog.append(b"x" * (64 << 20))  # written, so resident: the cgroup's limit is reached
        os.kill(os.getpid(), 9)
    threading.Thread(target=fault, daemon=True).start()
'''


def injected_recipe(make_recipe, tmp_path, mode: str):
    inject = tmp_path / "inject"
    inject.mkdir()
    armed, fired = tmp_path / "armed", tmp_path / "fired"
    armed.touch()
    recipe = two_node_recipe(make_recipe, "data.sequence_len=128", "train.max_steps=16", "train.save_steps=2",
                             "train.eval_steps=100",
                             f"slurm.train.setup=['export PYTHONPATH={inject}:$PYTHONPATH']")
    (inject / "sitecustomize.py").write_text(INJECT.format(
        armed=str(armed), fired=str(fired), checkpoints=str(RunDir.of(recipe).checkpoints),
        marker=checkpoints.MARKER, mode=mode))
    return recipe, fired


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode,cause", [("oom", "Out Of Memory"), ("kill", "Killed")])
def test_a_dead_rank_ends_the_job_and_status_names_it(make_recipe, tmp_path, mode, cause):
    recipe, fired = injected_recipe(make_recipe, tmp_path, mode)
    run = RunDir.of(recipe)
    (job,) = launch.submit(recipe, ["train"])
    states = wait_for_jobs([job.job_id], timeout=420)
    assert fired.exists(), ("the fault never fired", status.status(run))
    assert states[job.job_id] in ("FAILED", "OUT_OF_MEMORY"), status.status(run)

    # Ended within two minutes of the fault (sacct's End has a one-second resolution).
    end = sacct(job.job_id, "End")[0]["End"]
    ended = time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))
    assert ended - float(fired.read_text()) < 120, (end, fired.read_text())

    # `make status`: the rank, its node, the cause, and that rank's own log.
    died = first_dead_task(status.log_path(run, "train", 0, err=True))
    assert died == {"task": 1, "node": "node2", "cause": cause}, died
    report = status.status(run)
    assert f"rank 1 on node2 died first: {cause}" in report, report
    assert str(status.log_path(run, "train", 1, err=True)) in report, report

    if mode == "oom":  # a resubmission resumes from the last complete checkpoint and finishes
        (again,) = launch.submit(recipe, ["train"])
        assert wait_for_jobs([again.job_id], timeout=420)[again.job_id] == "COMPLETED", status.status(run)
        assert "resuming from" in rank_log(run, 0), rank_log(run, 0)[-3000:]
        assert run.training_done
    else:  # every checkpoint damaged: the resubmission stops at once, and status says why in one line
        for checkpoint in checkpoints.complete_checkpoints(run.checkpoints):
            weights = checkpoint / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
        (again,) = launch.submit(recipe, ["train"])
        assert wait_for_jobs([again.job_id], timeout=300)[again.job_id] == "FAILED", status.status(run)
        report = status.status(run)
        damaged = [line for line in report.splitlines() if "DamagedCheckpoint:" in line]
        assert len(damaged) == 1 and "adapter_model.safetensors is 100 bytes" in damaged[0], report
        assert "Traceback" not in report, report


NODE_FAULT = ROOT / "tests" / "cluster" / "node-fault.sh"  # root, through the sudo rule up.sh installs


def node_fault(action: str, node: str) -> None:
    done = subprocess.run(["sudo", "-n", str(NODE_FAULT), action, node], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(600)
def test_a_lost_node_ends_the_job_and_the_requeued_job_resumes(make_recipe, tmp_path):
    """node2 freezes mid-training (slurmd, slurmstepd and the rank get SIGSTOP): no process dies and no connection
    closes, so rank 0 just waits in a collective. Slurm marks node2 DOWN after SlurmdTimeout (30 s here) and ends
    the job as NODE_FAIL; it requeues it, and once node2 is back the job resumes from the last complete checkpoint."""
    if subprocess.run(["sudo", "-n", "-l", str(NODE_FAULT)], capture_output=True).returncode != 0:
        pytest.skip(f"no sudo rule for {NODE_FAULT} (tests/cluster/up.sh installs it where only root can change it)")
    recipe = two_node_recipe(make_recipe, "data.sequence_len=128", "train.max_steps=16", "train.save_steps=2",
                             "train.eval_steps=100")
    run = RunDir.of(recipe)
    (job,) = launch.submit(recipe, ["train"])
    deadline = time.time() + 300
    while not list(run.checkpoints.glob(f"checkpoint-*/{checkpoints.MARKER}")):
        assert time.time() < deadline, status.status(run)
        time.sleep(0.5)
    frozen_at = time.time()
    node_fault("freeze", "node2")
    try:
        while not any(r["State"] == "NODE_FAIL" for r in sacct(job.job_id, "State", duplicates=True)):
            assert time.time() < frozen_at + 120, ("no NODE_FAIL within 2 minutes", status.status(run))
            time.sleep(1)
        report = status.status(run)
        assert f"job {job.job_id} lost a node" in report and "down now: node2" in report, report
    finally:
        node_fault("revive", "node2")
    deadline = time.time() + 360  # sacct says NODE_FAIL until the requeued run starts: ask slurmctld
    while subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, status.status(run)
        time.sleep(2)
    runs = [r["State"].split()[0] for r in sacct(job.job_id, "JobID", "State", duplicates=True)]
    assert runs == ["NODE_FAIL", "COMPLETED"], runs
    assert "resuming from" in rank_log(run, 0), rank_log(run, 0)[-3000:]
    assert run.training_done


@pytest.mark.timeout(600)
def test_a_real_time_limit_checkpoints_requeues_and_resumes_exactly(make_recipe, tmp_path_factory):
    """Not `scancel --signal`: the job's own time limit (1 minute) ends its first attempt. Slurm signals it
    stop_signal_s (45 s) before the limit, every rank checkpoints, submitit requeues it, and the next attempt resumes
    with the loss trajectory of an uninterrupted run, step for step; the test then cancels both jobs. The schedule
    (100,000 steps) outlasts any attempt whatever the machine's speed: a schedule sized to "just over one attempt"
    finished before the limit once the ranks stopped oversubscribing the cores. That a requeued job then runs to
    its end is test_slurm_train.py's preemption test."""
    schedule = ("data.sequence_len=128", "train.max_steps=100000", "train.eval_steps=100000",
                "train.save_steps=100000", "train.warmup_steps=2", "train.logging_steps=1", "resources.train.nodes=1",
                "train.global_batch_size=8", "train.micro_batch_size=4")
    limited = two_node_recipe(make_recipe, *schedule, "resources.train.time_min=1",
                              "resources.train.stop_signal_s=45")
    reference = make_recipe("run.launcher=slurm", "data.sources[0].max_rows=300", "serve.enabled=false",
                            "train.sample_prompts=[]", f"run.dir={tmp_path_factory.mktemp('reference') / 'run'}",
                            *schedule)
    (job,) = launch.submit(limited, ["train"])
    (ref_job,) = launch.submit(reference, ["train"])
    run, ref_run = RunDir.of(limited), RunDir.of(reference)
    deadline = time.time() + 420
    while True:  # until the resumed attempt is 5 steps past its checkpoint, and the reference too
        text = rank_log(run, 0)
        resumed = re.search(r"resuming from \S*checkpoint-(\d+)", text)
        last = int(resumed.group(1)) + 5 if resumed else None
        if last and f"step {last}/" in text[resumed.end():] and \
                f"step {last}/" in _read(status.log_path(ref_run, "train", 0)):
            break
        assert time.time() < deadline, (status.status(run), text[-3000:])
        time.sleep(1)
    for r in (run, ref_run):
        status.cancel(r)
    wait_for_jobs([job.job_id, ref_job.job_id], timeout=120)

    attempts = [r["State"].split()[0] for r in sacct(job.job_id, "JobID", "State", duplicates=True)]
    assert attempts[0] == "REQUEUED" and attempts[-1] == "CANCELLED", attempts
    assert "time limit near" in rank_log(run, 0), rank_log(run, 0)[-3000:]  # Slurm's warning, not a cancel
    interrupted, uninterrupted = dict(losses(limited)), dict(losses(reference))
    assert set(range(1, last + 1)) <= set(interrupted) & set(uninterrupted), (sorted(interrupted)[-5:], last)
    assert [interrupted[s] for s in range(1, last + 1)] == [uninterrupted[s] for s in range(1, last + 1)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", ["make cancel", "scancel"])
def test_a_cancelled_training_is_never_requeued_and_keeps_its_checkpoint(make_recipe, how):
    """A cancel of a running 2-node training (`make cancel`, or the plain `scancel` every Slurm user types) sends
    the ranks the same SIGTERM as a preemption. It used to be taken for one: every rank checkpointed, submitit
    requeued the job, and it ran again ~20 s later, up to max_requeues times. Now Slurm is asked why the signal came:
    the job ends CANCELLED for good, after writing a checkpoint within the site's KillWait, and `make status` says
    when and after which step."""
    # Small steps (one 128-token row per rank): the signal's step ends and its checkpoint is written well within the
    # test cluster's KillWait (5 s), also on a busy machine.
    small = ("data.sequence_len=128", "train.global_batch_size=2", "train.micro_batch_size=1", "train.save_steps=3",
             "train.eval_steps=1000")
    recipe = two_node_recipe(make_recipe, "train.max_steps=400", *small)
    run = RunDir.of(recipe)
    (job,) = launch.submit(recipe, ["train"])
    log = status.log_path(run, "train", 0)
    deadline = time.time() + 300
    while not re.search(r"step ([4-9]|\d\d+)/400", _read(log)):  # past its first checkpoint (step 3)
        assert time.time() < deadline, status.status(run)
        time.sleep(0.5)
    if how == "make cancel":
        out = subprocess.run([sys.executable, "-m", "ftlib", "cancel", str(run.root)], capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, out.stderr
    else:
        subprocess.run(["scancel", job.job_id], check=True)
    assert wait_for_jobs([job.job_id], timeout=120)[job.job_id] == "CANCELLED", status.status(run)

    # Only the job's own processes would requeue it (submitit's handler runs `scontrol requeue`), and a requeued job
    # is listed PENDING at once. slurmctld lists the job until its last process has exited (COMPLETING): once it
    # no longer lists it at all, nothing is left to requeue it.
    deadline = time.time() + 60
    while (queued := squeue_states([job.job_id])) in (["RUNNING"], ["COMPLETING"]):
        assert time.time() < deadline, (queued, rank_log(run, 0)[-3000:])
        time.sleep(0.5)
    assert queued == [], (queued, rank_log(run, 0)[-3000:])
    assert [r["State"].split()[0] for r in sacct(job.job_id, "State", duplicates=True)] == ["CANCELLED"]

    stopped = read_json(run.stopped)
    assert stopped["how"] == f"cancelled by {getpass.getuser()}" and stopped["requeue"] is False, stopped
    assert stopped["job"] == job.job_id
    step = stopped["step"]
    assert stopped["checkpoint"] == f"checkpoint-{step}", (stopped, rank_log(run, 0)[-3000:])
    assert checkpoints.is_complete(run.checkpoints / f"checkpoint-{step}")
    assert "will not be requeued" in rank_log(run, 0)
    report = status.status(run)
    assert re.search(rf"train: job {job.job_id} cancelled by {getpass.getuser()} at \d\d:\d\d after step {step} "
                     rf"\(checkpoint-{step} kept\)", report), report
    if how == "make cancel":
        assert f"was RUNNING: cancelled by {getpass.getuser()} at" in out.stdout, out.stdout
        assert f"after step {step} (checkpoint-{step} kept)" in out.stdout, out.stdout
        assert f"resumes from checkpoint-{step}" in out.stdout, out.stdout
    else:  # a later `make train` resumes from the kept checkpoint
        recipe = two_node_recipe(make_recipe, f"train.max_steps={step + 2}", *small)
        (again,) = launch.submit(recipe, ["train"])
        assert wait_for_jobs([again.job_id], timeout=300)[again.job_id] == "COMPLETED", status.status(run)
        assert f"resuming from {run.checkpoints / f'checkpoint-{step}'}" in rank_log(run, 0)


@pytest.mark.timeout(600)
def test_a_stalled_rank_ends_its_job_and_status_names_it(make_recipe):
    """Rank 1's process stops (SIGSTOP) on a healthy node mid-training: nothing exits, no connection closes, Slurm
    sees a healthy node. It used to hold the job RUNNING until its time limit (gloo's collectives wait 30 minutes),
    logging nothing. Now the ranks' heartbeats show that no rank progresses, the job ends within
    train.stall_timeout_s, and `make status` names the stalled rank, its node and the step."""
    stall_s = 30
    recipe = two_node_recipe(make_recipe, "train.max_steps=400", f"train.stall_timeout_s={stall_s}",
                             "data.sequence_len=128", "train.global_batch_size=2", "train.micro_batch_size=1",
                             "train.save_steps=1000", "train.eval_steps=1000")
    run = RunDir.of(recipe)
    (job,) = launch.submit(recipe, ["train"])
    log = status.log_path(run, "train", 0)
    deadline = time.time() + 300
    while not re.search(r"step ([4-9]|\d\d+)/400", _read(log)):
        assert time.time() < deadline, status.status(run)
        time.sleep(0.5)
    beat = read_json(run.root / "heartbeat" / "rank-1.json")
    assert beat["node"] == "node2" and beat["job"] == job.job_id, beat
    os.kill(beat["pid"], signal.SIGSTOP)
    stopped_at = time.time()
    try:
        state = wait_for_jobs([job.job_id], timeout=stall_s + 150)[job.job_id]
    finally:
        try:
            os.kill(beat["pid"], signal.SIGCONT)  # (killed with its job by then)
        except ProcessLookupError:
            pass
    assert state == "FAILED", status.status(run)
    end = sacct(job.job_id, "End")[0]["End"]
    assert time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S")) - stopped_at < stall_s + 120, end
    report = status.status(run)
    assert re.search(r"ended by the stall watchdog: rank 1 on node2 stopped responding .* at step \d+", report), \
        report
    assert "rank 0 on node1" not in report.split("ended by the stall watchdog")[1].split("\n")[0], report


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
