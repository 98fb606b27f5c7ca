"""The chain: run a recipe's stages in order with one executor (Slurm, Local or DryRun; see executors.py).

    run_chain(recipe, stages, executor)   one loop for every executor; a stage already done is skipped
    submit(recipe, ["preprocess", "train"])     on Slurm, as one afterok chain; returns at once
    run_local(recipe, [...])                    on this machine, one stage after the other
    dry_run(recipe, [...])                      the sbatch scripts that would be submitted

A relaunch skips work already done: finished shards (completion markers) and a finished training (the adapter);
each stage's `todo` says what is left (launcher/stages.py).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import List, Sequence, Union

from ftlib import recipe as recipe_mod
from ftlib.rundir import RunDir, read_json, use_private_files
from launcher import records
from launcher.executors import DryRun, LaunchError, Local, Slurm, Submitted
from launcher.stages import STAGES, Stage

StageList = Sequence[Union[str, Stage]]


def run_chain(recipe, stages: StageList, executor) -> List[Submitted]:
    """Run `stages` in order with `executor`; each waits for the one before (afterok on Slurm)."""
    run = save_recipe(recipe)
    plan = [(stage, stage.todo(recipe)) for stage in (STAGES[s] if isinstance(s, str) else s for s in stages)]
    executor.prepare(run, recipe, [(stage, todo) for stage, todo in plan if todo])
    submitted: List[Submitted] = []
    try:
        for stage, todo in plan:
            if not todo:
                print(executor.skipped.format(stage.name))
                continue
            sub = executor.run(run, stage, recipe, todo, after=submitted[-1] if submitted else None)
            if sub is not None:
                submitted.append(sub)
    except BaseException:
        executor.abort(submitted)  # nothing half-submitted: no stage left waiting on one that never comes
        raise
    return submitted


def resolve_launcher(recipe) -> str:
    if recipe.run.launcher != "auto":
        return str(recipe.run.launcher)
    return "slurm" if shutil.which("sbatch") else "local"


def submit(recipe, stages: StageList) -> List[Submitted]:
    return run_chain(recipe, stages, Slurm())


def run_local(recipe, stages: StageList) -> List[Submitted]:
    return run_chain(recipe, stages, Local())


def dry_run(recipe, stages: StageList) -> List[Path]:
    executor = DryRun()
    run_chain(recipe, stages, executor)
    return executor.written


def save_recipe(recipe) -> RunDir:
    """The run directory, private (or shared with run.group) like all this process and its jobs write from here."""
    use_private_files(recipe)
    run = RunDir.of(recipe)
    recipe_mod.save(recipe, run.recipe)
    return run


def wait_for_endpoint(recipe, job_id: str, timeout_s: float) -> dict:
    """Block until the serve job `job_id` has written endpoint.json; fail early if the job ends first."""
    run = RunDir.of(recipe)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        endpoint = read_json(run.endpoint, {})
        if str(endpoint.get("job_id")) == job_id:
            return endpoint
        state = records.job_states([job_id]).get(job_id, "PENDING")
        if state not in records.ACTIVE:
            raise LaunchError(f"[serve] job {job_id} ended ({state}) before its endpoint was up; "
                              f"see `make status RUN={run.root}` and `make logs RUN={run.root} STAGE=serve`")
        time.sleep(2)
    raise LaunchError(f"[serve] job {job_id}: no endpoint after {timeout_s:.0f} s (still pending? `make status`)")
