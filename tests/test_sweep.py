"""Sweeps without a cluster: the trials a sweep section describes, the one-line errors, the successive-halving rule,
and the chain a dry run prints (one preprocessing array per distinct data set, one training array). The sweep on the
test cluster, end to end: tests/test_slurm_sweep.py."""
import json
import math
import subprocess
import sys

import pytest

from ftlib import sweep
from ftlib.recipe import EarlyStopping, RecipeError
from tests.conftest import DEMO, ROOT

pytestmark = pytest.mark.timeout(300)


def sweep_file(tmp_path, section: dict, **top) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"base": str(DEMO), "run": {"name": "s", "dir": str(tmp_path / "runs" / "s")},
                                "data": {"cache_dir": str(tmp_path / "cache")}, "sweep": section, **top}))
    return str(path)


def test_a_grid_is_every_combination_and_each_trial_a_run_of_its_own(tmp_path):
    path = sweep_file(tmp_path, {"grid": {"train.learning_rate": [1e-3, 3e-3], "lora.r": [4, 8]}})
    trials = sweep.expand(path)
    assert [t.name for t in trials] == ["learning_rate=0.001,r=4", "learning_rate=0.001,r=8",
                                        "learning_rate=0.003,r=4", "learning_rate=0.003,r=8"]
    for t in trials:
        r = t.recipe
        assert (r.train.learning_rate, r.lora.r) == (t.values["train.learning_rate"], t.values["lora.r"])
        assert r.run.dir == str(tmp_path / "runs" / "s" / t.name) and r.run.name == f"s-{t.name}"
        assert r.sweep.trial == t.name and not r.sweep.enabled  # a trial is a plain run, not a sweep again
        assert r.lora.alpha == 16 and r.train.max_steps == 40  # the rest is the recipe's


def test_random_draws_are_reproducible_and_in_range(tmp_path):
    section = {"grid": {"lora.r": [4, 8]}, "samples": 3, "seed": 7,
               "random": {"train.learning_rate": {"log_uniform": [1e-4, 1e-2]}, "lora.dropout": {"uniform": [0, 0.1]},
                          "train.warmup_steps": {"int_uniform": [1, 5]}, "lora.alpha": {"choice": [8, 32]}}}
    first = sweep.expand(sweep_file(tmp_path, section))
    assert len(first) == 6 and [t.values["lora.r"] for t in first] == [4, 4, 4, 8, 8, 8]
    assert [t.values for t in sweep.expand(sweep_file(tmp_path, section))] == [t.values for t in first]
    for t in first:
        v = t.values
        assert 1e-4 <= v["train.learning_rate"] <= 1e-2 and 0 <= v["lora.dropout"] <= 0.1
        assert v["train.warmup_steps"] in range(1, 6) and v["lora.alpha"] in (8, 32)
        assert t.recipe.train.learning_rate == v["train.learning_rate"]
    assert len({t.values["train.learning_rate"] for t in first}) == 6


@pytest.mark.parametrize("section,extra,error", [
    ({"grid": {"train.lerning_rate": [1e-3]}}, {},
     "sweep.grid.train.lerning_rate: unknown key (did you mean 'train.learning_rate'?)"),
    ({"grid": {"resources.train.nodes": [1, 2]}}, {}, "sweep.grid.resources.train.nodes: a sweep cannot vary resources.*"),
    ({"grid": {"lora.r": [8, -4]}}, {}, "sweep: trial r=-4: lora.r: must be positive, got -4"),
    ({"grid": {"lora.r": []}}, {}, "sweep.grid.lora.r: expected a non-empty list of values"),
    ({"grid": {"lora.r": list(range(1, 70))}}, {}, "sweep: 69 trials, more than sweep.max_trials=64"),
    ({"samples": 2}, {}, "sweep.random: random draws need keys to draw in sweep.random"),
    ({"samples": 2, "random": {"lora.r": {"normal": [1, 2]}}}, {}, "sweep.random.lora.r: expected one of"),
    ({"grid": {"lora.r": [8]}, "early_stopping": {"rungs": [30]}}, {},
     "sweep.early_stopping.rungs: step 30 is not an evaluation step (a multiple of train.eval_steps=20)"),
])
def test_mistakes_are_one_line_naming_the_key_before_anything_runs(tmp_path, section, extra, error):
    with pytest.raises(RecipeError) as failed:
        sweep.expand(sweep_file(tmp_path, section, **extra))
    message = str(failed.value)
    assert error in message and "\n" not in message, message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("losses,me,stops", [
    ({"a": 1.0}, "a", False),                                    # fewer than min_trials reached the rung
    ({"a": 1.0, "b": 2.0}, "b", True),                           # the worse half of two is one
    ({"a": 1.0, "b": 2.0}, "a", False),
    ({"a": 1.0, "b": 2.0, "c": 3.0}, "b", False),                # floor(3 x 0.5) = 1: only the worst stops
    ({"a": 1.0, "b": 2.0, "c": 3.0}, "c", True),
    ({"a": 1.0, "b": math.nan, "c": 3.0}, "b", True),            # a diverged trial is the worst
    ({"a": 2.0, "b": 2.0}, "a", True),                           # a tie: decided by name, the same way every time
])
def test_successive_halving_at_a_rung(losses, me, stops):
    why = sweep.early_stop(10, me, losses, EarlyStopping(rungs=[10], stop_fraction=0.5, min_trials=2))
    assert (why is not None) == stops
    if stops:
        assert why.startswith(f"stopped early at step 10: eval loss {losses[me]:.4f} is among the worst") and \
            f"of the {len(losses)} trials" in why


def test_a_dry_run_tokenizes_each_data_set_once_and_trains_the_trials_as_one_array(tmp_path):
    section = {"grid": {"data.sequence_len": [256, 512], "train.learning_rate": [1e-3, 3e-3, 1e-2]},
               "parallelism": 2}
    path = sweep_file(tmp_path, section, resources={"train": {"nodes": 2}})
    out = subprocess.run([sys.executable, "-m", "ftlib", "sweep", path, "run.launcher=slurm", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    scripts = [block.split("\n", 1) for block in out.stdout.split("# ---- ")[1:]]
    names = [head.rsplit("/", 1)[-1] for head, _ in scripts]
    assert names == ["preprocess.sbatch", "preprocess-2.sbatch", "train.sbatch"], names  # 2 data sets, 6 trials
    train = scripts[-1][1]
    assert "#SBATCH --array=0-5%2" in train and "#SBATCH --nodes=2" in train, train
    assert "#SBATCH --dependency='afterok:<preprocess>'" in train, train
    assert not (tmp_path / "runs" / "s" / "sequence_len=256,learning_rate=0.001" / "jobs.json").exists()
