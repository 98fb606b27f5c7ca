"""The endpoint on this machine, without Slurm: the same one-node Ray cluster, Serve app, endpoint.json and token
as a serve job (ftlib.serve.cluster.run_node as rank 0 of one node, on loopback).

    serve_foreground(recipe)            `make serve` with launcher=local: until Ctrl-C or SIGTERM, then Ray stops
                                        and no process is left behind
    with start_local(recipe) as ep:     the demo and the tests: the endpoint in a child process;
        ep.url, ep.token                ep.stop() (or leaving the block) stops it the same way
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from typing import Optional

from ftlib.rundir import RunDir, read_json
from ftlib.serve.cluster import log, run_node

LOOPBACK = "127.0.0.1"


def serve_foreground(recipe, job_id: Optional[str] = None) -> None:
    """Serve until Ctrl-C or SIGTERM (blocks)."""
    run_node(recipe, 0, [LOOPBACK], job_id or f"local-{os.getpid()}")


class LocalEndpoint:
    def __init__(self, recipe, process: subprocess.Popen, endpoint: dict):
        self.recipe, self.process, self.endpoint = recipe, process, endpoint
        self.url = endpoint["url"]
        self.token = open(endpoint["token_file"]).read().strip()
        self.job_id = endpoint["job_id"]

    def stop(self) -> None:
        _terminate(self.process)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_local(recipe, timeout_s: Optional[float] = None, log_file: Optional[str] = None) -> LocalEndpoint:
    """Start the endpoint in a child process (`serve_foreground`) and return once it answers. Its output (Ray's
    and Serve's logs) goes to `log_file`, or to ours."""
    out = open(log_file, "ab") if log_file else None
    process = subprocess.Popen([sys.executable, "-m", "ftlib.serve.local"], stdin=subprocess.PIPE, stdout=out,
                               stderr=subprocess.STDOUT if out else None)
    if out:
        out.close()  # the child has its own copy
    process.stdin.write(pickle.dumps(recipe))
    process.stdin.close()
    job_id = f"local-{process.pid}"
    endpoint_file = RunDir.of(recipe).endpoint
    deadline = time.monotonic() + (timeout_s or recipe.serve.startup_timeout_s + 30)
    while time.monotonic() < deadline:
        endpoint = read_json(endpoint_file) or {}
        if endpoint.get("job_id") == job_id:
            return LocalEndpoint(recipe, process, endpoint)
        if process.poll() is not None:
            raise RuntimeError(f"the local endpoint exited with status {process.returncode} before it was ready "
                               f"(see its output {'in ' + str(log_file) if log_file else 'above'})")
        time.sleep(0.2)
    _terminate(process)
    raise TimeoutError("the local endpoint was not ready in time")


def _terminate(process: subprocess.Popen, timeout_s: float = 90) -> None:
    """SIGTERM, as Ctrl-C or `make cancel` would; SIGKILL only if it does not finish in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"the local endpoint did not stop within {timeout_s:.0f} s; killing it")
            process.kill()
            process.wait()


if __name__ == "__main__":  # the child of start_local: the recipe arrives pickled on stdin
    serve_foreground(pickle.loads(sys.stdin.buffer.read()))
