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


@pytest.mark.parametrize("spelling,gpu_type,line", [
    ("gpus_per_node", None, "#SBATCH --gpus-per-node=4"),
    ("gpus_per_node", "a100", "#SBATCH --gpus-per-node=a100:4"),
    ("gres", None, "#SBATCH --gres=gpu:4"),
    ("gres", "a100", "#SBATCH --gres=gpu:a100:4"),
    ("gpus_per_task", None, "#SBATCH --gpus-per-task=1"),
    ("gpus_per_task", "h100", "#SBATCH --gpus-per-task=h100:1")])
def test_gpus_spelled_as_the_site_wants(make_recipe, spelling, gpu_type, line):
    r = make_recipe("resources.train.gpus_per_node=4", "resources.train.tasks_per_node=4",
                    "train.global_batch_size=32", f"slurm.train.gpu_request={spelling}",
                    *([f"slurm.train.gpu_type={gpu_type}"] if gpu_type else []))
    text = normalized(sbatch.render_sbatch(r, "train", "afterok:7"), r)
    assert line in text and "#SBATCH --ntasks-per-node=4" in text
    assert sum("gpu" in x for x in text.splitlines() if x.startswith("#SBATCH")) == 1, text  # one spelling only
    golden = GOLDEN / f"demo-train-{spelling}{'-' + gpu_type if gpu_type else ''}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("visible,expected", [
    ("0,1,2,3", ["0", "1", "2", "3"]),      # --gpus-per-node / --gres: every task sees the node's GPUs
    ("4,5,6,7", ["4", "5", "6", "7"]),      # another job holds 0-3 on this node
    (None, ["0", "1", "2", "3"]),           # nothing from Slurm
])
def test_each_task_gets_its_own_gpu(visible, expected):
    from launcher.jobs import task_device

    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert [task_device(environ, k)["CUDA_VISIBLE_DEVICES"] for k in range(4)] == expected
    assert task_device({"CUDA_VISIBLE_DEVICES": "6"}, 2) == {}  # --gpus-per-task=1: Slurm bound the task's GPU
    with pytest.raises(RuntimeError, match="local rank 2 sees 2 GPU"):
        task_device({"CUDA_VISIBLE_DEVICES": "0,1"}, 2)


def test_the_login_nodes_commands_do_not_load_torch(make_recipe):
    """What `make train` does before it submits (which stages are left to run), `make status` and `make cancel` read
    files and ask Slurm: they must not import torch and the Trainer (6-8 s of imports on a login node, for each
    command, before anything was submitted)."""
    import subprocess

    recipe = make_recipe("run.launcher=slurm")
    from ftlib import recipe as recipe_mod
    from ftlib.rundir import RunDir

    run = RunDir.of(recipe)
    run.root.mkdir(parents=True, exist_ok=True)
    recipe_mod.save(recipe, run.recipe)
    code = ("import sys\n"
            "from ftlib import recipe\n"
            "from ftlib.rundir import RunDir\n"
            "from launcher import stages, status\n"
            "r = recipe.load(sys.argv[1])\n"
            "todo = {name: s.todo(r) for name, s in stages.STAGES.items()}\n"
            "status.status(RunDir.of(r))\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'ftlib.train') if m in sys.modules)\n"
            "print(todo, heavy)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code, str(run.recipe)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "'train': [0]" in done.stdout, done.stdout
