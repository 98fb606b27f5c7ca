"""The HTTP endpoint, end to end: a real Ray Serve endpoint (start_local) on the tiny model with two LoRA adapters,
real HTTP, the official `openai` client. One endpoint serves the whole module (Ray starts in ~30 s here)."""
import http.client
import json
import os
import re
import signal
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.conftest import DEMO, TINY_MODEL

# Every test here needs the endpoint, which takes ~30 s to start (once per module).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(path: Path, seed: int) -> Path:
    """A LoRA adapter for the tiny model whose B matrices are not zero, so it changes the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    model.save_pretrained(path)
    return path


def serve_recipe(root: Path, *overrides: str):
    """A recipe whose run has its own adapter (served as 'mine') and one more adapter named 'second'."""
    from ftlib import recipe as recipe_mod

    make_adapter(root / "run" / "adapter", seed=1)
    make_adapter(root / "second", seed=2)
    return recipe_mod.load(DEMO, [f"run.dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                  "serve.model_name=mine", f"serve.adapters.second={root / 'second'}", *overrides])


def ray_processes(marker: str):
    """Processes of a Ray node of ours that are still running (Ray's processes inherit FTLIB_RAY_NODE)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if f"FTLIB_RAY_NODE={marker}".encode() in (proc / "environ").read_bytes().split(b"\0") \
                    and (proc / "stat").read_text().split(") ")[1][0] != "Z":
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def call(url: str, body=None, token=None, raw: bytes = None, method=None):
    """(status, parsed JSON) of one HTTP request; errors are answers too."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    from ftlib.serve.local import start_local

    recipe = serve_recipe(tmp_path_factory.mktemp("serve"), "serve.max_prompts_per_request=4",
                          "serve.max_batch_size=8", "serve.max_new_tokens=64", "serve.default_max_new_tokens=8")
    ep = start_local(recipe, timeout_s=180)
    yield ep
    ep.stop()


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=endpoint.url + "/v1", api_key=endpoint.token, max_retries=0, timeout=60)


def greedy(client, model, prompt="Once upon a time", **kw):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=kw.pop("max_tokens", 16), temperature=0,
                                  **kw)
    return r.choices[0]


# ----------------------------------------------------------------------------------------------------- tests
def test_endpoint_json_names_the_token_file_and_the_models(endpoint):
    ep = endpoint.endpoint
    assert ep["models"] == ["mine", "second", "stories260K"] and ep["default_model"] == "mine"
    assert ep["url"] == f"http://127.0.0.1:{ep['port']}" and ep["job_id"] == endpoint.job_id
    token_file = Path(ep["token_file"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert endpoint.token not in Path(endpoint.recipe.run.dir, "endpoint.json").read_text()


def test_notebook_format(endpoint):
    prompt = "Below is an instruction.\n### Instruction:\nTell me a story.\n### Response:\n"
    status, answer = call(endpoint.url + "/", [{"text": prompt}, {"text": ["Once upon a time", "Lily"]}],
                          endpoint.token)
    assert status == 200 and len(answer) == 3
    assert set(answer[0]) == {"responses"}
    # As in the notebook, each response is the prompt followed by the generated text.
    for a, p in zip(answer, [prompt, "Once upon a time", "Lily"]):
        assert a["responses"].startswith(p) and len(a["responses"]) > len(p)


def test_openai_completions_plain_and_streaming(client):
    plain = greedy(client, "mine")
    assert plain.text and plain.finish_reason == "length"
    chunks = list(client.completions.create(model="mine", prompt="Once upon a time", max_tokens=16, temperature=0,
                                            stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert sum(1 for t in texts if t) > 2  # the text arrived in pieces
    assert "".join(texts) == plain.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_chat_plain_and_streaming(client):
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A dog story."}]
    plain = client.chat.completions.create(model="mine", messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].message.content
    assert plain.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="mine", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences_cut_the_text_also_when_streaming(client):
    full = greedy(client, "stories260K", max_tokens=24).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = greedy(client, "stories260K", max_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    chunks = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=24, temperature=0,
                                       stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut.text


def test_adapters_are_selected_by_name(client):
    answers = {m: greedy(client, m).text for m in ("mine", "second", "stories260K")}
    assert len(set(answers.values())) == 3, answers  # each adapter, and the base, answers differently
    assert greedy(client, "second").text == answers["second"]  # deterministic at temperature 0
    assert [m.id for m in client.models.list().data] == ["mine", "second", "stories260K"]


def test_requests_without_the_token_get_401(endpoint):
    for path, body in [("/", [{"text": "hi"}]), ("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/models", None)]:
        for token in (None, "wrong-token"):
            status, answer = call(endpoint.url + path, body, token)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", (path, token)
    bad_client = openai.OpenAI(base_url=endpoint.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.completions.create(model="mine", prompt="hi")
    assert call(endpoint.url + "/health")[0] == 200  # the health check stays open


def test_concurrent_requests_are_batched(endpoint):
    before = call(endpoint.url + "/health")[1]
    results = []

    def one(i):
        results.append(call(endpoint.url + "/v1/completions", {"model": ["mine", "second", "stories260K"][i % 3],
                                                               "prompt": f"Story number {i}", "max_tokens": 16},
                            endpoint.token)[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = call(endpoint.url + "/health")[1]
    assert results == [200] * 12
    assert after["batched_prompts"] - before["batched_prompts"] == 12
    assert after["batches"] - before["batches"] < 12  # some generate calls served several requests (mixed adapters)
    assert after["largest_batch"] > 1


BAD_REQUESTS = [
    # (what, path, body or raw bytes, status, param, words in the message)
    ("malformed JSON", "/v1/completions", b'{"prompt": "hi", ', 400, None, "not valid JSON"),
    ("not an object", "/v1/completions", ["hi"], 400, None, "JSON object"),
    ("missing prompt", "/v1/completions", {"model": "mine"}, 400, "prompt", "Field required"),
    ("wrong type", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("bool as int", "/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ("unknown model", "/v1/completions", {"prompt": "hi", "model": "nope"}, 404, "model", "not served"),
    ("temperature too high", "/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature", "between"),
    ("top_p zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("negative top_k", "/v1/completions", {"prompt": "hi", "top_k": -1}, 400, "top_k", "positive"),
    ("max_tokens over the limit", "/v1/completions", {"prompt": "hi", "max_tokens": 65}, 400, "max_tokens",
     "serve.max_new_tokens"),
    ("max_tokens zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "between"),
    ("too many beams", "/v1/completions", {"prompt": "hi", "num_beams": 9}, 400, "num_beams", "serve.max_num_beams"),
    ("beams and streaming", "/v1/completions", {"prompt": "hi", "num_beams": 2, "stream": True}, 400, "num_beams",
     "cannot stream"),
    ("five stop sequences", "/v1/completions", {"prompt": "hi", "stop": list("abcde")}, 400, "stop", "up to 4"),
    ("negative seed", "/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed", "between"),
    ("n > 1", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", "n=1"),
    ("too many prompts", "/v1/completions", {"prompt": ["a"] * 5}, 400, "prompt", "serve.max_prompts_per_request"),
    ("prompt longer than the context", "/v1/completions", {"prompt": "Once upon a time " * 200}, 400, "prompt",
     "context"),
    ("prompt plus max_tokens over the context", "/v1/completions", {"prompt": "Once upon a time " * 118,
                                                                     "max_tokens": 64}, 400, "max_tokens", "context"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role", "'user'"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages", "at least one"),
    ("notebook body not a list", "/", {"text": "hi"}, 400, None, "JSON list"),
    ("notebook item without text", "/", [{"txt": "hi"}], 400, "text", "Field required"),
    ("notebook text of the wrong type", "/", [{"text": 5}], 400, "text", "valid string"),
]


@pytest.mark.parametrize("what,path,body,status,param,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_in_openai_format(endpoint, what, path, body, status, param, words):
    raw = body if isinstance(body, bytes) else None
    got, answer = call(endpoint.url + path, None if raw else body, endpoint.token, raw=raw)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_unknown_paths_and_methods_answer_in_openai_format(endpoint):
    status, answer = call(endpoint.url + "/v1/nothing", token=endpoint.token)
    assert status == 404 and "/v1/nothing" in answer["error"]["message"]
    status, answer = call(endpoint.url + "/v1/completions", token=endpoint.token)  # GET
    assert status == 405 and answer["error"]["type"] == "invalid_request_error"


def test_the_server_keeps_serving_after_bad_requests(endpoint, client):
    for _, path, body, *_ in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else None
        call(endpoint.url + path, None if raw else body, endpoint.token, raw=raw)
    assert greedy(client, "mine").text
    assert call(endpoint.url + "/health")[1]["status"] == "ok"


# ----------------------------------------------------------------------------------------------------- hostile input
# Requests that must cost the replica little and get a short 4xx: each is followed by a normal request.
def send(url: str, path: str, raw: bytes, token: str, chunked: bool = False):
    """(status, raw answer bytes, seconds) of a POST; `chunked` sends the body without a Content-Length."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    start = time.monotonic()
    if chunked:
        conn.request("POST", path, body=(raw[i:i + 65536] for i in range(0, len(raw), 65536)), headers=headers,
                     encode_chunked=True)
    else:
        conn.request("POST", path, body=raw, headers=headers)
    r = conn.getresponse()
    answer = r.read()
    conn.close()
    return r.status, answer, time.monotonic() - start


SHORT = 600  # bytes: an error answer never echoes more than a short excerpt of the request


def assert_short_error(status, answer, want_status, param="any", words=""):
    assert status == want_status, answer[:300]
    assert len(answer) < SHORT, f"{len(answer)} bytes: {answer[:300]}"
    error = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert param == "any" or error["param"] == param, error
    assert words in error["message"], error


def still_serves(endpoint):
    status, answer = call(endpoint.url + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4},
                          endpoint.token)
    assert status == 200 and answer["choices"][0]["text"], answer


