"""The stall watchdog's judgement, in one process: the ranks' watchdogs share a run directory as on a cluster."""
import time

import pytest

from ftlib import watchdog
from ftlib.distributed import DistEnv
from ftlib.rundir import RunDir


def dogs(tmp_path, timeout_s=30.0):
    run = RunDir(tmp_path / "run")
    found = [watchdog.Watchdog(run, DistEnv(r, r, 2, 1, "127.0.0.1", 0), timeout_s, "s1", lambda *a, **k: None,
                               job="7") for r in (0, 1)]
    for dog in found:
        dog.folder.mkdir(parents=True, exist_ok=True)
    return run, found


def test_a_rank_that_was_stopped_itself_overwrites_no_verdict(tmp_path, monkeypatch):
    """Rank 1 was SIGSTOPped; rank 0 named it and ended the job. Slurm then SIGCONTs rank 1 as it kills the step:
    rank 1's own stale view (every heartbeat, its own too, unchanged for 30 s) must not replace rank 0's verdict,
    which `make status` shows."""
    monkeypatch.setattr(watchdog.os, "_exit", lambda code: None)
    run, (rank0, rank1) = dogs(tmp_path)
    right = {"job": "7", "session": "s1", "ranks": [1], "message": "rank 1 on node2 stopped responding"}
    rank0._end(right)
    rank1._end({"job": "7", "session": "s1", "ranks": [0, 1], "message": "rank 0 on node1, rank 1 on node2 ..."})
    assert watchdog.stall_verdict(run, "7")["ranks"] == [1]
    # A later attempt of the same job (requeued: another session) gives its own verdict.
    rank0.session = "s2"
    rank0._end({**right, "session": "s2", "step": 9})
    assert watchdog.stall_verdict(run, "7")["session"] == "s2"





@pytest.mark.parametrize("gap, judged", [(1.0, True), (30.0, False)])
def test_a_long_gap_between_its_own_beats_resets_the_clocks(tmp_path, monkeypatch, gap, judged):
    _, (rank0, _) = dogs(tmp_path, timeout_s=0.6)
    seen = []
    monkeypatch.setattr(rank0, "_end", lambda verdict: seen.append(verdict))
    clock = [1000.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    for r in (0, 1):
        rank0._changed[r] = rank0._progressed[r] = clock[0] - 5  # nobody progressed for 5 s (> the 0.6 s limit)
    waits = iter([False, True])

    class Done:
        def wait(self, _):
            clock[0] += gap
            return next(waits)

        def set(self):
            pass

    rank0._done = Done()
    rank0._run()  # one loop
    assert bool(seen) == judged, seen
