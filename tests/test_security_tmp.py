"""Caches and temporary files on a node shared with another user (the attacker, ftl-bob, really running as that
user: see tests/test_security_files.py). Libraries of the stack keep files at names anyone can compute, in folders
anyone may create first: Inductor's compiled code in $TMPDIR/torchinductor_<user>, TensorBoard's
$TMPDIR/.tensorboard-info, vLLM's $TMPDIR/vllm_dist_*. The attacker prepares them; the owner's files and processes
must stay untouched. $TMPDIR is a shared sticky folder here (a site's scratch, or /tmp itself), made for the test so
that other runs on this machine do not see the attacker's folders."""
import json
import os
import time
from pathlib import Path

import pytest

from ftlib import private, tensorboard
from tests.test_security_files import attacker, attacker_prefix, shared_root  # noqa: F401 (fixture)
from tests.test_tensorboard import write_run

pytestmark = [pytest.mark.security]

# Fills a folder of its own, TensorBoard's info folder in $TMPDIR (mode 777, as TensorBoard makes it), with
# pid-<N>.info links to a file of the victim, for the pids about to be given out, until its stdin closes (or 90 s):
# a TensorBoard started meanwhile writes its info file through one of them.
PLANT_INFO_LINKS = r"""
import os, sys, threading, time
folder, target = sys.argv[1], sys.argv[2]
os.mkdir(folder)
os.chmod(folder, 0o777)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("planted", flush=True)
deadline = time.time() + 90
while time.time() < deadline and not done.is_set():
    last = int(open("/proc/sys/kernel/ns_last_pid").read())
    for pid in range(max(last - 20, 1), last + 200):
        try:
            os.symlink(target, os.path.join(folder, f"pid-{pid}.info"))
        except FileExistsError:
            pass
    time.sleep(0.02)
"""


@pytest.mark.timeout(180)
def test_a_prepared_tensorboard_info_folder_overwrites_none_of_the_owners_files(shared_root, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    attacker_prefix()  # skip before starting anything
    precious = tmp_path / "precious.txt"  # any file the owner may write, e.g. ~/.bashrc
    precious.write_text("the owner's own text\n")
    runs = tmp_path / "runs"
    write_run(runs, "demo")
    monkeypatch.setenv("TMPDIR", str(shared_root))
    planter = attacker(PLANT_INFO_LINKS, shared_root / ".tensorboard-info", precious, background=True)
    assert planter.stdout.readline().strip() == "planted", planter.stdout.read()
    try:
        board = tensorboard.start(runs)
        try:
            pid = board.process.pid
            mine = Path(private.library_env()["TMPDIR"], ".tensorboard-info", f"pid-{pid}.info")
            deadline = time.monotonic() + 30  # TensorBoard writes its info file once it serves
            while not mine.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert json.loads(mine.read_text())["port"] == board.port  # in the owner's private folder
        finally:
            board.stop()
    finally:
        planter.stdin.close()
        planter.wait(timeout=120)
    assert precious.read_text() == "the owner's own text\n", \
        f"TensorBoard wrote through the attacker's link: {precious.read_text()[:200]}"
    # The link for TensorBoard's pid was there all along (TensorBoard removes its own info file when it stops).
    assert (shared_root / ".tensorboard-info" / f"pid-{pid}.info").is_symlink(), \
        "the attacker did not manage to prepare the link for TensorBoard's pid: the test proves nothing"
