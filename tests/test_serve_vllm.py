"""serve.engine=vllm end to end: the real Ray Serve path (the project's ingress in front of Ray Serve's LLM library
and vLLM's CPU build, in the serving environment .venv-serve), on the tiny model widened to head size 32
(assets/models/stories260K-hd32), with two LoRA adapters. An HF-engine endpoint of the same recipe runs alongside:
at temperature 0 in fp32 both must give the same answers. One pair of endpoints serves the whole module."""
import json
import re
import signal
import threading
from pathlib import Path

import openai
import pytest

from tests.conftest import ROOT
from tests.test_serve import call, make_adapter, ray_processes, serve_recipe

WIDE_MODEL = ROOT / "assets" / "models" / "stories260K-hd32"
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(not SERVE_PYTHON.exists(), reason="no serving environment (.venv-serve): make setup")]


def wide_adapter(path: Path, seed: int) -> Path:
    import tests.test_serve as ts

    old, ts.TINY_MODEL = ts.TINY_MODEL, WIDE_MODEL
    try:
        return make_adapter(path, seed)
    finally:
        ts.TINY_MODEL = old


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """{'vllm': endpoint, 'hf': endpoint}, the same recipe but serve.engine, started at the same time."""
    import tests.test_serve as ts
    from ftlib.serve.local import start_local

    root = tmp_path_factory.mktemp("vllm")
    limits = ("serve.max_prompts_per_request=4", "serve.max_new_tokens=64", "serve.default_max_new_tokens=8",
              f"model.name_or_path={WIDE_MODEL}")
    recipes = {}
    old, ts.TINY_MODEL = ts.TINY_MODEL, WIDE_MODEL  # serve_recipe's adapters are made on the widened model
    try:
        for engine in ("vllm", "hf"):
            recipes[engine] = serve_recipe(root / engine, *limits, f"serve.engine={engine}")
    finally:
        ts.TINY_MODEL = old
    wide_adapter(root / "third", seed=3)
    started, errors = {}, []

    def start(engine):
        try:
            started[engine] = start_local(recipes[engine], timeout_s=420, log_file=str(root / f"{engine}.log"))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{engine}: {e}")

    threads = [threading.Thread(target=start, args=(e,)) for e in recipes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, (errors, (root / "vllm.log").read_text()[-4000:] if (root / "vllm.log").exists() else "")
        started["third"] = root / "third"
        yield started
    finally:
        for ep in list(started.values()):
            if hasattr(ep, "stop"):
                ep.stop()


def clients(endpoints):
    return {e: openai.OpenAI(base_url=endpoints[e].url + "/v1", api_key=endpoints[e].token, max_retries=0,
                             timeout=120) for e in ("vllm", "hf")}


def test_the_vllm_endpoint_runs_vllm_and_names_the_models(endpoints):
    ep = endpoints["vllm"]
    status, health = call(ep.url + "/health")
    assert status == 200 and health["engine"] == "vllm" and call(endpoints["hf"].url + "/health")[1]["engine"] == "hf"
    assert ep.endpoint["models"] == ["mine", "second", "stories260K-hd32"]
    c = clients(endpoints)["vllm"]
    assert [m.id for m in c.models.list().data] == ["mine", "second", "stories260K-hd32"]


def answers(client, model, stop):
    """What one engine answers to a set of requests (each a comparable tuple)."""
    out = []
    for prompt, kw in [("Once upon a time", {}), ("Lily and Tom went to the park", {"max_tokens": 24}),
                       ("The little dog was sad because", {"stop": [stop], "max_tokens": 24})]:
        r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=kw.pop("max_tokens", 16),
                                      **kw)
        out.append((r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens))
    chunks = list(client.completions.create(model=model, prompt="One day, a bird found a shiny", max_tokens=16,
                                            temperature=0, stream=True))
    out.append(("".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].choices[0].finish_reason))
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A dog story."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    out.append((chat.choices[0].message.content, chat.choices[0].finish_reason, chat.usage.completion_tokens))
    streamed = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                   stream=True))
    out.append("".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices))
    return out


