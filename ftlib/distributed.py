"""Joining the torch.distributed group of a training job, with a rendezvous that names who is missing.

The launcher (launcher/ or a test) sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
FTLIB_RENDEZVOUS in every task. A plain `init_process_group` waits up to 30 minutes for a rank that never comes and
then says nothing useful. So rank 0 first opens a TCPStore on MASTER_ADDR, every rank registers "rank -> node" in
it, and rank 0 waits at most `timeout_s` for all of them. If some are missing, every rank that did join fails with
the same message listing the missing ranks (and their node index); the process group is then built on that same
store.

The store against other users of the nodes. A TCPStore has no authentication: whoever connects reads and writes its
keys, and whoever listens on its port first plays the store. So:
  - rank 0 listens on MASTER_ADDR's address only (not every interface), on a port the kernel picks when
    MASTER_PORT is 0 (launcher.jobs sets 0: submitit derives a port from the job id, which anyone can compute and
    take first);
  - rank 0 publishes that port with a secret made for this rendezvous (32 random bytes) in the file FTLIB_RENDEZVOUS
    names: mode 600, in the private run directory that every node sees (never on a command line or in the
    environment); rank 0 removes it once every rank has joined;
  - every value a rank puts in the store carries an HMAC-SHA256 of its key and value under that secret, checked
    when any rank reads it (SignedStore): the rendezvous and the process group's own keys (gloo's addresses). A rank
    that reads a value the job did not write stops with RendezvousError naming the store.
What another user can still do: see the port (every listening socket is listed in /proc/net/tcp), connect, read the
keys (node names, gloo's addresses and connection ids: the values are signed, not secret), delete or overwrite them
(the job then fails, naming the store, instead of using them). It cannot send a rank to an address of its choosing.
gloo's own connections between the ranks are neither authenticated nor encrypted (torch has no setting for that):
an attacker on the nodes' network that connects to a rank's gloo port with the connection id it read, before the
real peer does, can make the job fail or, in principle, feed a collective its data. Counters (Store.add) cannot be
signed; only the rendezvous's "read" count uses one, and forging it only makes rank 0 stop waiting for the others to
read a failure.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ftlib.rundir import write_atomic


class RendezvousError(RuntimeError):
    """Not every rank joined the training job in time."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int  # 0: rank 0 takes a port the kernel picks and publishes it in the rendezvous file
    rendezvous_file: Optional[str] = None  # where rank 0 publishes its port and the secret (FTLIB_RENDEZVOUS)

    @classmethod
    def from_environ(cls) -> "DistEnv":
        """The launcher's variables; without WORLD_SIZE this is a single process (rank 0 of 1)."""
        env = os.environ
        if "WORLD_SIZE" not in env:
            return cls(0, 0, 1, 1, "127.0.0.1", 0)
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RendezvousError(f"WORLD_SIZE is set but {', '.join(missing)} is not: the launcher must set RANK, "
                                  f"LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and "
                                  f"{RENDEZVOUS_ENV}")
        world = int(env["WORLD_SIZE"])
        return cls(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world,
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                   master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]),
                   rendezvous_file=env.get(RENDEZVOUS_ENV))


RENDEZVOUS_ENV = "FTLIB_RENDEZVOUS"


