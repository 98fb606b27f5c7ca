"""Serving on the REAL two-node Slurm cluster: each serve job is one allocation of two nodes running a Ray head
and a Ray worker (ports chosen per job and node), hosting the Serve app. Two such jobs of two different users run at
once on the same two nodes: this user's (ftl-alice under `make test`) and the other tenant's (ftl-bob, driven through
sudo by this module run as a script). The official openai client talks to both; neither user can use the other's
endpoint, cancel the other's job or read the other's run directory; `make cancel` shuts each down and removes its
endpoint.json."""
import json
import os
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from ftlib.rundir import RunDir
from launcher import launch, status
from tests.conftest import DEMO, ROOT, as_tenant, what_user_reads
from tests.test_serve import call, make_adapter, ray_processes
from tests.test_slurm import cluster, wait_for_jobs  # noqa: F401 (cluster: the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SERVE = ("run.launcher=slurm", "resources.serve.nodes=2", "resources.serve.cpus_per_task=1",
         "resources.serve.mem_gb=2.5", "serve.replicas=2", "serve.cpus_per_replica=1")
RESULT = "TENANT-RESULT "  # the line the other tenant's half prints its findings on


def tenant_recipe(root: Path):
    """A serve recipe in root/run with its own adapter (served as 'mine') and one more named 'second'. The run
    directory is made by the product (save_recipe), as in a real run, so its permissions are the product's."""
    from ftlib import recipe as recipe_mod

    make_adapter(root / "second", seed=2)
    recipe = recipe_mod.load(DEMO, [f"run.dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                    "serve.model_name=mine", f"serve.adapters.second={root / 'second'}", *SERVE])
    launch.save_recipe(recipe)
    make_adapter(RunDir.of(recipe).adapter, seed=1)
    return recipe


def exercise(endpoint: dict) -> dict:
    """What the endpoint's owner finds when using it (every value is asserted by the test)."""
    token_file = Path(endpoint["token_file"])
    token = token_file.read_text().strip()
    client = openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=token, max_retries=0, timeout=60)
    plain = client.completions.create(model="second", prompt="Once upon a time", max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model="mine", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8, temperature=0,
        stream=True))
    return {
        "token_mode": oct(stat.S_IMODE(token_file.stat().st_mode)),
        "token_in_endpoint_json": token in Path(endpoint["run_endpoint"]).read_text(),
        "completion": plain.choices[0].text,
        "chat": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "notebook_post": call(endpoint["url"] + "/", [{"text": "Once upon a time"}], token)[0],
        "models_without_token": call(endpoint["url"] + "/v1/models")[0],
        # Replicas on both nodes answer: the Ray cluster spans the allocation.
        "nodes_answering": len({call(endpoint["url"] + "/health")[1].get("node_id") for _ in range(30)}),
    }


def assert_serves(endpoint: dict, found: dict, who: str):
    assert endpoint["host"] in ("node1", "127.0.1.1") or endpoint["url"].startswith("http://127.0.1.1:"), endpoint
    assert found["token_mode"] == oct(0o600) and not found["token_in_endpoint_json"], (who, found)
    assert found["completion"] and found["chat"], (who, found)
    assert (found["notebook_post"], found["models_without_token"], found["nodes_answering"]) == (200, 401, 2), \
        (who, found)


def run_files(run: Path) -> list:
    return sorted(str(p) for p in run.rglob("*") if p.is_file())


def other_tenant_half(action: str, root: Path) -> None:
    """The other tenant's side, run as that user: `up` submits its serve job, waits for the endpoint, uses it and
    prints what it found; `down` cancels the run's jobs and waits until endpoint.json is gone."""
    if action == "up":
        root.mkdir(exist_ok=True)
        recipe = tenant_recipe(root)
        (job,) = launch.submit(recipe, ["serve"])
        print(RESULT + json.dumps({"job_id": job.job_id}), flush=True)
        run = RunDir.of(recipe)
        try:
            endpoint = launch.wait_for_endpoint(recipe, job.job_id, 420)
        except Exception:
            # What `make status` says of the job (rank, node, cause, its log's last lines), for the test's message.
            print(RESULT + json.dumps({"status": status.status(run)}), flush=True)
            raise
        found = exercise({**endpoint, "run_endpoint": str(run.endpoint)})
        print(RESULT + json.dumps({"job_id": job.job_id, "endpoint": endpoint, "found": found,
                                   "run": str(run.root), "files": run_files(run.root)}), flush=True)
    elif action == "down":
        run = RunDir(root / "run")
        print(RESULT + json.dumps({"cancelled": status.cancel(run) if run.jobs.exists() else []}), flush=True)
        deadline = time.time() + 60
        while time.time() < deadline and run.endpoint.exists():
            time.sleep(1)
        print(RESULT + json.dumps({"endpoint_left": run.endpoint.exists()}), flush=True)
    else:
        raise SystemExit(f"unknown action {action}")


