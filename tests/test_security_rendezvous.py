"""The training rendezvous (torch's TCPStore) against another user of the nodes: the attacker, ftl-bob, really running
as that user (tests/test_security_files.py), with the project's interpreter (it has torch, as any user of a shared
cluster's software would). The ranks are local processes that run what a training task of the product runs before
it trains: launcher.jobs.rank_environment (under submitit's variables of a local job, as the local launcher gives
them) and then ftlib.distributed.join, and finally one all_reduce."""
import json
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, as_tenant
from tests.test_security_files import attacker_prefix

pytestmark = [pytest.mark.security, pytest.mark.timeout(180)]

RANK = r"""
import json, os, sys
import torch, torch.distributed as dist
from ftlib import recipe as recipe_mod
from ftlib.distributed import DistEnv, join
from launcher import jobs
jobs.rank_environment(recipe_mod.load(sys.argv[1]))
try:
    join(DistEnv.from_environ(), timeout_s=float(sys.argv[2]))
    total = torch.ones(1)
    dist.all_reduce(total)
    found = {"joined": True, "sum": total.item(), "port": int(os.environ["MASTER_PORT"])}
except Exception as e:
    found = {"joined": False, "error": f"{type(e).__name__}: {e}"}
print("RESULT " + json.dumps(found), flush=True)
"""

# The attacker's side, with the project's interpreter (torch): `first JOB_ID` takes the port submitit derives from a
# job id (anyone can compute it) on every interface and plays a store there whose rendezvous says "ok"; `write HOST
# PORT` connects to a store and writes rank 1's key. Each stops by itself.
ATTACK = r"""
import random, sys, time
from datetime import timedelta
import torch.distributed as dist
if sys.argv[1] == "first":
    port = random.Random(sys.argv[2]).randint(20000, 60000)  # submitit's TorchDistributedEnvironment._get_master_port
    store = dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    store.set("rendezvous/result", "ok")
    print("listening", port, flush=True)
    sys.stdin.read()  # until the test closes our stdin
else:
    store = dist.TCPStore(sys.argv[2], int(sys.argv[3]), is_master=False, timeout=timedelta(seconds=20))
    store.set("rendezvous/rank/1", "the attacker's node")
    print("written", flush=True)
"""


def bob(*args: str, background: bool = False):
    command = as_tenant(sys.executable, "-c", ATTACK, *args)
    if background:
        return subprocess.Popen(command, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=60)


