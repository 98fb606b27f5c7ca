"""A sweep's chain: tokenize once, train every trial as one array, and the sweep-wide views (status, serving).

    submit_sweep(path, overrides, executor)   preprocessing (one array per distinct data set) -> the trials as ONE
                                              training array (afterok), each array task a multi-node job of its own
    sweep_status(folder)                      one line per trial: state, step, eval loss, tokens/s
    serve_recipe(folder, best_only)           a recipe that serves the finished trials' adapters, best first

Trials that share their tokenized data (the same fingerprint: ftlib.data.preprocess) share one preprocessing array;
a trial that changes the data (say data.sequence_len) gets its own. The training array runs sweep.parallelism trials
at once (split into several arrays after one another where the site's MaxArraySize says so, like preprocessing).
Each trial records its own job ("<array>_<task>") in its run directory, so `make status/logs/cancel RUN=<trial>`
work on it; the sweep's folder records the arrays. Submitting again reruns only the trials that did not finish
(completed, or stopped early).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Dict, List

from ftlib import recipe as recipe_mod
from ftlib import sweep as sweep_mod
from ftlib.data.preprocess import output_dir
from ftlib.rundir import RunDir, read_json
from launcher import jobs, records
from launcher.executors import Submitted
from launcher.launch import save_recipe
from launcher.stages import STAGES, Stage


def trial_done(trial: sweep_mod.Trial) -> bool:
    """Completed (adapter/, and no more steps asked) or stopped early: a rerun of the sweep skips it."""
    stopped = read_json(trial.run.stopped, {}) or {}
    return stopped.get("how") == "stopped early" or not STAGES["train"].todo(trial.recipe)


def submit_sweep(path, overrides, executor) -> List[Submitted]:
    """Validate every trial, write the sweep's folder, and run its chain with `executor` (Slurm, Local, DryRun)."""
    sweep = recipe_mod.load(path, list(overrides))
    trials = sweep_mod.expand(path, overrides, sweep)
    folder = save_recipe(sweep)
    sweep_mod.write_trials(folder.root, trials)
    for t in trials:
        save_recipe(t.recipe)
    todo = [i for i, t in enumerate(trials) if not trial_done(t)]
    print(f"sweep {sweep.run.name}: {len(trials)} trials, {len(trials) - len(todo)} already done; "
          f"{sweep.sweep.parallelism} at a time; folder {folder.root}")
    if sweep.serve.enabled:
        print(f"(serve.enabled does not apply to a sweep: once trials finish, `make serve RUN={folder.root}` serves "
              f"them all on one endpoint)")

    # One preprocessing stage per distinct tokenized data set among the trials still to train.
    data: Dict[str, sweep_mod.Trial] = {}
    for i in todo:
        data.setdefault(str(output_dir(trials[i].recipe)), trials[i])
    plan = []
    for k, first in enumerate(data.values()):
        stage = dataclasses.replace(STAGES["preprocess"], name="preprocess" if k == 0 else f"preprocess-{k + 1}",
                                    section="preprocess")
        plan.append((stage, first.recipe, stage.todo(first.recipe)))
    # The training array: the sweep's own recipe sizes it (every trial shares resources.train and slurm.train).
    base = copy.deepcopy(sweep)
    base.resources.train.array_parallelism = sweep.sweep.parallelism
    train = Stage("train", jobs.Train(), todo=lambda recipe: todo, array=True, ranks=True,
                  arguments=lambda recipe, indices: [(trials[i].recipe,) for i in indices])
    plan.append((train, base, todo))

    executor.prepare(folder, base, [(s, t) for s, _, t in plan if t])
    submitted: List[Submitted] = []
    try:
        data_stages: List[Submitted] = []
        for stage, recipe, stage_todo in plan:
            if not stage_todo:
                print(executor.skipped.format(stage.name))
                continue
            after = _all_of(data_stages) if stage is train else None
            sub = executor.run(folder, stage, recipe, stage_todo, after=after)
            if sub is None:
                continue
            submitted.append(sub)
            if stage is train:
                _record_trials(trials, sub, executor.name)
            else:
                data_stages.append(sub)
    except BaseException:
        executor.abort(submitted)
        raise
    return submitted


def _all_of(subs: List[Submitted]):
    """One dependency on every data stage (None when nothing had to be tokenized)."""
    if not subs:
        return None
    return Submitted("preprocess", subs[0].job_id, subs[0].folder, job_ids=[j for s in subs for j in s.job_ids])


