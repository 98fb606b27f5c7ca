"""A site's limits on the REAL test cluster, which is configured like a strict site (tests/cluster/up.sh)."""
import subprocess

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
