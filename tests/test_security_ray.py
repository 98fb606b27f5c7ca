"""A serve job's Ray cluster on a host it shares with other users: what a second local user (the attacker, another
tenant: ftl-bob) can do to it. The attacker's steps really run as that user: through runuser when the suite runs as
root (the user is created if missing), through `sudo -n -u ftl-bob` when it runs as ftl-alice (tests/cluster/up.sh
allows that); without either the tests skip, saying so.

One real serve job (run_node, rank 0 of one node, on 127.0.1.1: an address Ray does not treat as "localhost", so
it binds as on a real cluster's nodes) is started while the attacker tries to plant its own Ray token in advance;
the tests then look at its token, its listening sockets, its files, and what stopping leaves behind."""
import ipaddress
import json
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from ftlib.serve import cluster
from tests.test_security_files import REMOVE, attacker, attacker_prefix
from tests.test_serve import ray_processes, serve_recipe
from tests.test_slurm import cluster as slurm_cluster  # noqa: F401 (the session fixture, by this name)

NODE = "import pickle, sys; from ftlib.serve.cluster import run_node; run_node(*pickle.load(open(sys.argv[1], 'rb')))"


# Plants its own token where ftlib used to keep Ray's (a name anyone can predict from the job id, /tmp/ftr-<job>-
# <rank>), and keeps putting it back: a head that read it would accept the attacker as one of its drivers.
PLANT_TOKEN = r"""
import os, sys, threading, time
token, directory, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
os.makedirs(directory, exist_ok=True)
os.chmod(directory, 0o777)
done = threading.Event()  # until the test closes our stdin
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("planted", flush=True)
deadline = time.time() + seconds
while time.time() < deadline and not done.is_set():
    tmp = os.path.join(directory, ".planted")
    with open(tmp, "w") as f:
        f.write(token)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(directory, "ray_token"))
    time.sleep(0.005)
"""

TRY_TO_READ = r"""
import os, sys
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path).read()
        print("read", path)
    except OSError as e:
        print("refused", type(e).__name__, path)
"""


