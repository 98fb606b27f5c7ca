"""The launchers against the REAL two-node Slurm test cluster (tests/cluster/up.sh starts it if it is not up).

Each test has its own run directory (and so its own submitit folders) and a time guard.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlib.rundir import RunDir, read_json
from launcher import launch, records, status
from tests.conftest import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


@pytest.fixture(scope="session", autouse=True)
def cluster():
    """The test cluster is up. Root starts it if needed; any other user (make test runs the suite as ftl-alice)
    only checks it, and every Slurm test fails with up.sh's reason when it is down."""
    up = ["bash", str(ROOT / "tests" / "cluster" / "up.sh")] + ([] if os.geteuid() == 0 else ["--check"])
    out = subprocess.run(up, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        pytest.fail(f"the test Slurm cluster is not up ({' '.join(up[1:])}):\n{out.stdout}{out.stderr}",
                    pytrace=False)


def sacct(job_id: str, *fields: str, steps: bool = False, duplicates: bool = False):
    """sacct rows of a job (its steps too with steps=True; every run of a requeued job with duplicates=True)."""
    cmd = ["sacct", "-P", "-n", f"--format={','.join(fields)}", "-j", job_id] + ([] if steps else ["-X"]) + \
        (["--duplicates"] if duplicates else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def wait_for_jobs(job_ids, timeout: float):
    """Until slurmctld has none of these jobs pending or running and sacct has every one of them (and every array
    task) in a terminal state. Accounting lags: just after submission sacct may not list a job yet, so sacct alone once
    returned "done" with only the one job already cancelled."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        by_job = {j: sacct(j, "JobID", "State") for j in job_ids}
        rows = [r for j in job_ids for r in by_job[j]]
        # "12_[2-3%2]" is the array's tasks not started yet: PENDING, or CANCELLED for good if the array was.
        if all(by_job.values()) and all(r["State"].split()[0] in TERMINAL for r in rows) and not active(job_ids):
            return {r["JobID"]: r["State"].split()[0] for r in rows}
        time.sleep(2)
    raise TimeoutError(f"jobs {job_ids} not finished after {timeout} s: {rows}")


def squeue_states(job_ids) -> list:
    """What slurmctld says now of these jobs (of each array task): RUNNING, COMPLETING, PENDING...; [] once it no
    longer lists them."""
    out = subprocess.run(["squeue", "-h", "-j", ",".join(str(j).split("_")[0] for j in job_ids), "-o", "%T"],
                         capture_output=True, text=True).stdout  # (an id slurmctld forgot: an error, no line)
    return out.split()


def active(job_ids) -> list:
    """The states of the jobs among these that slurmctld still has pending or running. Not those completing: they
    have ended, and their last processes may take up to KillWait (30 s here) to exit."""
    return [state for state in squeue_states(job_ids) if state != "COMPLETING"]


def with_setup(tmp_path, stage: str, *lines: str) -> Path:
    """A recipe on top of the demo whose `slurm.<stage>.setup` runs these shell lines before the task."""
    child = tmp_path / "recipe.yaml"
    child.write_text(json.dumps({"base": str(ROOT / "recipes" / "demo.yaml"), "slurm": {stage: {"setup": list(lines)}}}))
    return child


def chain_recipe(make_recipe, *extra, base=ROOT / "recipes" / "demo.yaml"):
    """The demo on Slurm, small: 4 shards (2 at a time) of 400 rows, then 6 steps of 2-node training."""
    return make_recipe("run.launcher=slurm", "data.num_shards=4", "resources.preprocess.array_parallelism=2",
                       "data.sources[0].max_rows=400", "train.max_steps=6", "train.eval_steps=3",
                       "train.save_steps=3", "train.logging_steps=1", "train.sample_prompts=[]", "serve.enabled=false",
                       *extra, base=base)


def test_chain_array_then_two_node_training(make_recipe):
    """4-shard array (at most 2 at once) -> 2-node training afterok; sacct shows both nodes; relaunch skips."""
    recipe = chain_recipe(make_recipe)
    submitted = launch.submit(recipe, ["preprocess", "train"])
    pre, train = submitted
    dependency = subprocess.run(["squeue", "-h", "-j", train.job_id, "-o", "%E"], capture_output=True,
                                text=True).stdout.strip()
    assert dependency.startswith(f"afterok:{pre.job_id}_*") or dependency == "", dependency

    states = wait_for_jobs([pre.job_id, train.job_id], timeout=420)
    tasks = {j: s for j, s in states.items() if j.startswith(pre.job_id + "_")}
    assert sorted(tasks) == [f"{pre.job_id}_{k}" for k in range(4)] and set(tasks.values()) == {"COMPLETED"}, states
    assert states[train.job_id] == "COMPLETED", status.status(RunDir.of(recipe))

    # Never more than 2 array tasks at once (resources.preprocess.array_parallelism), and training after all of them.
    spans = [(r["Start"], r["End"]) for r in sacct(pre.job_id, "JobID", "Start", "End")]
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= 2, spans
    train_start = sacct(train.job_id, "Start")[0]["Start"]
    assert train_start >= max(e for _, e in spans)

    # The training step ran one task on each of the two nodes.
    steps = sacct(train.job_id, "JobID", "NodeList", "NTasks", steps=True)
    step0 = next(r for r in steps if r["JobID"] == f"{train.job_id}.0")
    assert step0["NodeList"] == "node[1-2]" and step0["NTasks"] == "2", steps
    run = RunDir.of(recipe)
    assert (run.adapter / "adapter_config.json").is_file()
    assert (run.sbatch / "preprocess.sbatch").read_text().count("#SBATCH --array=0-3%2") == 1
    assert "afterok:" in (run.sbatch / "train.sbatch").read_text()
    jobs = read_json(run.jobs)
    assert jobs["stages"]["train"]["job_id"] == train.job_id

    # `make status` reads it all back; a relaunch of the same recipe submits nothing.
    report = status.status(run)
    assert f"{pre.job_id}_3" in report and "COMPLETED" in report and "node[1-2]" in report
    assert launch.submit(recipe, ["preprocess", "train"]) == []


def test_failing_shard_cancels_dependents_and_rerun_redoes_only_it(make_recipe, tmp_path):
    """Shard 2 fails (a failure injected in the job's setup lines, as a broken node would); training is
    cancelled rather than left pending; status names the shard; resubmitting reruns only that shard."""
    healed = tmp_path / "healed"
    inject = (f"if [ \"$SLURM_ARRAY_TASK_ID\" = 2 ] && [ ! -e {healed} ]; then "
              "echo 'injected failure on shard 2' >&2; exit 3; fi")
    recipe = chain_recipe(make_recipe, base=with_setup(tmp_path, "preprocess", inject))
    pre, train = launch.submit(recipe, ["preprocess", "train"])
    states = wait_for_jobs([pre.job_id, train.job_id], timeout=300)
    assert states[f"{pre.job_id}_2"] == "FAILED"
    assert states[train.job_id] == "CANCELLED", states  # not PENDING (DependencyNeverSatisfied) forever

    report = status.status(RunDir.of(recipe))
    assert f"shard 2 (array task {pre.job_id}_2) FAILED" in report
    assert "injected failure on shard 2" in report

    healed.touch()
    again = launch.submit(recipe, ["preprocess"])
    assert len(again) == 1 and again[0].tasks == [2]
    wait_for_jobs([again[0].job_id], timeout=180)
    from ftlib.data.preprocess import shards_status
    assert shards_status(recipe)["missing"] == []


def test_a_damaged_shard_is_tokenized_again_on_resubmission(make_recipe, tmp_path):
    """A finished shard's arrow file cut short: the next submission says which shard and file (it used to say
    "[preprocess] already done, skipped", and training then failed on Arrow's nameless error, every time), tokenizes
    that shard alone again, and the training after it runs."""
    from ftlib.data.preprocess import output_dir, shard_name

    recipe = chain_recipe(make_recipe, "data.num_shards=2", "train.max_steps=2")
    (pre,) = launch.submit(recipe, ["preprocess"])
    assert set(wait_for_jobs([pre.job_id], timeout=300).values()) == {"COMPLETED"}
    (arrow,) = (output_dir(recipe) / shard_name(1, 2)).glob("*.arrow")
    os.truncate(arrow, arrow.stat().st_size // 2)
    out = subprocess.run([sys.executable, "-m", "ftlib", "train", str(RunDir.of(recipe).recipe)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"[preprocess] {arrow.parent}: shard 1 of 2 is damaged: {arrow.name} is" in out.stdout, out.stdout
    assert "(truncated)" in out.stdout and "(1 array task)" in out.stdout, out.stdout
    train = records.JobRecords(RunDir.of(recipe)).latest("train")["job_id"]
    assert wait_for_jobs([train], timeout=300)[train] == "COMPLETED", status.status(RunDir.of(recipe))
    assert RunDir.of(recipe).training_done


def test_cancel_stops_the_whole_chain(make_recipe, tmp_path):
    recipe = chain_recipe(make_recipe, base=with_setup(tmp_path, "preprocess", "sleep 60"))
    submitted = launch.submit(recipe, ["preprocess", "train"])
    ids = status.cancel(RunDir.of(recipe))
    assert ids == [s.job_id for s in submitted]
    states = wait_for_jobs(ids, timeout=60)
    assert set(states.values()) == {"CANCELLED"}, states


def test_dry_run_prints_every_script_in_order(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ftlib", "train", str(ROOT / "recipes" / "demo.yaml"),
                          f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.index("preprocess.sbatch") < text.index("train.sbatch") < text.index("serve.sbatch")
    assert "#SBATCH --dependency=afterok:<preprocess>" in text or "afterok:<preprocess>" in text
    assert sorted(p.name for p in (tmp_path / "run" / "sbatch").iterdir()) == [
        "preprocess.sbatch", "serve.sbatch", "train.sbatch"]
    # Nothing submitted: no job of mine runs a script of this run (other users' and tests' jobs share the queue).
    queued = subprocess.run(["squeue", "-h", "-u", str(os.geteuid()), "-o", "%i %o"], capture_output=True, text=True,
                            check=True).stdout
    assert str(tmp_path) not in queued, queued


def test_hand_submitted_array_matches_the_launcher(make_recipe, tmp_path):
    """`sbatch --array=0-3 slurm/preprocess.sbatch recipe.yaml` writes the same shards as the launcher's array:
    the same fingerprint and, shard by shard, the same rows. Both arrays run at once, each into its own cache."""
    from ftlib.data.preprocess import fingerprint, output_dir, shard_name, shards_status

    recipe = chain_recipe(make_recipe)
    by_launcher = chain_recipe(make_recipe, f"run.dir={tmp_path / 'launcher-run'}",
                               f"data.cache_dir={tmp_path / 'launcher-cache'}")
    (launched,) = launch.submit(by_launcher, ["preprocess"])
    launch.save_recipe(recipe)
    out = subprocess.run(["sbatch", "--parsable", "--array=0-3", f"--output={tmp_path}/pre-%A_%a.out",
                          str(ROOT / "slurm" / "preprocess.sbatch"), str(RunDir.of(recipe).recipe)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    job = out.stdout.strip().split(";")[0]
    states = wait_for_jobs([job, launched.job_id], timeout=240)
    assert set(states.values()) == {"COMPLETED"}, (states, [p.read_text() for p in tmp_path.glob("pre-*.out")])

    hand, launcher = shards_status(recipe), shards_status(by_launcher)
    assert hand["missing"] == [] and launcher["missing"] == [], (hand, launcher)
    assert hand["num_shards"] == launcher["num_shards"] == 4
    assert fingerprint(recipe) == fingerprint(by_launcher) == output_dir(recipe).name == output_dir(by_launcher).name
    assert output_dir(recipe) != output_dir(by_launcher)
    import datasets

    total = 0
    for k in range(4):
        a, b = (datasets.load_from_disk(str(output_dir(r) / shard_name(k, 4))) for r in (recipe, by_launcher))
        assert a.column_names == b.column_names and a.num_rows == b.num_rows, (k, a, b)
        assert a.to_dict() == b.to_dict(), f"shard {k}: the hand-submitted array's rows differ from the launcher's"
        total += a.num_rows
    assert total > 0


def test_memory_limit_is_enforced(tmp_path):
    """A job that allocates 500 MB under --mem=100M is killed by the cgroup and sacct says OUT_OF_MEMORY
    (up.sh: task/cgroup with ConstrainRAMSpace=yes), so a runaway job cannot take a node's memory from others."""
    hog = f"{sys.executable} -c \"x = b'x' * (500 * 2**20); print('survived')\""
    out = subprocess.run(["sbatch", "--parsable", "--mem=100M", "--time=2", f"--output={tmp_path}/oom-%j.out",
                          "--wrap", hog], capture_output=True, text=True, check=True, timeout=30)
    job = out.stdout.strip().split(";")[0]
    states = wait_for_jobs([job], timeout=120)
    log = "".join(p.read_text() for p in tmp_path.glob("oom-*.out"))
    assert states[job] == "OUT_OF_MEMORY", (states, log)
    assert "survived" not in log, log
