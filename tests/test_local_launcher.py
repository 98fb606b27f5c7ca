"""The local launcher (submitit's LocalExecutor) says why a task failed: the task's own error line, not only where
its log is."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO, ROOT
from tests.test_data_preprocess import BAD_FILE, write_jsonl


def ftlib(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ftlib", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_a_failed_shard_and_a_failed_rank_say_why(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_FILE)
    common = [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "run.launcher=local"]
    out = ftlib("preprocess", str(DEMO), *common, f"data.sources=[{{path: {data}}}]")
    assert out.returncode == 1, out.stdout + out.stderr
    error = out.stderr.strip().splitlines()
    # (the shard that finishes last checks the data set)
    assert re.match(r"error: \[preprocess\] shard [01] failed: ftlib.data.DataError: ", error[0]), out.stderr
    assert f"{data}: 5 of 18 rows (27.8%) in the data set (2 shards) are malformed" in error[0], out.stderr
    assert error[1].strip().startswith("log: ") and error[1].strip().endswith("_log.err"), out.stderr

    # A rank's error: the training stage stops and says it (here an own DeepSpeed file that contradicts the recipe).
    own = tmp_path / "ds.json"
    own.write_text('{"train_batch_size": 3, "zero_optimization": {"stage": 2}}')
    out = ftlib("train", str(DEMO), *common, f"deepspeed.config_file={own}", "data.sources[0].max_rows=40")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"error: \[train\] job \d+ failed: [\w.]*(Error|Exception): .*train_batch_size", out.stderr), \
        out.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_deepspeed_op_prebuilt_in_torch_extensions_dir_is_found(make_recipe, monkeypatch, capsys):
    """With TORCH_EXTENSIONS_DIR set, torch keeps its JIT-built ops directly in it (no py<ver>_cpu/ level): the
    prebuild built the op there, then said 'could not prebuild deepspeed_shm_comm (DeepSpeed ... built
    successfully)', looking one level down. Asked again, it finds the op and says nothing."""
    from launcher.jobs import prebuild_ops

    # torch's default folder for this Python's CPU ops, named as TORCH_EXTENSIONS_DIR: the ops this user has built
    # already (tests/test_slurm.py builds this one) are found there without a py<ver>_cpu/ level.
    ext = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions" / \
        f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    prebuild_ops(make_recipe())  # builds it (~40 s) if this user has not yet
    assert "warning" not in capsys.readouterr().out
    assert list(ext.glob("deepspeed_shm_comm/deepspeed_shm_comm*.so"))
    prebuild_ops(make_recipe())
    assert capsys.readouterr().out == ""
