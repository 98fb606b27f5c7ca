"""Ray clusters of several nodes on this one host, as a serve job runs them: `run_node` once per node, each in its own
process. Two such clusters run at the same time (one on 127.0.0.1, one on the addresses of the test Slurm cluster's
nodes, 127.0.1.1 and 127.0.1.2) and share the host's ports without colliding."""
import json
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.test_serve import call, ray_processes, serve_recipe

NODE = "import pickle, sys; from ftlib.serve.cluster import run_node; run_node(*pickle.load(open(sys.argv[1], 'rb')))"


def start_node(tmp: Path, recipe, rank: int, hostnames, job_id: str, log: Path) -> subprocess.Popen:
    args = tmp / f"node-{job_id}-{rank}.pkl"
    args.write_bytes(pickle.dumps((recipe, rank, hostnames, job_id)))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", NODE, str(args)], stdout=out, stderr=subprocess.STDOUT)


def wait_for_endpoint(run_dir: Path, job_id: str, processes, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / "endpoint.json"
        if path.exists():
            endpoint = json.loads(path.read_text())
            if endpoint["job_id"] == job_id:
                return endpoint
        assert all(p.poll() is None for p in processes), "a node exited before the endpoint was ready"
        time.sleep(0.5)
    raise TimeoutError(f"no endpoint.json for job {job_id}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_clusters_of_two_nodes_share_one_host(tmp_path):
    clusters = {"a": ["127.0.0.1", "127.0.0.1"], "b": ["127.0.1.1", "127.0.1.2"]}
    recipes, jobs, nodes, logs = {}, {}, {}, []
    for name, hostnames in clusters.items():
        # Two replicas of 2 CPUs on nodes of 2 CPUs: one replica on each node, so the worker node serves too.
        recipes[name] = serve_recipe(tmp_path / name, "serve.replicas=2", "serve.cpus_per_replica=2")
        jobs[name] = job_id = f"test{name}{time.time_ns() % 10**6}"
        for rank in (1, 0):  # workers first: they wait for the head's address
            logs.append(tmp_path / f"{name}-{rank}.log")
            nodes[name, rank] = start_node(tmp_path, recipes[name], rank, hostnames, job_id, logs[-1])
    try:
        endpoints = {name: wait_for_endpoint(Path(r.run.dir), jobs[name], list(nodes.values()), 240)
                     for name, r in recipes.items()}
        heads = {name: json.loads((Path(r.run.dir) / "serve_head.json").read_text()) for name, r in recipes.items()}
        assert endpoints["b"]["url"].startswith("http://127.0.1.1:")  # HTTP on the head node's address only
        assert heads["a"]["address"] != heads["b"]["address"] and endpoints["a"]["port"] != endpoints["b"]["port"]
        for name, r in recipes.items():
            ep = endpoints[name]
            assert stat.S_IMODE((Path(r.run.dir) / "serve_head.json").stat().st_mode) == 0o600
            token = Path(ep["token_file"]).read_text().strip()
            status, answer = call(ep["url"] + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8,
                                                                  "model": "second"}, token)
            assert status == 200 and answer["choices"][0]["text"], answer
            # Both nodes' replicas answer: the cluster really spans the two nodes.
            seen = {call(ep["url"] + "/health")[1]["node_id"] for _ in range(30)}
            assert len(seen) == 2, seen
        # Every process of every node, to check after stopping: FTLIB_RAY_NODE in the environment alone misses
        # Ray's agents, whose process titles overwrite it.
        started = [c for p in nodes.values() for c in psutil.Process(p.pid).children(recursive=True)]
        assert any("DashboardAgent" in c.name() for c in started)
    finally:
        for p in nodes.values():
            p.send_signal(signal.SIGTERM)
        codes = {key: p.wait(timeout=120) for key, p in nodes.items()}
        if any(codes.values()):
            for log in logs:
                print(f"----- {log.name}\n{log.read_text()[-3000:]}")
    assert codes == {key: 0 for key in nodes}
    assert [c for c in started if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []
    for name, r in recipes.items():
        assert not (Path(r.run.dir) / "endpoint.json").exists()
        for rank in (0, 1):
            assert ray_processes(f"{jobs[name]}-{rank}") == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_node_that_never_joins_is_named(tmp_path):
    recipe = serve_recipe(tmp_path, "serve.startup_timeout_s=5")
    job_id = f"lonely{time.time_ns() % 10**6}"
    log = tmp_path / "head.log"
    head = start_node(tmp_path, recipe, 0, ["127.0.0.1", "127.0.1.2"], job_id, log)
    assert head.wait(timeout=90) != 0
    assert "these nodes never joined the Ray cluster: rank 1 (127.0.1.2)" in log.read_text()
    assert ray_processes(f"{job_id}-0") == []
    assert not (Path(recipe.run.dir) / "serve_head.json").exists()


SIGNALS_UNDER_A_FOREIGN_HANDLER = r"""
import os, signal, sys, threading, time
from ftlib.stopping import stop_on

def foreign(signum, frame):  # what ray.init installs: sys.exit (and an aborting C++ handler)
    print("foreign handler ran", flush=True); os._exit(3)

before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
with stop_on((signal.SIGTERM, signal.SIGUSR2), taken_by_thread=True) as stop:
    signal.signal(signal.SIGTERM, foreign)  # installed while serving, as ray.init does
    late = threading.Thread(target=lambda: time.sleep(0.5))  # a thread started later inherits the mask
    late.start()
    os.kill(os.getpid(), signal.SIGTERM)
    print("stopped", stop.wait(5), stop.received == signal.SIGTERM, flush=True)
    late.join()
    os.kill(os.getpid(), signal.SIGUSR2)  # a second signal: taken as well, the first one stays the reason
    time.sleep(0.6)
    print("first", stop.signal_name, flush=True)
print("mask restored", signal.pthread_sigmask(signal.SIG_BLOCK, []) == before, flush=True)
print("their handler kept", signal.getsignal(signal.SIGTERM) is foreign, flush=True)
print("ours removed", signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL, flush=True)
"""


def test_serving_takes_stop_signals_in_one_thread_even_under_a_handler_installed_later():
    """ftlib.stopping as run_node uses it: the signals are blocked and taken by a thread, so a SIGTERM handler that
    ray.init installs later never runs; afterwards the mask is as before and the later handler stays in place."""
    out = subprocess.run([sys.executable, "-c", SIGNALS_UNDER_A_FOREIGN_HANDLER], capture_output=True, text=True,
                         timeout=30, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split("\n")[:-1] == ["stopped True True", "first SIGTERM", "mask restored True",
                                           "their handler kept True", "ours removed True"], out.stdout + out.stderr
