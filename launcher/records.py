"""Job records: which job ran which stage of a run (jobs.json), and what Slurm says about those jobs.

The one module that reads and writes a run's jobs.json and calls Slurm's accounting (`sacct`, `squeue`). Every
state list lives here. jobs.json holds, for each stage, its latest submission and the history of all of them:

  {"stages": {"train": {"job_id": "13", "folder": ".../logs/train", "launcher": "slurm", "tasks": [],
                        "task_jobs": {}, "submitted": "..."}}, "history": [...]}

`tasks` lists an array stage's shard indices and `task_jobs` maps each to its own job id ("12_3" on Slurm, a process
id locally), from which submitit's JobPaths names the logs.
"""
from __future__ import annotations

import datetime
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from submitit.core.utils import JobPaths

from ftlib.rundir import RunDir, read_json, write_json

# Slurm job states (sacct/squeue spelling).
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING")
FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE")
WORST_FIRST = ["FAILED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "CANCELLED", "PREEMPTED",
               "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "PENDING", "COMPLETED"]


# ----------------------------------------------------------------------------------------------------- jobs.json
class JobRecords:
    """A run's jobs.json."""

    def __init__(self, run: RunDir):
        self.run = run

    def _read(self) -> dict:
        return read_json(self.run.jobs, {"stages": {}, "history": []})

    def stages(self) -> Dict[str, dict]:
        """{stage: its latest submission}, in the order they were first submitted."""
        return self._read()["stages"]

    def latest(self, stage: str) -> Optional[dict]:
        return self.stages().get(stage)

    def add(self, stage: str, launcher: str, job_id: str, folder: Path, task_jobs: Optional[Dict[int, str]] = None,
            job_ids: Optional[List[str]] = None):
        now = datetime.datetime.now().isoformat(timespec="seconds")
        state = self._read()
        task_jobs = task_jobs or {}
        entry = {"job_id": job_id, "job_ids": job_ids or [job_id], "folder": str(folder), "launcher": launcher,
                 "submitted": now, "tasks": sorted(task_jobs), "task_jobs": {str(k): v for k, v in task_jobs.items()}}
        state["stages"][stage] = entry
        state.setdefault("history", []).append({"stage": stage, **entry})
        write_json(self.run.jobs, state)

    def slurm_ids(self) -> List[str]:
        """The Slurm job ids of every stage's latest submission, in chain order."""
        return [j for e in self.stages().values() if e.get("launcher") == "slurm" for j in job_ids(e)]

    def shard_of(self, stage: str, job_id: str) -> Optional[int]:
        """The shard an array task ran ("15_2" -> its shard index), from the stage's record."""
        for shard, job in (self.latest(stage) or {}).get("task_jobs", {}).items():
            if job == job_id:
                return int(shard)
        return None

    def log_paths(self, stage: str, task: int = 0, job_id: Optional[str] = None) -> JobPaths:
        """submitit's paths of one task's logs: the shard index of an array stage, else the rank (task) of the job.
        `job_id` picks a given job (e.g. an array task's "12_3") instead of the latest submission's."""
        entry = self.latest(stage)
        if entry is None:
            raise FileNotFoundError(f"{self.run.root}: no {stage} stage was submitted (jobs.json)")
        if entry.get("tasks"):  # an array stage: one job of one task per shard
            job_id = job_id or entry.get("task_jobs", {}).get(str(task)) or f"{entry['job_id']}_{task}"
            return JobPaths(entry["folder"], job_id=job_id, task_id=0)
        return JobPaths(entry["folder"], job_id=job_id or entry["job_id"], task_id=task)

    def stage_states(self, lookup=None) -> Dict[str, dict]:
        """{stage: {job_id, launcher, state}}: one Slurm state per stage (an array takes its worst task's), None
        for local stages or when accounting is unavailable. `lookup(ids)` is `job_states` unless given."""
        entries = self.stages()
        stages = {name: {"job_id": e.get("job_id"), "launcher": e.get("launcher"), "state": None}
                  for name, e in entries.items()}
        ids = self.slurm_ids()
        states = (lookup or job_states)(ids) if ids else {}
        for name, s in stages.items():
            if s["launcher"] == "slurm" and states:
                s["state"] = stage_state(job_ids(entries[name]), states)
        return stages


# ----------------------------------------------------------------------------------------------------- Slurm
def sacct(job_ids: List[str], fields: List[str], attempts: bool = False) -> List[Dict[str, str]]:
    """One dict per job (and per array task), allocation lines only; [] when accounting is unavailable (see
    accounting_missing). With attempts=True, one per run of a job Slurm requeued (preemption, time limit, node
    failure), oldest first, the last being the current one."""
    if not job_ids or accounting_missing():
        return []
    try:
        out = subprocess.run(["sacct", "-X", "-P", "-n", f"--format={','.join(fields)}", "-j", ",".join(job_ids)]
                             + (["--duplicates"] if attempts else []), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split("|") for line in out.stdout.splitlines()]
    return [dict(zip(fields, values)) for values in rows if len(values) == len(fields)]


@functools.lru_cache(maxsize=1)
def accounting_missing() -> Optional[str]:
    """Why this site keeps no job history (no sacct, or no slurmdbd behind it), or None when it does."""
    if not shutil.which("sacct"):
        return "sacct is not installed"
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-j", "1", "--format=JobID"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sacct did not answer ({e})"
    if out.returncode != 0:
        return " ".join((out.stderr or out.stdout).split()) or f"sacct exited with {out.returncode}"
    return None


def live_states(job_ids: List[str]) -> Dict[str, str]:
    """States from slurmctld itself (squeue, then scontrol for jobs that ended a few minutes ago): what a site
    without accounting still knows. A job neither knows has ended, how is lost: "ENDED"."""
    states: Dict[str, str] = {}
    if not job_ids or not shutil.which("squeue"):
        return states
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(job_ids)], capture_output=True,
                             text=True, timeout=30).stdout
        states.update(line.split("|", 1) for line in out.splitlines() if "|" in line)
        for job in job_ids:
            if any(j == job or j.startswith(f"{job}_") for j in states):
                continue
            shown = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True,
                                   timeout=30).stdout
            for line in shown.splitlines():
                array_job = re.search(r"\bArrayJobId=(\d+) ArrayTaskId=(\d+)", line)
                name = f"{array_job.group(1)}_{array_job.group(2)}" if array_job else job
                found = re.search(r"\bJobState=(\S+)", line)
                states[name] = found.group(1) if found else "ENDED"
            states.setdefault(job, "ENDED")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return states


