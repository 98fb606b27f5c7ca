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
import signal
import sys
import time

import submitit

from ftlib.rundir import use_private_files
from ftlib.stage import check_offline


def preprocess_shard(recipe, index: int, num_shards: int) -> str:
    """One task of the preprocessing array: tokenize shard `index` of `num_shards`."""
    from ftlib.data.preprocess import run_shard

    use_private_files(recipe)
    check_offline(recipe)
    return str(run_shard(recipe, index, num_shards))


class Train(submitit.helpers.Checkpointable):
    """One task of the (multi-node) training job. Every task runs this; together they form one torch.distributed
    group. On USR1/USR2 ftlib.train saves a complete checkpoint on all ranks and returns "interrupted"; then rank 0
    hands the signal to submitit, which calls `checkpoint()` below and requeues the job. The requeued job calls
    `ftlib.train.train` again, which resumes from the latest complete checkpoint by itself."""

    def __call__(self, recipe) -> str:
        use_private_files(recipe)
        check_offline(recipe)
        use_gpus = recipe.resources.train.gpus_per_node > 0
        if not use_gpus:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Name nodes in rendezvous errors by their Slurm name (on the test cluster all share one hostname).
        os.environ.setdefault("FTLIB_NODE_NAME", os.environ.get("SLURMD_NODENAME", ""))
        # MASTER_ADDR is the first node; MASTER_PORT is derived from the job id, so two jobs sharing a node differ.
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                           overwrite=True)
        if use_gpus:
            os.environ.update(task_device(os.environ, dist_env.local_rank))
        from ftlib.train import train

        outcome = train(recipe)
        if outcome == "interrupted":
            env = submitit.JobEnvironment()
            if env.global_rank == 0:
                signal.raise_signal(submitit.JobEnvironment._usr_sig())  # submitit: checkpoint() + requeue + exit
            # Other ranks wait to be stopped by the requeue rather than report a result for a job that continues.
            time.sleep(300)
            sys.exit(1)
        return outcome

    def checkpoint(self, recipe) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, recipe)


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
