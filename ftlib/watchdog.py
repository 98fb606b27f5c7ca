"""A rank that stops making progress ends its training job, named, instead of holding every rank until the time limit.

    watch = Watchdog(run, env, recipe.train.stall_timeout_s, session, say)
    watch.start()                  # at the start of training, on every rank
    watch.progress(step)           # the training loop: every micro-batch, evaluation batch, checkpoint
    watch.stop()

Why a thread and files: a rank that is SIGSTOPped, whose data reader deadlocks, or whose filesystem stops answering
makes no error; its peers just wait in a collective. So every rank runs a thread, outside the collectives, that every
few seconds writes its heartbeat into the run directory (which every node sees) -- `heartbeat/rank-<k>.json`: node,
step, micro-batches started, a beat counter -- and reads its peers'. Changes are timed on the reader's own clock, so
the nodes' clocks need not agree.

When no rank has made progress for the timeout (train.stall_timeout_s, or three times the slowest progress interval
seen in the run if that is longer: a slow checkpoint or evaluation is not a stall), the lowest rank still beating
writes `heartbeat/stalled.json` naming the culprit and every rank still beating exits (STALL_EXIT_CODE), which ends
the job (srun --kill-on-bad-exit, or the local launcher) within seconds. The culprit is:
  - a rank whose heartbeat stopped: its process is stopped or its node hung;
  - else the rank(s) that started the fewest micro-batches: alive but stuck before its next batch (data reader,
    filesystem) while the others wait for it in a collective;
  - else every rank, stuck at the same point (a collective or filesystem that does not answer).
`make status` prints the verdict for the failed job (launcher/status.py).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from ftlib.rundir import RunDir, read_json, write_json

if TYPE_CHECKING:  # ftlib.distributed imports torch: `make status` reads heartbeats without it
    from ftlib.distributed import DistEnv

STALL_EXIT_CODE = 75
SLOWEST_FACTOR = 3  # a stall is this many times the slowest progress interval seen, at least


class Watchdog:
    def __init__(self, run: RunDir, env: DistEnv, timeout_s: float, session: str, say, job: Optional[str] = None):
        from ftlib.distributed import node_name  # here, not at the top: it imports torch, which `make status` need not

        self.folder = run.root / "heartbeat"
        self.env, self.timeout_s, self.session, self.say = env, float(timeout_s), session, say
        self.node = node_name()
        self.job = job if job is not None else os.environ.get("FTLIB_JOB_ID")  # the launcher's id (ftlib.train)
        self.interval_s = max(0.5, min(5.0, self.timeout_s / 6))
        self.step = self.micro = self.marks = self.beats = 0  # optimizer steps, micro-batches, progress marks
        self.slowest_s = 0.0  # longest time between two progress marks of this rank
        self._last_mark = time.monotonic()
        self._seen: Dict[int, tuple] = {}  # rank -> (beats, micro, step) as last read
        self._changed: Dict[int, float] = {}  # rank -> when its beats / its progress last changed (our clock)
        self._progressed: Dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftlib-watchdog", daemon=True)

    # -------------------------------------------------------------------------------------------- training side
    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        now = self._last_mark = time.monotonic()
        for r in range(self.env.world_size):  # every rank counts from now: the first step may take long
            self._changed[r] = self._progressed[r] = now
        self._write()
        self._thread.start()

    def progress(self, step: Optional[int] = None, micro: bool = False) -> None:
        """Mark progress: a micro-batch started (micro=True), an optimizer step ended (step), or any other unit of
        work (an evaluation batch, a checkpoint written)."""
        now = time.monotonic()
        self.slowest_s = max(self.slowest_s, now - self._last_mark)
        self._last_mark = now
        if step is not None:
            self.step = step
        self.micro += 1 if micro else 0
        self.marks += 1

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def limit_s(self) -> float:
        return max(self.timeout_s, SLOWEST_FACTOR * self.slowest_s)

    # -------------------------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        last = time.monotonic()
        while not self._done.wait(self.interval_s):
            now = time.monotonic()
            if now - last >= self.frozen_s:
                # This process itself did not run (SIGSTOPped, then SIGCONTed, e.g. by Slurm as it ends the job):
                # what it last saw of the others is stale, so it judges no one before watching them afresh.
                self._changed = {r: now for r in self._changed}
                self._progressed = {r: now for r in self._progressed}
            last = now
            self.beats += 1
            try:
                self._write()
                verdict = self._look()
            except OSError:
                continue  # a filesystem hiccup; a lasting one shows as no progress
            if verdict is not None:
                self._end(verdict)

    @property
    def frozen_s(self) -> float:
        """A heartbeat unchanged this long means its thread does not run."""
        return max(3 * self.interval_s, 10.0)

    def _file(self, rank: int) -> Path:
        return self.folder / f"rank-{rank}.json"

    def _write(self) -> None:
        write_json(self._file(self.env.rank), {
            "session": self.session, "job": self.job, "rank": self.env.rank, "node": self.node, "pid": os.getpid(),
            "step": self.step, "micro": self.micro, "marks": self.marks, "beats": self.beats,
            "time": time.time()})

    def _look(self) -> Optional[dict]:
        """Read every rank's heartbeat; a verdict when no rank has progressed for the limit."""
        now = time.monotonic()
        beats: Dict[int, dict] = {}
        for r in range(self.env.world_size):
            beat = read_json(self._file(r), {}) if r != self.env.rank else {
                "beats": self.beats, "micro": self.micro, "step": self.step, "marks": self.marks,
                "node": self.node, "session": self.session}
            if beat.get("session") != self.session:
                beat = {}  # not written by this run of the job yet
            beats[r] = beat
            seen = (beat.get("beats"), beat.get("micro"), beat.get("step"), beat.get("marks"))
            if r in self._seen and seen != self._seen[r]:
                self._changed[r] = now
                if seen[1:] != self._seen[r][1:]:
                    self._progressed[r] = now
            self._seen[r] = seen
        quiet = now - max(self._progressed.values())
        if quiet < self.limit_s:
            return None
        return self._verdict(beats, now, quiet)

    def _verdict(self, beats: Dict[int, dict], now: float, quiet: float) -> dict:
        def where(r: int) -> str:
            return f"rank {r} on {beats[r].get('node') or '?'}"

        frozen = [r for r in beats if now - self._changed[r] >= min(quiet, self.frozen_s)]
        fewest = min(beats[r].get("micro", 0) for r in beats)
        behind = [r for r in beats if beats[r].get("micro", 0) == fewest]
        step = max((b.get("step", 0) for b in beats.values()), default=0)
        if frozen:
            culprits, why = frozen, "stopped responding (no heartbeat: its process is stopped or its node hung)"
        elif len(behind) < len(beats):
            culprits, why = behind, ("is alive but makes no progress (stuck before its next batch: data reader, "
                                     "filesystem) while the other ranks wait for it")
        else:
            culprits, why = list(beats), "are all stuck at the same point (a collective or filesystem that does not answer)"
        text = (f"{', '.join(where(r) for r in culprits)} {why}; no rank has made progress for {quiet:.0f} s "
                f"(train.stall_timeout_s={self.timeout_s:g}) at step {step}")
        return {"job": self.job, "session": self.session, "ranks": culprits,
                "nodes": [beats[r].get("node") for r in culprits], "step": step, "quiet_s": round(quiet, 1),
                "message": text, "detected_by": self.env.rank}

    def _end(self, verdict: dict) -> None:
        alive = [r for r in range(self.env.world_size) if r not in verdict["ranks"]]
        given = read_json(self.folder / "stalled.json", {})
        first = given.get("session") != self.session  # a verdict this run of the job already gave stands
        if first and self.env.rank == (min(alive) if alive else self.env.rank):
            write_json(self.folder / "stalled.json", verdict)
        self.say(f"stalled: {verdict['message']}; ending the job", every_rank=True)
        os._exit(STALL_EXIT_CODE)


def stall_verdict(run: RunDir, job: Optional[str]) -> Optional[dict]:
    """The watchdog's verdict on `job` (None if it gave none)."""
    verdict = read_json(run.root / "heartbeat" / "stalled.json", {})
    return verdict if verdict and (job is None or verdict.get("job") == job) else None


def heartbeats(run: RunDir) -> List[dict]:
    """The ranks' last heartbeats (for `make status` while a job runs)."""
    folder = run.root / "heartbeat"
    return [read_json(p, {}) for p in sorted(folder.glob("rank-*.json"))] if folder.is_dir() else []