def _record_trials(trials, sub: Submitted, launcher: str) -> None:
    """Each trial's own jobs.json: its array task, so that status, logs and cancel work on the trial alone."""
    if launcher == "dry run":
        return
    for index, job in zip(sub.tasks, sub.jobs):
        records.JobRecords(trials[index].run).add("train", launcher, str(job.job_id), Path(sub.folder))


# ----------------------------------------------------------------------------------------------------- views
def trial_rows(folder) -> List[dict]:
    """ftlib.sweep.ranking (best first) with, per trial, its job, its state and the GPU-hours Slurm charged:
    "completed", "stopped early", else the Slurm state of its array task (PENDING, RUNNING, CANCELLED, ...),
    "not finished" (a local run that stopped) or "not run"."""
    folder = Path(folder)
    rows = sweep_mod.ranking(folder)
    entries = {r["name"]: records.JobRecords(RunDir(folder / r["name"])).latest("train") for r in rows}
    on_slurm = [e["job_id"] for e in entries.values() if e and e.get("launcher") == "slurm"]
    live = records.job_states(on_slurm) if on_slurm else {}
    for row in rows:
        entry = entries[row["name"]]
        row["job"] = entry["job_id"] if entry else None
        slurm_state = live.get(row["job"], "PENDING") if entry and entry.get("launcher") == "slurm" else None
        if row["stopped_early"]:
            row["state"] = "stopped early"
        elif row["completed"]:
            row["state"] = "completed"
        else:
            row["state"] = slurm_state or ("not finished" if entry else "not run")
        usage = records.usage(row["job"]) if slurm_state and slurm_state not in records.ACTIVE else None
        row["gpu_hours"] = usage["elapsed_s"] * usage["gpus"] / 3600 if usage else None
    return rows


def sweep_status(folder) -> str:
    folder = Path(folder)
    rows = trial_rows(folder)
    submitted = []
    for stage, entry in records.JobRecords(RunDir(folder)).stages().items():
        ids = records.job_ids(entry)
        state = records.stage_state(ids, records.job_states(ids)) if entry.get("launcher") == "slurm" else "local"
        submitted.append(f"{stage} {ids[0]} {state}")
    out = [f"sweep {folder} ({len(rows)} trials; {', '.join(submitted) or 'nothing submitted'})",
           f"{'trial':<34}{'state':<16}{'job':<10}{'step':>10}{'eval loss':>11}{'tokens/s':>10}"]
    for r in rows:
        step = f"{r['step']}/{r['max_steps']}" if r["step"] is not None else "-"
        out.append(f"{r['name']:<34}{r['state']:<16}{r['job'] or '-':<10}{step:>10}{_num(r['eval_loss']):>11}"
                   f"{_num(r['tokens_per_s'], 0):>10}")
        if r["stopped_early"]:
            out.append(f"    {r['stopped_early']}")
    return "\n".join(out)


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def serve_recipe(folder, best_only: bool = False):
    """The recipe that serves a sweep: the best finished trial's recipe, with every finished trial's adapter under
    its trial name (best first: /v1/models lists them so, and the first is the default), in `<sweep>/serve/`."""
    from ftlib.errors import UserError

    folder = Path(folder)
    finished = [r for r in sweep_mod.ranking(folder) if r["completed"]]
    if not finished:
        raise UserError(f"{folder}: no trial of the sweep has finished training yet (`make status RUN={folder}`)")
    chosen = finished[:1] if best_only else finished
    best = RunDir(folder / chosen[0]["name"])
    adapters = {r["name"]: str(folder / r["name"] / "adapter") for r in chosen}
    bases = {recipe_mod.load(folder / r["name"] / "recipe.yaml").model.name_or_path for r in chosen}
    if len(bases) > 1:
        raise UserError(f"{folder}: the trials train different base models ({', '.join(sorted(bases))}): one endpoint "
                        f"serves one base; serve trials one at a time (make serve RUN={folder}/<trial>)")
    import json

    overrides = [f"run.dir={json.dumps(str(folder / 'serve'))}", f"run.name={json.dumps(folder.name + '-serve')}",
                 "serve.model_name=null", f"serve.adapters={json.dumps(adapters)}"]
    return recipe_mod.load(best.recipe, overrides)