def big_prompt(n_bytes: int) -> str:
    return "Once upon a time " * (n_bytes // 17)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_size_limit_gets_413(endpoint, chunked):
    raw = json.dumps({"prompt": big_prompt(3 << 20), "max_tokens": 4}).encode()  # 3 MiB; the limit here is 1 MiB
    status, answer, _ = send(endpoint.url, "/v1/completions", raw, endpoint.token, chunked=chunked)
    assert_short_error(status, answer, 413, None, "limit of 1048576 bytes")  # 1 MiB: the floor (app.body_limit)
    still_serves(endpoint)


def test_health_answers_while_large_requests_are_tokenized(endpoint):
    """Tokenizing runs off the event loop: /health keeps answering while ~1 MB prompts (under the body limit, over the
    context: 400 once tokenized) are tokenized. On the event loop, /health waited for them (0.9 s here)."""
    raw = json.dumps({"prompt": big_prompt(1_000_000)}).encode()
    assert len(raw) < 1 << 20
    alone = send(endpoint.url, "/v1/completions", raw, endpoint.token)
    assert_short_error(alone[0], alone[1], 400, "prompt", "context")
    assert alone[2] > 0.2, f"a large prompt took only {alone[2]:.2f} s: too quick to tell"
    results, slowest, probes = [], 0.0, 0
    threads = [threading.Thread(target=lambda: results.append(send(endpoint.url, "/v1/completions", raw,
                                                                    endpoint.token)))
               for _ in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        start = time.monotonic()
        assert call(endpoint.url + "/health")[0] == 200
        slowest, probes = max(slowest, time.monotonic() - start), probes + 1
        time.sleep(0.02)
    for status, answer, _ in results:
        assert_short_error(status, answer, 400, "prompt", "context")
    bound = max(0.1, alone[2] / 2)
    assert slowest < bound, (f"/health took {slowest:.2f} s while large requests were tokenized (one takes "
                             f"{alone[2]:.2f} s; {probes} probes)")
    still_serves(endpoint)


HOSTILE = [
    # (what, path, raw body, status, param, words in the message)
    ("100k nested lists", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None,
     "nested"),
    ("a lone surrogate in a prompt", "/v1/completions", b'{"prompt": "Once \\ud800 upon", "max_tokens": 4}', 400,
     "prompt", "surrogate"),
    ("a lone surrogate in a notebook text", "/", b'[{"text": "Once \\udfff upon"}]', 400, "text", "surrogate"),
    ("a 5,000-digit max_tokens", "/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400,
     None, "digits"),
    ("a long invalid stop list", "/v1/completions", json.dumps({"prompt": "hi", "stop": ["x" * 100_000] * 8}).encode(),
     400, "stop", "up to 4"),
    ("a long unknown model name", "/v1/completions", json.dumps({"prompt": "hi", "model": "m" * 500_000}).encode(),
     404, "model", "not served"),
    ("a long invalid role", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "r" * 500_000, "content": "hi"}]}).encode(), 400, "messages.0.role", "'user'"),
]