def results(text: str) -> dict:
    found = {}
    for line in text.splitlines():
        if line.startswith(RESULT):
            found.update(json.loads(line[len(RESULT):]))
    return found


def half(action: str, root: Path) -> list:
    return as_tenant(sys.executable, "-m", "tests.test_slurm_serve", action, str(root))


@pytest.mark.timeout(720)
def test_two_tenants_serve_on_the_same_nodes_at_once(other_tenant, shared_scratch):
    """ftl-alice's and ftl-bob's 2-node serve jobs run at the same time on node1+node2; each answers its owner;
    neither user can use the other's endpoint, cancel the other's job or read the other's run directory."""
    mine = tenant_recipe(shared_scratch / "alice")
    theirs = shared_scratch / "bob"
    bob = subprocess.Popen(half("up", theirs), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (job,) = launch.submit(mine, ["serve"])
    run = RunDir.of(mine)
    bob_out = bob_err = ""
    privacy = {}
    try:
        endpoint = launch.wait_for_endpoint(mine, job.job_id, 420)
        found = exercise({**endpoint, "run_endpoint": str(run.endpoint)})
        assert_serves(endpoint, found, "alice")
        bob_out, bob_err = bob.communicate(timeout=480)
        other = results(bob_out)
        assert bob.returncode == 0 and "found" in other, (
            f"{other_tenant}'s half ended with status {bob.returncode}; its job:\n{other.get('status')}\n"
            f"its stderr's end:\n{bob_err[-3000:]}")
        assert_serves(other["endpoint"], other["found"], other_tenant)

        # Both jobs run at this moment, each over both nodes, each as its own user.
        queue = subprocess.run(["squeue", "-h", "-j", f"{job.job_id},{other['job_id']}", "-o", "%i %u %T %N"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        rows = sorted(line.split() for line in queue if line)
        assert rows == sorted([[job.job_id, pwd.getpwuid(os.geteuid()).pw_name, "RUNNING", "node[1-2]"],
                               [other["job_id"], other_tenant, "RUNNING", "node[1-2]"]]), rows
        assert endpoint["port"] != other["endpoint"]["port"]

        # Tenants are apart: my token does not open the other endpoint, I cannot read the other's token,
        # Slurm refuses my scancel of the other's job.
        my_token = Path(endpoint["token_file"]).read_text().strip()
        assert call(other["endpoint"]["url"] + "/v1/models", token=my_token)[0] == 401
        with pytest.raises(PermissionError):
            Path(other["endpoint"]["token_file"]).read_text()
        refused = subprocess.run(["scancel", other["job_id"]], capture_output=True, text=True)
        assert refused.returncode != 0 or "ccess" in refused.stderr or "ermission" in refused.stderr, refused
        still = subprocess.run(["squeue", "-h", "-j", other["job_id"], "-o", "%T"], capture_output=True, text=True)
        assert still.stdout.strip() == "RUNNING", (refused, still)

        # Run directories are private (checked while both runs are up, endpoint.json included); asserted last.
        privacy = {
            f"{other_tenant} reads mine": what_user_reads(run.root, run_files(run.root), user=other_tenant),
            f"I read {other_tenant}'s": what_user_reads(Path(other["run"]), other["files"]),
        }

        # My Ray head dies (its GCS killed, as the OOM killer might): my job ends within two minutes, status says
        # why, and the other tenant's endpoint, on the same nodes, answers on.
        gcs = [pid for pid in ray_processes(f"{job.job_id}-0")
               if Path(f"/proc/{pid}/comm").read_text().strip() == "gcs_server"]
        assert len(gcs) == 1, gcs
        killed_at = time.time()
        os.kill(gcs[0], 9)
        assert wait_for_jobs([job.job_id], timeout=120)[job.job_id] == "FAILED", status.status(run)
        assert time.time() - killed_at < 120
        report = status.status(run)
        # ... naming the process that died, as Ray recorded it (the folder holding that record is gone by now).
        assert "the Ray head exited" in report and "gcs_server died (exit code -9" in report, report
        assert call(other["endpoint"]["url"] + "/health")[0] == 200
    finally:
        status.cancel(run)
        down = subprocess.run(half("down", theirs), cwd=ROOT, capture_output=True, text=True, timeout=150)
        if bob.poll() is None:
            bob.kill()
            bob_out, bob_err = bob.communicate(timeout=30)
    assert down.returncode == 0 and results(down.stdout).get("endpoint_left") is False, (down.stdout, down.stderr)
    other = results(bob_out)
    states = wait_for_jobs([job.job_id] + ([other["job_id"]] if "job_id" in other else []), timeout=150)
    assert states[job.job_id] == "FAILED" and set(states.values()) <= {"FAILED", "CANCELLED", "COMPLETED"}, states
    deadline = time.time() + 60
    while time.time() < deadline and run.endpoint.exists():
        time.sleep(1)
    assert not run.endpoint.exists()

    leaks = {who: seen for who, seen in privacy.items() if seen}
    assert not leaks, f"one tenant read the other's run directory: {json.dumps(leaks)[:1500]}"


VLLM_SERVE = ("run.launcher=slurm", "resources.serve.nodes=2", "resources.serve.cpus_per_task=2",
              "resources.serve.mem_gb=5.5", "serve.replicas=1", "serve.cpus_per_replica=1", "serve.engine=vllm")


@pytest.mark.timeout(900)
def test_a_two_node_vllm_serve_job_answers_like_hf_and_loads_an_adapter(cluster, tmp_path):  # noqa: F811
    """serve.engine=vllm on a 2-node serve job: Ray Serve's LLM library and vLLM in the serving environment behind
    the project's ingress. The official client (plain, streaming, chat), the notebook format and the token check;
    then a second adapter loaded into the running endpoint (`python -m ftlib load-adapter`) and served by name."""
    from ftlib import recipe as recipe_mod
    from tests.test_serve_vllm import SERVE_PYTHON, WIDE_MODEL, wide_adapter

    if not SERVE_PYTHON.exists():
        pytest.skip("no serving environment (.venv-serve): make setup")
    wide_adapter(tmp_path / "second", seed=2)
    wide_adapter(tmp_path / "third", seed=3)
    recipe = recipe_mod.load(DEMO, [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                                    f"model.name_or_path={WIDE_MODEL}", "serve.model_name=mine",
                                    f"serve.adapters.second={tmp_path / 'second'}", *VLLM_SERVE])
    launch.save_recipe(recipe)
    wide_adapter(RunDir.of(recipe).adapter, seed=1)
    (job,) = launch.submit(recipe, ["serve"])
    run = RunDir.of(recipe)
    try:
        endpoint = launch.wait_for_endpoint(recipe, job.job_id, 600)
        assert endpoint["nodes"] == 2 and call(endpoint["url"] + "/health")[1]["engine"] == "vllm"
        found = exercise({**endpoint, "run_endpoint": str(run.endpoint)})
        assert found["completion"] and found["chat"] and found["token_mode"] == oct(0o600), found
        assert (found["notebook_post"], found["models_without_token"]) == (200, 401), found
        done = subprocess.run([sys.executable, "-m", "ftlib", "load-adapter", str(run.root), "third",
                               str(tmp_path / "third")], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        token = Path(endpoint["token_file"]).read_text().strip()
        client = openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=token, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["mine", "second", "third", "stories260K-hd32"]
        answers = {m: client.completions.create(model=m, prompt="Once upon a time", max_tokens=12,
                                                temperature=0).choices[0].text for m in ("third", "stories260K-hd32")}
        assert answers["third"] and answers["third"] != answers["stories260K-hd32"], answers
    finally:
        status.cancel(run)
    states = wait_for_jobs([job.job_id], timeout=150)
    assert set(states.values()) <= {"CANCELLED", "COMPLETED"}, states


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    other_tenant_half(sys.argv[1], Path(sys.argv[2]))
