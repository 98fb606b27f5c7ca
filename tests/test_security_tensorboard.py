"""`make tensorboard` on a shared login node: TensorBoard listens on loopback, which every user of the node can
reach. Another local user (the attacker, ftl-bob, really running as that user: see tests/test_security_files.py)
must read nothing of it; its owner reads it with the secret that only `make tensorboard` prints."""
import http.client
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ftlib import tensorboard
from tests.test_security_files import attacker, attacker_prefix
from tests.test_tensorboard import ROOT, write_run

pytestmark = [pytest.mark.security]

ASK = r"""
import sys, urllib.request, urllib.error
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            print(r.status, r.read(200))
    except urllib.error.HTTPError as e:
        print(e.code)
    except OSError as e:
        print("unreachable", e)
"""


def request(port: int, path: str, headers=None):
    """(status, headers, body) of one GET, redirects not followed."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def group_listeners(board):
    leader = psutil.Process(board.process.pid)
    return {(p.pid, p.name(), c.laddr.ip, c.laddr.port) for p in [leader, *leader.children(recursive=True)]
            for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    attacker_prefix()  # skip before starting anything
    runs = tmp_path_factory.mktemp("tb") / "runs"
    write_run(runs, "private")
    board = tensorboard.start(runs)
    yield board
    board.stop()


@pytest.mark.timeout(120)
def test_another_user_of_the_node_reads_nothing(board):
    """Every listening socket of TensorBoard's processes (TensorBoard, and any data server it starts) refuses a
    request without the secret; the other user gets 401/403 for the page and the data."""
    listening = group_listeners(board)
    assert listening, "TensorBoard listens nowhere?"
    for pid, name, ip, port in listening:
        assert ip == "127.0.0.1", (name, ip, port)
        status, _, _ = request(port, "/data/runs")
        assert status in (401, 403), f"{name} (pid {pid}) on {ip}:{port} answers {status} without the secret"
    asked = attacker(ASK, board.url, board.url + "data/runs", board.url + "data/plugin/scalars/tags")
    assert asked.returncode == 0, asked.stderr
    assert [line.split()[0] for line in asked.stdout.splitlines()] in (["401"] * 3, ["403"] * 3), asked.stdout


@pytest.mark.timeout(120)
def test_the_owner_reads_it_with_the_secret_through_a_cookie(board):
    assert request(board.port, "/?token=wrong" + board.token[5:])[0] == 403
    status, headers, _ = request(board.port, "/?token=" + board.token)  # the URL make tensorboard prints
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    status, _, page = request(board.port, "/", {"Cookie": cookie})
    assert status == 200 and b"<tb-webapp>" in page  # TensorBoard's own page
    status, _, runs = request(board.port, "/data/runs", {"Cookie": cookie})
    assert status == 200 and json.loads(runs) == ["private/tensorboard"]


@pytest.mark.timeout(120)
def test_the_secret_is_on_no_command_line_and_in_no_environment(board):
    """`ps` shows every process's command line to everyone: the secret must not be on any."""
    secret = board.token.encode()
    for proc in Path("/proc").iterdir():
        try:
            assert secret not in (proc / "cmdline").read_bytes(), f"the secret is on pid {proc.name}'s command line"
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            pass
    leader = psutil.Process(board.process.pid)
    for p in [leader, *leader.children(recursive=True)]:
        assert secret not in Path(f"/proc/{p.pid}/environ").read_bytes()


@pytest.mark.timeout(120)
def test_make_tensorboard_prints_the_secret_only_to_its_own_terminal(tmp_path):
    """`python -m ftlib.tensorboard RUNS`: the login URL (with the secret) goes to its stdout; the secret is
    nowhere else: not on a command line, not in TensorBoard's info file (which other users may read)."""
    runs = tmp_path / "runs"
    write_run(runs, "demo")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "ftlib.tensorboard", str(runs)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        for line in proc.stdout:
            out += line
            if "Ctrl-C stops it" in line:
                break
        secret = re.search(r"then open +http://localhost:\d+/\?token=(\S+)", out).group(1)
        for p in Path("/proc").iterdir():
            try:
                assert secret.encode() not in (p / "cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
                pass
        from ftlib.private import library_env

        for info in Path(library_env()["TMPDIR"], ".tensorboard-info").glob("*.info"):
            try:
                assert secret not in info.read_text()
            except FileNotFoundError:
                pass
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