@pytest.mark.parametrize("model", ["mine", "second", "stories260K-hd32"])
def test_same_answers_as_the_hf_engine_at_temperature_0(endpoints, model):
    c = clients(endpoints)
    full = c["hf"].completions.create(model=model, prompt="The little dog was sad because", max_tokens=24,
                                      temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a stop sequence that cuts the text halfway
    got, want = answers(c["vllm"], model, stop), answers(c["hf"], model, stop)
    assert got == want
    assert got[4][0] == got[5]  # streamed chat adds up to the plain one
    assert got[2][1] == "stop" and got[2][0] == full[:full.index(stop)]


def test_notebook_format_and_token_check_as_with_hf(endpoints):
    body = [{"text": "Below is an instruction.\n### Instruction:\nTell me a story.\n### Response:\n",
             "temperature": 0},
            {"text": ["Once upon a time", "Lily"], "max_tokens": 12, "temperature": 0}]
    got = {e: call(endpoints[e].url + "/", body, endpoints[e].token) for e in ("vllm", "hf")}
    assert got["vllm"][0] == 200 and got["vllm"] == got["hf"] and len(got["vllm"][1]) == 3
    ep = endpoints["vllm"]
    for path, body in [("/", [{"text": "hi"}]), ("/v1/completions", {"prompt": "hi"}), ("/v1/models", None),
                       ("/admin/adapters", {"name": "x", "path": "/tmp"})]:
        for token in (None, "wrong-token"):
            status, answer = call(ep.url + path, body, token)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", (path, token)


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "hi", "model": "nope"}, 404, "model"),
    ({"prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": "Once upon a time " * 200}, 400, "prompt"),
    ({"prompt": "hi", "num_beams": 2}, 400, "num_beams"),
])
def test_limits_and_errors_in_openai_format(endpoints, body, status, param):
    got, answer = call(endpoints["vllm"].url + "/v1/completions", body, endpoints["vllm"].token)
    assert got == status and answer["error"]["param"] == param and set(answer["error"]) == {
        "message", "type", "param", "code"}, answer


def test_concurrent_requests_for_mixed_adapters_answer_as_alone(endpoints):
    ep = endpoints["vllm"]
    models = ["mine", "second", "stories260K-hd32"]
    alone = {m: call(ep.url + "/v1/completions", {"model": m, "prompt": "Story number 7", "max_tokens": 16,
                                                  "temperature": 0}, ep.token)[1]["choices"][0]["text"] for m in models}
    results = {}

    def one(i):
        results[i] = call(ep.url + "/v1/completions", {"model": models[i % 3], "prompt": "Story number 7",
                                                       "max_tokens": 16, "temperature": 0}, ep.token)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i][0] == 200 and results[i][1]["choices"][0]["text"] == alone[models[i % 3]]
               for i in range(12)), results


def test_an_adapter_loaded_at_run_time_is_served_by_name(endpoints):
    """`make load-adapter` (python -m ftlib load-adapter) into the running vLLM endpoint; POST /admin/adapters into
    the HF one; both then answer the new name alike."""
    import subprocess
    import sys

    third = str(endpoints["third"])
    run = endpoints["vllm"].recipe.run.dir
    done = subprocess.run([sys.executable, "-m", "ftlib", "load-adapter", run, "third", third], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and "third" in done.stdout, done.stderr[-2000:]
    hf = endpoints["hf"]
    assert call(hf.url + "/admin/adapters", {"name": "third", "path": third}, hf.token)[0] == 201
    c = clients(endpoints)
    assert [m.id for m in c["vllm"].models.list().data] == ["mine", "second", "third", "stories260K-hd32"]
    got, want = (c[e].completions.create(model="third", prompt="Once upon a time", max_tokens=16, temperature=0)
                 .choices[0].text for e in ("vllm", "hf"))
    base = c["vllm"].completions.create(model="stories260K-hd32", prompt="Once upon a time", max_tokens=16,
                                        temperature=0).choices[0].text
    assert got == want and got != base
    # refused: a name already served, a folder that is no adapter
    ep = endpoints["vllm"]
    status, answer = call(ep.url + "/admin/adapters", {"name": "third", "path": third}, ep.token)
    assert status == 409 and answer["error"]["code"] == "adapter_exists"
    status, answer = call(ep.url + "/admin/adapters", {"name": "fourth", "path": str(ROOT)}, ep.token)
    assert status == 400 and "adapter_config.json" in answer["error"]["message"]


def test_sigterm_stops_the_vllm_endpoint_and_leaves_nothing_behind(endpoints):
    """Runs last."""
    ep = endpoints["vllm"]
    run = Path(ep.recipe.run.dir)
    marker = f"{ep.job_id}-0"
    assert ray_processes(marker)
    ep.process.send_signal(signal.SIGTERM)
    assert ep.process.wait(timeout=150) == 0
    assert ray_processes(marker) == []
    assert not (run / "endpoint.json").exists() and not (run / "serve_token").exists()
    # The node (under the serving environment's interpreter) names what stopped it: the SIGTERM passed on by the
    # process that started it, which is still there.
    log = (run.parent.parent / "vllm.log").read_text(errors="replace")
    assert re.search(r"node 0: stopping \(SIGTERM\)\n", log), log[-3000:]


def test_a_model_vllm_cannot_run_falls_back_to_hf_saying_why(make_recipe):
    from ftlib.serve.vllm_engine import engine_for

    engine, reason = engine_for(make_recipe("serve.engine=vllm"))  # the shipped tiny model: head size 8
    assert engine == "hf" and "head size 8" in reason and "\n" not in reason
    assert engine_for(make_recipe("serve.engine=vllm", f"model.name_or_path={WIDE_MODEL}")) == ("vllm", None)
    assert engine_for(make_recipe("serve.engine=hf", f"model.name_or_path={WIDE_MODEL}")) == ("hf", None)
