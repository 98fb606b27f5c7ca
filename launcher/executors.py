"""How a stage is run. Three executors with one method each that matters, `run(stage, todo, after)`:

  Slurm    submits the stage with submitit's SlurmExecutor, after the previous stage (afterok); returns at once
  Local    runs it on this machine with submitit's LocalExecutor (a stage's ranks become local processes) and waits
  DryRun   writes the sbatch script that Slurm would get, submits nothing

Every executor records what it started in jobs.json (launcher.records) so that `make status` finds it. The tasks of
the Slurm and local executors run launcher.task, submitit's job runner with an exit that cannot fail a finished task.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import submitit
from submitit.core.utils import JobPaths

from ftlib.errors import UserError
from ftlib.recipe import redact
from ftlib.rundir import RunDir, write_atomic
from launcher import records, site
from launcher.sbatch import render_sbatch, slurm_parameters
from launcher.stages import Stage
from launcher.task import task_command


class LaunchError(UserError):
    """A stage failed or cannot be submitted; the message says which and where its log is."""


class _RunsLauncherTask:
    """Mixed into a submitit executor: its tasks run launcher.task instead of submitit.core._submit."""

    @property
    def _submitit_command_str(self) -> str:
        return task_command(self.python, self.folder)


class SlurmExecutor(_RunsLauncherTask, submitit.SlurmExecutor):
    pass


class LocalExecutor(_RunsLauncherTask, submitit.LocalExecutor):
    pass


@dataclass
class Submitted:
    stage: str
    job_id: str  # the stage's (first) job: what tests and messages name
    folder: str
    tasks: List[int] = field(default_factory=list)  # shard indices, for an array stage
    jobs: list = field(default_factory=list, repr=False)  # submitit Job objects (not saved)
    job_ids: List[str] = field(default_factory=list)  # every job of the stage (an array stage may need several)

    def __post_init__(self):
        self.job_ids = self.job_ids or [self.job_id]

    @property
    def afterok(self) -> str:
        """The dependency of the next stage: all of this one's jobs ended well."""
        return "afterok:" + ":".join(self.job_ids)


def _submit(ex, stage: Stage, recipe, todo: List[int], max_array: Optional[int] = None) -> Submitted:
    """Submit a stage's jobs through a submitit executor: one array task per shard for an array stage (as several
    arrays of at most `max_array` tasks when the site caps array sizes, each after the previous one, so that at
    most array_parallelism tasks run at once), else one job."""
    calls = stage.calls(recipe, todo)
    if not stage.array:
        job = ex.submit(stage.run, *calls[0])
        return Submitted(stage.name, job.job_id, str(ex.folder), jobs=[job])
    size = max_array or len(calls)
    jobs, arrays = [], []
    first_dependency = ex.parameters.get("dependency")
    for start in range(0, len(calls), size):
        if arrays:
            after_previous = f"afterany:{arrays[-1]}"
            ex.update_parameters(dependency=f"{first_dependency},{after_previous}" if first_dependency
                                 else after_previous)
        with ex.batch():
            chunk = [ex.submit(stage.run, *args) for args in calls[start:start + size]]
        jobs += chunk
        arrays.append(chunk[0].job_id.split("_")[0])
    return Submitted(stage.name, arrays[0], str(ex.folder), tasks=list(todo), jobs=jobs, job_ids=arrays)


def _record(run: RunDir, launcher: str, sub: Submitted) -> None:
    task_jobs = {index: job.job_id for index, job in zip(sub.tasks, sub.jobs)}
    records.JobRecords(run).add(sub.stage, launcher, sub.job_id, Path(sub.folder), task_jobs, sub.job_ids)


class Slurm:
    name = "slurm"
    skipped = "[{}] already done, skipped"

    def prepare(self, run: RunDir, recipe, plan: List[tuple]) -> None:
        """Refuse to submit a run that still has jobs queued or running (they would write the same files), and
        check every stage against the site's limits before submitting any (launcher.site)."""
        ids = records.JobRecords(run).slurm_ids()
        active = {j: s for j, s in records.job_states(ids).items() if s in records.ACTIVE}
        if active:
            listing = ", ".join(f"{j} {s}" for j, s in active.items())
            raise LaunchError(f"{run.root.name} still has jobs in flight ({listing}); "
                              f"`make cancel RUN={run.root}` first")
        for stage, todo in plan:
            array = min(len(todo), records.max_array_size() or len(todo)) if stage.array else None
            site.check(recipe, stage, render_sbatch(recipe, stage, None, array))

    def abort(self, submitted: List[Submitted]) -> None:
        ids = [j for sub in submitted for j in sub.job_ids]
        if ids:
            records.cancel(ids)
            print(f"cancelled what was already submitted: {', '.join(ids)}")

    def run(self, run: RunDir, stage: Stage, recipe, todo: List[int], after: Optional[Submitted]) -> Submitted:
        dependency = after.afterok if after else None
        ex = SlurmExecutor(folder=run.stage_logs(stage.name),
                           max_num_timeout=stage.resources(recipe).max_requeues)
        ex.update_parameters(**slurm_parameters(recipe, stage, dependency))
        try:
            sub = _submit(ex, stage, recipe, todo, records.max_array_size() if stage.array else None)
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
            # A limit --test-only could not see (e.g. jobs counted with the ones this chain just queued).
            raise site.SiteError(site.explain(recipe, stage, str(e))) from None
        # Keep the script submitit generated (<folder>/<job id>_submission.sh) beside the run's other scripts.
        script = JobPaths(sub.folder, job_id=sub.jobs[0].job_id).submission_file
        if script.is_file():
            write_atomic(run.sbatch / f"{stage.name}.sbatch", redact(script.read_text(), recipe))
        _record(run, self.name, sub)
        arrays = f" as {len(sub.job_ids)} arrays ({', '.join(sub.job_ids)}; the site's MaxArraySize)" \
            if len(sub.job_ids) > 1 else ""
        tasks = f" ({len(sub.tasks)} array task{'s' * (len(sub.tasks) != 1)}{arrays})" if sub.tasks else ""
        print(f"[{stage.name}] submitted job {sub.job_id}{tasks}" + (f", after {after.job_id}" if after else ""))
        return sub


