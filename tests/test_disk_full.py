"""A disk that fills up while a shard or a checkpoint is written: one line naming the folder and the free space,
nothing marked complete, and once space is freed a rerun redoes only what is missing.

On a small real filesystem (tmpfs): $FTLIB_SMALL_FS (default /tmp/ftlib-small-fs) when it is a tmpfs this user can
write (tests/cluster/up.sh, run as root, mounts a 64 MB one there for the unprivileged test user); else one mounted
by the test itself when running as root; else the tests are skipped, saying why.
"""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ftlib import checkpoints
from ftlib.data import preprocess
from ftlib.rundir import RunDir
from tests.test_train import TINY, Ranks, make, scalars

SMALL_FS = Path(os.environ.get("FTLIB_SMALL_FS", "/tmp/ftlib-small-fs"))
FREE = r"\(\d[\d.,]* (bytes|KiB|MiB) free\)"
MAX_FILL = 256 << 20


def mounted_tmpfs(path: Path) -> bool:
    try:
        target = str(path.resolve())
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    return any(m[1] == target and m[2] == "tmpfs" for m in mounts if len(m) > 2)


@pytest.fixture
def small_fs(tmp_path):
    """An empty folder on a small tmpfs of its own (nothing else of the test writes there)."""
    if mounted_tmpfs(SMALL_FS) and os.access(SMALL_FS, os.W_OK | os.X_OK):
        if shutil.disk_usage(SMALL_FS).total > MAX_FILL:  # filling it would take that much memory
            pytest.skip(f"{SMALL_FS} (FTLIB_SMALL_FS) is a tmpfs of {shutil.disk_usage(SMALL_FS).total:,} bytes; "
                        f"these tests fill it up, so it must be at most {MAX_FILL:,} (up.sh mounts 64 MB)")
        folder = SMALL_FS / f"test-{os.getpid()}-{time.monotonic_ns()}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if os.geteuid() != 0:
        pytest.skip(f"needs a small filesystem: {SMALL_FS} (FTLIB_SMALL_FS) is not a tmpfs this user can write; "
                    f"run tests/cluster/up.sh as root to mount one there, or run the tests as root")
    folder = tmp_path / "small-fs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a small filesystem: mounting a tmpfs on {folder} failed: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def leave_free(folder: Path, nbytes: int) -> Path:
    """Grow one filler file in `folder` until only about `nbytes` of its filesystem are free."""
    filler = folder / "filler"
    have = filler.stat().st_size if filler.exists() else 0
    grow = shutil.disk_usage(folder).free - nbytes
    assert grow > 0, f"{folder} has less than {nbytes} bytes free already"
    with open(filler, "ab") as f:
        os.posix_fallocate(f.fileno(), 0, have + grow)
    assert abs(shutil.disk_usage(folder).free - nbytes) < 64 * 1024
    return filler


def size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def free_in_message(text: str) -> float:
    number, unit = re.search(r"\((\d[\d.,]*) (bytes|KiB|MiB) free\)", text).groups()
    return float(number.replace(",", "")) * {"bytes": 1, "KiB": 1024, "MiB": 2 ** 20}[unit]


