"""A Ray cluster on the nodes of one serve job, and the Serve application on it.

`run_node(recipe, node_rank, hostnames, job_id)` runs once on every node of the allocation (the executor in
slurm/ calls it; `make serve` with launcher=local calls it once through ftlib.serve.local):

  rank 0   starts the Ray head and publishes its address and the cluster's token in serve_head.json (mode 600),
           waits until every node has joined, deploys the Serve application (HTTP proxy on this node only),
           writes the API token (serve_token, mode 600) and then endpoint.json, and blocks.
  rank k   waits for serve_head.json of the same job, starts a Ray worker pointed at the head, and blocks.

With serve.engine=vllm, started from the training environment, a node runs all of this under the serving
environment's interpreter instead (node_python, run_node_in_serve_env: a child process running this module): both
engines share this one Ray-node plumbing.

Each blocks until SIGTERM, SIGINT or SIGUSR2 (Slurm's time limit, `make cancel`, Ctrl-C), a `stop` event, or an
optional time limit, then takes down what it started, and only that: rank 0 removes endpoint.json and the token,
shuts Serve down, and every rank stops its own `ray start` (never `ray stop`, which would kill every Ray of the user
on the host) and deletes its folder (token and Ray's temporary directory).

Ports. Every Ray port (GCS, node manager, object manager, worker range, dashboard and its agent, metrics,
runtime-env agent, client server, and the dashboard's and autoscaler's metrics ports) and the HTTP port of a node
come from one block of 128 ports in 20000-31999 (below Linux's ephemeral range). The first block tried is derived
from the job id and the node rank; a block is taken only if this host has no other ftlib node of this user holding
it (a lock file, held while the node runs) and every port in it is free. So two serve jobs on one node, or two
nodes of a test cluster on one host, never collide. The other nodes learn the head's port from serve_head.json.

Security (other users of the same hosts are not trusted):
  - Ray's control plane uses token authentication with a token made for this job (RAY_AUTH_MODE=token; the token
    travels in files of mode 600, never on a command line or in a log). Every listener of the cluster refuses
    requests without it (tests/test_security_ray.py checks each one).
  - Files: everything of a node lives in a fresh folder with an unpredictable name (NodeDir) inside this user's
    private /tmp/ftlib-<uid> (mode 700; refused, in one line, if it is a symbolic link, another user's, or open to
    others). The token file is written there with O_EXCL|O_NOFOLLOW, mode 600, outside Ray's temporary directory
    (Ray makes that one world-writable). The port locks are in /tmp/ftlib-<uid>/ports. Stopping removes the token
    first (a cancelled job is SIGKILLed KillWait seconds after SIGTERM, possibly before Ray has stopped), then the
    folder; starting a node first removes the folders of this user's nodes that were killed (no lock held), their
    tokens first. Paths stay short: Unix socket paths must stay under 107 bytes. Every process of the node runs
    with umask 077 and the libraries' caches and temporary files in /tmp/ftlib-<uid>/{cache,tmp} (ftlib.private):
    Inductor's code compiled for vLLM's sampler, vLLM's sockets and files, whatever uses $TMPDIR.
  - Ray's Prometheus endpoints take no token, so they are off unless FTLIB_RAY_METRICS=1 (then on the block's
    ports, every interface: for a site's Prometheus). The dashboard, when on, listens on loopback only.
  - One listener is outside the block: Serve's replicas run an inter-deployment gRPC server on a port Ray 2.60
    hard-codes as "[::]:0" (the kernel's ephemeral range, which the blocks avoid); it checks the token.
  - Where Ray listens: the client server and the agents on the node's address; the GCS, the raylet (node and object
    manager), the dashboard agent's gRPC and the replicas' gRPC on every interface (Ray 2.60 has no setting for
    these; all check the token). A local endpoint's node (127.0.0.1) runs Ray on 127.0.0.2 (ray_address_of), so
    that the first group stays on loopback.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

from ftlib.private import open_private, private_dir, user_base, write_private
from ftlib.rundir import RunDir, read_json, use_private_files, write_atomic, write_json
from ftlib.stopping import stop_on, unblock

PORT_RANGE = (20000, 32000)  # Ray's own defaults use 6379, 8265, 10002-19999; Linux's ephemeral range starts at 32768
BLOCK = 128
NAMED_PORTS = ("gcs", "node_manager", "object_manager", "client_server", "dashboard", "dashboard_agent_http",
               "dashboard_agent_grpc", "runtime_env_agent", "metrics", "http", "dashboard_metrics",
               "autoscaler_metrics")
WORKER_PORTS = (16, BLOCK)  # offsets in the block: 112 ports for Ray's worker processes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
METRICS_ENV = "FTLIB_RAY_METRICS"  # =1: Ray's Prometheus endpoints on (unauthenticated, every interface)
UNBINDABLE_PORT = "65536"
RAY_LOOPBACK = "127.0.0.2"  # a local endpoint's Ray node (see ray_address_of)
KEEP_ALIVE_S = 5  # an idle connection of the HTTP proxy is closed after this (Ray's default: 90 s)


def log(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------- private files
class NodeDir:
    """The folder of one Ray node of ours on this host: a fresh, unpredictable name in the user's base folder
    (tempfile.mkdtemp), holding

        lock        locked while the node runs (the sweep of leftovers leaves it alone)
        ray_token   the cluster's token (600), outside Ray's folder
        ray/        Ray's --temp-dir: Ray makes it world-writable; the private folders above keep others out

    Paths stay short (/tmp/ftlib-<uid>/n<8 chars>/ray/session_<date>_<pid>/sockets/...: under 100 bytes) because
    Unix socket paths are limited to 107 bytes. Creating one first removes this user's leftovers: the folders of
    nodes that ended without removing theirs (killed), with their tokens."""

    def __init__(self, base: Path):
        guard = open_private(base / ".create.lock")
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # a folder is created and locked before any sweep can see it
            sweep_leftovers(base)
            self.path = Path(tempfile.mkdtemp(prefix="n", dir=base))
            self._lock = open_private(self.path / "lock")
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(guard)
        self.token_file = self.path / "ray_token"
        self.ray_dir = self.path / "ray"

    def forget_token(self) -> None:
        """The token first, before anything slow: Slurm's SIGKILL (KillWait after SIGTERM) may come any moment."""
        self.token_file.unlink(missing_ok=True)

    def remove(self) -> None:
        self.forget_token()
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)


