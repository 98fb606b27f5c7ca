"""How start-up grows with the number of nodes, on the local test Slurm cluster (tests/cluster/up.sh, partition wide),
and a 64-rank rendezvous of plain processes on this machine.

    .venv/bin/python bench/scale.py [--nodes 2,4,8] [--local-ranks 64] [--skip-slurm] [--skip-serve]

Prints, measured in this one run:

  rendezvous   N-node x 1-task Slurm job (srun): ftlib.distributed.join, then a first all_reduce of one float. Each
               rank notes the time just before join (after importing torch) and after the all_reduce;
               "after last" = last rank done - last rank arrived (the rendezvous itself), "span" = last rank done -
               first rank arrived (adds the skew of srun starting ranks and importing torch).
  ray start    N-node serve job (launch.submit, serve.replicas=1): job RUNNING -> rank 0 logs "all N node(s)
               joined" -> endpoint.json written (Serve deployed, /health answered), polled every 0.2 s.
  local ranks  --local-ranks processes forked from one parent that has imported torch (no model): join + first
               all_reduce with gloo over loopback; peak RSS summed over the ranks (shared pages counted in every
               process) and peak PSS (shared pages divided among them), sampled every 0.2 s.

The test cluster's 8 nodes share this host's 2 cores, so Slurm and Ray figures measure start-up overhead on an
oversubscribed machine, not a network; they grow with the number of processes that start on the same cores.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
PARTITION = "wide"

RANK_SCRIPT = r"""
import json, os, subprocess, sys, time
import torch, torch.distributed as dist
from ftlib.distributed import DistEnv, join
nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                       text=True, check=True).stdout.split()
env = DistEnv(rank=int(os.environ["SLURM_PROCID"]), local_rank=0, world_size=int(os.environ["SLURM_NTASKS"]),
              local_world_size=1, master_addr=nodes[0], master_port=0,
              rendezvous_file=f"{sys.argv[1]}/rendezvous-{os.environ['SLURM_JOB_ID']}.json")