def cpu_threads(env: DistEnv, environ=os.environ, visible: Optional[int] = None) -> Tuple[int, str]:
    """How many intra-op threads (OpenMP) this rank should run, and why: the CPUs its task was given, not every core
    of the node. Left alone, torch (and Accelerate, "we set it at N") give each rank all the node's cores; with
    several ranks, or other jobs, on the same cores the threads spin against each other: two 2-rank jobs on 2
    cores trained the tiny model 10-40x slower per step than with one thread each. OMP_NUM_THREADS, if set, wins."""
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS is set"
    visible = visible if visible is not None else len(os.sched_getaffinity(0))
    share = max(1, visible // max(1, env.local_world_size))
    why = f"{visible} core(s) visible, {env.local_world_size} rank(s) on this node"
    given = environ.get("SLURM_CPUS_PER_TASK", "")
    if given.isdigit() and int(given) < share:
        return max(1, int(given)), f"Slurm gave this task {given} CPU(s) (SLURM_CPUS_PER_TASK); {why}"
    return share, why


def use_cpu_threads(env: DistEnv) -> str:
    """Apply cpu_threads to this process (torch now; OMP_NUM_THREADS for Accelerate and child processes)."""
    n, why = cpu_threads(env)
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return f"CPU threads: {torch.get_num_threads()} per rank ({why})"


def node_name() -> str:
    """How this node is named in error messages (the launcher may set FTLIB_NODE_NAME, e.g. to the Slurm node)."""
    return os.environ.get("FTLIB_NODE_NAME") or socket.gethostname()


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def join(env: DistEnv, timeout_s: float, collective_timeout: timedelta = timedelta(minutes=30)) -> None:
    """Rendezvous of all ranks (failing within ~timeout_s with the missing ranks named), then init_process_group."""
    if dist.is_initialized():
        return
    if env.world_size == 1:  # nothing to wait for
        dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=collective_timeout)
        return
    me = f"rank {env.rank} on {node_name()}"
    store = open_store(env, timeout_s)

    store.set(f"rendezvous/rank/{env.rank}", node_name())
    if env.rank == 0:
        try:
            _check_everyone_joined(store, env, timeout_s)
        finally:  # every rank that came has read it; the others will not come
            Path(env.rendezvous_file).unlink(missing_ok=True)
    else:
        store.wait(["rendezvous/result"], timedelta(seconds=timeout_s + 30))
        result = store.get("rendezvous/result").decode()
        store.add("rendezvous/read", 1)
        if result != "ok":
            raise RendezvousError(f"{me}: {result}")

    dist.init_process_group(backend(), store=dist.PrefixStore("pg", store), rank=env.rank,
                            world_size=env.world_size, timeout=collective_timeout)