def start_ranks(recipe_path: Path, job_id: str, ranks=(0, 1), world_size: int = 2, timeout_s: float = 30,
                script: str = RANK, **env_vars):
    """Training tasks of a local job `job_id` (submitit's LocalExecutor sets these variables in each task)."""
    procs = {}
    for rank in ranks:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID=job_id, SUBMITIT_LOCAL_NTASKS=str(world_size),
                   SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID=str(rank),
                   SUBMITIT_LOCAL_LOCALID=str(rank), OMP_NUM_THREADS="1", **env_vars)
        procs[rank] = subprocess.Popen([sys.executable, "-c", script, str(recipe_path), str(timeout_s)], env=env,
                                       cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    return procs


def result(proc, timeout=90) -> dict:
    """What a rank found; {"joined": False, "error": "hung ..."} if it did not finish in time (then it is killed)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return {"joined": False, "error": f"hung for {timeout} s", "log": out[-1500:]}
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out[-3000:]
    return {**json.loads(lines[-1][len("RESULT "):]), "log": out[-1500:]}


@pytest.fixture
def recipe_path(make_recipe):
    from ftlib import recipe as recipe_mod
    from launcher import launch

    recipe = make_recipe()
    run = launch.save_recipe(recipe)  # the run directory as the product makes it (private)
    path = run.root / "rank-recipe.yaml"
    recipe_mod.save(recipe, path)
    return path


def test_a_port_taken_first_by_another_user_does_not_stop_or_fool_the_ranks(recipe_path):
    """submitit derives MASTER_PORT from the job id: the attacker computes it and listens there first, with a store
    whose rendezvous says 'ok'. The ranks must meet anyway, on a port the kernel gave rank 0, and not in the
    attacker's store."""
    attacker_prefix()
    job_id = str(random.randrange(10**6, 10**7))
    taken = bob("first", job_id, background=True)
    try:
        line = taken.stdout.readline().split()
        assert line[:1] == ["listening"], line + [taken.stdout.read()]
        procs = start_ranks(recipe_path, job_id)
        found = {rank: result(p) for rank, p in procs.items()}
    finally:
        taken.stdin.close()
        taken.wait(timeout=30)
    assert all(f["joined"] and f["sum"] == 2 for f in found.values()), found
    assert found[0]["port"] == found[1]["port"] != int(line[1]), (found, line)


def test_a_value_another_user_writes_into_the_store_stops_the_rank_naming_the_store(recipe_path):
    """Rank 0 waits for rank 1; the attacker connects to the store (its port is listed in /proc/net/tcp for
    everyone; the test hands it over) and registers rank 1 itself. Rank 0 must not take it: it stops at once,
    naming the store, instead of building the group with the attacker's entry. The store listens on the ranks'
    address only, and the secret is in a 600 file only, removed when rank 0 is done."""
    attacker_prefix()
    run = recipe_path.parent
    job_id = str(random.randrange(10**6, 10**7))
    (rank0,) = start_ranks(recipe_path, job_id, ranks=(0,), timeout_s=60).values()
    published = list(run.glob(f"*{job_id}*"))
    deadline = time.monotonic() + 60
    while not published and rank0.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        published = list(run.glob(f"*{job_id}*"))
    assert published, f"rank 0 published no rendezvous in {run}: {rank0.poll()} {sorted(os.listdir(run))}"
    info = json.loads(published[0].read_text())
    assert stat.S_IMODE(published[0].stat().st_mode) == 0o600
    secret = info["secret"].encode()
    ranks = [rank0.pid, *(p.pid for p in psutil.Process(rank0.pid).children(recursive=True))]
    for pid in ranks:
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(rank0.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert (info["address"], info["port"]) in listening and info["address"] == "127.0.0.1", (info, listening)
    assert not any(ip in ("0.0.0.0", "::") for ip, port in listening if port == info["port"]), listening

    started = time.monotonic()
    written = bob("write", info["address"], str(info["port"]))
    assert "written" in written.stdout, written.stdout + written.stderr
    found = result(rank0, timeout=90)
    assert not found["joined"] and time.monotonic() - started < 30, found
    assert found["error"].startswith("RendezvousError") and \
        f"the rendezvous store at 127.0.0.1:{info['port']} holds a value for 'rendezvous/rank/1' that this job's " \
        "ranks did not write" in found["error"], found
    assert not published[0].exists()


# ----------------------------------------------------------------------------------------------- /dev/shm
# A rank that meets the others, says the port the rendezvous took (DeepSpeed would name its shared memory after it),
# waits for a line on stdin, then initializes DeepSpeed as ftlib.train does on CPU, every rank on one node
# (LOCAL_SIZE: where DeepSpeed would share its all-reduce buffers through /dev/shm), and reports what it mapped.
SHM_RANK = r"""
import json, os, sys
from ftlib import recipe as recipe_mod
from ftlib.distributed import DistEnv, backend, join
from ftlib.train import _without_deepspeed_shm_op
from launcher import jobs
jobs.rank_environment(recipe_mod.load(sys.argv[1]))
env = DistEnv.from_environ()
join(env, timeout_s=float(sys.argv[2]))
print("AT", os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], flush=True)
sys.stdin.readline()
try:
    _without_deepspeed_shm_op()
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend())
    mapped = sorted({line.split()[-1] for line in open("/proc/self/maps") if "/dev/shm/" in line})
    found = {"ok": True, "mapped": mapped}
except Exception as e:
    found = {"ok": False, "error": f"{type(e).__name__}: {e}"}
print("RESULT " + json.dumps(found), flush=True)
"""

PREPARE_SHM = r"""
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    os.fchmod(fd, 0o666)
    os.close(fd)
print("prepared", flush=True)
"""


def shm_names(address: str, port: str):
    return [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}" for rank in (0, 1)]


def address_of(proc) -> tuple:
    """(MASTER_ADDR, port) a rank reports once it has joined."""
    for line in proc.stdout:
        if line.startswith("AT "):
            return tuple(line.split()[1:3])
    raise AssertionError(f"no address: {proc.communicate()[0][-3000:]}")


@pytest.mark.timeout(300)
def test_deepspeeds_shared_memory_is_not_used(recipe_path):
    """DeepSpeed's CPU all-reduce op keeps each rank's buffer in /dev/shm under a name anyone can compute (uid,
    address, port, rank) and opens it without O_EXCL: an object the attacker created first would carry the ranks'
    data. Training never needs that op (only inference_all_reduce uses it), so ftlib.train keeps DeepSpeed from
    building it: with the names created first by the attacker (the port is visible in /proc/net/tcp; the test hands
    it over), the ranks initialize DeepSpeed, map no shared memory, and the attacker's objects get nothing."""
    attacker_prefix()
    procs = start_ranks(recipe_path, str(random.randrange(10**6, 10**7)), script=SHM_RANK, timeout_s=60,
                        LOCAL_SIZE="2")
    at = {rank: address_of(p) for rank, p in procs.items()}
    assert at[0] == at[1], at
    names = shm_names(*at[0])
    done = subprocess.run(as_tenant("python3", "-c", PREPARE_SHM, *names), capture_output=True, text=True, timeout=60)
    assert "prepared" in done.stdout, done.stderr
    try:
        for p in procs.values():
            p.stdin.write("go\n")
            p.stdin.flush()
        found = {rank: result(p, timeout=240) for rank, p in procs.items()}
        assert all(f["ok"] for f in found.values()), found
        assert [f["mapped"] for f in found.values()] == [[], []], found
        assert [os.stat(n).st_size for n in names] == [0, 0], "the ranks wrote into the attacker's objects"
    finally:
        subprocess.run(as_tenant("rm", "-f", *names), timeout=60)
