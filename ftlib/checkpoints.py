"""Training checkpoints that are never mistaken for complete when they are not, and never trained on when damaged.

The Trainer writes `checkpoints/checkpoint-<step>/` from every rank (DeepSpeed shards, RNG states, ...). A job killed
half-way through leaves a folder that looks like a checkpoint. So after ALL ranks have finished saving, rank 0 writes
the marker file `COMPLETE` into the folder; resuming and rotation only ever look at folders with the marker.

The marker also records the size and sha256 of every file of the checkpoint (JSON: {"step", "files": {path:
{"bytes", "sha256"}}}), so that a file truncated or garbled afterwards (a node that crashed before its page cache
reached the disk, a quota hit while copying a run, a bad disk) is found before it is trained on: `resume_point`
checks the newest complete checkpoint against its marker and falls back to the one before (moving the damaged one
aside to `checkpoint-<step>.damaged`), or refuses to train when no intact one is left. Hashing costs ~0.65 s per GiB
on one core (sha256 with SHA-NI), once when the marker is written and once at a resume.

A disk that fills up (or a quota) while a checkpoint or a shard is written is reported in one line naming the folder
and the free space (`no_space`), whatever library was writing (torch.save's error does not say ENOSPC).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ftlib.errors import UserError
from ftlib.rundir import write_json

MARKER = "COMPLETE"
DAMAGED_SUFFIX = ".damaged"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class DamagedCheckpoint(UserError):
    """No intact complete checkpoint to resume from, though there are damaged ones: training must not start."""


class NoSpace(UserError):
    """The disk (or the quota) filled up while writing a checkpoint or a shard."""


# ----------------------------------------------------------------------------------------------------- listing
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
    """The highest step that has the marker (None: start from scratch). Not checked against the marker: after rank 0's
    `resume_point` has moved damaged checkpoints aside, this is what every other rank resumes from."""
    done = complete_checkpoints(folder)
    return done[-1] if done else None


# ----------------------------------------------------------------------------------------------------- marker
def mark_complete(checkpoint: Path, step: int) -> None:
    """Call on one rank, after every rank has finished writing `checkpoint`: records every file's size and sha256."""
    checkpoint = Path(checkpoint)
    files = {rel: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(checkpoint).items()}
    write_json(checkpoint / MARKER, {"step": step, "files": files})


def verify(checkpoint: Path) -> Optional[str]:
    """None if every file the marker lists is there with its recorded size and sha256; else what is wrong, e.g.
    "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt is 1,024 bytes, 285,331 when it was saved (truncated)".
    A marker from before markers listed files ("step N") has nothing to check against and passes."""
    checkpoint = Path(checkpoint)
    try:
        text = (checkpoint / MARKER).read_text()
    except OSError:
        return f"its {MARKER} marker is unreadable"
    if re.fullmatch(r"step \d+\s*", text):
        return None
    try:
        recorded: Dict[str, dict] = json.loads(text)["files"]
        problems = [p for p in (_check(checkpoint, rel, want) for rel, want in sorted(recorded.items())) if p]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {MARKER} marker is unreadable"
    if not problems:
        return None
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more damaged file{'s' if more > 1 else ''})" if more else "")


def _check(checkpoint: Path, rel: str, want: dict) -> Optional[str]:
    path = checkpoint / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{rel} is missing"
    if size != want["bytes"]:
        how = "truncated" if size < want["bytes"] else "longer than saved"
        return f"{rel} is {size:,} bytes, {want['bytes']:,} when it was saved ({how})"
    if _sha256(path) != want["sha256"]:
        return f"{rel} does not match the sha256 recorded when it was saved (same size, different content)"
    return None


def _files(checkpoint: Path) -> Dict[str, Path]:
    """The checkpoint's files by path relative to it (without the marker and hidden temporary files)."""
    out = {}
    for p in sorted(checkpoint.rglob("*")):
        rel = p.relative_to(checkpoint)
        if p.is_file() and str(rel) != MARKER and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = p
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buffer = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                return h.hexdigest()
            h.update(buffer[:n])


# ----------------------------------------------------------------------------------------------------- resuming
def resume_point(folder: Path) -> Tuple[Optional[Path], List[str]]:
    """Rank 0, at the start of a (resumed) run: the newest complete checkpoint that matches its marker (None: start
    from scratch), and one line per damaged newer checkpoint, which is moved aside to checkpoint-<step>.damaged
    (kept for a look; never resumed from, never rotated). Raises DamagedCheckpoint (and moves nothing) when there are
    complete checkpoints but none is intact."""
    folder = Path(folder)
    checkpoint, damaged = newest_intact(folder)
    if checkpoint is not None:
        notes = []
        for bad, why in damaged:
            aside = set_aside(bad)
            notes.append(f"{bad} is damaged: {why}; moved to {aside.name}, resuming from {checkpoint.name}")
        return checkpoint, notes
    if not damaged:
        return None, []
    raise DamagedCheckpoint(f"{nothing_intact(damaged, 'to resume from')}; not training on it: restore the files, "
                            f"or delete {folder} to train from the start")


