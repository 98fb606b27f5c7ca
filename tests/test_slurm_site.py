"""A site's limits on the REAL test cluster, which is configured like a strict site (tests/cluster/up.sh)."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlib.data.preprocess import output_dir, shard_name, shards_status
from ftlib.rundir import RunDir
from launcher import launch, records, status
from tests.conftest import ROOT
from tests.test_slurm import cluster, sacct, wait_for_jobs  # noqa: F401 (cluster: the session fixture)

pytestmark = [pytest.mark.slurm]


@pytest.mark.timeout(600)
def test_more_shards_than_the_sites_max_array_size(make_recipe):
    """7 shards on a site whose MaxArraySize is 5: two arrays (5 and 2 tasks), one after the other (so never more than
    array_parallelism tasks at once), training after all of them, one stage in `make status`, and a rerun
    resubmits only the missing shard."""
    assert records.max_array_size() == 5, "the test cluster sets MaxArraySize=5 (tests/cluster/up.sh)"
    recipe = make_recipe("run.launcher=slurm", "data.num_shards=7", "resources.preprocess.array_parallelism=2",
                         "data.sources[0].max_rows=140", "data.sequence_len=128", "train.max_steps=2",
                         "train.eval_steps=100", "train.save_steps=100", "serve.enabled=false")
    pre, train = launch.submit(recipe, ["preprocess", "train"])
    assert len(pre.job_ids) == 2 and pre.tasks == list(range(7)), pre
    dependency = subprocess.run(["squeue", "-h", "-j", train.job_id, "-o", "%E"], capture_output=True,
                                text=True).stdout
    assert all(j in dependency for j in pre.job_ids) or dependency.strip() == "", dependency

    states = wait_for_jobs(pre.job_ids + [train.job_id], timeout=540)
    assert set(states.values()) == {"COMPLETED"} and len(states) == 7 + 1, (states, status.status(RunDir.of(recipe)))
    assert shards_status(recipe)["ready"]
    report = status.status(RunDir.of(recipe))
    assert sum(1 for line in report.splitlines() if line.startswith("preprocess ")) == 7, report

    # Shard 6 lost (say, deleted to redo it): a rerun of the stage submits that shard only, as one small array.
    marker = output_dir(recipe) / f"{shard_name(6, 7)}.done.json"
    marker.unlink()
    (again,) = launch.submit(recipe, ["preprocess"])
    assert again.tasks == [6] and len(again.job_ids) == 1
    # (an array of one is submitted by submitit as a plain job: its id has no _<index>)
    assert set(wait_for_jobs(again.job_ids, timeout=180).values()) == {"COMPLETED"}
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


# ------------------------------------------------------------------------------------ refusals, one line each
# What the strict test cluster allows (tests/cluster/up.sh): accounts ftl and ftl-other, partitions debug (default,
# MaxTime 60 min), long and wide, QOS normal (default) and short (MaxWall 30 min, 3 jobs submitted per user).
REFUSALS = {
    "account": (["slurm.train.account=nope"],
                "[train] slurm.train.account=nope refused by Slurm (Invalid account", "your accounts: ftl, ftl-other"),
    "partition": (["slurm.train.partition=nope"],
                  "[train] slurm.train.partition=nope refused by Slurm (Invalid partition", "partitions: debug, long, wide"),
    "qos": (["slurm.train.qos=nope"], "[train] slurm.train.qos=nope refused by Slurm (Invalid qos", "your QOS: normal, short"),
    "partition time": (["resources.train.time_min=90"], "[train] resources.train.time_min=90 refused by Slurm",
                       "partition debug allows MaxTime=01:00:00"),
    "qos wall time": (["slurm.train.qos=short", "resources.train.time_min=45"],
                      "[train] resources.train.time_min=45 refused by Slurm", "QOS short: max wall 00:30:00"),
    "qos job count": (["slurm.preprocess.qos=short", "data.num_shards=4"],  # 4 array tasks, 3 allowed
                      "[preprocess] slurm.preprocess.qos=short (job count, size or time limits) refused by Slurm",
                      "QOS short: max wall 00:30:00, max 3 jobs submitted"),
}


def submit_cli(tmp_path, name: str, *overrides: str):
    """`python -m ftlib train recipes/demo.yaml ... run.launcher=slurm` as a user types it; job names are <name>-*."""
    return subprocess.run([sys.executable, "-m", "ftlib", "train", str(ROOT / "recipes" / "demo.yaml"),
                           "run.launcher=slurm", f"run.name={name}", f"run.dir={tmp_path / 'run'}",
                           f"data.cache_dir={tmp_path / 'cache'}", "serve.enabled=false", *overrides],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)


def queued_jobs_named(prefix: str, settle_s: float = 0) -> list:
    """This user's jobs in squeue whose name starts with prefix (after settle_s, for jobs just cancelled)."""
    deadline = time.time() + settle_s
    while True:
        out = subprocess.run(["squeue", "-h", "--me", "-o", "%i %j %T"], capture_output=True, text=True, check=True)
        jobs = [line for line in out.stdout.splitlines() if line.split()[1].startswith(prefix)]
        if not jobs or time.time() >= deadline:
            return jobs
        time.sleep(1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_setting_the_site_refuses_is_one_line_and_submits_nothing(tmp_path, case):
    overrides, said, allowed = REFUSALS[case]
    name = f"refused-{case.replace(' ', '-')}-{os.getpid()}"
    out = submit_cli(tmp_path, name, *overrides)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, (out.stdout, out.stderr)
    (line,) = errors
    assert said in line and allowed in line, line
    assert "submitted job" not in out.stdout, out.stdout
    assert queued_jobs_named(name) == []


@pytest.mark.timeout(240)
def test_a_refusal_at_submission_cancels_what_the_chain_had_submitted(tmp_path):
    """3 preprocessing tasks under QOS short pass (3 jobs allowed), training is the 4th job: sbatch refuses it at
    submission (each stage's --test-only alone passes), and the array already queued is cancelled."""
    name = f"refused-late-{os.getpid()}"
    out = submit_cli(tmp_path, name, "data.num_shards=3", "slurm.preprocess.qos=short", "slurm.train.qos=short")
    assert out.returncode != 0 and "QOSMaxSubmitJobPerUserLimit" in out.stderr, (out.stdout, out.stderr[-3000:])
    assert "[preprocess] submitted job" in out.stdout and "cancelled what was already submitted" in out.stdout, \
        out.stdout
    assert queued_jobs_named(name, settle_s=30) == []
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-3000:]
    assert "[train] slurm.train.qos=short" in errors[0], errors


