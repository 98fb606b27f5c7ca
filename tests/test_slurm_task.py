"""How a job's task ends, on the REAL Slurm cluster (launcher/task.py): a task whose work is done ends as Python would
end it, with its result and its status, even when the teardown of a C++ library it loaded would abort the process
afterwards. In CI a rank of a 2-node ZeRO-3 job died as the job ended ("terminate called without an active
exception"), and Slurm recorded the job as FAILED.

The fault is injected the way a C++ library's static destructor is registered: a function that glibc runs when the
process exits (__cxa_atexit), here abort(3)."""
import atexit
import ctypes
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit

from launcher.executors import SlurmExecutor
from launcher.sbatch import slurm_parameters
from tests.test_slurm import cluster, sacct, wait_for_jobs  # noqa: F401 (cluster: the session fixture)

pytestmark = [pytest.mark.slurm]


# ----------------------------------------------------------------------------------------------------- the jobs' work
def finish_then_abort_at_exit() -> int:
    """The task's work (it returns its rank), after which its process aborts at exit, as a library's teardown can."""
    libc = ctypes.CDLL("libc.so.6")
    libc.__cxa_atexit(ctypes.cast(libc.abort, ctypes.c_void_p), None, None)
    return submitit.JobEnvironment().global_rank


def fail_with(message: str) -> None:
    raise ValueError(message)


def exit_with(code: int) -> None:
    sys.exit(code)


def finish_with_exit_handler_and_thread(folder: str) -> str:
    """Returns at once; an exit handler and a (non-daemon) thread still have work to do, as Python lets them."""
    atexit.register(Path(folder, "exit-handler-ran").write_text, "yes")
    threading.Thread(target=lambda: (time.sleep(2), Path(folder, "thread-finished").write_text("yes"))).start()
    return "returned"


# ----------------------------------------------------------------------------------------------------- the tests
def executor(cls, recipe, folder: Path, nodes: int):
    """An executor of `cls` with the train stage's parameters (srun --kill-on-bad-exit included) on `nodes` nodes."""
    ex = cls(folder=folder)
    ex.update_parameters(**{**slurm_parameters(recipe, "train"), "nodes": nodes, "job_name": "task-exit"})
    return ex


def state_and_exit_code(job_id: str) -> tuple:
    (row,) = sacct(job_id, "State", "ExitCode")
    return row["State"].split()[0], row["ExitCode"]


@pytest.mark.timeout(300)
def test_a_finished_task_whose_teardown_aborts_still_completes(make_recipe, tmp_path):
    recipe = make_recipe("run.launcher=slurm")
    ours = executor(SlurmExecutor, recipe, tmp_path / "ours", nodes=2).submit(finish_then_abort_at_exit)
    # The same job under submitit's own entry: the fault is real, and fails it.
    plain = executor(submitit.SlurmExecutor, recipe, tmp_path / "plain", nodes=2).submit(finish_then_abort_at_exit)
    wait_for_jobs([ours.job_id, plain.job_id], timeout=240)

    assert state_and_exit_code(ours.job_id) == ("COMPLETED", "0:0"), ours.stderr()
    assert ours.results() == [0, 1]
    assert state_and_exit_code(plain.job_id)[0] == "FAILED"


@pytest.mark.timeout(300)
def test_a_task_ends_with_the_status_python_would_give_it(make_recipe, tmp_path):
    recipe = make_recipe("run.launcher=slurm")
    ex = executor(SlurmExecutor, recipe, tmp_path / "logs", nodes=1)
    jobs = {"error": ex.submit(fail_with, "row 7 of part-0.jsonl is not JSON"),
            "exit 3": ex.submit(exit_with, 3),
            "handlers": ex.submit(finish_with_exit_handler_and_thread, str(tmp_path))}
    wait_for_jobs([j.job_id for j in jobs.values()], timeout=240)

    # An error: status 1, its traceback in the task's log and in the result submitit keeps.
    assert state_and_exit_code(jobs["error"].job_id) == ("FAILED", "1:0")
    assert "ValueError: row 7 of part-0.jsonl is not JSON" in jobs["error"].stderr()
    with pytest.raises(submitit.core.utils.FailedJobError, match="row 7 of part-0.jsonl is not JSON"):
        jobs["error"].result()
    # sys.exit(3): status 3.
    assert state_and_exit_code(jobs["exit 3"].job_id) == ("FAILED", "3:0")
    # Python's exit handlers ran and its non-daemon threads finished before the process ended.
    assert state_and_exit_code(jobs["handlers"].job_id) == ("COMPLETED", "0:0")
    assert jobs["handlers"].result() == "returned"
    assert (tmp_path / "exit-handler-ran").read_text() == "yes"
    assert (tmp_path / "thread-finished").read_text() == "yes"
