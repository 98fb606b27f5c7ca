"""Turn a recipe into jobs: the preprocessing array → multi-node training (afterok) → the serve job (afterok).

The same stages run on Slurm (submitit's SlurmExecutor, one dependency chain submitted at once) or on this
machine (submitit's LocalExecutor, one stage after the other). Every sbatch script is a pure function of the
recipe (`render_sbatch`), written into the run directory and checked against golden files in the tests.

A relaunch skips work already done: finished shards (completion markers) and a finished training (the adapter).
"""
from __future__ import annotations

import datetime
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from ftlib import recipe as recipe_mod
from ftlib.rundir import RunDir, read_json, write_atomic, write_json
from slurm import jobs

STAGES = ("preprocess", "train", "serve")


class LaunchError(Exception):
    """A stage failed or cannot be submitted; the message says which and where its log is."""


def resolve_launcher(recipe) -> str:
    if recipe.run.launcher != "auto":
        return recipe.run.launcher
    return "slurm" if shutil.which("sbatch") else "local"


# ---------------------------------------------------------------------------------------- sbatch parameters
def slurm_parameters(recipe, stage: str, dependency: Optional[str] = None) -> Dict:
    """submitit SlurmExecutor parameters of one stage, straight from the recipe's `slurm.<stage>` section."""
    s = getattr(recipe.slurm, stage)
    params = {
        "job_name": f"{recipe.run.name}-{stage}",
        "time": s.time_min,
        "nodes": s.nodes,
        "ntasks_per_node": s.tasks_per_node if stage == "train" else 1,
        "cpus_per_task": s.cpus_per_task,
        "array_parallelism": s.array_parallelism,
        "setup": list(s.setup),
    }
    optional = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint,
                "mem": f"{int(s.mem_gb * 1024)}M" if s.mem_gb else None,
                "gpus_per_node": s.gpus_per_node or None, "exclusive": True if s.exclusive else None,
                "dependency": dependency}
    params.update({k: v for k, v in optional.items() if v is not None})
    extra = dict(s.additional)
    if dependency:
        # Without this, a job whose dependency failed stays PENDING (DependencyNeverSatisfied) forever.
        extra.setdefault("kill-on-invalid-dep", "yes")
    if extra:
        params["additional_parameters"] = extra
    return params


def render_sbatch(recipe, stage: str, dependency: Optional[str] = None, array_size: Optional[int] = None) -> str:
    """The sbatch script submitit submits for a stage (a pure function: checked against golden files)."""
    folder = RunDir.of(recipe).stage_logs(stage)
    params = slurm_parameters(recipe, stage, dependency)
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)


def _executor(recipe, stage: str, launcher: str, dependency: Optional[str] = None):
    folder = RunDir.of(recipe).stage_logs(stage)
    s = getattr(recipe.slurm, stage)
    if launcher == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
        ex.update_parameters(**slurm_parameters(recipe, stage, dependency))
    else:
        ex = submitit.LocalExecutor(folder=folder)
        # One machine: all of a stage's ranks become local processes (nodes × tasks_per_node of the recipe).
        tasks = recipe.world_size if stage == "train" else 1
        ex.update_parameters(timeout_min=s.time_min, tasks_per_node=tasks, nodes=1)
    return ex


# ---------------------------------------------------------------------------------------- the chain
@dataclass
class Submitted:
    stage: str
    job_id: str
    folder: str
    tasks: List[int] = field(default_factory=list)  # array indices, for the preprocessing stage
    jobs: list = field(default_factory=list, repr=False)  # submitit Job objects (not saved)


def missing_shards(recipe) -> List[int]:
    from ftlib.data.preprocess import shards_status

    return list(shards_status(recipe)["missing"])


def training_done(recipe) -> bool:
    return (RunDir.of(recipe).adapter / "adapter_config.json").is_file()


def plan(recipe, stages: List[str]) -> Dict[str, Optional[List[int]]]:
    """What to run: for each requested stage, None if it is already done, else the work (shard indices for the
    array, [] for the other stages)."""
    todo: Dict[str, Optional[List[int]]] = {}
    for stage in stages:
        if stage == "preprocess":
            todo[stage] = missing_shards(recipe) or None
        elif stage == "train":
            todo[stage] = None if training_done(recipe) else []
        else:
            todo[stage] = []
    return todo


def save_recipe(recipe) -> RunDir:
    run = RunDir.of(recipe)
    run.root.mkdir(parents=True, exist_ok=True)
    recipe_mod.save(recipe, run.recipe)
    return run


def dry_run(recipe, stages: List[str]) -> List[Path]:
    """Write (and return) every sbatch script that would be submitted, in order, with placeholder dependencies."""
    run = save_recipe(recipe)
    todo = plan(recipe, stages)
    written, previous = [], None
    for stage in stages:
        work = todo[stage]
        if work is None:
            print(f"# [{stage}] already done, would be skipped")
            continue
        dependency = f"afterok:<{previous}>" if previous else None
        array = len(work) if stage == "preprocess" else None
        path = run.sbatch / f"{stage}.sbatch"
        write_atomic(path, render_sbatch(recipe, stage, dependency, array))
        written.append(path)
        previous = stage
    return written