@pytest.mark.parametrize("what,path,raw,status,param,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_a_short_4xx(endpoint, what, path, raw, status, param, words):
    got, answer, _ = send(endpoint.url, path, raw, endpoint.token)
    assert_short_error(got, answer, status, param, words)
    still_serves(endpoint)


@pytest.mark.timeout(120)
def test_sigterm_stops_the_endpoint_and_leaves_nothing_behind(endpoint):
    """Runs last: the endpoint's process is serve_foreground, stopped as `make serve` is by Ctrl-C / SIGTERM."""
    run = Path(endpoint.recipe.run.dir)
    marker = f"{endpoint.job_id}-0"
    assert ray_processes(marker), "the test cannot see the Ray processes it should check"
    # The node's private folder (token, Ray's temp dir), as its processes name it on their command lines.
    cmdlines = b" ".join(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                         for pid in ray_processes(marker))
    node_dirs = set(re.findall(rf"/tmp/ftlib-{os.getuid()}/n\w+", cmdlines.decode(errors="replace")))
    assert len(node_dirs) == 1, node_dirs
    endpoint.process.send_signal(signal.SIGTERM)
    assert endpoint.process.wait(timeout=90) == 0
    assert ray_processes(marker) == []
    assert not (run / "endpoint.json").exists() and not (run / "serve_token").exists()
    assert not (run / "serve_head.json").exists()
    assert not os.path.exists(node_dirs.pop())  # with the token in it
