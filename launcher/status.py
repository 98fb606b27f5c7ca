"""Operations on a submitted run: `make status`, `make logs`, `make cancel`.

Everything comes from the run directory's jobs.json and from Slurm's accounting (launcher.records), so it works
from any login node, for runs submitted by anyone with access to the folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

from ftlib.rundir import RunDir
from launcher import records

FIELDS = ["JobID", "JobName", "State", "Elapsed", "NodeList", "ExitCode", "Reason"]


def stage_rows(run: RunDir) -> List[Dict[str, str]]:
    """One row per job (and per array task) of the run's latest submission of each stage, and one per earlier run
    of a job that Slurm requeued (marked "earlier")."""
    rows = []
    for stage, entry in records.JobRecords(run).stages().items():
        if entry.get("launcher") != "slurm":
            rows.append({"stage": stage, "JobID": entry["job_id"], "State": "LOCAL", "Elapsed": "", "NodeList": "",
                         "ExitCode": "", "Reason": ""})
            continue
        if records.accounting_missing():  # no history: what slurmctld still knows, state only
            rows += [{"stage": stage, "JobID": j, "State": s, "Elapsed": "", "NodeList": "", "ExitCode": "",
                      "Reason": ""} for j, s in records.live_states(records.job_ids(entry)).items()]
        else:
            found = records.sacct(records.job_ids(entry), FIELDS, attempts=True)
            current = {r["JobID"]: k for k, r in enumerate(found)}  # each job's last run, oldest first
            rows += [{"stage": stage, **r, "earlier": current[r["JobID"]] != k} for k, r in enumerate(found)]
    return rows


def log_path(run: RunDir, stage: str, task: int = 0, err: bool = False, job_id: Optional[str] = None) -> Path:
    """The log of one task: the shard index for preprocessing, the rank for training."""
    paths = records.JobRecords(run).log_paths(stage, task, job_id)
    return paths.stderr if err else paths.stdout


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
    pending = records.pending_reasons([r["JobID"] for r in rows if r["State"] == "PENDING"])
    out = [f"run {run.root}", f"{'stage':<11}{'job':<12}{'state':<14}{'elapsed':<11}{'nodes':<16}exit"]
    missing = records.accounting_missing()
    if missing:
        out.insert(1, f"(job history unavailable: this site keeps no accounting — {missing}; states come from "
                      f"squeue/scontrol, and a job that ended over a few minutes ago shows as ENDED)")
    failures, lost = [], []
    for r in rows:
        state = r["State"].split()[0]
        if state == "PENDING" and pending.get(r["JobID"]):
            state = f"PENDING ({pending[r['JobID']]})"
        out.append(f"{r['stage']:<11}{r['JobID']:<12}{state:<14}{r['Elapsed']:<11}{r['NodeList']:<16}{r['ExitCode']}")
        if r.get("earlier"):  # Slurm requeued it and runs it again: only a lost node needs saying
            if state == "NODE_FAIL":
                lost.append(r)
        elif state == "NODE_FAIL" and records.live_states([r["JobID"]]).get(r["JobID"]) in records.ACTIVE:
            lost.append(r)  # requeued, and its next run not started yet: sacct lists that one once it starts
        elif state in records.FAILED:
            failures.append(r)
    for r in lost:
        out.append(f"\n{r['stage']}: job {r['JobID']} lost a node (NODE_FAIL; nodes of the job: {r['NodeList']}"
                   f"{down_nodes(r['NodeList'])}); Slurm requeued it: it resumes from its last complete "
                   f"checkpoint")
    jobs = records.JobRecords(run)
    for r in failures:
        if "_" in r["JobID"]:  # an array task: its record says which shard it ran
            shard = jobs.shard_of(r["stage"], r["JobID"])
            task = int(r["JobID"].split("_")[1].strip("[]").split("-")[0]) if shard is None else shard
            what = f"shard {task} (array task {r['JobID']})"
        elif r["State"].startswith("CANCELLED"):
            out.append(f"\n{r['stage']}: job {r['JobID']} was cancelled ({r['State']})")
            continue
        else:
            task, what = 0, f"job {r['JobID']}"
            died = first_dead_task(log_path(run, r["stage"], 0, err=True, job_id=r["JobID"]))
            if died:  # the task whose end took the others down (srun --kill-on-bad-exit)
                task = died["task"]
                what += f" (rank {task} on {died['node']} died first: {died['cause']})"
            if r["State"].startswith("NODE_FAIL"):
                what += f" (node failure; nodes of the job: {r['NodeList']}{down_nodes(r['NodeList'])})"
        log = log_path(run, r["stage"], task, err=True, job_id=r["JobID"])
        out.append(f"\n{r['stage']}: {what} {r['State']}, exit {r['ExitCode']}; last lines of {log}:")
        out.append(tail(log))
    return "\n".join(out)


# srun's own lines about its tasks, in the batch script's stderr (submitit's <job>_0_log.err, shared with task 0):
#   srun: error: node2: task 1: Out Of Memory       srun: error: node1: task 0: Killed
#   srun: error: node2: task 1: Exited with exit code 3
SRUN_TASK_END = re.compile(r"srun: error: (?P<node>[^:\s]+): tasks? (?P<task>\d+)[^:]*: (?P<cause>.+)")


def first_dead_task(batch_log: Path) -> Optional[Dict]:
    """The task that ended first with an error: srun's first such line in the batch log (the tasks it then ends,
    or that fail on their own when a peer vanishes, come after it). {task, node, cause} or None."""
    try:
        lines = batch_log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    first = next((m for m in map(SRUN_TASK_END.search, lines) if m), None)
    if first is None:
        return None
    return {"task": int(first["task"]), "node": first["node"], "cause": first["cause"].strip()}


def down_nodes(nodelist: str) -> str:
    """'; down now: node2 (Not responding)' for the job's nodes that Slurm has marked down, else ''."""
    rows = records.node_states(nodelist)
    down = [f"{n} ({why or state})" for n, state, why in rows if state.rstrip("*").lower() in records.NODE_DOWN]
    return f"; down now: {', '.join(down)}" if down else ""


def cancel(run: RunDir) -> List[str]:
    """scancel every job of the run's chain; returns the ids."""
    ids = records.JobRecords(run).slurm_ids()
    records.cancel(ids)
    return ids