class Local:
    name = "local"
    skipped = "[{}] already done, skipped"

    def prepare(self, run: RunDir, recipe, plan: List[tuple]) -> None:
        pass

    def abort(self, submitted: List[Submitted]) -> None:
        pass  # each local stage has ended before the next starts

    def run(self, run: RunDir, stage: Stage, recipe, todo: List[int],
            after: Optional[Submitted]) -> Optional[Submitted]:
        if stage.foreground:
            stage.foreground(recipe)
            return None
        r = stage.resources(recipe)
        processes = r.nodes * r.tasks_per_node if stage.ranks else 1  # one machine: all ranks are local processes
        ex = LocalExecutor(folder=run.stage_logs(stage.name))
        ex.update_parameters(timeout_min=r.time_min, tasks_per_node=processes, nodes=1)
        if stage.array and stage.ranks:
            print(f"[{stage.name}] {len(todo)} trial(s), one after the other, {processes} process(es) each")
        elif stage.array:
            print(f"[{stage.name}] {len(todo)} of {recipe.data.num_shards} tasks as a local array")
        else:
            print(f"[{stage.name}] {processes} process(es)" + (f", world size {processes}" if stage.ranks else ""))
        started = time.time()
        if stage.array and stage.ranks:
            sub = self._one_after_the_other(run, ex, stage, recipe, todo)
        else:
            sub = _submit(ex, stage, recipe, todo)
            _record(run, self.name, sub)
            _wait(sub, follow=stage.ranks)
        print(f"[{stage.name}] done in {time.time() - started:.0f} s")
        return sub

    def _one_after_the_other(self, run: RunDir, ex, stage: Stage, recipe, todo: List[int]) -> Submitted:
        """A sweep's trials on this machine: each with all its ranks, one after the other (they would share the same
        cores). A failed trial does not stop the others; the stage fails at the end, naming each."""
        subs, failed = [], []
        for index in todo:
            sub = _submit(ex, stage, recipe, [index])
            subs.append(sub)
            _record(run, self.name, Submitted(stage.name, subs[0].job_id, sub.folder, tasks=[i for s in subs
                                              for i in s.tasks], jobs=[j for s in subs for j in s.jobs]))
            try:
                _wait(sub, follow=True)
            except LaunchError as e:
                print(str(e))
                failed.append(str(e).splitlines()[0])
        if failed:
            raise LaunchError(f"[{stage.name}] {len(failed)} of {len(todo)} failed: " + "; ".join(failed))
        return Submitted(stage.name, subs[0].job_id, subs[0].folder, tasks=list(todo),
                         jobs=[j for s in subs for j in s.jobs])


class DryRun:
    name = "dry run"
    skipped = "# [{}] already done, would be skipped"

    def __init__(self):
        self.written: List[Path] = []

    def prepare(self, run: RunDir, recipe, plan: List[tuple]) -> None:
        pass

    def abort(self, submitted: List[Submitted]) -> None:
        pass

    def run(self, run: RunDir, stage: Stage, recipe, todo: List[int], after: Optional[Submitted]) -> Submitted:
        dependency = f"afterok:<{after.stage}>" if after else None
        path = run.sbatch / f"{stage.name}.sbatch"
        write_atomic(path, redact(render_sbatch(recipe, stage, dependency, len(todo) if stage.array else None), recipe))
        self.written.append(path)
        return Submitted(stage.name, f"<{stage.name}>", str(run.stage_logs(stage.name)),
                         tasks=list(todo) if stage.array else [])


# ----------------------------------------------------------------------------------------------------- local waiting
def _wait(sub: Submitted, follow: bool) -> None:
    """Wait for every job of a local stage; print rank 0's log lines as they come when `follow`. A failed task
    raises LaunchError with the task's own error line (e.g. a DataError naming file and line) and its log."""
    printed = 0
    while not all(j.done() for j in sub.jobs):
        if follow:
            printed = _print_new(sub.jobs[0].paths.stdout, printed)
        time.sleep(1)
    if follow:
        _print_new(sub.jobs[0].paths.stdout, printed)
    for index, job in enumerate(sub.jobs):
        try:
            job.results()  # every task of the job (ranks)
        except Exception as e:  # submitit re-raises the task's exception with its traceback as text
            what = (f"{'trial' if follow else 'shard'} {sub.tasks[index]}" if sub.tasks else f"job {job.job_id}")
            raise LaunchError(f"[{sub.stage}] {what} failed: {task_error(str(e)) or type(e).__name__}\n"
                              f"  log: {job.paths.stderr}") from None


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?")


def task_error(text: str, limit: int = 600) -> str:
    """The exception of a failed submitit task, on one line: from the last line of the traceback it carries that
    names an exception type to its end (a message may span lines). submitit appends the log paths after the
    traceback; they say nothing of the cause."""
    traceback = re.split(r"\n-{10,}\n", text)
    lines = [line for line in (traceback[1] if len(traceback) > 2 else text).strip().splitlines() if line.strip()]
    start = max((i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)), default=len(lines) - 1)
    message = " ".join(line.strip() for line in lines[start:])
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _print_new(path: Path, already: int) -> int:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return already
    for line in lines[already:]:
        print("   ", line)
    return len(lines)