def sweep_leftovers(base: Path) -> List[Path]:
    """Remove the folders of this user's nodes in `base` that nobody holds any more (call with base's
    .create.lock held). Returns what was removed."""
    removed = []
    for entry in os.scandir(base):
        if not entry.name.startswith("n") or not entry.is_dir(follow_symlinks=False) \
                or entry.stat(follow_symlinks=False).st_uid != os.getuid():
            continue
        try:
            fd = os.open(Path(entry.path, "lock"), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None  # never locked (its node died while creating it): a leftover too
        except OSError:
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a running node
        finally:
            if fd is not None:
                os.close(fd)
        Path(entry.path, "ray_token").unlink(missing_ok=True)  # the secret first: Ray's folder can take a while
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
        log(f"removed {entry.path}, left behind by a node of yours that did not stop cleanly")
    return removed


# ----------------------------------------------------------------------------------------------------- ports
@dataclass
class NodePorts:
    """The ports of one Ray node, held (by a lock file: its descriptor) until `release()`."""
    first: int
    lock: int

    def __getattr__(self, name):
        if name in NAMED_PORTS:
            return self.first + NAMED_PORTS.index(name)
        raise AttributeError(name)

    @property
    def worker_range(self):
        return self.first + WORKER_PORTS[0], self.first + WORKER_PORTS[1] - 1

    def release(self) -> None:
        os.close(self.lock)


def reserve_ports(job_id: str, node_rank: int, base: Optional[Path] = None) -> NodePorts:
    """A free block of ports for this node of this job (see the module's docstring). The lock files are in the
    user's private base folder (`base`, default user_base())."""
    blocks = (PORT_RANGE[1] - PORT_RANGE[0]) // BLOCK
    start = zlib.crc32(f"{job_id}/{node_rank}".encode()) % blocks
    lock_dir = private_dir((base or user_base()) / "ports")
    for i in range(blocks):
        first = PORT_RANGE[0] + ((start + i) % blocks) * BLOCK
        lock = open_private(lock_dir / f"{first}.lock")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by another ftlib node on this host
        except BlockingIOError:
            os.close(lock)
            continue
        if all(_port_free(p) for p in range(first, first + BLOCK)):
            return NodePorts(first, lock)
        os.close(lock)
    raise RuntimeError(f"no free block of {BLOCK} ports in {PORT_RANGE[0]}-{PORT_RANGE[1] - 1} on this host")


def _port_free(port: int) -> bool:
    # Ray's daemons listen on every interface, so a port is free only if nothing listens on it anywhere.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


# ----------------------------------------------------------------------------------------------------- ray nodes
class RayNode:
    """One `ray start --block` process of this job on this host, with its ports and its private folder (NodeDir:
    token file and Ray's temp dir)."""

    def __init__(self, job_id: str, node_rank: int, host: str, ray_token: str, head_address: Optional[str] = None,
                 dashboard: bool = False):
        self.job_id, self.rank, self.ip = job_id, node_rank, ray_address_of(host)
        base = user_base()
        self.dir = NodeDir(base)
        try:
            write_private(self.dir.token_file, ray_token)
            self.ports = reserve_ports(job_id, node_rank, base)
            self._start(host, head_address, dashboard)
        except BaseException:
            if hasattr(self, "ports"):
                self.ports.release()
            self.dir.remove()
            raise

    @property
    def token_file(self) -> Path:
        return self.dir.token_file

    @property
    def temp_dir(self) -> Path:
        return self.dir.ray_dir

    def _start(self, host: str, head_address: Optional[str], dashboard: bool) -> None:
        node_rank = self.rank
        self.address = f"{self.ip}:{self.ports.gcs}" if head_address is None else head_address
        p = self.ports
        low, high = p.worker_range
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
               f"--node-ip-address={self.ip}", f"--temp-dir={self.temp_dir}",
               f"--num-cpus={len(os.sched_getaffinity(0))}",  # the CPUs Slurm gave this task, not the machine's
               f"--resources={{\"ftlib_node_{node_rank}\": 1}}",  # lets the head tell which node is missing
               f"--node-manager-port={p.node_manager}", f"--object-manager-port={p.object_manager}",
               f"--min-worker-port={low}", f"--max-worker-port={high}",
               f"--dashboard-agent-listen-port={p.dashboard_agent_http}",
               f"--dashboard-agent-grpc-port={p.dashboard_agent_grpc}",
               f"--runtime-env-agent-port={p.runtime_env_agent}", f"--metrics-export-port={p.metrics}"]
        if head_address is None:
            cmd += ["--head", f"--port={p.gcs}", f"--ray-client-server-port={p.client_server}",
                    f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={p.dashboard}"]
        else:
            cmd += [f"--address={head_address}"]
        env = {**os.environ, **ray_env(self.token_file, p),
               # The one HTTP proxy is on the head: left to prefer its own node, it would send everything to the
               # head's replicas until they are full, leaving the other nodes' replicas idle.
               "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
               # On SIGTERM, `ray start` would wait up to 30 s for the node to drain, so that Serve can move its
               # replicas away; the whole cluster stops with the job (serve.shutdown() first), so there is nowhere
               # to move them, and a detached actor (the adapter registry) keeps the node from ever draining.
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               # Marks every process of this node (Ray's processes inherit it): tests look for leftovers.
               "FTLIB_RAY_NODE": f"{self.job_id}-{node_rank}"}
        log(f"node {node_rank}: starting Ray {'head' if head_address is None else 'worker'} on {host} ({self.ip}), "
            f"ports {p.first}-{p.first + BLOCK - 1}, temp dir {self.temp_dir}")
        # Own session: Ctrl-C at a terminal reaches only us, and we stop Ray in order. The kernel stops Ray if we
        # die without doing so (parent-death signal).
        self.process = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_as_own_process)

    def alive(self) -> bool:
        return self.process.poll() is None

    def why_exited(self) -> str:
        """Why `ray start` exited, from what Ray recorded in this node's folder (read it before stop() removes the
        folder): "status 1: raylet died (exit code -9 (signal 9)), its log ends: ...". `ray start --block` exits
        when one of its processes dies; it names them in ray_process_exit.log. The last lines of each one's own log
        go to this node's log, the last of them into the returned text (what `make status` shows)."""
        text = f"status {self.process.returncode}"
        records = {p.resolve() for p in self.temp_dir.glob("session_*/logs/ray_process_exit.log")}
        died = []
        for record in records:
            try:
                died += [(record.parent, *found) for found in re.findall(
                    r"^\s+(\S+) \[exit code=([^\]]*)\]$", record.read_text(errors="replace"), re.M)]
            except OSError:
                continue
        for logs, name, code in died:
            last = _last_lines(logs, name, 5)
            for line in last:
                log(f"node {self.rank}: {name}: {line}")
            text += f"; {name} died (exit code {code})" + (f", its log ends: {last[-1]}" if last else "")
        return text if died else f"{text} (its output is above)"

    def wait_until_listening(self, timeout_s: float) -> None:
        """Until the head's GCS accepts connections (or fail if `ray start` exits)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"ray start exited with {self.why_exited()}")
            try:
                socket.create_connection((self.ip, self.ports.gcs), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the Ray head did not listen on {self.address} within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM to `ray start --block`, which stops its daemons; then SIGKILL to whatever of this node is left.

        Ray puts each worker in its own process group, and a worker whose raylet is gone exits only when it notices:
        the node's processes are therefore taken as a tree before stopping, and waited for (killed if need be)."""
        import psutil

        self.dir.forget_token()
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"node {self.rank}: ray start did not stop within 30 s; killing its processes")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left in its session
        self.process.wait()
        _, left = psutil.wait_procs(tree, timeout=5)
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(left, timeout=5)
        self.ports.release()
        self.dir.remove()