def job_states(job_ids: List[str]) -> Dict[str, str]:
    """Job id (array tasks as <id>_<k>) -> Slurm state, e.g. {"12_0": "COMPLETED", "13": "PENDING"}; from slurmctld
    (live_states) where the site keeps no accounting."""
    if accounting_missing():
        return live_states(job_ids)
    return {r["JobID"]: r["State"].split()[0] for r in sacct(job_ids, ["JobID", "State"])}


def job_ids(entry: dict) -> List[str]:
    """Every job of a stage's record (an array stage split into several arrays has several)."""
    return entry.get("job_ids") or [entry["job_id"]]


def stage_state(ids: List[str], states: Dict[str, str]) -> str:
    """One state for a stage's jobs: the worst of them, an array's tasks included."""
    mine = {s for j, s in states.items() if any(j == i or j.startswith(f"{i}_") for i in ids)}
    if not mine:
        return "UNKNOWN"
    return min(mine, key=lambda s: WORST_FIRST.index(s) if s in WORST_FIRST else len(WORST_FIRST))


def pending_reasons(job_ids: List[str]) -> Dict[str, str]:
    """Pending jobs' reasons from squeue (sacct does not always show them)."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    reasons = {}
    for line in out.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        reasons[job] = reason if reason and reason != "None" else state
    return reasons


NODE_DOWN = ("down", "drained", "draining", "fail", "failing", "not_responding", "unknown")


def node_states(nodelist: str) -> List[tuple]:
    """[(node, state, reason)] of the nodes in a Slurm node list, from sinfo; [] when sinfo is unavailable."""
    if not nodelist or not shutil.which("sinfo"):
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", nodelist, "-o", "%N|%T|%E"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [tuple((line.split("|") + ["", ""])[:3]) for line in out.stdout.splitlines() if line]
    return list(dict.fromkeys(rows))  # sinfo -N lists a node once per partition


def cancel(ids: List[str]) -> None:
    if ids:
        subprocess.run(["scancel", *ids], check=False)


@functools.lru_cache(maxsize=1)
def slurm_config() -> Dict[str, str]:
    """`scontrol show config` as {name: value} ({} when scontrol is unavailable)."""
    if not shutil.which("scontrol"):
        return {}
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+)\s*=\s*(.*)$", out, re.M)}


def max_array_size() -> Optional[int]:
    """The site's MaxArraySize (array indices must stay below it); None if unknown."""
    found = re.match(r"\d+", slurm_config().get("MaxArraySize", ""))
    return int(found.group()) if found and int(found.group()) > 0 else None