def _check_everyone_joined(store, env: DistEnv, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    names = {}
    while True:
        for r in range(env.world_size):  # read (so checked against the secret) as soon as it is there
            if r not in names and store.check([f"rendezvous/rank/{r}"]):
                names[r] = store.get(f"rendezvous/rank/{r}").decode()
        missing = [r for r in range(env.world_size) if r not in names]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not missing:
        store.set("rendezvous/result", "ok")
        return
    joined = [r for r in range(env.world_size) if r not in missing]
    missing_text = ", ".join(f"rank {r} (node {r // env.local_world_size})" for r in missing)
    joined_text = ", ".join(f"rank {r} on {names[r]}" for r in joined)
    message = (f"{len(missing)} of {env.world_size} ranks did not join within {timeout_s:g} s: {missing_text}; "
               f"joined: {joined_text}")
    store.set("rendezvous/result", message)
    # Keep the store (served by this process) up until the joined ranks have read the verdict.
    wait_until = time.monotonic() + 10
    while int(store.add("rendezvous/read", 0)) < len(joined) - 1 and time.monotonic() < wait_until:
        time.sleep(0.1)
    raise RendezvousError(f"rank 0 on {node_name()}: {message}")


# ----------------------------------------------------------------------------------------------------- the store
def open_store(env: DistEnv, timeout_s: float) -> "SignedStore":
    """The rendezvous store (see the module's docstring): rank 0 opens it and publishes where it is with the secret,
    the other ranks wait (at most timeout_s) for that and connect."""
    me = f"rank {env.rank} on {node_name()}"
    if not env.rendezvous_file:
        raise RendezvousError(f"{me}: {RENDEZVOUS_ENV} is not set: the launcher must name a file in a private folder "
                              f"that every rank sees (the run directory), where rank 0 publishes the rendezvous's "
                              f"port and secret")
    published = Path(env.rendezvous_file)
    timeout = timedelta(seconds=timeout_s)
    if env.rank == 0:
        try:
            address = socket.gethostbyname(env.master_addr)
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((address, env.master_port))  # this address only; port 0: the kernel picks one
            listener.listen(1024)
            port = listener.getsockname()[1]
            store = dist.TCPStore(address, port, is_master=True, master_listen_fd=listener.detach(),
                                  timeout=timeout, wait_for_workers=False)
        except Exception as e:  # noqa: BLE001 (an address that does not resolve, a port in use, ...)
            raise RendezvousError(f"{me}: cannot open the rendezvous on {env.master_addr}:{env.master_port}: "
                                  f"{e}") from None
        secret = secrets.token_bytes(32)
        write_atomic(published, json.dumps({"address": address, "port": port, "secret": secret.hex()}), mode=0o600)
    else:
        deadline = time.monotonic() + timeout_s
        while not (found := _read_published(published)):
            if time.monotonic() > deadline:
                raise RendezvousError(f"{me}: rank 0 did not open the rendezvous within {timeout_s:g} s (rank 0, "
                                      f"node 0, is missing, or {published.parent} is not on a filesystem every node "
                                      f"sees)")
            time.sleep(0.2)
        address, port, secret = found["address"], found["port"], bytes.fromhex(found["secret"])
        try:
            store = dist.TCPStore(address, port, is_master=False, timeout=timeout)
        except Exception:  # noqa: BLE001
            raise RendezvousError(f"{me}: cannot reach rank 0's rendezvous at {address}:{port} (published in "
                                  f"{published}) within {timeout_s:g} s") from None
    # Libraries that read the port (DeepSpeed names its shared memory after it) see the one in use.
    os.environ["MASTER_PORT"] = str(port)
    return SignedStore(store, secret, f"{address}:{port}", me)


def _read_published(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet (rank 0 writes it whole, then renames)
        return None


class SignedStore(dist.Store):
    """A store whose values carry an HMAC of their key and value under the job's secret, checked on every read:
    what another user writes into the TCPStore is refused, not used (RendezvousError naming the store). Wraps the
    calls torch's process groups make (set, get, wait, check, add, clone, ...); append and the queue calls, whose
    values it could not check, are not offered (has_extended_api is False)."""

    MAC = hashlib.sha256().digest_size

    def __init__(self, store, secret: bytes, where: str, me: str):
        super().__init__()
        self.store, self.secret, self.where, self.me = store, secret, where, me
        # A process group holds only the C++ half of a store written in Python: without a reference to this object,
        # its methods are gone once the caller's variable is (torch then fails with "Not implemented").
        _IN_USE.append(self)

    def _mac(self, key: str, value: bytes) -> bytes:
        return hmac.new(self.secret, key.encode() + b"\0" + value, hashlib.sha256).digest()

    def _sign(self, key: str, value) -> bytes:
        value = value.encode() if isinstance(value, str) else bytes(value)
        return self._mac(key, value) + value

    def _check(self, key: str, signed: bytes) -> bytes:
        mac, value = signed[:self.MAC], signed[self.MAC:]
        if not hmac.compare_digest(mac, self._mac(key, value)):
            raise RendezvousError(f"{self.me}: the rendezvous store at {self.where} holds a value for {key!r} that "
                                  f"this job's ranks did not write (another program connected to it): stopping "
                                  f"rather than using it")
        return value

    def set(self, key, value):
        self.store.set(key, self._sign(key, value))

    def get(self, key):
        return self._check(key, self.store.get(key))

    def multi_set(self, keys, values):
        self.store.multi_set(keys, [self._sign(k, v) for k, v in zip(keys, values)])

    def multi_get(self, keys):
        return [self._check(k, v) for k, v in zip(keys, self.store.multi_get(keys))]

    def compare_set(self, key, expected, desired):
        raise NotImplementedError("SignedStore.compare_set: a signed value cannot be compared by the server")

    def add(self, key, amount):
        return self.store.add(key, amount)

    def wait(self, keys, timeout=None):
        return self.store.wait(keys) if timeout is None else self.store.wait(keys, timeout)

    def check(self, keys):
        return self.store.check(keys)

    def delete_key(self, key):
        return self.store.delete_key(key)

    def num_keys(self):
        return self.store.num_keys()

    def set_timeout(self, timeout):
        self.store.set_timeout(timeout)

    def clone(self):  # a new connection to the same store (gloo takes one per process group)
        return SignedStore(self.store.clone(), self.secret, self.where, self.me)

    def has_extended_api(self):  # no append/queues: their values could not be checked
        return False

    def list_keys(self):
        return self.store.list_keys()

    getNumKeys, deleteKey = num_keys, delete_key  # the names torch's C++ side asks a Python store for


_IN_USE = []  # every SignedStore of this process (see SignedStore.__init__)


def all_ranks_any(flag: bool, device="cpu") -> bool:
    """True on every rank if `flag` is true on at least one (a no-op without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks_sum(values, device="cpu") -> list:
    """Element-wise sum of a list of numbers over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def from_rank0(value):
    """Rank 0's `value` on every rank (a picklable object; unchanged without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