os.environ["FTLIB_NODE_NAME"] = os.environ["SLURMD_NODENAME"]
t0 = time.time()
join(env, timeout_s=120)
t = torch.ones(1)
dist.all_reduce(t)
t1 = time.time()
print("RANK " + json.dumps({"rank": env.rank, "start": t0, "end": t1, "sum": t.item()}), flush=True)
dist.destroy_process_group()
"""


def spans(rows):
    starts, ends = [r["start"] for r in rows], [r["end"] for r in rows]
    return max(ends) - max(starts), max(ends) - min(starts)


# ----------------------------------------------------------------------------------------------- Slurm rendezvous
def slurm_rendezvous(nodes: int, folder: Path) -> dict:
    script = folder / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = folder / f"rdzv-{nodes}-%j.out"
    batch = (f"#!/bin/bash\ncd {ROOT}\nexport PYTHONPATH={ROOT}\nsrun --kill-on-bad-exit=1 {sys.executable} {script} {folder}\n")
    t0 = time.time()
    job = subprocess.run(["sbatch", "--parsable", "--wait", f"--partition={PARTITION}", f"--nodes={nodes}",
                          "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=1G", "--time=10", f"--output={out}",
                          "--job-name=bench-rdzv"], input=batch, capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    job_id = job.stdout.strip().split(";")[0]
    text = Path(str(out).replace("%j", job_id)).read_text() if job_id else ""
    rows = [json.loads(line.split("RANK ", 1)[1]) for line in text.splitlines() if line.startswith("RANK ")]
    if job.returncode != 0 or len(rows) != nodes:
        raise SystemExit(f"rendezvous job of {nodes} nodes failed (rc {job.returncode}): {job.stderr}\n{text[-3000:]}")
    assert all(r["sum"] == nodes for r in rows), rows
    after_last, span = spans(rows)
    return {"nodes": nodes, "after_last_s": after_last, "span_s": span, "sbatch_wait_s": wall}


# ----------------------------------------------------------------------------------------------- Ray cluster start
def make_adapter(path: Path, recipe) -> None:
    import torch
    from peft import get_peft_model

    from ftlib.model import load_base, lora_config

    torch.manual_seed(0)
    config = lora_config(recipe)
    config.init_lora_weights = False
    get_peft_model(load_base(recipe, device="cpu"), config).save_pretrained(path)


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    return out or "GONE"


def ray_start(nodes: int, folder: Path) -> dict:
    from ftlib import recipe as recipe_mod
    from ftlib.rundir import RunDir
    from launcher import launch, status

    recipe = recipe_mod.load(ROOT / "recipes" / "demo.yaml", [
        f"run.dir={folder / f'serve-{nodes}'}", f"data.cache_dir={folder / 'cache'}", "run.launcher=slurm",
        f"run.name=bench-ray-{nodes}", f"resources.serve.nodes={nodes}", "resources.serve.cpus_per_task=1",
        "resources.serve.mem_gb=1.8", "resources.serve.time_min=10", f"slurm.serve.partition={PARTITION}",
        "serve.replicas=1", "serve.cpus_per_replica=1"])
    launch.save_recipe(recipe)
    run = RunDir.of(recipe)
    make_adapter(run.adapter, recipe)
    with open(os.devnull, "w") as quiet:
        sys.stdout, saved = quiet, sys.stdout
        try:
            (job,) = launch.submit(recipe, ["serve"])
        finally:
            sys.stdout = saved
    marks, deadline = {}, time.time() + 480
    try:
        while time.time() < deadline and "endpoint" not in marks:
            now = time.time()
            state = job_state(job.job_id)
            if state == "RUNNING":
                marks.setdefault("running", now)
            elif state not in ("PENDING", "CONFIGURING"):
                raise SystemExit(f"serve job {job.job_id} of {nodes} nodes: {state}\n{status.status(run)}")
            if "running" in marks and "joined" not in marks:
                log = status.log_path(run, "serve", 0, err=True)
                if log.is_file() and f"all {nodes} node(s) joined" in log.read_text(errors="replace"):
                    marks["joined"] = now
            if run.endpoint.is_file():
                marks.setdefault("joined", now)
                marks["endpoint"] = now
            time.sleep(0.2)
    finally:
        status.cancel(run)
    if "endpoint" not in marks:
        raise SystemExit(f"serve job {job.job_id} of {nodes} nodes: no endpoint after 480 s ({marks})")
    while job_state(job.job_id) not in ("GONE", "COMPLETED", "CANCELLED"):
        time.sleep(1)
    return {"nodes": nodes, "joined_s": marks["joined"] - marks["running"],
            "endpoint_s": marks["endpoint"] - marks["running"]}


# ----------------------------------------------------------------------------------------------- local ranks
def _local_rank(rank: int, world: int, rendezvous: str, results) -> None:
    import torch
    import torch.distributed as dist

    from ftlib.distributed import DistEnv, join

    os.environ["FTLIB_NODE_NAME"] = "local"
    t0 = time.time()
    join(DistEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world, master_addr="127.0.0.1",
                 master_port=0, rendezvous_file=rendezvous), timeout_s=300)
    t = torch.ones(1)
    dist.all_reduce(t)
    results.put({"rank": rank, "start": t0, "end": time.time(), "sum": t.item()})
    dist.barrier()  # stay up (and measured) until every rank is done
    dist.destroy_process_group()


def _mem_kib(pid: int):
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def local_ranks(world: int) -> dict:
    import torch.distributed  # noqa: F401 (imported once, in the parent: the ranks are forked)

    rendezvous = tempfile.mkdtemp(prefix="ftlib-bench-") + "/rendezvous.json"  # private (mode 700)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    peak = {"rss": 0, "pss": 0}
    procs = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = pss = 0
            for p in procs:
                r, q = _mem_kib(p.pid) if p.pid else (0, 0)
                rss, pss = rss + r, pss + q
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.time()
    for r in range(world):
        p = ctx.Process(target=_local_rank, args=(r, world, rendezvous, results))
        p.start()
        procs.append(p)
    sampler.start()
    rows = [results.get(timeout=600) for _ in range(world)]
    for p in procs:
        p.join(120)
    done.set()
    sampler.join()
    assert all(r["sum"] == world for r in rows) and all(p.exitcode == 0 for p in procs), rows
    after_last, span = spans(rows)
    return {"ranks": world, "after_last_s": after_last, "span_s": span, "total_s": time.time() - t0,
            "peak_rss_gib": peak["rss"] / 2**20, "peak_pss_gib": peak["pss"] / 2**20,
            "per_rank_pss_mib": peak["pss"] / 1024 / world}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,4,8", help="node counts for the Slurm measurements")
    ap.add_argument("--local-ranks", type=int, default=64)
    ap.add_argument("--skip-slurm", action="store_true", help="only the local ranks")
    ap.add_argument("--skip-serve", action="store_true", help="no Ray cluster measurements")
    args = ap.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    print(f"# bench/scale.py on {os.cpu_count()} cores; Slurm partition {PARTITION}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="ftlib-scale-", dir=os.environ.get("FTLIB_BENCH_DIR")))
    try:
        if not args.skip_slurm:
            print("rendezvous on Slurm (join + first all_reduce, 1 task per node)", flush=True)
            for n in counts:
                r = slurm_rendezvous(n, folder)
                print(f"  {n} nodes: after last rank {r['after_last_s']:.2f} s, span {r['span_s']:.2f} s "
                      f"(sbatch --wait {r['sbatch_wait_s']:.1f} s)", flush=True)
            if not args.skip_serve:
                print("Ray cluster start (serve job: RUNNING -> all nodes joined -> endpoint up)", flush=True)
                for n in counts:
                    r = ray_start(n, folder)
                    print(f"  {n} nodes: joined {r['joined_s']:.1f} s, endpoint {r['endpoint_s']:.1f} s", flush=True)
        print(f"local rendezvous, {args.local_ranks} forked processes (join + first all_reduce)", flush=True)
        r = local_ranks(args.local_ranks)
        print(f"  {r['ranks']} ranks: after last rank {r['after_last_s']:.2f} s, span {r['span_s']:.2f} s, "
              f"total {r['total_s']:.1f} s; peak RSS {r['peak_rss_gib']:.2f} GiB summed "
              f"(PSS {r['peak_pss_gib']:.2f} GiB, {r['per_rank_pss_mib']:.0f} MiB per rank)", flush=True)
    except BaseException:
        print(f"# kept {folder} (run directories and job logs) for a look", flush=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
