"""Sweeps: many trainings of one recipe with other values, compared, the worst stopped early.

    trials = expand(recipe_path, overrides)   # [Trial(name, values, recipe)], every trial's recipe validated
    early_stop(rung, me, losses, rule)        # the successive-halving rule, a pure function

A sweep is a recipe with a `sweep:` section (a grid and/or random draws over recipe keys; see ftlib/recipe.py).
Each trial is a run of its own in `runs/<sweep>/<trial>/` (its name says its values, e.g.
`learning_rate=0.003,r=8`), holding everything a run holds, so every command works on a trial; its recipe is the
sweep's with the trial's values, `sweep.trial` set and no grid. The sweep's folder holds what is shared:

  runs/<sweep>/recipe.yaml     the sweep's recipe as resolved          trials.json   trial -> values, in array order
  runs/<sweep>/jobs.json       the preprocessing and training arrays   logs/, sbatch/ as for a run
  runs/<sweep>/reports/<trial>.json   each trial's eval losses by step (written by the trial's rank 0)

Early stopping needs no service: at an evaluation step listed in sweep.early_stopping.rungs, a trial writes its eval
loss to its report and reads the others'; if at least min_trials reached the rung and its loss is among the worst
stop_fraction of them, it stops (checkpoint kept, `stopped.json` says the rung and the loss). Trials start in array
order, so later ones are compared with the earlier ones' losses (asynchronous successive halving).
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from omegaconf import OmegaConf

from ftlib import recipe as recipe_mod
from ftlib.recipe import RecipeError
from ftlib.rundir import RunDir, read_json, write_json

# Keys a sweep may not vary: every trial of the one training array shares its resources and site settings, the
# launcher names each trial's run, and a sweep does not nest.
FIXED = ("run.", "resources.", "slurm.", "sweep.", "serve.")
DRAWS = ("log_uniform", "uniform", "int_uniform", "choice")


@dataclass
class Trial:
    name: str
    values: Dict[str, Any]
    recipe: Any  # the trial's validated Recipe

    @property
    def run(self) -> RunDir:
        return RunDir.of(self.recipe)


# ----------------------------------------------------------------------------------------------------- trials
def expand(path, overrides=(), sweep=None) -> List[Trial]:
    """The trials of the sweep recipe at `path`, each trial's recipe loaded and validated (a value the schema
    rejects is a RecipeError naming the sweep key, before anything is submitted)."""
    sweep = sweep or recipe_mod.load(path, list(overrides))
    top = f"{path} (with command-line overrides)" if overrides else str(path)
    s = sweep.sweep
    _check_keys(s, top)
    points = _grid(s.grid) or [{}]
    if s.samples and s.random:
        rng = np.random.default_rng(s.seed)
        points = [{**point, **_draw(s.random, rng, top)} for point in points for _ in range(s.samples)]
    elif s.samples or s.random:
        raise RecipeError(f"{top}: sweep.{'random' if s.samples else 'samples'}: "
                          + ("random draws need keys to draw in sweep.random" if s.samples else
                             "sweep.random needs sweep.samples > 0 draws"))
    if points == [{}]:
        raise RecipeError(f"{top}: sweep.grid: empty: give at least one key with values (or sweep.random with samples)")
    if len(points) > s.max_trials:
        raise RecipeError(f"{top}: sweep: {len(points)} trials, more than sweep.max_trials={s.max_trials}")
    names = _names(points)
    if len(set(names)) < len(names):
        raise RecipeError(f"{top}: sweep: trials repeat the same values ({names[0]}...): remove repeated values")
    folder = Path(sweep.run.dir)
    trials = []
    for name, values in zip(names, points):
        fixed = [f"run.name={json.dumps(f'{sweep.run.name}-{name}')}", f"run.dir={json.dumps(str(folder / name))}"]
        trial_overrides = list(overrides) + [f"{k}={json.dumps(v)}" for k, v in values.items()] + fixed
        try:
            trial = recipe_mod.load(path, trial_overrides)
        except RecipeError as e:
            why = str(e).split(": ", 1)[-1]
            raise RecipeError(f"{top}: sweep: trial {name}: {why}") from None
        trial.sweep.grid, trial.sweep.random, trial.sweep.samples, trial.sweep.trial = {}, {}, 0, name
        trials.append(Trial(name, values, trial))
    return trials


def _check_keys(s, top: str) -> None:
    schema = OmegaConf.structured(recipe_mod.Recipe)
    for section, keys in (("grid", s.grid), ("random", s.random)):
        for key in keys:
            where = f"{top}: sweep.{section}.{key}"
            if key.startswith(FIXED):
                raise RecipeError(f"{where}: a sweep cannot vary {key.split('.')[0]}.*: every trial of the training "
                                  f"array shares its resources, site settings and serving")
            if OmegaConf.select(schema, key, default="\0missing") == "\0missing":
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(schema, parent) if parent else schema
                known = list(node.keys()) if OmegaConf.is_dict(node) else []
                import difflib

                close = difflib.get_close_matches(leaf, known, n=1)
                raise RecipeError(f"{where}: unknown key" + (f" (did you mean '{parent}.{close[0]}'?)" if close else ""))
            if section == "grid" and (not isinstance(keys[key], (list, tuple)) or not keys[key]):
                raise RecipeError(f"{where}: expected a non-empty list of values, got {keys[key]!r}")
            if section == "random":
                draw = keys[key]
                if not isinstance(draw, dict) or len(draw) != 1 or next(iter(draw)) not in DRAWS:
                    raise RecipeError(f"{where}: expected one of {', '.join(f'{{{d}: [...]}}' for d in DRAWS)}, "
                                      f"got {draw!r}")


def _grid(grid: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(grid[k]) for k in keys))]


def _draw(random: Dict[str, Dict[str, Any]], rng, top: str) -> Dict[str, Any]:
    out = {}
    for key, spec in random.items():
        (how, args), = spec.items()
        args = list(args)
        if how == "choice":
            out[key] = args[int(rng.integers(len(args)))]
            continue
        lo, hi = (float(a) for a in args)
        if not lo < hi or (how == "log_uniform" and lo <= 0):
            raise RecipeError(f"{top}: sweep.random.{key}: {how} needs 0 < lo < hi" if how == "log_uniform"
                              else f"{top}: sweep.random.{key}: {how} needs lo < hi, got {args}")
        if how == "log_uniform":
            out[key] = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
        elif how == "uniform":
            out[key] = float(f"{rng.uniform(lo, hi):.3g}")
        else:
            out[key] = int(rng.integers(int(lo), int(hi) + 1))
    return out


def _names(points: List[Dict[str, Any]]) -> List[str]:
    """A trial's name says its values: `learning_rate=0.003,r=8` (the last part of each key, unless two keys of the
    sweep end alike)."""
    keys = list(points[0])
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = short if len(set(short)) == len(short) else keys
    return [",".join(f"{label}={_text(point[k])}" for label, k in zip(labels, keys)) for point in points]


def _text(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+\-]", "_", text)


# ----------------------------------------------------------------------------------------------------- the sweep's folder
def folder_of(trial_recipe) -> Path:
    """The sweep folder of a trial (its run directory's parent)."""
    return Path(trial_recipe.run.dir).parent


def is_sweep(folder) -> bool:
    return (Path(folder) / "trials.json").is_file()


def write_trials(folder: Path, trials: List[Trial]) -> None:
    write_json(folder / "trials.json", {"trials": [{"name": t.name, "values": t.values} for t in trials]})


def trial_names(folder) -> List[str]:
    return [t["name"] for t in (read_json(Path(folder) / "trials.json") or {"trials": []})["trials"]]


def report_path(folder: Path, trial: str) -> Path:
    return folder / "reports" / f"{trial}.json"


def record_eval(trial_recipe, step: int, loss: float) -> Dict[str, Dict[str, float]]:
    """Add this trial's eval loss at `step` to its report; returns every trial's {trial: {step: loss}}."""
    folder, me = folder_of(trial_recipe), trial_recipe.sweep.trial
    mine = read_json(report_path(folder, me), {}) or {}
    mine[str(step)] = loss
    write_json(report_path(folder, me), mine)
    return {p.stem: read_json(p, {}) for p in sorted((folder / "reports").glob("*.json"))}


def early_stop(rung: int, me: str, losses: Dict[str, float], rule) -> Optional[str]:
    """Successive halving at one rung: of the n trials whose eval losses at this rung are known (`losses`, this
    one's included), the worst floor(n x stop_fraction) stop, once n >= min_trials. A NaN loss (a diverged trial) is
    the worst. Returns why `me` stops, or None."""
    n = len(losses)
    if n < rule.min_trials:
        return None
    k = math.floor(n * rule.stop_fraction)
    worst_first = sorted(losses, key=lambda t: (-_finite(losses[t]), t))
    if me not in worst_first[:k]:
        return None
    return (f"stopped early at step {rung}: eval loss {losses[me]:.4f} is among the worst {k} of the {n} trials "
            f"that reached this step (sweep.early_stopping.stop_fraction={rule.stop_fraction:g})")


def _finite(loss: float) -> float:
    return loss if loss == loss and loss != float("inf") else float("inf")


# ----------------------------------------------------------------------------------------------------- results
def summaries(folder) -> List[dict]:
    """Per trial, in the sweep's order: name, values, started, completed, stopped_early (why, or None), step,
    max_steps, eval_loss, train_loss, tokens_per_s and the eval-loss curve [(step, loss)], from its run directory
    (TensorBoard events, adapter/, stopped.json)."""
    from ftlib.report import Events, _event_dirs, last, read_events, series  # (report imports nothing of ours)

    folder = Path(folder)
    out = []
    for entry in (read_json(folder / "trials.json") or {"trials": []})["trials"]:
        run = RunDir(folder / entry["name"])
        events = read_events(run.tensorboard) if _event_dirs(run.tensorboard) else Events()
        losses, evals, speed = (series(events, n) for n in ("train_loss", "eval_loss", "tokens_per_s"))
        stopped = read_json(run.stopped, {}) or {}
        out.append({
            "name": entry["name"], "values": entry["values"],
            "completed": run.training_done, "max_steps": _max_steps(run),
            "stopped_early": stopped.get("why") if stopped.get("how") == "stopped early" else None,
            "step": max((points[-1].step for points in (losses, evals) if points), default=None),
            "eval_loss": last(events, "eval_loss"), "train_loss": last(events, "train_loss"),
            "tokens_per_s": sum(p.value for p in speed) / len(speed) if speed else None,
            "eval_curve": [(p.step, p.value) for p in evals]})
    return out


def _max_steps(run: RunDir) -> Optional[int]:
    try:
        return recipe_mod.load(run.recipe).train.max_steps
    except (RecipeError, OSError):
        return None


def ranking(folder) -> List[dict]:
    """summaries() best first: finished trials by their final eval loss, then those stopped early (by the loss they
    stopped at), then the rest. A missing or NaN loss ranks last in its group."""
    def key(row):
        group = 0 if row["completed"] else 1 if row["stopped_early"] else 2
        loss = row["eval_loss"]
        return group, _finite(loss) if loss is not None else float("inf"), row["name"]

    return sorted(summaries(folder), key=key)