def submit(recipe, stages: List[str]) -> List[Submitted]:
    """Submit the requested stages on Slurm as one dependency chain; returns at once."""
    run = save_recipe(recipe)
    _refuse_if_in_flight(run)
    todo = plan(recipe, stages)
    submitted: List[Submitted] = []
    dependency = None
    for stage in stages:
        work = todo[stage]
        if work is None:
            print(f"[{stage}] already done, skipped")
            continue
        ex = _executor(recipe, stage, "slurm", dependency)
        if stage == "preprocess":
            n = recipe.data.num_shards
            with ex.batch():
                array_jobs = [ex.submit(jobs.preprocess_shard, recipe, i, n) for i in work]
            job_id = array_jobs[0].job_id.split("_")[0]
            sub = Submitted(stage, job_id, str(ex.folder), tasks=list(work), jobs=array_jobs)
        else:
            job = ex.submit(jobs.Train() if stage == "train" else jobs.serve_node, recipe)
            sub = Submitted(stage, job.job_id, str(ex.folder), jobs=[job])
        _keep_script(run, stage, sub.job_id, Path(ex.folder))
        submitted.append(sub)
        dependency = f"afterok:{sub.job_id}"
        print(f"[{stage}] submitted job {sub.job_id}" + (f" ({len(sub.tasks)} array tasks)" if sub.tasks else "")
              + (f", after {submitted[-2].job_id}" if len(submitted) > 1 else ""))
    record(run, "slurm", submitted)
    return submitted


def wait_for_endpoint(recipe, job_id: str, timeout_s: float) -> dict:
    """Block until the serve job `job_id` has written endpoint.json; fail early if the job ends first."""
    from slurm.status import job_states

    run = RunDir.of(recipe)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        endpoint = read_json(run.endpoint, {})
        if str(endpoint.get("job_id")) == job_id:
            return endpoint
        state = job_states([job_id]).get(job_id, "PENDING")
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"):
            raise LaunchError(f"[serve] job {job_id} ended ({state}) before its endpoint was up; "
                              f"see `make status RUN={run.root}` and `make logs RUN={run.root} STAGE=serve`")
        time.sleep(2)
    raise LaunchError(f"[serve] job {job_id}: no endpoint after {timeout_s:.0f} s (still pending? `make status`)")


def _keep_script(run: RunDir, stage: str, job_id: str, folder: Path) -> None:
    """Copy the sbatch script submitit generated (<folder>/<job id>_submission.sh) into the run's sbatch/."""
    scripts = sorted(folder.glob(f"{job_id}*_submission.sh"))
    if scripts:
        write_atomic(run.sbatch / f"{stage}.sbatch", scripts[0].read_text())


def record(run: RunDir, launcher: str, submitted: List[Submitted]) -> None:
    """jobs.json: the latest job of each stage, plus the history of every submission."""
    now = datetime.datetime.now().isoformat(timespec="seconds")
    state = read_json(run.jobs, {"stages": {}, "history": []})
    for s in submitted:
        entry = {"job_id": s.job_id, "folder": s.folder, "tasks": s.tasks, "launcher": launcher, "submitted": now}
        state["stages"][s.stage] = entry
        state["history"].append({"stage": s.stage, **entry})
    write_json(run.jobs, state)


def _refuse_if_in_flight(run: RunDir) -> None:
    from slurm.status import job_states

    state = read_json(run.jobs, {"stages": {}})
    ids = [e["job_id"] for e in state["stages"].values() if e.get("launcher") == "slurm"]
    active = {j: s for j, s in job_states(ids).items() if s in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING")}
    if active:
        listing = ", ".join(f"{j} {s}" for j, s in active.items())
        raise LaunchError(f"{run.root.name} still has jobs in flight ({listing}); `make cancel RUN={run.root}` first")


# ---------------------------------------------------------------------------------------- local execution
def run_local(recipe, stages: List[str]) -> None:
    """Run the stages on this machine, one after the other, with the same callables as on Slurm."""
    run = save_recipe(recipe)
    todo = plan(recipe, stages)
    for stage in stages:
        work = todo[stage]
        if work is None:
            print(f"[{stage}] already done, skipped")
            continue
        if stage == "serve":
            from ftlib.serve.local import serve_foreground

            serve_foreground(recipe)  # until Ctrl-C / SIGTERM, like a serve job until its time limit
            continue
        ex = _executor(recipe, stage, "local")
        started = time.time()
        if stage == "preprocess":
            n = recipe.data.num_shards
            print(f"[preprocess] tokenizing {len(work)} of {n} shards as a local array")
            with ex.batch():
                stage_jobs = [ex.submit(jobs.preprocess_shard, recipe, i, n) for i in work]
            sub = Submitted(stage, stage_jobs[0].job_id, str(ex.folder), tasks=list(work), jobs=stage_jobs)
        else:
            print(f"[train] {recipe.world_size} processes (DeepSpeed, world size {recipe.world_size})")
            job = ex.submit(jobs.Train(), recipe)
            sub = Submitted(stage, job.job_id, str(ex.folder), jobs=[job])
        record(run, "local", [sub])
        _wait_local(sub, follow=(stage == "train"))
        if stage == "preprocess":
            from ftlib.data.preprocess import write_manifest

            print(f"[preprocess] done in {time.time() - started:.0f} s: {write_manifest(recipe).parent}")
        else:
            print(f"[train] done in {time.time() - started:.0f} s: adapter in {RunDir.of(recipe).adapter}")


def _wait_local(sub: Submitted, follow: bool) -> None:
    """Wait for a local stage; print rank 0's log lines as they come when `follow`."""
    printed = 0
    while not all(j.done() for j in sub.jobs):
        if follow:
            printed = _print_new(sub.jobs[0].paths.stdout, printed)
        time.sleep(1)
    if follow:
        _print_new(sub.jobs[0].paths.stdout, printed)
    for j in sub.jobs:
        try:
            j.results()  # every task of the job (ranks)
        except Exception as e:  # submitit re-raises the task's exception with its traceback as text
            log = j.paths.stderr
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise LaunchError(f"[{sub.stage}] task {j.job_id} failed: {last}\n  log: {log}") from None


def _print_new(path: Path, already: int) -> int:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return already
    for line in lines[already:]:
        print("   ", line)
    return len(lines)
