"""The local launcher (submitit's LocalExecutor) says why a task failed: the task's own error line, not only where
its log is."""
import re
import subprocess
import sys

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