def _last_lines(logs: Path, name: str, count: int) -> List[str]:
    """The last non-empty lines that Ray's process `name` wrote to its log (name.err, else name.out), each cut at 300
    characters."""
    for path in (logs / f"{name}.err", logs / f"{name}.out"):
        try:
            lines = [line[:300] for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            continue
        if lines:
            return lines[-count:]
    return []


def ray_address_of(host: str) -> str:
    """The address a Ray node on `host` takes. Ray moves 127.0.0.1 (and "localhost") to the machine's network
    address, where its agents then listen for anyone on the network: a node on 127.0.0.1 (a local endpoint) gets
    RAY_LOOPBACK instead, another loopback address, which Ray takes as it is."""
    ip = socket.gethostbyname(host)
    return RAY_LOOPBACK if ip == "127.0.0.1" else ip


def ray_auth_env(token_file: Path) -> dict:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def metrics_wanted() -> bool:
    return os.environ.get(METRICS_ENV, "") == "1"


def ray_env(token_file: Path, ports: NodePorts) -> dict:
    """The environment of every process of a Ray node of ours (and of the driver): token auth, and Ray's Prometheus
    endpoints, which take no token, off unless FTLIB_RAY_METRICS=1.

    Ray 2.60 serves metrics without authentication from three processes: the dashboard agent of every node
    (--metrics-export-port), and on the head the dashboard process and the autoscaler monitor (ports fixed at 44227
    and 44217, on every interface when the node's address is not 127.0.0.1). The agent's exporter goes with Ray's
    metrics collection (RAY_enable_metrics_collection=0). The other two have no switch, only their port variables:
    a port that cannot be bound makes their start fail, which Ray logs and carries on from. With metrics wanted,
    all three take ports of the node's block instead."""
    env = ray_auth_env(token_file)
    if metrics_wanted():
        env.update({"DASHBOARD_METRIC_PORT": str(ports.dashboard_metrics),
                    "AUTOSCALER_METRIC_PORT": str(ports.autoscaler_metrics)})
    else:
        env.update({"RAY_enable_metrics_collection": "0", "DASHBOARD_METRIC_PORT": UNBINDABLE_PORT,
                    "AUTOSCALER_METRIC_PORT": UNBINDABLE_PORT})
    return env


def _as_own_process() -> None:
    """In the child before exec: take signals again (the mask is inherited), and get SIGTERM if we die."""
    unblock(STOP_SIGNALS)
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# ----------------------------------------------------------------------------------------------------- the job
def run_node(recipe, node_rank: int, hostnames: List[str], job_id: str, stop: Optional[threading.Event] = None,
             time_limit_s: Optional[float] = None) -> None:
    """Run this node of the serve job until stopped (see the module's docstring). Without `stop`, SIGTERM, SIGINT
    and SIGUSR2 stop it: call it from the main thread, before starting threads of your own (they would have to
    block these signals too); the signals behave as before once it returns."""
    job_id = re.sub(r"[^A-Za-z0-9_.-]", "_", str(job_id))[:40]
    # Whatever started us (a job, `make serve`, a test): our files are private, and so are the caches of every
    # library in this node's processes (Ray's, the replicas', vLLM's engine and its compiled code).
    use_private_files(recipe)
    use_all_open_files()
    with contextlib.ExitStack() as signals:
        if stop is None:
            # Blocked and taken by a thread, not caught by handlers: ray.init installs SIGTERM handlers of its own
            # (sys.exit, and a C++ crash reporter that aborts) that would kill us halfway through stopping.
            stop = signals.enter_context(stop_on(STOP_SIGNALS, taken_by_thread=True))
        python = node_python(recipe, node_rank)  # serve.engine=vllm: the node runs in the serving environment
        if python is not None:
            return run_node_in_serve_env(python, (recipe, node_rank, hostnames, job_id, None, time_limit_s), stop)
        _run(node_rank, HeadNode(recipe, hostnames, job_id) if node_rank == 0
             else WorkerNode(recipe, node_rank, hostnames, job_id), stop, time_limit_s)


def node_python(recipe, node_rank: int) -> Optional[Path]:
    """The interpreter this node must run under when it is not this one (serve.engine=vllm from .venv: the
    serving environment's), else None. Says in one line (rank 0) why serve.engine=vllm falls back to hf."""
    from ftlib.serve.vllm_engine import engine_for, has_vllm, serve_python

    engine, reason = engine_for(recipe)
    if reason and node_rank == 0:
        log(f"serve.engine=vllm cannot run here: {reason}; serving with serve.engine=hf")
    return serve_python(recipe) if engine == "vllm" and not has_vllm() else None


def run_node_in_serve_env(python: Path, args: tuple, stop: threading.Event) -> None:
    """Run `run_node(*args)` under the serving environment's interpreter (a child process of this one, running this
    module) until it ends or `stop` is set (then SIGTERM, as a serve job is stopped). Raises if it fails."""
    import pickle

    log(f"serve.engine=vllm: running this node under {python}")
    child = subprocess.Popen([str(python), "-m", "ftlib.serve.cluster"], stdin=subprocess.PIPE,
                             preexec_fn=_as_own_process, env={**os.environ, "PYTHONNOUSERSITE": "1"})
    child.stdin.write(pickle.dumps(args))
    child.stdin.close()
    while child.poll() is None:
        if stop.wait(0.5):
            child.send_signal(signal.SIGTERM)
            child.wait()
            break
    if child.returncode not in (0, -signal.SIGTERM):
        raise RuntimeError(f"the serve node under {python} exited with status {child.returncode}")


def use_all_open_files() -> None:
    """Raise this process's open-files limit (and so its Ray processes', the HTTP proxy's included) to the hard
    limit. Every connection holds one: at the usual 1,024, anyone who can reach the port blocks the endpoint with
    ~1,000 connections that never finish their request (the proxy has no timeout for unfinished headers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(node_rank: int, node, stop, time_limit_s: Optional[float]) -> None:
    deadline = time.monotonic() + time_limit_s if time_limit_s else None
    parent = os.getppid()
    try:
        node.start(stop)
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            ended = node.ended()
            if ended:
                log(f"node {node_rank}: {ended}")
                break
            stop.wait(1.0)
        log(f"node {node_rank}: stopping{_why_stopping(stop, parent, deadline)}")
    finally:
        node.stop()
        log(f"node {node_rank}: stopped")


def _why_stopping(stop, parent: int, deadline: Optional[float]) -> str:
    """Why the node stops, for its log line: " (SIGTERM)", " (SIGTERM; the process that started this node has exited)",
    " (time limit)" or "" (stopped by a caller's event)."""
    if deadline is not None and time.monotonic() >= deadline:
        return " (time limit)"
    signal_name = getattr(stop, "signal_name", None)  # a Stop (ftlib.stopping) knows which signal; an Event does not
    if signal_name is None:
        return ""
    gone = "; the process that started this node has exited" if os.getppid() != parent else ""
    return f" ({signal_name}{gone})"


class HeadNode:
    def __init__(self, recipe, hostnames: List[str], job_id: str):
        self.recipe, self.hostnames, self.job_id = recipe, hostnames, job_id
        self.run = RunDir.of(recipe)
        self.ray: Optional[RayNode] = None
        self.connected = False

    def start(self, stop: threading.Event) -> None:
        s = self.recipe.serve
        deadline = time.monotonic() + s.startup_timeout_s
        ray_token = secrets.token_hex(32)
        self.ray = RayNode(self.job_id, 0, self.hostnames[0], ray_token, dashboard=s.dashboard)
        self.ray.wait_until_listening(timeout_s=120)
        write_json(self.run.serve_head, {"job_id": self.job_id, "address": self.ray.address,
                                         "node": self.hostnames[0], "ray_token": ray_token}, mode=0o600)

        os.environ.update(ray_env(self.ray.token_file, self.ray.ports))  # a driver of its cluster: same settings
        import ray
        from ray import serve

        ray.init(address=self.ray.address, _node_ip_address=self.ray.ip, _temp_dir=str(self.ray.temp_dir),
                 logging_level="WARNING")
        self.connected = True
        self._wait_for_nodes(deadline, stop)
        if stop.is_set():
            return

        from ftlib.serve.app import build_app

        bind = s.http_host or socket.gethostbyname(self.hostnames[0])  # the head's address as given
        port = s.port or self.ray.ports.http
        api_token = secrets.token_urlsafe(32)
        serve.start(http_options={"host": bind, "port": port, "keep_alive_timeout_s": KEEP_ALIVE_S},
                    proxy_location="HeadOnly")
        log(f"deploying the Serve application on {len(self.hostnames)} node(s)")
        serve.run(build_app(self.recipe, api_token), name="ftlib", route_prefix="/")
        host = self.hostnames[0] if bind in ("0.0.0.0", "::") else bind
        url = f"http://{host}:{port}"
        health = _wait_for_health(url, deadline, stop)
        if health is None:  # stopped while starting
            return
        # The token first, then endpoint.json: whoever sees endpoint.json can read the token.
        write_atomic(self.run.token, api_token + "\n", mode=0o600)
        write_json(self.run.endpoint, {
            "job_id": self.job_id, "node": self.hostnames[0], "host": host, "port": port, "url": url,
            "models": health["models"], "default_model": health["models"][0], "token_file": str(self.run.token),
            "nodes": len(self.hostnames), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid()})
        log(f"ready at {url} (models: {', '.join(health['models'])}; token in {self.run.token})")

    def _wait_for_nodes(self, deadline: float, stop: threading.Event) -> None:
        import ray

        want = {f"ftlib_node_{k}": f"rank {k} ({h})" for k, h in enumerate(self.hostnames)}
        while not stop.is_set():
            joined = {r for n in ray.nodes() if n["Alive"] for r in n["Resources"] if r in want}
            missing = [want[r] for r in want if r not in joined]
            if not missing:
                log(f"all {len(want)} node(s) joined")
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve.startup_timeout_s ({self.recipe.serve.startup_timeout_s} s) passed and "
                                   f"these nodes never joined the Ray cluster: {', '.join(missing)}")
            time.sleep(1)

    def ended(self) -> Optional[str]:
        """Why this node's work is over (None while it goes on); raises if something broke."""
        if not self.ray.alive():
            raise RuntimeError(f"the Ray head exited with {self.ray.why_exited()}")
        return None

    def stop(self) -> None:
        # Files first, secrets among them: a cancelled job gets SIGKILL KillWait seconds after SIGTERM (5-30 s at
        # most sites), and Ray may take longer than that to stop.
        mine = (read_json(self.run.endpoint) or {}).get("job_id") == self.job_id
        if mine:  # clients stop finding us first; leave another job's files alone
            self.run.endpoint.unlink(missing_ok=True)
            self.run.token.unlink(missing_ok=True)
        if (read_json(self.run.serve_head) or {}).get("job_id") == self.job_id:
            self.run.serve_head.unlink(missing_ok=True)
        if self.ray is not None:
            self.ray.dir.forget_token()
        if self.connected:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            except Exception as e:  # Ray may be half down already; the node's processes go below anyway
                log(f"serve.shutdown failed: {e}")
            ray.shutdown()
        if self.ray is not None:
            self.ray.stop()


class WorkerNode:
    def __init__(self, recipe, node_rank: int, hostnames: List[str], job_id: str):
        self.recipe, self.rank, self.hostnames, self.job_id = recipe, node_rank, hostnames, job_id
        self.run = RunDir.of(recipe)
        self.ray: Optional[RayNode] = None

    def start(self, stop: threading.Event) -> None:
        timeout_s = self.recipe.serve.startup_timeout_s
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            head = read_json(self.run.serve_head) or {}
            if head.get("job_id") == self.job_id:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.rank}: the head (rank 0, {self.hostnames[0]}) did not publish its "
                                   f"address in {self.run.serve_head} within {timeout_s} s")
            time.sleep(0.5)
        else:
            return
        self.ray = RayNode(self.job_id, self.rank, self.hostnames[self.rank], head["ray_token"],
                           head_address=head["address"])

    def ended(self) -> Optional[str]:
        if self.ray is None:
            return "stopped before the head published its address"
        # The head removes serve_head.json when it stops; its workers follow.
        if (read_json(self.run.serve_head) or {}).get("job_id") != self.job_id:
            return "the head has stopped"
        if not self.ray.alive():
            raise RuntimeError(f"the Ray worker exited with {self.ray.why_exited()}")
        return None

    def stop(self) -> None:
        if self.ray is not None:
            self.ray.stop()


def _wait_for_health(url: str, deadline: float, stop: threading.Event) -> Optional[dict]:
    """GET /health until the proxy and a replica answer (None if stopped meanwhile)."""
    last = None
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                return json.loads(r.read())
        except OSError as e:
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"the endpoint at {url} did not answer /health within serve.startup_timeout_s: {last}")
        time.sleep(0.5)
    return None


if __name__ == "__main__":  # the child of run_node_in_serve_env: the node's arguments arrive pickled on stdin
    import pickle

    from ftlib.serve.cluster import run_node  # the module proper, not this __main__ copy of it

    run_node(*pickle.loads(sys.stdin.buffer.read()))
