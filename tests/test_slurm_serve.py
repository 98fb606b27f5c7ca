"""Serving on the REAL two-node Slurm cluster: each serve job is one allocation of two nodes running a Ray head
and a Ray worker (ports chosen per job and node), hosting the Serve app. Two such jobs run at once on the same
two nodes; the official openai client talks to both; `make cancel` shuts them down and removes endpoint.json."""
import stat
import time
from pathlib import Path

import openai
import pytest

from ftlib.rundir import RunDir
from launcher import launch, status
from tests.test_serve import call, serve_recipe
from tests.test_slurm import cluster, wait_for_jobs  # noqa: F401 (cluster: the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_two_serve_jobs_of_two_nodes_on_the_same_nodes(tmp_path):
    recipes, jobs = {}, {}
    for name in ("a", "b"):
        recipes[name] = serve_recipe(tmp_path / name, "run.launcher=slurm", "resources.serve.nodes=2",
                                     "resources.serve.cpus_per_task=1", "resources.serve.mem_gb=2.5",
                                     "serve.replicas=2", "serve.cpus_per_replica=1")
        (jobs[name],) = launch.submit(recipes[name], ["serve"])
    try:
        endpoints = {name: launch.wait_for_endpoint(r, jobs[name].job_id, 420) for name, r in recipes.items()}
        assert endpoints["a"]["port"] != endpoints["b"]["port"]
        for name, r in recipes.items():
            ep = endpoints[name]
            run = RunDir.of(r)
            assert ep["host"] in ("node1", "127.0.1.1") or ep["url"].startswith("http://127.0.1.1:"), ep
            assert stat.S_IMODE(Path(ep["token_file"]).stat().st_mode) == 0o600
            token = Path(ep["token_file"]).read_text().strip()
            assert token not in run.endpoint.read_text()
            client = openai.OpenAI(base_url=ep["url"] + "/v1", api_key=token, max_retries=0, timeout=60)
            plain = client.completions.create(model="second", prompt="Once upon a time", max_tokens=8,
                                              temperature=0)
            assert plain.choices[0].text
            chunks = list(client.chat.completions.create(
                model="mine", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8,
                temperature=0, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert call(ep["url"] + "/", [{"text": "Once upon a time"}], token)[0] == 200
            assert call(ep["url"] + "/v1/models")[0] == 401
            # Replicas on both nodes answer: the Ray cluster spans the allocation.
            seen = {call(ep["url"] + "/health")[1].get("node_id") for _ in range(30)}
            assert len(seen) == 2, seen
    finally:
        for r in recipes.values():
            status.cancel(RunDir.of(r))
    states = wait_for_jobs([j.job_id for j in jobs.values()], timeout=150)
    assert set(states.values()) <= {"CANCELLED", "COMPLETED"}, states
    deadline = time.time() + 60
    while time.time() < deadline and any(RunDir.of(r).endpoint.exists() for r in recipes.values()):
        time.sleep(1)
    assert not any(RunDir.of(r).endpoint.exists() for r in recipes.values())
