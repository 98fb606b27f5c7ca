"""What every task of a job runs on its node: `python -u -m launcher.task FOLDER`.

submitit's own entry (`python -m submitit.core._submit FOLDER`) runs the stage's function, pickles its result and
returns; the interpreter then tears itself down, and with it the C++ parts of the libraries the stage loaded (gloo's
and DeepSpeed's process groups, OpenMP's threads, Ray's core worker). That teardown comes after the work is done and
its result is on disk, yet it can still abort the process. In CI a rank of a 2-node ZeRO-3 job died as the job ended
(no error before, at the time a whole run takes) with "terminate called without an active exception", SIGABRT:
Slurm recorded the job FAILED and srun's --kill-on-bad-exit sent SIGTERM to the other rank.

This entry runs the same job runner (submitit's process_job: signals, requeue, the result pickle), then does what a
normal exit does at Python's level (waits for the threads that are not daemons, runs the exit handlers: logging's
flush, Ray's shutdown, ...), flushes stdout and stderr (with -u, C's stdio is unbuffered), and ends with os._exit and
the status Python would have ended with: 0 after a result, 1 after an error (its traceback printed, as Python prints
it), the code of a SystemExit (submitit's requeue exits with -1 on Slurm and 144 locally). Only the interpreter's
own teardown, and the C++ destructors after it, are skipped.
"""
import atexit
import os
import shlex
import sys
import threading
import traceback

from submitit.core.submission import submitit_main


def task_command(python: str, folder) -> str:
    """The command line of a task (the executors and the sbatch scripts give it)."""
    return f"{python} -u -m launcher.task {shlex.quote(str(folder))}"


def exit_status() -> int:
    """Run submitit's job runner; the status Python would exit with."""
    try:
        submitit_main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits with 1
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130  # 128 + SIGINT
    except BaseException:  # noqa: BLE001 (submitit re-raises the stage's error after pickling it)
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    status = exit_status()
    for thread in threading.enumerate():  # as Python waits for them before exiting
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 (the handlers Python would run at exit; there is no public way)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status & 0xFF)


if __name__ == "__main__":
    main()
