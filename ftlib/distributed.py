"""Joining the torch.distributed group of a training job, with a rendezvous that names who is missing.

The launcher (launcher/ or a test) sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in
every task. A plain `init_process_group` waits up to 30 minutes for a rank that never comes and then says nothing
useful. So rank 0 first opens a TCPStore on MASTER_ADDR:MASTER_PORT, every rank registers "rank -> node" in it, and
rank 0 waits at most `timeout_s` for all of them. If some are missing, every rank that did join fails with the same
message listing the missing ranks (and their node index); the process group is then built on that same store.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class RendezvousError(RuntimeError):
    """Not every rank joined the training job in time."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls) -> "DistEnv":
        """The launcher's variables; without WORLD_SIZE this is a single process (rank 0 of 1)."""
        env = os.environ
        if "WORLD_SIZE" not in env:
            return cls(0, 0, 1, 1, "127.0.0.1", 0)
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RendezvousError(f"WORLD_SIZE is set but {', '.join(missing)} is not: the launcher must set RANK, "
                                  "LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        world = int(env["WORLD_SIZE"])
        return cls(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world,
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                   master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]))


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
    try:
        store = dist.TCPStore(env.master_addr, env.master_port, is_master=env.rank == 0,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as e:  # a client could not reach rank 0, or rank 0 could not listen
        where = f"{env.master_addr}:{env.master_port}"
        if env.rank == 0:
            raise RendezvousError(f"{me}: cannot open the rendezvous on {where}: {e}") from None
        raise RendezvousError(f"{me}: rank 0 did not open the rendezvous at {where} within {timeout_s:g} s "
                              f"(rank 0, node 0, is missing or MASTER_ADDR/MASTER_PORT are wrong)") from None

    store.set(f"rendezvous/rank/{env.rank}", node_name())
    if env.rank == 0:
        _check_everyone_joined(store, env, timeout_s)
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
    while True:
        missing = [r for r in range(env.world_size) if not store.check([f"rendezvous/rank/{r}"])]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not missing:
        store.set("rendezvous/result", "ok")
        return
    joined = [r for r in range(env.world_size) if r not in missing]
    names = {r: store.get(f"rendezvous/rank/{r}").decode() for r in joined}
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