def kill_wait_s() -> Optional[float]:
    """The site's KillWait: seconds between the SIGTERM that ends a job (scancel, time limit) and the SIGKILL that
    follows; None if unknown."""
    found = re.match(r"\d+", slurm_config().get("KillWait", ""))
    return float(found.group()) if found else None


def job_now(job_id: str) -> Dict[str, str]:
    """What slurmctld says of a job now: `scontrol show job -o` as {field: value} (JobState, Reason, Restarts,
    TimeLimit, RunTime, PreemptTime when the site preempts, ...); {} when it cannot be asked."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    first = out.splitlines()[0] if out.strip() else ""
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", first))


def accounted_state(job_id: str) -> Optional[str]:
    """The state sacct records for the job's current run, e.g. "CANCELLED by 1001", "TIMEOUT", "RUNNING" (it tells
    why a job is ending, which slurmctld only shows as COMPLETING); None without accounting."""
    rows = sacct([str(job_id)], ["JobID", "State"])
    states = [r["State"] for r in rows if r["JobID"] == str(job_id)]
    return states[-1] if states else None


def usage(job_id: str) -> Optional[Dict[str, float]]:
    """Elapsed seconds, nodes, GPUs and CPUs of a Slurm job from its accounting (None when sacct is unavailable).
    For a requeued job, sacct reports the latest attempt."""
    rows = sacct([str(job_id)], ["Elapsed", "NNodes", "AllocTRES"])
    if not rows:
        return None
    row = rows[-1]
    alloc = parse_tres(row["AllocTRES"])
    return {"elapsed_s": parse_elapsed(row["Elapsed"]), "nodes": float(row["NNodes"] or 0),
            "gpus": alloc.get("gpu", 0.0), "cpus": alloc.get("cpu", 0.0), "job_id": str(job_id)}


def train_usage(run: RunDir) -> Optional[Dict[str, float]]:
    """What the cluster charged for the run's training job (None for a local run or without accounting)."""
    entry = JobRecords(run).latest("train") or {}
    return usage(entry["job_id"]) if entry.get("launcher") == "slurm" and entry.get("job_id") else None


def parse_elapsed(text: str) -> float:
    """Slurm's [D-]HH:MM:SS (or MM:SS) -> seconds."""
    days, _, clock = text.strip().rpartition("-")
    parts = [float(x) for x in clock.split(":")]
    seconds = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    return seconds + 86400 * int(days or 0)


def parse_tres(text: str) -> Dict[str, float]:
    """AllocTRES like `cpu=4,mem=8G,node=2,gres/gpu=8` -> {"cpu": 4, "node": 2, "gpu": 8} (memory left out)."""
    out: Dict[str, float] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("gres/gpu"):  # gres/gpu=8, or typed: gres/gpu:a100=8 (counted once via the plain key)
            if key == "gres/gpu" or "gpu" not in out:
                out["gpu"] = float(value)
        elif key in ("cpu", "node"):
            out[key] = float(value)
    return out
