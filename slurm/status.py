"""Operations on a submitted run: `make status`, `make logs`, `make cancel`.

Everything comes from the run directory's jobs.json (job ids and submitit folders) and from Slurm's own
accounting (`sacct`), so it works from any login node, for runs submitted by anyone with access to the folder.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from ftlib.rundir import RunDir, read_json

FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def _sacct(job_ids: List[str]) -> List[Dict[str, str]]:
    if not job_ids:
        return []
    fields = "JobID,JobName,State,Elapsed,NodeList,ExitCode,Reason"
    try:
        out = subprocess.run(["sacct", "-X", "-P", "-n", f"--format={fields}", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.stdout.splitlines():
        values = line.split("|")
        if len(values) == len(fields.split(",")):
            rows.append(dict(zip(fields.split(","), values)))
    return rows


def _squeue_reasons(job_ids: List[str]) -> Dict[str, str]:
    """Pending jobs' reasons (sacct does not always show them)."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    reasons = {}
    for line in out.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        reasons[job] = reason if reason and reason != "None" else state
    return reasons


def job_states(job_ids: List[str]) -> Dict[str, str]:
    """Job id (array tasks as <id>_<k>) -> Slurm state, e.g. {"12_0": "COMPLETED", "13": "PENDING"}."""
    return {r["JobID"]: r["State"].split()[0] for r in _sacct(job_ids)}


def stage_rows(run: RunDir) -> List[Dict[str, str]]:
    """One row per job (and per array task) of the run's latest submission of each stage."""
    state = read_json(run.jobs, {"stages": {}})
    rows = []
    for stage, entry in state["stages"].items():
        if entry.get("launcher") != "slurm":
            rows.append({"stage": stage, "JobID": entry["job_id"], "State": "LOCAL", "Elapsed": "", "NodeList": "",
                         "ExitCode": "", "Reason": ""})
            continue
        for r in _sacct([entry["job_id"]]):
            rows.append({"stage": stage, **r})
    return rows


def log_path(run: RunDir, stage: str, task: int = 0, err: bool = False, job_id: Optional[str] = None) -> Path:
    """The submitit log of one task: the array index for preprocessing, the rank for training."""
    state = read_json(run.jobs, {"stages": {}})
    entry = state["stages"].get(stage)
    if entry is None:
        raise FileNotFoundError(f"{run.root}: no {stage} stage was submitted (jobs.json)")
    job = job_id or entry["job_id"]
    folder = Path(entry["folder"])
    suffix = "err" if err else "out"
    if stage == "preprocess" and entry.get("launcher") == "slurm":
        name = f"{job.split('_')[0]}_{task}_0_log.{suffix}"
    elif stage == "train":
        name = f"{job}_{task}_log.{suffix}"
    else:
        name = f"{job}_0_log.{suffix}"
    return folder / name


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"


def status(run: RunDir) -> str:
    """A table of each stage's jobs, and for each failed task the tail of its log."""
    rows = stage_rows(run)
    if not rows:
        return f"{run.root}: nothing submitted yet"
    pending = _squeue_reasons([r["JobID"] for r in rows if r["State"] == "PENDING"])
    out = [f"run {run.root}", f"{'stage':<11}{'job':<12}{'state':<14}{'elapsed':<11}{'nodes':<16}exit"]
    failures = []
    for r in rows:
        state = r["State"].split()[0]
        if state == "PENDING" and pending.get(r["JobID"]):
            state = f"PENDING ({pending[r['JobID']]})"
        out.append(f"{r['stage']:<11}{r['JobID']:<12}{state:<14}{r['Elapsed']:<11}{r['NodeList']:<16}{r['ExitCode']}")
        if state in FAILED:
            failures.append(r)
    for r in failures:
        if r["stage"] == "preprocess" and "_" in r["JobID"]:
            task = int(r["JobID"].split("_")[1].strip("[]").split("-")[0])
            what = f"shard {task} (array task {r['JobID']})"
        else:
            task, what = 0, f"job {r['JobID']}"
        if r["State"].startswith("CANCELLED") and r["stage"] != "preprocess":
            out.append(f"\n{r['stage']}: {what} was cancelled ({r['State']})")
            continue
        log = log_path(run, r["stage"], task, err=True, job_id=r["JobID"])
        out.append(f"\n{r['stage']}: {what} {r['State']}, exit {r['ExitCode']}; last lines of {log}:")
        out.append(tail(log))
    return "\n".join(out)


def cancel(run: RunDir) -> List[str]:
    """scancel every job of the run's chain; returns the ids."""
    state = read_json(run.jobs, {"stages": {}})
    ids = [e["job_id"] for e in state["stages"].values() if e.get("launcher") == "slurm"]
    if ids:
        subprocess.run(["scancel", *ids], check=False)
    return ids