def newest_intact(folder: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """The newest complete checkpoint that matches its marker (or None), and the newer damaged ones with what is
    wrong with each, newest first. Reads every file of the checkpoints it checks; changes nothing."""
    damaged: List[Tuple[Path, str]] = []
    for checkpoint in reversed(complete_checkpoints(folder)):
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint, damaged
        damaged.append((checkpoint, problem))
    return None, damaged


def nothing_intact(damaged: List[Tuple[Path, str]], purpose: str) -> str:
    """'<newest> is damaged: <why>; no intact earlier checkpoint <purpose> (<older> is damaged too: <why>)'."""
    (newest, why), earlier = damaged[0], damaged[1:]
    too = "; ".join(f"{p.name} is damaged too: {w}" for p, w in earlier)
    return f"{newest} is damaged: {why}; no intact earlier checkpoint {purpose}{f' ({too})' if too else ''}"


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the checkpoint-<step> namespace (replacing an older damaged copy)."""
    aside = checkpoint.with_name(checkpoint.name + DAMAGED_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(checkpoint, aside)
    return aside


# The files of a checkpoint that make up the adapter (what Trainer.save_model writes besides training_args.bin).
_ADAPTER_FILES = re.compile(r"^(adapter_.*|README\.md|tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
                            r"chat_template.*|vocab.*|merges.*|.*\.model)$")


def adapter_files(checkpoint: Path) -> List[Path]:
    """The adapter saved in a checkpoint (PEFT format), or [] when it has none."""
    files = [p for p in sorted(Path(checkpoint).iterdir()) if p.is_file() and _ADAPTER_FILES.match(p.name)]
    names = {p.name for p in files}
    has_weights = bool(names & {"adapter_model.safetensors", "adapter_model.bin"})
    return files if "adapter_config.json" in names and has_weights else []


# ----------------------------------------------------------------------------------------------------- rotation
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


# ----------------------------------------------------------------------------------------------------- disk full
_ERRNO_TEXT = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}
# How libraries that do not raise OSError say it (safetensors: "No space left on device (os error 28)").
_TEXTS = (("No space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("StorageFull", errno.ENOSPC),
          ("Disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT), ("QuotaExceeded", errno.EDQUOT))
PROBE_BYTES = 1 << 20


def no_space(exc: BaseException, folder: Path, what: str) -> Optional[NoSpace]:
    """If `exc` (raised while writing `what` into `folder`) came from a full disk or quota: the one-line error
    "no space left on FOLDER: writing WHAT (N MiB free)". torch.save says only "unexpected pos ..." or "file write
    failed", so when the exception does not say, a small probe file written into `folder` decides. None otherwise."""
    if isinstance(exc, UserError):
        return None
    code = _errno_of(exc)
    if code is None:
        code = _probe(Path(folder))
    if code is None:
        return None
    free = shutil.disk_usage(_existing(Path(folder))).free
    where = "free" if code == errno.ENOSPC else "free on the filesystem"
    return NoSpace(f"{_ERRNO_TEXT[code]} on {folder}: writing {what} ({human_size(free)} {where})")


@contextlib.contextmanager
def no_space_in_one_line(folder: Path, what: str):
    """Turn a full disk or quota inside the block into NoSpace (see no_space); other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        full = no_space(e, folder, what)
        if full is None:
            raise
        raise full from e


def _errno_of(exc: BaseException) -> Optional[int]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _ERRNO_TEXT:
            return exc.errno
        for text, code in _TEXTS:
            if text in str(exc):
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _probe(folder: Path) -> Optional[int]:
    """ENOSPC/EDQUOT if a PROBE_BYTES file cannot be written (and flushed) in `folder`; else None."""
    path = _existing(folder) / f".ftlib-space-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        return e.errno if e.errno in _ERRNO_TEXT else None
    try:
        data = memoryview(bytes(PROBE_BYTES))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as e:
        return e.errno if e.errno in _ERRNO_TEXT else None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'; 12 * 2**20 -> '12 MiB'."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if n < 100 else f"{n:,.0f} {unit}"
    raise AssertionError  # unreachable