# ----------------------------------------------------------------------------------------------------- shards
@pytest.mark.timeout(120)
def test_a_shard_on_a_full_disk_fails_in_one_line_and_a_rerun_redoes_only_that_shard(small_fs, make_recipe, caplog):
    recipe = make_recipe(f"data.cache_dir={small_fs / 'cache'}")
    out = preprocess.output_dir(recipe)
    preprocess.run_shard(recipe, 0, 2)
    first = out / f"{preprocess.shard_name(0, 2)}.done.json"
    done_at = first.stat().st_mtime_ns
    shard_bytes = size_on_disk(out / preprocess.shard_name(0, 2))
    assert shard_bytes > 1 << 20  # big enough that a quarter of it is a real write

    filler = leave_free(small_fs, shard_bytes // 4)  # shard 1 is about as big as shard 0
    with pytest.raises(checkpoints.NoSpace) as full:
        preprocess.run_shard(recipe, 1, 2)
    message = str(full.value)
    assert re.fullmatch(rf"no space left on {re.escape(str(out))}: writing shard-00001-of-00002 {FREE}", message), \
        message
    assert abs(free_in_message(message) - shard_bytes // 4) < 256 * 1024  # the space left once its tmp is gone
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.json", "shard-00000-of-00002",
                                                      "shard-00000-of-00002.done.json"]  # nothing half-written
    assert preprocess.shards_status(recipe)["missing"] == [1]

    filler.unlink()  # space freed: the rerun of the whole stage redoes shard 1 only
    caplog.clear()
    with caplog.at_level("INFO", logger="ftlib.data"):
        for i in range(2):
            preprocess.run_shard(recipe, i, 2)
    assert "preprocess shard 0 of 2: already done" in caplog.text
    assert first.stat().st_mtime_ns == done_at
    status = preprocess.shards_status(recipe)
    assert status["complete"] == [0, 1] and status["manifest"]


# ----------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_checkpoint_on_a_full_disk_fails_in_one_line_marks_nothing_and_the_rerun_resumes(small_fs, tmp_path):
    """2-rank ZeRO-2 training whose checkpoints/ lies on the small filesystem (the rest of the run, the logs and the
    data elsewhere). A first launch leaves checkpoint-2 (and the final checkpoint-4, which is then dropped, as if
    the job had died there). With half a checkpoint's space left, the rerun resumes from 2 and fails writing
    checkpoint-4; once space is freed the next rerun resumes from checkpoint-2 again and ends like the first."""
    recipe = make(tmp_path, *TINY, "deepspeed.zero_stage=2", "data.sequence_len=128", "train.max_steps=4",
                  "train.save_steps=2", "train.eval_steps=4", "train.save_total_limit=2")
    from tests.test_train import preprocess as tokenize

    tokenize(recipe)
    run = RunDir.of(recipe)
    run.root.mkdir(parents=True)
    (small_fs / "checkpoints").mkdir()
    run.checkpoints.symlink_to(small_fs / "checkpoints")  # like checkpoints on a scratch filesystem

    assert Ranks(recipe).finish() == {0: "completed", 1: "completed"}
    reference = scalars(run.root, "train/loss")
    ckpt2, ckpt4 = run.checkpoints / "checkpoint-2", run.checkpoints / "checkpoint-4"
    checkpoint_bytes = size_on_disk(ckpt2)
    shutil.rmtree(ckpt4)
    shutil.rmtree(run.adapter)

    filler = leave_free(small_fs, checkpoint_bytes // 2)
    full = Ranks(recipe)
    for rank, p in full.procs.items():
        assert p.wait(240) != 0, full.log(rank)[-3000:]
    errors = [line for rank in (0, 1) for line in full.log(rank).splitlines() if "NoSpace: " in line]
    assert errors, full.log(0)[-3000:] + full.log(1)[-3000:]
    for line in errors:
        assert re.search(rf"NoSpace: no space left on {re.escape(str(run.checkpoints))}: writing checkpoint-4 "
                         rf"{FREE}$", line), line
    assert f"resuming from {ckpt2}" in full.log(0)
    assert not checkpoints.is_complete(ckpt4)
    assert checkpoints.verify(ckpt2) is None and checkpoints.latest_complete(run.checkpoints) == ckpt2
    assert not run.adapter.exists()

    filler.unlink()
    again = Ranks(recipe)
    assert again.finish() == {0: "completed", 1: "completed"}
    log = again.log(0)
    assert "removed incomplete checkpoint checkpoint-4" in log and f"resuming from {ckpt2} (step 2)" in log
    assert scalars(run.root, "train/loss") == reference
    assert checkpoints.verify(ckpt4) is None and run.training_done
