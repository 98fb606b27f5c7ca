"""Shared test set-up: offline hub, CPU DeepSpeed, a factory for recipes that write into tmp_path, and the second
tenant of the test cluster (tests act as ftl-bob through sudo; `make test` runs the suite as ftl-alice)."""
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "assets" / "models" / "stories260K"
SAMPLE_DATA = ROOT / "assets" / "data" / "alpaca_gpt4_sample.jsonl"
DEMO = ROOT / "recipes" / "demo.yaml"

# No hub access here; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def make_recipe(tmp_path):
    """make_recipe("train.max_steps=4", ..., base=DEMO) -> a validated Recipe whose run dir and data cache are
    inside this test's tmp_path, so tests never share state."""
    from ftlib import recipe as recipe_mod

    def make(*overrides: str, base: Path = DEMO):
        fixed = [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
        return recipe_mod.load(base, fixed + list(overrides))

    return make


# ----------------------------------------------------------------------------------------------------- tenants
TEST_USER = "ftl-alice"    # make test runs the suite as this user (tests/cluster/run-as-user.sh)
OTHER_TENANT = "ftl-bob"   # another user of the same cluster; TEST_USER may run commands as it (sudo, no password)
# What a tenant's commands need from this environment (sudo starts from a clean one).
_TENANT_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "SLURM_CONF")


def as_tenant(*cmd: str, user: str = OTHER_TENANT) -> list:
    """argv that runs cmd as `user`, with that user's HOME, from the current directory."""
    env = [f"{k}={os.environ[k]}" for k in _TENANT_ENV if k in os.environ]
    return ["sudo", "-n", "-H", "-u", user, "env", *env, *cmd]


_PROBE = """import os, sys
seen = []
try:
    seen.append("list " + sys.argv[1] + ": " + " ".join(sorted(os.listdir(sys.argv[1]))))
except OSError:
    pass
for f in sys.argv[2:]:
    try:
        with open(f, "rb") as fh:
            fh.read(1)
        seen.append("read " + f)
    except OSError:
        pass
print("\\n".join(seen))
"""


def what_user_reads(folder: Path, files=(), user: str = None) -> list:
    """What `user` (None: this user) can see of `folder`: its listing and which of `files` it can read.
    [] when it can do neither."""
    cmd = ["python3", "-c", _PROBE, str(folder), *map(str, files)]
    out = subprocess.run(as_tenant(*cmd, user=user) if user else cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


@pytest.fixture(scope="session")
def other_tenant():
    """The second tenant's name, once it is known that this user can act as it. As root the tests that need it
    skip: root reads everything, so privacy between tenants means nothing (make test runs them as ftl-alice)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        pytest.skip(f"running as root: `make test` runs the suite as {TEST_USER}, who can act as {OTHER_TENANT}")
    out = subprocess.run(as_tenant("true"), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        message = (f"{me} cannot act as {OTHER_TENANT} (sudo -n -u {OTHER_TENANT} true: {out.stderr.strip()}); "
                   f"tests/cluster/up.sh sets this up for {TEST_USER}")
        if me == TEST_USER:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return OTHER_TENANT


@pytest.fixture
def shared_scratch(other_tenant):
    """A folder both tenants can create in (mode 1777, like a cluster's shared scratch), so whether one tenant can
    read the other's run directory depends on the run directory alone. Each tenant's part is removed by its owner."""
    folder = Path(tempfile.mkdtemp(prefix="ftl-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    yield folder
    for entry in folder.iterdir():
        if entry.owner() != pwd.getpwuid(os.geteuid()).pw_name:
            subprocess.run(as_tenant("rm", "-rf", str(entry), user=entry.owner()), timeout=120)
    shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- process state
# Tests, like the product, create nothing that other users may read: folders 0700, files 0600.
os.umask(0o077)


@pytest.fixture(autouse=True)
def _process_state_restored():
    """What a test changes in this process's environment, temporary folder and umask (e.g. by calling a job's
    function in-process: jobs set umask 077 and point $TMPDIR and the libraries' caches into the user's private
    folder) does not leak into the next test."""
    environ, umask = dict(os.environ), os.umask(0o077)
    os.umask(umask)
    yield
    os.environ.clear()
    os.environ.update(environ)
    os.umask(umask)
    tempfile.tempdir = None


# ----------------------------------------------------------------------------------------------------- test order
SLURM_GROUP = "slurm"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(session, config, items):
    """The slow modules first, so that a failure of the long end-to-end tests shows early: modules ordered by how
    many of their tests are marked slow or slurm (most first), each module's tests kept together and in their order
    (module-scoped fixtures such as a running endpoint then start once).

    Each module is one group for pytest-xdist (`make test` runs two workers, `--dist loadgroup`), except that every
    module with a test on the Slurm cluster joins one group, run first: those tests share the cluster's two debug
    nodes and its queue, so they run one after the other in one worker while the other worker runs the rest."""
    def slow(item) -> bool:
        return item.get_closest_marker("slow") is not None or item.get_closest_marker("slurm") is not None

    modules: dict = {}
    for item in items:
        modules.setdefault(item.module.__name__ if item.module else "", []).append(item)
    on_slurm = {name for name, group in modules.items()
                if any(item.get_closest_marker("slurm") for item in group)}
    ordered = sorted(modules.items(), key=lambda kv: (kv[0] not in on_slurm, -sum(map(slow, kv[1]))))
    items[:] = [item for _, group in ordered for item in group]
    for name, group in ordered:
        for item in group:
            item.add_marker(pytest.mark.xdist_group(SLURM_GROUP if name in on_slurm else name))
