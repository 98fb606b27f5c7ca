"""Caches and temporary files on a node shared with another user (the attacker, ftl-bob, really running as that
user: see tests/test_security_files.py). Libraries of the stack keep files at names anyone can compute, in folders
anyone may create first: Inductor's compiled code in $TMPDIR/torchinductor_<user>, TensorBoard's
$TMPDIR/.tensorboard-info, vLLM's $TMPDIR/vllm_dist_*. The attacker prepares them; the owner's files and processes
must stay untouched. $TMPDIR is a shared sticky folder here (a site's scratch, or /tmp itself), made for the test so
that other runs on this machine do not see the attacker's folders."""
import getpass
import json
import os
import stat
import time
from pathlib import Path

import pytest

from ftlib import private, tensorboard
from launcher.status import tail
from tests.conftest import DEMO
from tests.test_security_files import ATTACKER, attacker, attacker_prefix, shared_root  # noqa: F401 (fixture)
from tests.test_serve import call, ray_processes
from tests.test_serve_vllm import SERVE_PYTHON, WIDE_MODEL, wide_adapter
from tests.test_tensorboard import write_run

pytestmark = [pytest.mark.security]

PREPARE_FOLDER = "import os, sys; os.mkdir(sys.argv[1]); os.chmod(sys.argv[1], 0o777)"

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


# ----------------------------------------------------------------------------------------------- the environment
def test_every_job_points_the_libraries_caches_and_temp_files_into_the_private_folder(make_recipe, monkeypatch):
    """What every process of the product calls first (use_private_files: jobs, serve nodes, the CLI): umask 077 and
    each library's own setting pointed into /tmp/ftlib-<uid>, whatever $TMPDIR was."""
    import tempfile

    from ftlib.rundir import use_private_files

    monkeypatch.setenv("TMPDIR", "/tmp")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    os.umask(0o022)
    use_private_files(make_recipe())
    base = private.user_base()
    assert os.umask(0o077) == 0o077
    assert tempfile.gettempdir() == str(base / "tmp") == os.environ["TMPDIR"] == os.environ["VLLM_RPC_BASE_PATH"]
    assert {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_HOME",
                                       "VLLM_CACHE_ROOT")} == {
        "TORCHINDUCTOR_CACHE_DIR": str(base / "cache" / "inductor"),
        "TRITON_CACHE_DIR": str(base / "cache" / "triton" / "cache"),
        "TRITON_HOME": str(base / "cache" / "triton"), "VLLM_CACHE_ROOT": str(base / "cache" / "vllm")}
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(base / "cache" / "inductor")  # what Inductor itself reads
    for folder in (base, base / "tmp", base / "cache"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()


@pytest.mark.parametrize("variable", ["TORCH_EXTENSIONS_DIR", "HF_HOME"])
def test_a_cache_in_a_folder_another_user_may_write_is_refused_in_one_line(shared_root, variable,  # noqa: F811
                                                                           monkeypatch):
    """The caches that stay in the home directory (the login node fills them for the compute nodes): torch's
    extensions (DeepSpeed's compiled op) and Hugging Face's (models, remote code). Pointed at a folder the attacker
    made, or at one it may still create (in a shared folder), they are refused; in a folder of the owner's, used."""
    attacker_prefix()
    theirs = shared_root / "theirs"
    assert attacker(PREPARE_FOLDER, theirs).returncode == 0
    for path, why in [(theirs, f"belongs to user {ATTACKER}"), (shared_root / "not-yet", "writable by other users")]:
        monkeypatch.setenv(variable, str(path))
        with pytest.raises(private.UnsafeDirectory) as refused:
            private.library_env()
        message = str(refused.value)
        assert "\n" not in message and variable in message and str(path) in message and why in message, message
    mine = private.private_dir(shared_root / "mine")
    monkeypatch.setenv(variable, str(mine / "cache"))
    assert private.library_env()["TMPDIR"] == str(private.user_base() / "tmp")


# ----------------------------------------------------------------------------------------------- compile caches
def owned_by_me(folder: Path) -> list:
    return sorted(str(p) for p in folder.rglob("*") if p.lstat().st_uid == os.getuid())


def environment(pid: int) -> dict:
    return dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not SERVE_PYTHON.exists(), reason="no serving environment (.venv-serve): make setup")
# Known intermittent, not a leak (the attacker's folder stayed empty every time): in about a third of suite runs the
# vLLM endpoint under this test's conditions stops itself right after it is ready ("node 0: stopping" with no
# cause logged), so the test finds no engine or no endpoint. Run to the end and reported either way until fixed.
@pytest.mark.xfail(reason="intermittent: the vLLM endpoint sometimes stops itself right after it is ready",
                   strict=False)
