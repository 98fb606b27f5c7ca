"""Wider jobs on the REAL test cluster: its partition `wide` has all 8 nodes (tests/cluster/up.sh; node3-8 have
1 CPU and 2 GiB each), while the rest of the suite stays on `debug` (node1-2). 8-node x 1-task training of the tiny
model, a serve job whose Ray cluster spans 4 nodes, and a rendezvous of 8 ranks with one missing.

With FTLIB_SLURM_NODES=2 (a cluster of two nodes) the Slurm tests here skip; the rendezvous test runs anyway."""
import multiprocessing
import subprocess
import time

import pytest

from ftlib.data.preprocess import run_shard
from ftlib.rundir import RunDir
from launcher import launch, status
from tests.test_serve import call, make_adapter
from tests.test_slurm import cluster, sacct, wait_for_jobs  # noqa: F401 (cluster: the session fixture)

WIDE = "wide"


def wide_nodes() -> int:
    out = subprocess.run(["sinfo", "-h", "-p", WIDE, "-o", "%D"], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.split() else 0


@pytest.fixture
def eight_nodes(cluster):  # noqa: F811
    if wide_nodes() < 8:
        pytest.skip(f"partition {WIDE} has {wide_nodes()} nodes (tests/cluster/up.sh with FTLIB_SLURM_NODES=8)")


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_eight_nodes_one_task_each_train(make_recipe, eight_nodes):
    """resources.train.nodes=8 on partition wide: one rank on each of node1..node8, one process group of 8, two
    steps of the tiny model, the adapter saved."""
    recipe = make_recipe("run.launcher=slurm", "data.sources[0].max_rows=120", "data.sequence_len=128",
                         "serve.enabled=false", "resources.train.nodes=8", "resources.train.tasks_per_node=1",
                         "resources.train.cpus_per_task=1", "resources.train.mem_gb=1.5", "resources.train.time_min=10",
                         f"slurm.train.partition={WIDE}", "train.max_steps=2", "train.global_batch_size=8",
                         "train.micro_batch_size=1", "train.warmup_steps=0", "train.logging_steps=1",
                         "train.eval_steps=100", "train.save_steps=100", "train.sample_prompts=[]")
    for k in range(recipe.data.num_shards):  # preprocessing is not what this test is about
        run_shard(recipe, k, recipe.data.num_shards)
    (job,) = launch.submit(recipe, ["train"])
    states = wait_for_jobs([job.job_id], timeout=360)
    run = RunDir.of(recipe)
    assert states[job.job_id] == "COMPLETED", status.status(run)
    step = next(r for r in sacct(job.job_id, "JobID", "NodeList", "NTasks", steps=True)
                if r["JobID"] == f"{job.job_id}.0")
    assert (step["NodeList"], step["NTasks"]) == ("node[1-8]", "8"), step
    rank0 = status.log_path(run, "train", 0, err=True).read_text() + status.log_path(run, "train", 0).read_text()
    assert "world size 8" in rank0, rank0[-3000:]
    assert (run.adapter / "adapter_model.safetensors").is_file()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_serve_on_four_nodes(make_recipe, tmp_path, eight_nodes):
    """A serve job of 4 nodes on partition wide: the Ray cluster has all 4 (Serve waits for them), one replica per
    node (1 CPU each), the endpoint answers, and `make cancel` takes it down."""
    recipe = make_recipe("run.launcher=slurm", "resources.serve.nodes=4", "resources.serve.cpus_per_task=1",
                         "resources.serve.mem_gb=1.8", "resources.serve.time_min=10", f"slurm.serve.partition={WIDE}",
                         "serve.replicas=4", "serve.cpus_per_replica=1")
    launch.save_recipe(recipe)
    make_adapter(RunDir.of(recipe).adapter, seed=1)
    (job,) = launch.submit(recipe, ["serve"])
    run = RunDir.of(recipe)
    try:
        endpoint = launch.wait_for_endpoint(recipe, job.job_id, 360)
        assert endpoint["nodes"] == 4, endpoint
        token = (run.token).read_text().strip()
        code, health = call(endpoint["url"] + "/health", token=token)
        assert code == 200, health
        nodes = {call(endpoint["url"] + "/health", token=token)[1].get("node_id") for _ in range(40)}
        assert len(nodes) >= 2, nodes  # replicas on several nodes of the allocation answer
        assert call(endpoint["url"] + "/", [{"text": "Once upon a time"}], token)[0] == 200
        queue = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T %N"], capture_output=True, text=True)
        assert queue.stdout.split() == ["RUNNING", "node[1-4]"], queue.stdout
        log = status.log_path(run, "serve", 0, err=True).read_text()
        assert "all 4 node(s) joined" in log, log[-3000:]
    finally:
        status.cancel(run)
    assert set(wait_for_jobs([job.job_id], timeout=120).values()) <= {"CANCELLED", "COMPLETED"}
    deadline = time.time() + 60
    while time.time() < deadline and run.endpoint.exists():
        time.sleep(1)
    assert not run.endpoint.exists()


def _join(rank: int, world: int, rendezvous: str, timeout_s: float, results) -> None:
    from ftlib.distributed import DistEnv, join

    try:
        join(DistEnv(rank=rank, local_rank=0, world_size=world, local_world_size=1, master_addr="127.0.0.1",
                     master_port=0, rendezvous_file=rendezvous), timeout_s=timeout_s)
        results.put((rank, "joined"))
    except Exception as e:  # noqa: BLE001 (the message is what is checked)
        results.put((rank, f"{type(e).__name__}: {e}"))


@pytest.mark.timeout(120)
def test_rendezvous_of_eight_names_the_rank_that_never_came(tmp_path):
    """Ranks 0-6 of 8 (local processes; rank 7 never starts): within the timeout every rank that came fails with
    the same message, naming rank 7 and its node."""
    import torch.distributed  # noqa: F401 (imported once, before the fork)

    rendezvous = str(tmp_path / "rendezvous.json")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    started = time.monotonic()
    procs = [ctx.Process(target=_join, args=(r, 8, rendezvous, 4, results)) for r in range(7)]
    for p in procs:
        p.start()
    found = dict(results.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
    elapsed = time.monotonic() - started
    assert sorted(found) == list(range(7)), found
    expected = "1 of 8 ranks did not join within 4 s: rank 7 (node 7)"
    assert all(m.startswith("RendezvousError") and expected in m for m in found.values()), found
    assert "joined: rank 0 on" in found[0] and "rank 6 on" in found[0], found[0]
    assert elapsed < 60, elapsed
