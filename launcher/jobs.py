"""The callables that run inside jobs: thin wrappers that put ftlib's steps into Slurm's (or the local) world.

They are pickled by submitit, so they take the resolved recipe as their only state. The steps themselves
(ftlib.data, ftlib.train, ftlib.serve) know nothing of Slurm; everything Slurm-specific is here.

Requeue after preemption or at the time limit relies on these submitit 1.5 behaviours (pinned in
env/requirements.lock; recheck them when upgrading):
  - submitit asks Slurm for `--signal=USR2@90` and, in every task, installs a handler for that signal
    (`JobEnvironment._handle_signals`; the signal is the private `JobEnvironment._usr_sig()`) that, on global
    rank 0 only, calls our `checkpoint()` (a `helpers.Checkpointable` method), pickles the returned
    `DelayedSubmission` over the job's submitted pickle, runs `scontrol requeue <job>` and exits. On other ranks
    the handler returns and does nothing.
  - ftlib.train takes USR1/USR2/TERM itself while training (to checkpoint on every rank at a step boundary), so
    `Train` re-raises the signal on rank 0 afterwards to reach submitit's handler.
  - submitit counts a signal as a timeout when the job has run 80% of its time (or all but 10 minutes), and then
    requeues at most `max_num_timeout` times (resources.<stage>.max_requeues); a preemption is not counted.
  - A requeued job starts again from the pickled DelayedSubmission, i.e. calls `Train()(recipe)` again; training
    resumes from its latest complete checkpoint by itself.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Optional

import submitit

from ftlib.rundir import RunDir, use_private_files
from ftlib.stage import check_offline
from launcher import records


def preprocess_shard(recipe, index: int, num_shards: int) -> str:
    """One task of the preprocessing array: tokenize shard `index` of `num_shards`."""
    from ftlib.data.preprocess import run_shard

    use_private_files(recipe)
    check_offline(recipe)
    return str(run_shard(recipe, index, num_shards))


class Train(submitit.helpers.Checkpointable):
    """One task of the (multi-node) training job. Every task runs this; together they form one torch.distributed
    group. On a stop signal, rank 0 asks Slurm why (slurm_stop_reason). Time limit or preemption: ftlib.train saves
    a complete checkpoint on all ranks and returns "interrupted"; then rank 0 hands the signal to submitit, which
    calls `checkpoint()` below and requeues the job. The requeued job calls `ftlib.train.train` again, which resumes
    from the latest complete checkpoint by itself. Cancelled: training saves a checkpoint if it fits in the site's
    KillWait and returns "cancelled", and nothing requeues the job."""

    def __call__(self, recipe) -> str:
        use_private_files(recipe)
        check_offline(recipe)
        use_gpus = recipe.resources.train.gpus_per_node > 0
        if not use_gpus:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        dist_env = rank_environment(recipe)
        if use_gpus:
            os.environ.update(task_device(os.environ, dist_env.local_rank))
        from ftlib.train import JOB_ID_ENV, train

        # The job's id as Slurm's commands and the run's records spell it: "12", or "12_3" for a sweep's trial.
        os.environ[JOB_ID_ENV] = str(submitit.JobEnvironment().job_id)
        outcome = train(recipe, why_stopped=slurm_stop_reason if os.environ.get("SLURM_JOB_ID") else None)
        if outcome == "interrupted":
            env = submitit.JobEnvironment()
            if env.global_rank == 0:
                signal.raise_signal(submitit.JobEnvironment._usr_sig())  # submitit: checkpoint() + requeue + exit
            # Other ranks wait to be stopped by the requeue rather than report a result for a job that continues. The
            # requeue's SIGTERM ends them (submitit only logs it), instead of the SIGKILL a KillWait later.
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            time.sleep(300)
            sys.exit(1)
        return outcome

    def checkpoint(self, recipe) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, recipe)


def rank_environment(recipe) -> submitit.helpers.TorchDistributedEnvironment:
    """The variables that make this task a rank of the training job (ftlib.distributed.DistEnv.from_environ)."""
    # Name nodes in rendezvous errors by their Slurm name (on the test cluster all share one hostname).
    os.environ.setdefault("FTLIB_NODE_NAME", os.environ.get("SLURMD_NODENAME", ""))
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    # MASTER_ADDR is the first node. Not submitit's MASTER_PORT: derived from the job id, anyone can compute it and
    # listen there first. 0: rank 0 takes a port the kernel picks and publishes it, with the rendezvous's secret, in
    # a private file of the run directory (ftlib.distributed). Its name is this attempt's: a requeued job's ranks
    # must not find the previous attempt's.
    from ftlib.distributed import RENDEZVOUS_ENV

    job = submitit.JobEnvironment()
    attempt = f"{job.job_id}-r{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    os.environ.update({"MASTER_PORT": "0", RENDEZVOUS_ENV: str(RunDir.of(recipe).rendezvous(attempt))})
    return dist_env


# What `scontrol show job` calls a job that is ending (COMPLETING, whatever the cause, while its processes stop).
ENDING = ("COMPLETING", "CANCELLED", "TIMEOUT", "PREEMPTED", "REQUEUED", "NODE_FAIL", "FAILED", "COMPLETED")


def slurm_stop_reason(signum: Optional[int]):
    """Why this training job got a stop signal, from what Slurm says of the job at that moment, never from the
    signal alone (a `scancel` and a preemption both send SIGTERM):

      the job runs on (RUNNING)      a warning: Slurm's --signal before the time limit, a preemption notice, or
                                     `scancel --signal=USR2` -> checkpoint and requeue. A SIGTERM while Slurm runs
                                     the job on and preempts nothing is nobody's warning -> stop, no requeue.
      the job is ending (COMPLETING) accounting says why: CANCELLED (scancel, `make cancel`) -> stop for good,
                                     checkpoint only if it fits in KillWait; TIMEOUT, PREEMPTED, REQUEUED, NODE_FAIL
                                     -> checkpoint and requeue. Without accounting: Reason=TimeLimit or a new restart
                                     count mean the same; an ending job that is neither was cancelled.
    """
    from ftlib.train import JOB_ID_ENV, StopReason

    job = os.environ[JOB_ID_ENV]
    grace = records.kill_wait_s()
    now = records.job_now(job)
    if now.get("JobState", "") not in ENDING:
        if now.get("PreemptTime", "None") not in ("None", "Unknown", ""):
            return StopReason("preempted", requeue=True, grace_s=grace)
        if signum == signal.SIGTERM:
            return StopReason("SIGTERM while Slurm runs the job on (no cancel, time limit or preemption)",
                              requeue=False, grace_s=grace)
        left = _seconds(now.get("TimeLimit", "")) - _seconds(now.get("RunTime", ""))
        return StopReason("time limit near" if 0 <= left <= 600 else "preemption notice", requeue=True, grace_s=grace)
    accounted = ""
    for _ in range(5):  # slurmctld tells slurmdbd asynchronously: give it a moment to hear of the cancel
        accounted = records.accounted_state(job) or ""
        if not accounted or not accounted.startswith(("RUNNING", "PENDING")):
            break
        time.sleep(0.5)
    restarted = now.get("Restarts", "0") != os.environ.get("SLURM_RESTART_COUNT", "0")
    if accounted.startswith("CANCELLED") or not (accounted or now.get("Reason") == "TimeLimit" or restarted):
        by = re.search(r"by (\d+)", accounted)
        return StopReason("cancelled" + (f" by {_user(int(by.group(1)))}" if by else ""), requeue=False,
                          grace_s=grace)
    if accounted.startswith("TIMEOUT") or now.get("Reason") == "TimeLimit":
        return StopReason("time limit", requeue=True, grace_s=grace)
    return StopReason(f"{(accounted or 'requeued').split()[0].lower().replace('_', ' ')} (Slurm)", requeue=True,
                      grace_s=grace)


def _seconds(text: str) -> float:
    """Slurm's [D-]HH:MM:SS -> seconds (-1 when absent or UNLIMITED)."""
    return records.parse_elapsed(text) if re.fullmatch(r"(\d+-)?[\d:]+", text or "") else -1.0


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def task_device(environ, local_rank: int) -> dict:
    """The GPU of one training task, as CUDA_VISIBLE_DEVICES. Slurm sets the variable to the job's GPUs on the node
    (--gpus-per-node, --gres: e.g. "2,3" when another job holds 0 and 1), or to the one GPU bound to the task
    (--gpus-per-task=1): task k takes the k-th of the list; a list of one is kept."""
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(visible) == 1:
        return {}
    if not visible:  # nothing from Slurm (no GRES accounting): the devices are numbered from 0
        return {"CUDA_VISIBLE_DEVICES": str(local_rank)}
    if local_rank >= len(visible):
        raise RuntimeError(f"task with local rank {local_rank} sees {len(visible)} GPU(s) (CUDA_VISIBLE_DEVICES="
                           f"{','.join(visible)}): resources.train.tasks_per_node exceeds the GPUs Slurm gave the node")
    return {"CUDA_VISIBLE_DEVICES": visible[local_rank]}


def serve_node(recipe) -> str:
    """One task per node of the serve job: rank 0 runs the Ray head and the Serve app, the others Ray workers.
    Blocks until the time limit, `make cancel`, or Ctrl-C."""
    from ftlib.serve.cluster import run_node

    use_private_files(recipe)
    check_offline(recipe)
    env = submitit.JobEnvironment()
    job_id = str(env.job_id)
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    if restarts != "0":  # a requeued serve job must not find the previous attempt's head
        job_id += f"-r{restarts}"
    run_node(recipe, node_rank=env.node, hostnames=env.hostnames, job_id=job_id)
    return "stopped"
