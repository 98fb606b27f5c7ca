"""Progress lines, one way for every step: `log = progress.logger("train")`, then `log.info("step 10: ...")`.

A line reads `HH:MM:SS [train] step 10: ...`, on stdout and at once: in a job that is the task's log
(logs/<stage>/<job>_<task>_log.out), which `make logs` shows and which reads well in a plain file. A program
that set up logging itself (a test with caplog, a notebook) gets the records through its own handlers instead.
"""
from __future__ import annotations

import logging
import sys


def logger(step: str) -> logging.Logger:
    """The progress logger of a step of ftlib: "data", "train", "eval", "serve"."""
    log = logging.getLogger(f"ftlib.{step}")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.hasHandlers():  # neither ours yet nor the program's
        handler = logging.StreamHandler(sys.stdout)  # a StreamHandler flushes every record
        handler.setFormatter(logging.Formatter(f"%(asctime)s [{step}] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    return log
