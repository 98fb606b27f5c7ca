"""A site's limits on the REAL test cluster, which is configured like a strict site (tests/cluster/up.sh)."""
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from ftlib.data.preprocess import output_dir, shard_name, shards_status
from ftlib.rundir import RunDir
from launcher import launch, records, status
from tests.test_slurm import cluster, wait_for_jobs  # noqa: F401 (cluster: the session fixture)

pytestmark = [pytest.mark.slurm]


@pytest.mark.timeout(600)
def test_more_shards_than_the_sites_max_array_size(make_recipe):
    """12 shards on a site whose MaxArraySize is 5: three arrays, one after the other (so never more than
    array_parallelism tasks at once), training after all of them, one stage in `make status`, and a rerun
    resubmits only the missing shard."""
    assert records.max_array_size() == 5, "the test cluster sets MaxArraySize=5 (tests/cluster/up.sh)"
    recipe = make_recipe("run.launcher=slurm", "data.num_shards=12", "resources.preprocess.array_parallelism=2",
                         "data.sources[0].max_rows=240", "data.sequence_len=128", "train.max_steps=2",
                         "train.eval_steps=100", "train.save_steps=100", "serve.enabled=false")
    pre, train = launch.submit(recipe, ["preprocess", "train"])
    assert len(pre.job_ids) == 3 and pre.tasks == list(range(12)), pre
    dependency = subprocess.run(["squeue", "-h", "-j", train.job_id, "-o", "%E"], capture_output=True,
                                text=True).stdout
    assert all(j in dependency for j in pre.job_ids) or dependency.strip() == "", dependency

    states = wait_for_jobs(pre.job_ids + [train.job_id], timeout=540)
    assert set(states.values()) == {"COMPLETED"} and len(states) == 12 + 1, (states, status.status(RunDir.of(recipe)))
    assert shards_status(recipe)["ready"]
    report = status.status(RunDir.of(recipe))
    assert sum(1 for line in report.splitlines() if line.startswith("preprocess ")) == 12, report

    # Shard 7 lost (say, deleted to redo it): a rerun of the stage submits that shard only, as one small array.
    marker = output_dir(recipe) / f"{shard_name(7, 12)}.done.json"
    marker.unlink()
    (again,) = launch.submit(recipe, ["preprocess"])
    assert again.tasks == [7] and len(again.job_ids) == 1
    assert wait_for_jobs(again.job_ids, timeout=180) == {f"{again.job_id}_0": "COMPLETED"}
    assert shards_status(recipe)["ready"]


@pytest.fixture
def no_accounting(tmp_path, monkeypatch):
    """This cluster's clients as on a site without slurmdbd: the same slurm.conf with accounting storage off, so
    sacct answers "Slurm accounting storage is disabled" while squeue and scontrol work as usual."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    off = tmp_path / "slurm.conf"
    off.write_text(re.sub(r"(?m)^AccountingStorageType=.*$", "AccountingStorageType=accounting_storage/none", conf))
    monkeypatch.setenv("SLURM_CONF", str(off))
    records.accounting_missing.cache_clear()
    yield
    monkeypatch.undo()
    records.accounting_missing.cache_clear()


@pytest.mark.timeout(420)
def test_without_accounting_status_and_the_chain_still_work(make_recipe, no_accounting):
    assert "accounting storage is disabled" in (records.accounting_missing() or "").lower()
    recipe = make_recipe("run.launcher=slurm", "data.sources[0].max_rows=60", "serve.enabled=false")
    (pre,) = launch.submit(recipe, ["preprocess"])
    run = RunDir.of(recipe)
    deadline = time.time() + 300
    while time.time() < deadline and records.stage_state(pre.job_ids, records.job_states(pre.job_ids)) in \
            records.ACTIVE + ("UNKNOWN",):
        time.sleep(2)
    report = status.status(run)
    assert "job history unavailable" in report and "accounting storage is disabled" in report.lower(), report
    assert f"{pre.job_id}_1" in report and ("COMPLETED" in report or "ENDED" in report), report
    assert shards_status(recipe)["ready"]
    # A second submission checks for jobs in flight from slurmctld's view, without sacct: nothing to do here.
    assert launch.submit(recipe, ["preprocess"]) == []
