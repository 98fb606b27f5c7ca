"""`make tensorboard`: TensorBoard over every run, reachable from a laptop through an SSH tunnel, readable only
with a secret.

    serve("runs")      starts TensorBoard on 127.0.0.1:<free port>, prints the URL with the secret and the `ssh -L`
                       command, and waits; Ctrl-C or SIGTERM stops it and everything it started.

What protects it. TensorBoard listens on the loopback interface only: nobody can reach it from another machine
except through your `ssh -L` forward. But every user logged in on the same node can reach loopback ports, so
loopback alone does not keep your runs to yourself. Each TensorBoard therefore has a secret (32 random bytes,
new each time) and answers nothing without it (401; 403 for a wrong one): the first visit to
`http://localhost:<port>/?token=<secret>` sets an HttpOnly, SameSite=Strict cookie and redirects to the page;
scripts may send `Authorization: Bearer <secret>`. The check runs inside TensorBoard's own HTTP server (a WSGI
guard around its app), so there is no unguarded port behind it, and TensorBoard's fast data server (an
unauthenticated gRPC port on loopback) is not started (--load_fast=false: runs load in TensorBoard's process,
slower for very large logdirs). The secret reaches TensorBoard on its stdin, never on a command line (`ps` shows
those to everyone) or in its environment, and is printed only to your terminal. Not covered: root on that node,
and anyone who can read your terminal; the cookie is sent to every port of localhost in your browser (cookies do
not tell ports apart), so do not browse untrusted local services in the same browser profile while it runs.

TensorBoard's own bookkeeping file (.tensorboard-info/pid-<N>.info, under $TMPDIR) goes into this user's private
folder (ftlib.private): in a shared /tmp anyone could create that folder first and fill it with links to the
owner's files, which TensorBoard would overwrite.

It runs over `--logdir <runs dir>`, which TensorBoard walks recursively, so runs started after TensorBoard
(runs/<name>/tensorboard) appear by themselves; each is named `<name>/tensorboard`. TensorBoard runs in its own
process group: stopping kills the group, and TensorBoard's SIGTERM handler removes its own bookkeeping file
(which holds no secret), so nothing is left behind.
"""
from __future__ import annotations

import getpass
import hmac
import http.cookies
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftlib.private import library_env
from ftlib.stopping import Stop, stop_on

HOST = "127.0.0.1"


@dataclass
class TensorBoard:
    """A running TensorBoard: its process (leader of its own process group) and where it listens."""

    process: subprocess.Popen
    port: int
    token: str  # the secret: without it TensorBoard answers 401

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The address to open once (it sets the cookie); through the tunnel, `localhost` instead of 127.0.0.1."""
        return f"{self.url}?token={self.token}"

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
    command = [sys.executable, "-m", "ftlib.tensorboard", BOARD, "--logdir", str(runs_dir), "--host", HOST,
               "--port", str(port), "--load_fast=false"]
    # start_new_session: TensorBoard leads its own process group (killed as a whole on stop), and a Ctrl-C in the
    # terminal reaches only us, so the shutdown always goes through stop().
    token = secrets.token_urlsafe(32)
    # TensorBoard keeps its bookkeeping files in $TMPDIR/.tensorboard-info, a name anyone can create first (and fill
    # with links to the owner's files): its TMPDIR is this user's private folder (ftlib.private).
    process = subprocess.Popen(command, start_new_session=True, stdin=subprocess.PIPE,
                               env={**os.environ, **library_env()})
    process.stdin.write(f"{token}\n".encode())  # stdin, not argv or the environment: others can read argv
    process.stdin.close()
    board = TensorBoard(process, port, token)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            board.stop()
            return None
        if board.process.poll() is not None:
            raise RuntimeError(f"TensorBoard exited with status {board.process.returncode} before answering on "
                               f"port {port} (its messages are above)")
        try:
            ask = urllib.request.Request(board.url + "data/environment", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(ask, timeout=2):
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
            print(f"  here:        {board.login_url}")
            print(f"  from a laptop, run there:\n    {tunnel_command(board.port)}")
            print(f"  then open    http://localhost:{board.port}/?token={board.token}")
            print("  (the token is the secret that keeps other users of this node out: do not share it)")
            print("Ctrl-C stops it.", flush=True)
            while board.process.poll() is None and not stop.wait(0.5):
                pass
            if stop.is_set():
                print("\nstopping TensorBoard ...", flush=True)
            else:
                print(f"TensorBoard exited with status {board.process.returncode}", file=sys.stderr)
        finally:
            board.stop()


# ----------------------------------------------------------------------------------------------------- the guard
BOARD = "--board"  # `python -m ftlib.tensorboard --board <TensorBoard flags>`: the TensorBoard process itself
COOKIE = "ftlib_tensorboard_{port}"


def guard(app, token: str, cookie: str):
    """A WSGI app that passes a request to `app` only if it carries the secret: the cookie `cookie`, or
    `Authorization: Bearer <token>`. `?token=<token>` sets the cookie and redirects to the same page without it."""
    expected = token.encode()

    def matches(given: str) -> bool:
        return hmac.compare_digest(given.encode(), expected)

    def refuse(start_response, status: str, text: str):
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")])
        return [text.encode()]

    def guarded(environ, start_response):
        query = urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given:
            if not matches(given[-1]):
                return refuse(start_response, "403 Forbidden", "wrong token\n")
            rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "token"])
            location = environ.get("PATH_INFO", "/") + (f"?{rest}" if rest else "")
            start_response("303 See Other", [("Location", location), ("Cache-Control", "no-store"),
                                             ("Set-Cookie", f"{cookie}={token}; HttpOnly; SameSite=Strict; Path=/")])
            return [b""]
        scheme, _, bearer = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "bearer" and matches(bearer.strip()):
            return app(environ, start_response)
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(environ.get("HTTP_COOKIE", ""))
        except http.cookies.CookieError:
            pass
        if cookie in jar and matches(jar[cookie].value):
            return app(environ, start_response)
        return refuse(start_response, "401 Unauthorized",
                      "this TensorBoard needs its token: open the URL with ?token=... that make tensorboard printed\n")

    return guarded


def _board(argv) -> None:
    """The TensorBoard process: TensorBoard's own main, its HTTP server wrapped in `guard`; the secret on stdin."""
    token = sys.stdin.readline().strip()
    if not token:
        sys.exit("ftlib.tensorboard --board: no token on stdin")
    os.umask(0o077)  # its info file is its owner's business only
    from absl import app as absl_app
    from tensorboard import default, main_lib, program

    class GuardedServer(program.WerkzeugServer):
        def __init__(self, wsgi_app, flags):
            super().__init__(guard(wsgi_app, token, COOKIE.format(port=flags.port)), flags)

    main_lib.global_init()
    board = program.TensorBoard(plugins=default.get_plugins(), server_class=GuardedServer)
    absl_app.run(board.main, argv=["tensorboard", *argv], flags_parser=board.configure)


if __name__ == "__main__":
    if sys.argv[1:2] == [BOARD]:
        _board(sys.argv[2:])
    else:
        serve(sys.argv[1] if len(sys.argv) > 1 else "runs")
