"""make tensorboard: a real TensorBoard over real event files, asked over HTTP, then stopped without leftovers."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from ftlib import tensorboard

ROOT = Path(__file__).resolve().parents[1]


def write_run(runs_dir, name):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(runs_dir / name / "tensorboard"))
    for step in (5, 10):
        writer.add_scalar("train/loss", 3.0 / step, step)
        writer.add_scalar("train/tokens_per_second", 100.0 * step, step)
    writer.add_scalar("eval/loss", 0.5, 10)
    writer.add_text("samples/0", "**a prompt**\n\nan answer", 10)
    writer.close()


def get_json(url, token):
    """GET with TensorBoard's secret (see tests/test_security_tensorboard.py for what happens without it)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def info_files(pid):
    """TensorBoard's bookkeeping file for process `pid` (removed when it exits cleanly), in $TMPDIR: the user's
    private folder (ftlib.private)."""
    from ftlib.private import library_env

    return list(Path(library_env()["TMPDIR"], ".tensorboard-info").glob(f"pid-{pid}.info"))


def wait_gone(processes, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return alive


@pytest.mark.timeout(120)
def test_start_lists_runs_and_tags_on_loopback_then_stop_leaves_nothing(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "alpha")
    write_run(runs, "beta")
    board = tensorboard.start(runs)
    try:
        assert board.url.startswith("http://127.0.0.1:")
        leader = psutil.Process(board.process.pid)
        group = [leader, *leader.children(recursive=True)]
        assert os.getpgid(board.process.pid) == board.process.pid  # its own process group
        assert info_files(board.process.pid)  # written while it runs, must be gone after
        # Bound to loopback only: nothing listens on the port on another address.
        listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                     and c.laddr.port == board.port]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)

        # Runs appear as they are discovered (TensorBoard loads in the background).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tags = get_json(board.url + "data/plugin/scalars/tags", board.token)
            if len(tags) == 2:
                break
            time.sleep(0.5)
        assert sorted(get_json(board.url + "data/runs", board.token)) == ["alpha/tensorboard", "beta/tensorboard"]
        assert set(tags["alpha/tensorboard"]) == {"train/loss", "train/tokens_per_second", "eval/loss"}
        scalars = get_json(board.url + "data/plugin/scalars/scalars?run=alpha/tensorboard&tag=train/loss",
                           board.token)
        assert [(step, value) for _, step, value in scalars] == [(5, pytest.approx(0.6)), (10, pytest.approx(0.3))]
    finally:
        board.stop()
    assert not wait_gone(group), "a TensorBoard process outlived stop()"
    assert not info_files(board.process.pid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_prints_the_tunnel_and_stops_cleanly(tmp_path, how):
    """`python -m ftlib.tensorboard RUNS`, as `make tensorboard` runs it: prints the URL and the ssh command, serves,
    and on Ctrl-C (SIGINT to the foreground process) or SIGTERM stops TensorBoard and its children."""
    runs = tmp_path / "runs"
    write_run(runs, "demo")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "ftlib.tensorboard", str(runs)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        out = "".join(lines)
        port, token = re.search(r"here: +http://127\.0\.0\.1:(\d+)/\?token=(\S+)", out).groups()
        assert re.search(rf"ssh -N -L {port}:127\.0\.0\.1:{port} \S+@\S+", out), out
        assert f"then open    http://localhost:{port}/?token={token}" in out
        assert "1 runs: demo" in out
        assert get_json(f"http://127.0.0.1:{port}/data/runs", token) == ["demo/tensorboard"]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "TensorBoard is not running under serve()"

        proc.send_signal(how)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + rest
    assert "stopping TensorBoard" in rest
    assert not wait_gone(children), "a TensorBoard process outlived serve()"
    assert not any(info_files(c.pid) for c in children)
    with pytest.raises(urllib.error.URLError) as gone:
        get_json(f"http://127.0.0.1:{port}/data/runs", token)
    assert isinstance(gone.value.reason, ConnectionRefusedError)


def test_missing_runs_dir_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs directory not found: .*nowhere"):
        tensorboard.start(tmp_path / "nowhere")