# ----------------------------------------------------------------------------------------------- probes
def gcs_call(address: str, token: str):
    """The status of a real read-only GCS call with this token (OK: the cluster takes it as one of its own)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(
                b"", timeout=10, metadata=[("authorization", f"Bearer {token}")])
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


# Read-only calls of every gRPC service Ray runs (GCS, raylet, object manager, core workers, dashboard agent, Ray
# client server, Serve replicas). A server that checks the token rejects them with UNAUTHENTICATED; one that serves
# them without a token answers anything else; one that knows none of them answers UNIMPLEMENTED to all.
GRPC_PROBES = ["/ray.rpc.NodeInfoGcsService/GetClusterId", "/ray.rpc.InternalKVGcsService/GetInternalConfig",
               "/ray.rpc.NodeManagerService/GetSystemConfig", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",
               "/ray.rpc.CoreWorkerService/NumPendingTasks", "/ray.rpc.ReporterService/HealthCheck",
               "/ray.rpc.LogService/ListLogs", "/ray.rpc.RayletDriver/ClusterInfo",
               "/ray.serve.ASGIService/HandleRequest", "/ray.serve.RayServeAPIService/Healthz"]
HTTP_PROBES = ["/", "/metrics", "/v1/models", "/api/version", "/api/jobs/", "/get_or_create_runtime_env"]


def reach(ip: str, node_ip: str) -> str:
    """The address to connect to for a socket listening on `ip`."""
    if ip in ("0.0.0.0", "::"):
        return node_ip
    return ip[len("::ffff:"):] if ip.startswith("::ffff:") else ip


def http_statuses(host: str, port: int):
    """{path: status} of GET requests without any credentials, or None if it does not speak HTTP/1."""
    statuses = {}
    for path in HTTP_PROBES:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(5)
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                head = s.recv(64)
        except OSError as e:
            statuses[path] = f"error {e}"
            continue
        if not head.startswith(b"HTTP/"):
            return None
        statuses[path] = int(head.split()[1])
    return statuses


def grpc_statuses(host: str, port: int):
    import grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        codes = {}
        for method in GRPC_PROBES:
            try:
                channel.unary_unary(method)(b"", timeout=5)
                codes[method] = "OK"
            except grpc.RpcError as e:
                codes[method] = e.code().name
    return codes


def authentication(host: str, port: int) -> str:
    """'authenticated', or why not: what the listener does with requests that carry no credentials."""
    http = http_statuses(host, port)
    if http is not None:
        served = {p: s for p, s in http.items() if isinstance(s, int) and s < 400}
        if served:
            return f"HTTP without credentials answers {served}"
        if not any(s in (401, 403) for s in http.values()):
            return f"HTTP that never asks for credentials: {http}"
        return "authenticated"
    codes = grpc_statuses(host, port)
    served = {m: c for m, c in codes.items() if c not in ("UNIMPLEMENTED", "UNAUTHENTICATED")}
    if served:
        return f"gRPC without a token answers {served}"
    if "UNAUTHENTICATED" not in codes.values():
        return "gRPC whose services are none of Ray's known ones: cannot tell whether it checks the token"
    return "authenticated"


def cluster_processes(job_id: str, node_pid: int):
    """The node's own process (the Ray driver) and every process of its Ray node: its descendants, and those that
    inherited FTLIB_RAY_NODE (the environment alone misses some: Ray's agents overwrite it with their process
    titles)."""
    node = psutil.Process(node_pid)
    found = {p.pid: p for p in [node, *node.children(recursive=True)]}
    for pid in ray_processes(f"{job_id}-0"):
        if pid not in found and psutil.pid_exists(pid):
            found[pid] = psutil.Process(pid)
    return list(found.values())


def listeners(processes):
    found = set()
    for p in processes:
        try:
            name = p.name()
            for c in p.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.pid, name, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def ephemeral_ports():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


# ----------------------------------------------------------------------------------------------- the job
class Job:
    def __init__(self, tmp: Path):
        self.id = f"sec{time.time_ns() % 10**7}"
        self.node_ip = "127.0.1.1"
        self.recipe = serve_recipe(tmp, "serve.startup_timeout_s=150")
        self.run = Path(self.recipe.run.dir)
        self.log = tmp / "node.log"
        self.attacker_token = "a" * 64
        self.planted_dir = f"/tmp/ftr-{self.id}-0"
        self.planter = attacker(PLANT_TOKEN, self.attacker_token, self.planted_dir, 60, background=True)
        assert self.planter.stdout.readline().strip() == "planted"
        args = tmp / "node.pkl"
        args.write_bytes(pickle.dumps((self.recipe, 0, [self.node_ip], self.id)))
        with open(self.log, "w") as out:
            self.process = subprocess.Popen([sys.executable, "-c", NODE, str(args)], stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not (self.run / "endpoint.json").exists():
            assert self.process.poll() is None, f"the serve job exited:\n{self.log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the serve job did not get ready"
            time.sleep(0.5)
        self.endpoint = json.loads((self.run / "endpoint.json").read_text())
        self.head = json.loads((self.run / "serve_head.json").read_text())
        self.ray_start = next(p for p in cluster_processes(self.id, self.process.pid)
                              if "start" in p.cmdline()[:4] and "--block" in p.cmdline())
        self.ray_env = dict(kv.split("=", 1) for kv in Path(f"/proc/{self.ray_start.pid}/environ").read_text()
                            .split("\0") if "=" in kv)
        self.temp_dir = Path(next(a for a in self.ray_start.cmdline() if a.startswith("--temp-dir="))
                             .split("=", 1)[1])

    @property
    def block(self):
        first = int(self.head["address"].rsplit(":", 1)[1])  # the GCS port opens the block
        return range(first, first + cluster.BLOCK)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        self.planter.stdin.close()
        self.planter.wait(timeout=30)
        attacker(REMOVE, self.planted_dir)
        return code


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    attacker_prefix()  # skip before starting anything
    job = Job(tmp_path_factory.mktemp("security"))
    yield job
    job.stop()


# ----------------------------------------------------------------------------------------------- the tests
pytestmark = [pytest.mark.security, pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_token_planted_in_advance_by_another_user_is_not_the_clusters(job):
    """The head must take only the token its own job made: the attacker's token, planted at the place it could
    predict before the head started, must be refused, and the job's own (serve_head.json's) accepted."""
    assert gcs_call(job.head["address"], job.attacker_token) == "UNAUTHENTICATED"
    assert gcs_call(job.head["address"], job.head["ray_token"]) == "OK"


def test_ray_files_and_token_are_private_to_the_owner(job):
    token = Path(job.ray_env["RAY_AUTH_TOKEN_PATH"])
    assert token.read_text().strip() == job.head["ray_token"]
    st = token.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600
    assert job.temp_dir not in token.parents, "the token lies inside Ray's temp dir, which Ray makes world-writable"
    # Every folder above the token and Ray's temp dir, up to /tmp, is ours and closed to everyone else.
    for path in {*token.parents, *job.temp_dir.parents} - {*Path(tempfile.gettempdir()).parents,
                                                           Path(tempfile.gettempdir())}:
        st = path.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077, \
            f"{path}: mode {oct(st.st_mode)}, owner {st.st_uid}"
    base = Path(tempfile.gettempdir(), job.temp_dir.relative_to(tempfile.gettempdir()).parts[0])
    findings = attacker(TRY_TO_READ, base, token, job.temp_dir).stdout.split("\n")
    assert all(line.startswith("refused") for line in findings if line), findings
    # Unix socket paths must stay under 107 bytes.
    sockets = [p for p in job.temp_dir.rglob("*") if p.is_socket()]
    assert sockets and max(len(str(p).encode()) for p in sockets) < 107, sockets


def test_every_listening_socket_is_in_the_jobs_block_or_on_loopback_and_authenticated(job):
    """All processes of the cluster, their listening TCP sockets: each in the job's port block (or on loopback)
    and each refusing requests without the cluster's token (HTTP: 401/403, never an answer; gRPC: UNAUTHENTICATED).
    The one exception Ray does not let us avoid is named below and must still check the token."""
    found, deadline = set(), time.monotonic() + 30
    while time.monotonic() < deadline:  # Ray's agents start in the background: wait until all are listening
        found |= listeners(cluster_processes(job.id, job.process.pid))
        names = {name for _, name, _, _ in found}
        if {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names) \
                and any("RuntimeEnvAgent" in n for n in names) and any("ServeReplica" in n for n in names):
            break
        time.sleep(1)
    assert any("RuntimeEnvAgent" in name for _, name, _, _ in found), f"not all of Ray seen: {sorted(found)}"
    problems = []
    for pid, name, ip, port in sorted(found, key=lambda f: f[3]):
        where = f"{name} (pid {pid}) on {ip}:{port}"
        if port not in job.block and not is_loopback(ip):
            # Serve replicas run an inter-deployment gRPC server on a port Ray hard-codes as "[::]:0" (Ray 2.60,
            # serve/_private/replica.py): the kernel picks it from the ephemeral range, which our blocks avoid.
            if not ("ServeReplica" in name and port in ephemeral_ports()):
                problems.append(f"{where}: outside the job's ports {job.block.start}-{job.block.stop - 1}")
        verdict = authentication(reach(ip, job.node_ip), port)
        print(f"{where}: {verdict}")
        if verdict != "authenticated":
            problems.append(f"{where}: {verdict}")
    assert not problems, "\n".join(problems)


def test_stopping_leaves_no_token_and_no_folder_behind(job):
    token = Path(job.ray_env["RAY_AUTH_TOKEN_PATH"])
    assert job.stop() == 0, job.log.read_text()[-3000:]
    assert ray_processes(f"{job.id}-0") == []
    assert not token.exists() and not job.temp_dir.exists()
    assert not token.parent.exists(), f"{token.parent} is left behind"


def test_metrics_asked_for_are_served_from_the_jobs_block(monkeypatch):
    """FTLIB_RAY_METRICS=1 (for a site's Prometheus): Ray's three Prometheus endpoints answer, on ports of the
    node's block, and nothing listens outside it (by default they are off: the test above)."""
    monkeypatch.setenv(cluster.METRICS_ENV, "1")
    node = cluster.RayNode(f"metrics{time.time_ns() % 10**6}", 0, "127.0.1.1", "b" * 64)
    try:
        node.wait_until_listening(timeout_s=120)
        p, block = node.ports, range(node.ports.first, node.ports.first + cluster.BLOCK)
        wanted = {p.metrics: "agent", p.dashboard_metrics: "dashboard", p.autoscaler_metrics: "autoscaler"}
        deadline, found = time.monotonic() + 60, set()
        while time.monotonic() < deadline and not set(wanted) <= {port for *_, port in found}:
            time.sleep(1)
            ray = psutil.Process(node.process.pid)
            found = listeners([ray, *ray.children(recursive=True)])
        assert set(wanted) <= {port for *_, port in found}, (wanted, sorted(found))
        assert [f for f in found if f[3] not in block] == []
        for port, who in wanted.items():
            status = http_statuses(node.ip, port)["/metrics"]
            assert status == 200, f"{who} metrics on {port}: {status}"
    finally:
        node.stop()
    assert not node.dir.path.exists()


@pytest.mark.slurm
@pytest.mark.timeout(420)
@pytest.mark.usefixtures("slurm_cluster")
def test_a_cancelled_serve_job_leaves_no_token_behind(tmp_path):
    """`make cancel` of a serve job: Slurm sends SIGTERM, then SIGKILL after KillWait (5 s here; often 30 s) to
    everything the job runs. Whatever the node has not done by then stays undone: the Ray token of its private
    folder must not be among it (it is removed first thing), nor the run directory's tokens."""
    from ftlib.rundir import RunDir
    from launcher import launch, status
    from tests.test_slurm import wait_for_jobs

    recipe = serve_recipe(tmp_path, "run.launcher=slurm", "resources.serve.nodes=1", "resources.serve.mem_gb=3")
    launch.save_recipe(recipe)
    (job,) = launch.submit(recipe, ["serve"])
    run = RunDir.of(recipe)
    try:
        launch.wait_for_endpoint(recipe, job.job_id, 300)
        tokens = {Path(environ["RAY_AUTH_TOKEN_PATH"]) for pid in ray_processes(f"{job.job_id}-0")
                  if (environ := process_environ(pid)).get("RAY_AUTH_TOKEN_PATH")}
        assert tokens and all(t.exists() for t in tokens), tokens
    finally:
        status.cancel(run)
    assert set(wait_for_jobs([job.job_id], timeout=120).values()) <= {"CANCELLED", "COMPLETED"}
    left = [str(p) for p in [*tokens, run.token, run.serve_head, run.endpoint] if p.exists()]
    assert left == [], f"left behind by the cancelled job: {left}"


def process_environ(pid: int) -> dict:
    try:
        return dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    except OSError:
        return {}
