"""The private files of a serve job's Ray nodes (ftlib.serve.cluster: user_base, NodeDir, port locks, token
files) against a second local user (the attacker, another tenant: ftl-bob) who prepares names it can predict.

The attacker's steps really run as that user: through runuser when the suite runs as root (the user is created if
missing, as tests/cluster/up.sh creates it), through `sudo -n -u ftl-bob` when the suite runs as ftl-alice (up.sh
allows exactly that); without either, the tests that need it skip and say why. These tests start no Ray (fast);
tests/test_security_ray.py attacks a running serve job."""
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ftlib import private
from ftlib.serve import cluster

pytestmark = [pytest.mark.security]

ATTACKER = os.environ.get("FTLIB_TEST_OTHER_USER", "ftl-bob")
SYSTEM_PYTHON = "/usr/bin/python3"  # the attacker's own interpreter (standard library only)


# ----------------------------------------------------------------------------------------------- the attacker
def attacker_prefix() -> list:
    """The command prefix that runs a command as the other user, or skip."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(ATTACKER)
        except KeyError:  # as tests/cluster/up.sh creates it
            subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", "--comment",
                            "ftlib test tenant", ATTACKER], check=True, capture_output=True)
        return ["runuser", "-u", ATTACKER, "--"]
    probe = subprocess.run(["sudo", "-n", "-u", ATTACKER, "--", "true"], capture_output=True)
    if probe.returncode == 0:
        return ["sudo", "-n", "-u", ATTACKER, "--"]
    pytest.skip(f"acting as a second local user needs root (runuser) or `sudo -n -u {ATTACKER}` "
                f"(tests/cluster/up.sh sets that up for ftl-alice); neither is available to {os.getuid()}")


def attacker(code: str, *args, background: bool = False):
    """Run Python `code` as the other user (argv: args); its stdout lines are its findings."""
    command = attacker_prefix() + [SYSTEM_PYTHON, "-c", code, *map(str, args)]
    if background:
        return subprocess.Popen(command, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=60)


REMOVE = "import shutil, sys; [shutil.rmtree(p, ignore_errors=True) for p in sys.argv[1:]]"


@pytest.fixture
def shared_root():
    """A folder like /tmp (everyone may write, sticky) for the attacker to prepare names in."""
    root = Path(tempfile.mkdtemp(prefix="ftlib-shared-", dir="/tmp"))
    root.chmod(0o1777)
    yield root
    attacker(REMOVE, *root.iterdir())
    shutil.rmtree(root)


PREPARE = r"""
import os, sys
kind, path, other = sys.argv[1:]
if kind == "directory":
    os.mkdir(path)
    os.chmod(path, 0o777)
else:
    os.mkdir(other)
    os.chmod(other, 0o777)
    os.symlink(other, path)
"""


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_a_base_folder_prepared_by_another_user_is_refused_in_one_line(shared_root, kind):
    base = shared_root / f"ftlib-{os.getuid()}"
    prepared = attacker(PREPARE, kind, base, shared_root / "elsewhere")
    assert prepared.returncode == 0, prepared.stderr
    with pytest.raises(private.UnsafeDirectory) as refused:
        private.user_base(shared_root)
    message = str(refused.value)
    assert "\n" not in message and str(base) in message and "refusing" in message
    assert ("is a symbolic link" if kind == "symlink" else f"belongs to user {ATTACKER}") in message
    assert not (shared_root / "elsewhere" / "ports").exists()


def test_the_base_folder_is_private_and_a_root_without_the_sticky_bit_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o1777)
    base = private.user_base(root)
    assert base == root / f"ftlib-{os.getuid()}" and stat.S_IMODE(base.stat().st_mode) == 0o700
    assert private.user_base(root) == base  # found again as it is
    base.chmod(0o755)
    with pytest.raises(private.UnsafeDirectory, match="is open to other users"):
        private.user_base(root)
    base.chmod(0o700)
    root.chmod(0o777)
    with pytest.raises(private.UnsafeDirectory, match="writable by everyone but not sticky"):
        private.user_base(root)


def test_token_files_are_new_private_files_never_followed_links(tmp_path):
    target = tmp_path / "somewhere-else"
    link = tmp_path / "ray_token"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        private.write_private(link, "secret")
    assert not target.exists()
    existing = tmp_path / "existing"
    existing.write_text("old")
    with pytest.raises(FileExistsError):
        private.write_private(existing, "secret")
    assert existing.read_text() == "old"
    fresh = tmp_path / "fresh"
    private.write_private(fresh, "secret")
    assert fresh.read_text() == "secret" and stat.S_IMODE(fresh.stat().st_mode) == 0o600


CRASHING_NODE = r"""
import os, signal, sys
from pathlib import Path
from ftlib.serve import cluster
node = cluster.NodeDir(Path(sys.argv[1]))
cluster.write_private(node.token_file, "token of a node that gets killed")
print(node.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_folders_of_killed_nodes_are_swept_and_running_ones_kept(tmp_path):
    base = private.private_dir(tmp_path / "base")
    running = cluster.NodeDir(base)
    crashed = subprocess.run([sys.executable, "-c", CRASHING_NODE, str(base)], capture_output=True, text=True,
                             timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    dead = Path(crashed.stdout.strip())
    assert (dead / "ray_token").exists()  # what a killed node leaves: its token
    (base / "n-half-made").mkdir()  # a folder whose node died before locking it
    fresh = cluster.NodeDir(base)
    try:
        assert not dead.exists() and not (base / "n-half-made").exists()
        assert running.path.exists() and fresh.path.exists() and running.path != fresh.path
        for node in (running, fresh):
            assert stat.S_IMODE(node.path.stat().st_mode) == 0o700
            # Its longest socket path with the real base, the largest uid and pid: under Unix's 107 bytes.
            worst = Path(f"/tmp/ftlib-{2**32 - 1}", node.path.name, node.ray_dir.name,
                         "session_2026-12-01_10-27-11_336622_4194304", "sockets", "plasma_store")
            assert len(str(worst).encode()) < 107
    finally:
        running.remove()
        fresh.remove()
    assert sorted(p.name for p in base.iterdir()) == [".create.lock"]


def test_port_locks_are_kept_in_the_private_base_and_a_linked_lock_folder_is_refused(tmp_path):
    base = private.private_dir(tmp_path / "base")
    ports = cluster.reserve_ports("locks", 0, base)
    try:
        assert (base / "ports" / f"{ports.first}.lock").exists()
        assert stat.S_IMODE((base / "ports").stat().st_mode) == 0o700
    finally:
        ports.release()
    other = private.private_dir(tmp_path / "other")
    (other / "ports").symlink_to(tmp_path / "base" / "ports")
    with pytest.raises(private.UnsafeDirectory, match="ports is a symbolic link"):
        cluster.reserve_ports("locks", 0, other)