def test_a_prepared_compile_cache_folder_gets_nothing_from_a_vllm_endpoint(shared_root, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """vLLM's CPU sampler is compiled by torch.compile; Inductor keeps the generated code in
    $TMPDIR/torchinductor_<user> and loads it from there at the next start. The attacker creates that folder (777)
    before the owner's first endpoint: nothing of the owner's may land in it (it could replace the code), and the
    engine's processes must compile into the owner's private folder instead."""
    from ftlib.serve.local import start_local

    attacker_prefix()
    prepared = shared_root / f"torchinductor_{getpass.getuser()}"
    done = attacker(PREPARE_FOLDER, prepared)
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("TMPDIR", str(shared_root))
    os.umask(0o022)  # a usual login shell's: the endpoint must make its files private by itself
    recipe = vllm_recipe(tmp_path)
    started = time.time()
    ep = start_local(recipe, timeout_s=420, log_file=str(tmp_path / "endpoint.log"))
    try:
        answer = call(ep.url + "/v1/completions", {"model": "mine", "prompt": "Once upon a time", "max_tokens": 8,
                                                  "temperature": 0.8}, ep.token)
        assert answer[0] == 200, answer
        health = call(ep.url + "/health")
        assert health[1].get("engine") == "vllm", (health, tail(tmp_path / "endpoint.log", 40))
        # The processes of the endpoint's node, to find vLLM's engine among them (and name them all if it is not).
        env, commands = {}, {}
        for pid in ray_processes(f"{ep.job_id}-0"):
            try:
                env[pid] = environment(pid)
                commands[pid] = (Path(f"/proc/{pid}/comm").read_text().strip(),
                                 Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
            except OSError:
                pass  # ended meanwhile
        engine = [pid for pid, (comm, cmdline) in commands.items() if "VLLM" in comm or "EngineCore" in cmdline]
        assert engine, ("no vLLM engine process found", commands, tail(tmp_path / "endpoint.log", 40))
        # What the endpoint's processes created in $TMPDIR (vLLM's vllm_dist_* files and IPC sockets) and Ray's
        # sockets: for the owner only, whatever the umask of the shell that started it.
        made = [p for p in Path(env[engine[0]]["TMPDIR"]).iterdir() if p.lstat().st_mtime >= started - 1]
        ray_dirs = {ray_temp_dir(pid) for pid in ray_processes(f"{ep.job_id}-0")}
        ray_sockets = [p for folder in ray_dirs for p in folder.rglob("*") if p.is_socket()]
        assert any(p.name.startswith("vllm_dist_") for p in made) and ray_sockets, (made, ray_sockets)
        opened = [f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p}" for p in made + ray_sockets
                  if not p.is_dir() and p.lstat().st_mode & 0o077]
        assert opened == [], opened
    finally:
        ep.stop()
    assert owned_by_me(prepared) == [], "the endpoint wrote into the folder the attacker prepared"
    base = str(private.user_base())
    for pid in engine:  # the processes that compile (Ray's own daemons, e.g. its dashboard agent, run no torch)
        e = env[pid]
        # Where Inductor would compile in this process: its variable, else its default under the temp directory.
        temp = e.get("TMPDIR", "/tmp")
        inductor = e.get("TORCHINDUCTOR_CACHE_DIR", f"{temp}/torchinductor_{getpass.getuser()}")
        assert temp.startswith(base + "/") and inductor.startswith(base + "/"), (
            pid, commands.get(pid), {k: v for k, v in e.items() if "TMP" in k or "CACHE" in k or "FTLIB" in k})
    compiled = Path(env[engine[0]]["TORCHINDUCTOR_CACHE_DIR"])
    assert any(compiled.rglob("*.py")), f"nothing compiled into {compiled}: the test proves nothing"
    assert owned_by_me(shared_root) == [], "the endpoint left files in the shared $TMPDIR"


def vllm_recipe(root: Path):
    """serve.engine=vllm on the tiny model widened to head size 32 (tests/test_serve_vllm.py), adapter 'mine'."""
    from ftlib import recipe as recipe_mod

    wide_adapter(root / "run" / "adapter", seed=1)
    return recipe_mod.load(DEMO, [f"run.dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                  "serve.model_name=mine", f"model.name_or_path={WIDE_MODEL}", "serve.engine=vllm"])


def ray_temp_dir(pid: int) -> Path:
    """The --temp-dir of the `ray start` process among the given one's parents (or itself)."""
    import psutil

    for p in [psutil.Process(pid), *psutil.Process(pid).parents()]:
        for arg in p.cmdline():
            if arg.startswith("--temp-dir="):
                return Path(arg.split("=", 1)[1])
    return Path("/nonexistent")
