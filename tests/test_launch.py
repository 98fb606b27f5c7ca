"""The launcher's pure parts: recipe -> sbatch parameters -> sbatch text, checked against golden files.

Regenerate the golden files after an intended change with `UPDATE_GOLDEN=1 make test PYTEST_ARGS=tests/test_launch.py`
and review the diff.
"""
import os
import sys

import pytest

from launcher import sbatch
from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "golden"


def normalized(text: str, recipe) -> str:
    return text.replace(recipe.run.dir, "<RUN_DIR>").replace(sys.executable, "<PYTHON>")


@pytest.mark.parametrize("stage,dependency,array", [
    ("preprocess", None, 2), ("train", "afterok:<preprocess>", None), ("serve", "afterok:<train>", None)])
def test_sbatch_matches_golden(make_recipe, stage, dependency, array):
    recipe = make_recipe("slurm.train.partition=debug", "slurm.train.account=proj",
                         "slurm.train.setup=['module load cuda/12.6']", "slurm.serve.additional={reservation: demo}")
    text = normalized(sbatch.render_sbatch(recipe, stage, dependency, array), recipe)
    golden = GOLDEN / f"demo-{stage}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_parameters_come_from_the_recipe(make_recipe):
    r = make_recipe("resources.train.nodes=4", "train.global_batch_size=32", "resources.train.gpus_per_node=2",
                    "resources.train.tasks_per_node=2", "resources.train.mem_gb=1.5", "resources.train.exclusive=true",
                    "slurm.train.constraint=a100", "slurm.train.qos=high", "resources.train.time_min=90")
    p = sbatch.slurm_parameters(r, "train", dependency="afterok:7")
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["mem"]) == (4, 2, 2, "1536M")
    assert (p["exclusive"], p["constraint"], p["qos"], p["time"]) == (True, "a100", "high", 90)
    assert p["dependency"] == "afterok:7" and p["additional_parameters"]["kill-on-invalid-dep"] == "yes"
    text = sbatch.render_sbatch(r, "train", "afterok:7")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --dependency=afterok:7", "#SBATCH --exclusive", "#SBATCH --signal=USR2@90"):
        assert line in text


def test_array_parallelism(make_recipe):
    r = make_recipe("data.num_shards=4", "resources.preprocess.array_parallelism=2")
    assert "#SBATCH --array=0-3%2" in sbatch.render_sbatch(r, "preprocess", None, 4)
