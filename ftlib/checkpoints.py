"""Training checkpoints that are never mistaken for complete when they are not.

The Trainer writes `checkpoints/checkpoint-<step>/` from every rank (DeepSpeed shards, RNG states, ...). A job killed
half-way through leaves a folder that looks like a checkpoint. So after ALL ranks have finished saving, rank 0 writes
the marker file `COMPLETE` into the folder; resuming and rotation only ever look at folders with the marker.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, Optional

from ftlib.rundir import write_atomic

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def all_checkpoints(folder: Path) -> List[Path]:
    """Every checkpoint-<step> folder, complete or not, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    return int(_NAME.match(Path(checkpoint).name).group(1))


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / MARKER).is_file()


def complete_checkpoints(folder: Path) -> List[Path]:
    return [p for p in all_checkpoints(folder) if is_complete(p)]


def latest_complete(folder: Path) -> Optional[Path]:
    """The checkpoint to resume from: the highest step that has the marker (None: start from scratch)."""
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def mark_complete(checkpoint: Path, step: int) -> None:
    """Call on one rank, after every rank has finished writing `checkpoint`."""
    write_atomic(Path(checkpoint) / MARKER, f"step {step}\n")


def rotate(folder: Path, keep: Optional[int]) -> List[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest complete
    one (left by an interrupted save). Returns what was deleted."""
    done = complete_checkpoints(folder)
    doomed = done[:-keep] if keep and keep > 0 and len(done) > keep else []
    if done:
        newest = step_of(done[-1])
        doomed += [p for p in all_checkpoints(folder) if not is_complete(p) and step_of(p) < newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def remove_incomplete(folder: Path) -> List[Path]:
    """At the start of a (resumed) run: drop half-written checkpoints so they cannot be confused with anything."""
    doomed = [p for p in all_checkpoints(folder) if not is_complete(p)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
