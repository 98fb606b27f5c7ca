"""The stages of a run, one record each: what its tasks run, which tasks are still to do, how they are laid out.

A stage's name is also the name of its recipe sections (`resources.<name>`, `slurm.<name>`) and of its log folder
(`logs/<name>/`). Adding a stage (say, evaluation as a job) means adding one record here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ftlib.rundir import RunDir, more_steps_asked
from launcher import jobs


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable          # what every task runs, pickled by submitit (a callable of launcher.jobs)
    todo: Callable         # recipe -> the task indices still to run; [] when the stage is done
    array: bool = False    # one array task per index (each run(recipe, index, count)); else one job run(recipe)
    ranks: bool = False    # the job's tasks are ranks of one program: tasks_per_node on every node; else one a node
    foreground: Optional[Callable] = None  # the local launcher runs this in the foreground instead (until Ctrl-C)
    section: Optional[str] = None          # its recipe sections' name, when not `name` (a sweep's second data set)
    arguments: Optional[Callable] = None   # (recipe, todo) -> each job's arguments, when not the usual (a sweep)

    def calls(self, recipe, todo: List[int]) -> List[tuple]:
        """The arguments of each job to submit."""
        if self.arguments is not None:
            return self.arguments(recipe, todo)
        if self.array:  # the preprocessing array: shard `index` of data.num_shards
            return [(recipe, index, recipe.data.num_shards) for index in todo]
        return [(recipe,)]

    def resources(self, recipe):
        return getattr(recipe.resources, self.section or self.name)

    def site(self, recipe):
        return getattr(recipe.slurm, self.section or self.name)

    def tasks_per_node(self, recipe) -> int:
        return self.resources(recipe).tasks_per_node if self.ranks else 1


def _missing_shards(recipe) -> List[int]:
    from ftlib.data import DataError
    from ftlib.data.preprocess import shards_status

    status = shards_status(recipe)
    for line in status["damaged"].values():
        print(f"[preprocess] {line}")
    if status["missing"]:
        return status["missing"]
    if status["rejected"]:  # nothing to rerun: the data (or data.max_bad_fraction) must change
        raise DataError(status["rejected"])
    if not status["manifest"]:
        # Every shard is there but the last one died before writing the manifest: rerunning it only writes that.
        return [status["num_shards"] - 1]
    return []


def _train_todo(recipe) -> List[int]:
    """Train unless adapter/ is there and the recipe asks for no more steps than it had (ftlib.train)."""
    if RunDir.of(recipe).training_done and more_steps_asked(recipe) is None:
        return []
    return [0]


def _serve_foreground(recipe) -> None:
    from ftlib.serve.local import serve_foreground

    serve_foreground(recipe)  # like a serve job: until Ctrl-C / SIGTERM


STAGES: Dict[str, Stage] = {s.name: s for s in [
    Stage("preprocess", jobs.preprocess_shard, _missing_shards, array=True),
    Stage("train", jobs.Train(), _train_todo, ranks=True),
    Stage("serve", jobs.serve_node, lambda recipe: [0], foreground=_serve_foreground),
]}


def for_command(command: str, recipe) -> List[Stage]:
    """The chain a CLI command runs: `train` is preprocess -> train (-> serve when serve.enabled)."""
    if command == "train":
        return [STAGES["preprocess"], STAGES["train"]] + ([STAGES["serve"]] if recipe.serve.enabled else [])
    return [STAGES[command]]