@pytest.mark.timeout(480)
def test_the_demo_runs_with_explicit_account_partition_and_qos(make_recipe):
    """The shipped recipe, unchanged but for site settings: preprocessing in account ftl-other on debug under QOS
    normal, training in account ftl on long under QOS short; sacct shows each job where it was sent."""
    recipe = make_recipe("run.launcher=slurm", "data.sources[0].max_rows=120", "train.max_steps=2",
                         "train.eval_steps=100", "train.save_steps=100", "serve.enabled=false",
                         "slurm.preprocess.account=ftl-other", "slurm.preprocess.partition=debug",
                         "slurm.preprocess.qos=normal", "slurm.train.account=ftl", "slurm.train.partition=long",
                         "slurm.train.qos=short")
    pre, train = launch.submit(recipe, ["preprocess", "train"])
    states = wait_for_jobs([pre.job_id, train.job_id], timeout=420)
    assert set(states.values()) == {"COMPLETED"}, (states, status.status(RunDir.of(recipe)))
    rows = {r["JobID"]: (r["Account"], r["Partition"], r["QOS"])
            for j in (pre.job_id, train.job_id) for r in sacct(j, "JobID", "Account", "Partition", "QOS")}
    assert rows[train.job_id] == ("ftl", "long", "short"), rows
    assert {v for k, v in rows.items() if k != train.job_id} == {("ftl-other", "debug", "normal")}, rows
    assert (RunDir.of(recipe).adapter / "adapter_config.json").is_file()
