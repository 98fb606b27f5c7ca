"""`make tensorboard`: TensorBoard over every run, reachable from a laptop through an SSH tunnel.

    serve("runs")      starts TensorBoard on 127.0.0.1:<free port>, prints the URL and the `ssh -L` command,
                       and waits; Ctrl-C or SIGTERM stops it and everything it started.

TensorBoard listens on the loopback interface only, so on a shared login node nobody else can read your runs;
the `ssh -L` forward is the way in. It runs over `--logdir <runs dir>`, which TensorBoard walks recursively, so
runs started after TensorBoard (runs/<name>/tensorboard) appear by themselves; each is named `<name>/tensorboard`.
TensorBoard runs in its own process group: stopping kills the group, i.e. TensorBoard and the data server it
spawns, and TensorBoard's SIGTERM handler removes its own bookkeeping file, so nothing is left behind.
"""
from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftlib.stopping import Stop, stop_on

HOST = "127.0.0.1"


@dataclass
class TensorBoard:
    """A running TensorBoard: its process (leader of its own process group) and where it listens."""

    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the whole process group (TensorBoard exits cleanly on it); SIGKILL what is left after timeout_s."""
        if self.process.poll() is not None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        # Children (the data server) may outlive the leader for a moment; make sure the group is gone.
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(runs_dir: str | os.PathLike, port: int | None = None, ready_timeout_s: float = 60.0,
          stop: Optional[Stop] = None) -> Optional[TensorBoard]:
    """Start TensorBoard over `runs_dir` on 127.0.0.1 and return once its HTTP server answers (None if `stop` is
    set meanwhile: then it is stopped again)."""
    runs_dir = Path(runs_dir).resolve()
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory not found: {runs_dir}")
    port = port or free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs_dir), "--host", HOST,
               "--port", str(port)]
    # start_new_session: TensorBoard leads its own process group (killed as a whole on stop), and a Ctrl-C in the
    # terminal reaches only us, so the shutdown always goes through stop().
    board = TensorBoard(subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL), port)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            board.stop()
            return None
        if board.process.poll() is not None:
            raise RuntimeError(f"TensorBoard exited with status {board.process.returncode} before answering on "
                               f"port {port} (its messages are above)")
        try:
            with urllib.request.urlopen(board.url + "data/environment", timeout=2):
                return board
        except OSError:
            time.sleep(0.3)
    board.stop()
    raise RuntimeError(f"TensorBoard did not answer on {board.url} within {ready_timeout_s:.0f} s")


def login_host() -> str:
    """This machine's fully qualified name (what a laptop ssh's to)."""
    try:
        name = subprocess.run(["hostname", "-f"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        name = ""
    return name or socket.getfqdn()


def tunnel_command(port: int) -> str:
    return f"ssh -N -L {port}:{HOST}:{port} {getpass.getuser()}@{login_host()}"


def serve(runs_dir: str | os.PathLike = "runs") -> None:
    """Start TensorBoard, print how to open it, and block until Ctrl-C or SIGTERM; then stop it."""
    runs = sorted(p.parent.name for p in Path(runs_dir).glob("*/tensorboard"))
    # Ctrl-C and SIGTERM (scancel, kill) take the same clean way out: a flag (ftlib.stopping), not an exception
    # raised wherever this process happens to be.
    with stop_on((signal.SIGINT, signal.SIGTERM)) as stop:
        board = start(runs_dir, stop=stop)
        if board is None:
            return
        try:
            print(f"\nTensorBoard over {Path(runs_dir).resolve()} ({len(runs)} runs: {', '.join(runs) or 'none yet'})")
            print(f"  here:        {board.url}")
            print(f"  from a laptop, run there:\n    {tunnel_command(board.port)}")
            print(f"  then open    http://localhost:{board.port}/")
            print("Ctrl-C stops it.", flush=True)
            while board.process.poll() is None and not stop.wait(0.5):
                pass
            if stop.is_set():
                print("\nstopping TensorBoard ...", flush=True)
            else:
                print(f"TensorBoard exited with status {board.process.returncode}", file=sys.stderr)
        finally:
            board.stop()


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "runs")
