"""Operations on a submitted run: `make status`, `make logs`, `make cancel`.

Everything comes from the run directory's jobs.json and from Slurm's accounting (launcher.records), so it works
from any login node, for runs submitted by anyone with access to the folder.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, List, Optional

from ftlib import checkpoints
from ftlib.rundir import RunDir, read_json
from ftlib.watchdog import heartbeats, stall_verdict
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
    for r in rows:
        if r["stage"] == "train" and r["State"].startswith("RUNNING") and not r.get("earlier"):
            out.append(ranks_text(run, r["JobID"]))
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
            out.append(f"\n{r['stage']}: job {r['JobID']} " + cancelled_text(run, r["stage"], r["JobID"], r["State"]))
            continue
        else:
            task, what = 0, f"job {r['JobID']}"
            died = first_dead_task(log_path(run, r["stage"], 0, err=True, job_id=r["JobID"]))
            stalled = stall_verdict(run, r["JobID"]) if r["stage"] == "train" else None
            if stalled:  # the watchdog ended it: the ranks that exited first are the healthy ones
                task = stalled["ranks"][0]
                what += f" (ended by the stall watchdog: {stalled['message']})"
            elif died:  # the task whose end took the others down (srun --kill-on-bad-exit)
                task = died["task"]
                what += f" (rank {task} on {died['node']} died first: {died['cause']})"
            if r["State"].startswith("NODE_FAIL"):
                what += f" (node failure; nodes of the job: {r['NodeList']}{down_nodes(r['NodeList'])})"
        log = log_path(run, r["stage"], task, err=True, job_id=r["JobID"])
        cause = raised(log)
        if cause:  # the exception in one line (the traceback stays in the log)
            out.append(f"\n{r['stage']}: {what} {r['State']}, exit {r['ExitCode']}: {cause}\n  log: {log}")
        else:
            out.append(f"\n{r['stage']}: {what} {r['State']}, exit {r['ExitCode']}; last lines of {log}:")
            out.append(tail(log))
    return "\n".join(out)


def raised(log: Path) -> Optional[str]:
    """The exception a task's log ends with, in one line: what follows its last Python traceback (the frames are
    indented; the exception's own line is not), e.g. "ftlib.checkpoints.DamagedCheckpoint: <run>/checkpoints/
    checkpoint-6 is damaged: ..."; None when the log holds no traceback (a signal, a setup line that failed)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    after = [line for line in lines[starts[-1] + 1:] if line.strip()]
    message = next((line for line in after if not line.startswith((" ", "\t"))), None)
    return message.strip()[:1000] if message else None


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


def ranks_text(run: RunDir, job_id: str) -> str:
    """Where each rank of a running training job is, from its heartbeat (ftlib.watchdog), e.g.
    "train ranks: 0 on node1 step 12 (2 s ago), 1 on node2 step 10 (no heartbeat for 75 s)"."""
    beats = [b for b in heartbeats(run) if b.get("job") == job_id]
    if not beats:
        return "train ranks: no heartbeat yet (setting up)"
    now = time.time()
    parts = []
    for b in sorted(beats, key=lambda b: b["rank"]):
        age = now - b.get("time", now)
        when = f"no heartbeat for {age:.0f} s" if age > 30 else f"{age:.0f} s ago"
        parts.append(f"{b['rank']} on {b.get('node', '?')} step {b.get('step', 0)} ({when})")
    return "train ranks: " + ", ".join(parts)


def cancelled_text(run: RunDir, stage: str, job_id: str, state: str) -> str:
    """How a cancelled job ended: for training, when it stopped, after which step and what checkpoint it left
    (the job's stopped.json), e.g. "cancelled at 13:35 after step 21 (checkpoint-21 kept)"."""
    stopped = read_json(run.stopped, {}) if stage == "train" else {}
    kept = checkpoints.latest_complete(run.checkpoints) if stage == "train" else None
    if stopped.get("job") == job_id.split("_")[0] and not stopped.get("requeue", True):
        at = stopped["at"][11:16]  # HH:MM of the ISO time
        ckpt = f"{stopped['checkpoint']} kept" if stopped.get("checkpoint") else "no checkpoint kept"
        return f"{stopped['how']} at {at} after step {stopped['step']} ({ckpt})"
    text = f"was cancelled ({state})"
    if kept is not None:
        text += f"; the latest complete checkpoint is {kept.name}"
    return text


def cancel(run: RunDir) -> List[str]:
    """scancel every job of the run's chain; returns the ids."""
    ids = records.JobRecords(run).slurm_ids()
    records.cancel(ids)
    return ids


def cancel_and_wait(run: RunDir, wait_s: Optional[float] = None) -> str:
    """`make cancel`: scancel every job of the run's chain, wait until they have ended (a training job first writes
    its checkpoint, within the site's KillWait), and say what was stopped and what was kept."""
    jobs = records.JobRecords(run)
    stages = {stage: records.job_ids(e) for stage, e in jobs.stages().items() if e.get("launcher") == "slurm"}
    ids = [j for js in stages.values() for j in js]
    if not ids:
        return "no Slurm jobs recorded for this run"
    before = records.job_states(ids)
    records.cancel(ids)
    deadline = time.monotonic() + (wait_s if wait_s is not None else (records.kill_wait_s() or 30) + 60)
    while time.monotonic() < deadline:  # slurmctld's view: COMPLETING until the job's processes have ended
        if not any(s in records.ACTIVE for s in records.live_states(ids).values()):
            break
        time.sleep(1)
    after = records.job_states(ids)
    lines = [f"cancelled {run.root.name}:"]
    for stage, js in stages.items():
        was = records.stage_state(js, before)
        now = records.stage_state(js, after)
        if was not in records.ACTIVE:
            what = f"had ended ({was}): nothing to stop"
        elif was == "PENDING":
            what = "was pending: it will not start"
        elif now in records.ACTIVE:
            what = f"was {was}, still {now} after the wait: `make status RUN={run.root}` later"
        else:
            what = f"was {was}: " + cancelled_text(run, stage, js[0], now)
        lines.append(f"  {stage:<11}job {js[0]:<10}{what}")
    kept = checkpoints.latest_complete(run.checkpoints)
    if kept is not None and not run.training_done:
        lines.append(f"`make train RECIPE={run.recipe}` resumes from {kept.name}")
    return "\n".join(lines)
