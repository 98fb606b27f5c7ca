"""A sweep on the REAL test cluster, end to end: a 2 x 2 grid on the tiny model (a good and a deliberately bad
learning rate, two LoRA ranks), two trials at a time, compared once three trials reached a rung (the two good ones
run first, side by side, and are never compared with each other alone). It tokenizes once, trains the four trials as
one array (split
in two when the site's MaxArraySize is lowered), stops the bad learning rate early at its first rung, ranks the
trials with every eval-loss curve in one plot, serves the finished trials' adapters from one endpoint by trial name,
and after one trial is cancelled, submitting the sweep again runs that trial alone."""
import json
import subprocess
import sys
import time

import openai
import pytest

from ftlib import sweep as sweep_mod
from ftlib.data.preprocess import output_dir
from ftlib.rundir import RunDir, read_json
from launcher import executors, launch, records, status
from launcher.sweep import serve_recipe, submit_sweep, sweep_status, trial_rows
from tests.conftest import DEMO, ROOT
from tests.test_serve import call
from tests.test_slurm import cluster, wait_for_jobs  # noqa: F401 (cluster: the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

GOOD, BAD = 3e-3, 5.0


def write_sweep(tmp_path) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({
        "base": str(DEMO),
        "run": {"name": "grid", "dir": str(tmp_path / "runs" / "grid"), "launcher": "slurm"},
        "data": {"cache_dir": str(tmp_path / "cache"), "sequence_len": 128,
                 "sources": [{"path": str(ROOT / "assets/data/alpaca_gpt4_sample.jsonl"), "max_rows": 300}]},
        "train": {"max_steps": 6, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "warmup_steps": 0,
                  "global_batch_size": 4, "micro_batch_size": 2, "sample_prompts": []},
        "serve": {"enabled": False, "engine": "hf"},
        "sweep": {"grid": {"train.learning_rate": [GOOD, BAD], "lora.r": [4, 8]}, "parallelism": 2,
                  "early_stopping": {"rungs": [2, 4], "stop_fraction": 0.5, "min_trials": 3}},
    }))
    return str(path)


@pytest.mark.timeout(1500)
def test_a_sweep_end_to_end(tmp_path, monkeypatch):
    path = write_sweep(tmp_path)
    folder = tmp_path / "runs" / "grid"
    names = [t.name for t in sweep_mod.expand(path)]
    assert names == ["learning_rate=0.003,r=4", "learning_rate=0.003,r=8", "learning_rate=5,r=4", "learning_rate=5,r=8"]
    good, bad = names[:2], names[2:]

    monkeypatch.setattr(records, "max_array_size", lambda: 3)  # as a site with MaxArraySize=3 would say
    pre, train = submit_sweep(path, [], executors.Slurm())
    assert pre.stage == "preprocess" and len(pre.job_ids) == 1  # one tokenization for the four trials
    assert train.stage == "train" and len(train.job_ids) == 2 and len(train.jobs) == 4, train  # arrays of 3 and 1
    last = RunDir(folder / bad[1])
    last_job = records.JobRecords(last).latest("train")["job_id"]  # (submitit submits an array of one as a job)
    assert last_job in (train.job_ids[1], f"{train.job_ids[1]}_0"), last_job
    cancel = subprocess.run([sys.executable, "-m", "ftlib", "cancel", str(last.root)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)  # one trial cancelled, as a user would
    assert cancel.returncode == 0 and "train" in cancel.stdout, cancel.stdout + cancel.stderr

    states = wait_for_jobs([pre.job_id, *train.job_ids], timeout=900)
    assert states[last_job] == "CANCELLED", states
    assert all(states[f"{train.job_ids[0]}_{k}"] == "COMPLETED" for k in range(3)), (states, sweep_status(folder))
    shards = list(output_dir(sweep_mod.expand(path)[0].recipe).glob("shard-*.done.json"))
    assert len(shards) == 2  # data.num_shards of the demo: tokenized once

    rows = {r["name"]: r for r in trial_rows(folder)}
    assert [rows[n]["state"] for n in good] == ["completed", "completed"], sweep_status(folder)
    assert rows[bad[0]]["state"] == "stopped early" and rows[bad[1]]["state"] == "CANCELLED", sweep_status(folder)
    stopped = read_json(RunDir(folder / bad[0]).stopped)
    assert stopped["how"] == "stopped early" and stopped["rung"] == 2 and stopped["checkpoint"] == "checkpoint-2", \
        stopped
    assert "is among the worst 1 of the 3 trials that reached this step" in stopped["why"], stopped
    assert not RunDir(folder / bad[0]).training_done  # no adapter for a trial stopped early

    # Submitting the sweep again runs the cancelled trial alone: nothing tokenized, one array of one task.
    again = submit_sweep(path, [], executors.Slurm())
    assert [s.stage for s in again] == ["train"] and [t for t in again[0].tasks] == [3], again
    states = wait_for_jobs(again[0].job_ids, timeout=600)
    assert set(states.values()) == {"COMPLETED"}, (states, sweep_status(folder))
    ranked = trial_rows(folder)
    assert [r["name"] for r in ranked[:2]] == sorted(good, key=lambda n: rows[n]["eval_loss"]), ranked
    assert [r["state"] for r in ranked] == ["completed", "completed", "stopped early", "stopped early"], \
        sweep_status(folder)
    table = sweep_status(folder)
    assert all(name in table for name in names) and table.count("stopped early at step 2") == 2, table

    report = subprocess.run([sys.executable, "-m", "ftlib", "report", str(folder)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert report.returncode == 0, report.stderr
    text = (folder / "report.md").read_text()
    assert text.index(ranked[0]["name"]) < text.index(ranked[1]["name"]) < text.index(bad[0]), text
    assert (folder / "plots" / "eval_loss.png").stat().st_size > 1000
    assert f"make train RECIPE={folder / ranked[0]['name'] / 'recipe.yaml'}" in text, text

    # One endpoint serves every finished trial's adapter, by trial name, best first.
    recipe = serve_recipe(folder)
    (job,) = launch.submit(recipe, ["serve"])
    try:
        endpoint = launch.wait_for_endpoint(recipe, job.job_id, timeout_s=400)
        token = (RunDir.of(recipe).token).read_text().strip()
        client = openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=token, max_retries=0, timeout=60)
        served = [m.id for m in client.models.list().data]
        assert served[:2] == [r["name"] for r in ranked[:2]] and not set(bad) & set(served), served
        answers = {name: client.completions.create(model=name, prompt="Once upon a time", max_tokens=8,
                                                   temperature=0).choices[0].text for name in served[:2]}
        assert all(answers.values()), answers
        assert call(endpoint["url"] + "/v1/models")[0] == 401  # the token is still needed
    finally:
        status.cancel(RunDir.of(recipe))
    wait_for_jobs([job.job_id], timeout=120)
