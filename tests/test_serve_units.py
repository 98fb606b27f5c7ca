"""The parts of serving that need no Ray: batched generation with adapters, ports, the tunnel command."""
import socket

import pytest

from ftlib.recipe import RecipeError
from ftlib.serve import cluster
from ftlib.serve.engine import Generator, Job, Sampling, _streamable, alpaca_conversation
from ftlib.serve.tunnel import ssh_command
from tests.test_serve import make_adapter


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from ftlib import recipe as recipe_mod
    from tests.conftest import DEMO

    root = tmp_path_factory.mktemp("gen")
    make_adapter(root / "run" / "adapter", seed=1)
    make_adapter(root / "second", seed=2)
    # A served name with dots and commas, as a sweep's trials have (PEFT's own adapter names may not hold a dot).
    recipe = recipe_mod.load(DEMO, [f"run.dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                    "serve.model_name='learning_rate=0.003,r=8'",
                                    f"serve.adapters.second={root / 'second'}"])
    return Generator(recipe)


GREEDY = Sampling(temperature=0)
MINE = "learning_rate=0.003,r=8"  # the run's own adapter, as the fixture serves it


def test_mixed_adapters_in_one_call_match_separate_calls(generator):
    prompt = generator.encode("Once upon a time")
    alone = {m: generator.generate([Job(prompt, m, 10, GREEDY)])[0].text for m in generator.models}
    together = generator.generate([Job(prompt, m, 10, GREEDY) for m in generator.models])
    assert [c.text for c in together] == [alone[m] for m in generator.models]
    assert len(set(alone.values())) == 3


def test_each_row_keeps_its_own_max_tokens_and_stop(generator):
    prompt = generator.encode("Once upon a time")
    full = generator.generate([Job(prompt, "stories260K", 20, GREEDY)])[0]
    stop = full.text[10:13]
    short, long_, stopped = generator.generate([Job(prompt, "stories260K", 3, GREEDY),
                                                Job(prompt, "stories260K", 20, GREEDY),
                                                Job(prompt, "stories260K", 20, GREEDY, stop=[stop])])
    assert (short.completion_tokens, short.finish_reason) == (3, "length") and full.text.startswith(short.text)
    assert long_.text == full.text and long_.completion_tokens == 20
    assert stopped.text == full.text[:full.text.index(stop)] and stopped.finish_reason == "stop"


def test_streamed_pieces_add_up_to_the_text(generator):
    pieces = []
    prompt = generator.encode("Lily")
    [done] = generator.generate([Job(prompt, MINE, 16, GREEDY, on_text=pieces.append)])
    assert len(pieces) > 2 and done.text.startswith("".join(pieces))


def test_beam_search_and_seeded_sampling(generator):
    prompt = generator.encode("Once upon a time")
    beams = generator.generate([Job(prompt, MINE, 8, Sampling(temperature=0, num_beams=3)),
                                Job(prompt, "stories260K", 4, Sampling(temperature=0, num_beams=3))])
    assert beams[1].completion_tokens <= 4 and all(b.text for b in beams)
    seeded = Sampling(temperature=1.0, top_k=40, seed=7)
    first = generator.generate([Job(prompt, MINE, 12, seeded)])[0].text
    assert generator.generate([Job(prompt, MINE, 12, seeded)])[0].text == first


def test_streaming_holds_back_a_possible_stop_sequence():
    assert _streamable("The end. ###", ["### Instruction"]) == "The end. "
    assert _streamable("The end. #", ["##"]) == "The end. "
    assert _streamable("The end\ufffd", []) == "The end"
    assert _streamable("The end", ["xyz"]) == "The end"


def test_chat_messages_in_alpaca_style():
    from ftlib.data.formats import alpaca_prompt

    for style in ("instruct", "chat"):  # one user message: exactly the training prompt
        assert alpaca_conversation([{"role": "user", "content": "Hi"}], style) == alpaca_prompt("Hi", style=style)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Tell a story"}]
    text = alpaca_conversation(messages, "instruct")
    assert text.startswith("Below is an instruction that describes a task.")
    assert text.endswith("### Instruction:\nHi\n\n### Response:\nHello\n\n### Instruction:\nTell a story\n\n"
                         "### Response:\n")
    chat = alpaca_conversation([{"role": "system", "content": "Be brief."}, messages[0]], "chat")
    assert chat == "Be brief.\n\nUSER: Hi\nASSISTANT:"


def test_chat_requests_use_the_training_template_for_messages_data(generator, make_recipe, tmp_path):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    # The demo trains on Alpaca rows: chat requests get the Alpaca prompt.
    assert generator.encode_chat(messages) == generator.encode(alpaca_conversation(messages, "instruct"))
    # A run trained on `messages` rows: the template of training (here ftlib's default, USER:/ASSISTANT:).
    rows = tmp_path / "chat.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    make_adapter(tmp_path / "run" / "adapter", seed=1)
    chat = Generator(make_recipe(f"data.sources=[{{path: {rows}, format: messages}}]"))
    assert chat.tokenizer.decode(chat.encode_chat(messages)) == "<s>Be kind.\n\nUSER: Hi\nASSISTANT:"


def test_request_bounds_come_from_the_recipe():
    """The request models hold the bounds; the recipe's (serve.*) arrive as the validation context."""
    from pydantic import ValidationError

    from ftlib.recipe import ServeConfig
    from ftlib.serve.app import ApiError, CompletionRequest, _invalid

    for limit in (8, 64):
        limits = ServeConfig(max_new_tokens=limit, default_max_new_tokens=limit, max_prompts_per_request=2)
        ok = CompletionRequest.model_validate({"prompt": "hi", "max_tokens": limit}, context=limits)
        assert ok.max_tokens == limit
        with pytest.raises(ValidationError) as e:
            CompletionRequest.model_validate({"prompt": "hi", "max_tokens": limit + 1}, context=limits)
        error = _invalid(e.value)
        assert (error.status, error.param) == (400, "max_tokens")
        assert error.message == f"max_tokens: must be between 1 and {limit} (serve.max_new_tokens), got {limit + 1}"
    with pytest.raises(ApiError, match=r"prompt: 3 prompts in one request; the limit is 2 \(serve.max_prompts"):
        CompletionRequest.model_validate({"prompt": ["a", "b", "c"]}, context=limits)


def test_the_run_adapter_is_required_unless_others_are_listed(make_recipe):
    from ftlib.serve.engine import served_adapters

    with pytest.raises(FileNotFoundError, match="no trained adapter in .*adapter"):
        served_adapters(make_recipe())


def test_ports_are_reserved_per_job_and_node():
    a = cluster.reserve_ports("job1", 0)
    b = cluster.reserve_ports("job1", 0)  # the same job and rank again (a second node on this host)
    c = cluster.reserve_ports("job2", 1)
    try:
        firsts = {a.first, b.first, c.first}
        assert len(firsts) == 3  # the lock file keeps a taken block from being handed out twice
        for p in (a, b, c):
            ports = [getattr(p, n) for n in cluster.NAMED_PORTS] + list(range(*p.worker_range))
            assert len(set(ports)) == len(ports) and all(p.first <= x < p.first + cluster.BLOCK for x in ports)
            assert cluster.PORT_RANGE[0] <= p.first and p.first + cluster.BLOCK <= cluster.PORT_RANGE[1]
    finally:
        for p in (b, c):
            p.release()
    again = cluster.reserve_ports("job2", 1)  # released: the same job and rank get the same block back
    assert again.first == c.first
    again.release()
    a.release()


def test_a_port_in_use_moves_the_node_to_another_block():
    first = cluster.reserve_ports("busy", 0)
    first.release()
    with socket.socket() as s:
        s.bind(("127.0.0.1", first.gcs))
        s.listen()
        moved = cluster.reserve_ports("busy", 0)
        moved.release()
    assert moved.first != first.first


def test_ssh_command():
    endpoint = {"host": "127.0.1.1", "port": 21234, "url": "http://127.0.1.1:21234"}
    assert ssh_command(endpoint, "login.example.org", 8080) == \
        "ssh -N -o ExitOnForwardFailure=yes -L 8080:127.0.1.1:21234 login.example.org"
    with pytest.raises(FileNotFoundError, match="is the serve job running"):
        ssh_command("/nonexistent/endpoint.json", "login")


@pytest.mark.parametrize("override,words", [("serve.port=70000", "serve.port"),
                                            ("serve.batch_wait_timeout_s=-1", "serve.batch_wait_timeout_s"),
                                            ("serve.max_new_tokens=0", "serve.max_new_tokens")])
def test_serve_limits_are_checked(make_recipe, override, words):
    with pytest.raises(RecipeError, match=words):
        make_recipe(override)


def test_the_serve_modules_import_each_other_without_a_circle():
    """Every import between the modules of ftlib/serve, deferred ones (inside functions) included, goes one way:
    app -> vllm_engine -> cluster -> app was a circle (the Ray-node plumbing of serve.engine=vllm lived in
    vllm_engine); it has one home now, cluster.py, that both engines use."""
    import ast
    from pathlib import Path

    import ftlib.serve

    folder = Path(ftlib.serve.__file__).parent
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    imports = {}
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module.rpartition(".")[2]} if node.module.startswith("ftlib.serve.") else set()
                if node.module == "ftlib.serve":
                    found |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.rpartition(".")[2] for a in node.names if a.name.startswith("ftlib.serve.")}
        imports[name] = (found & modules) - {name}
    assert imports["cluster"] >= {"app", "vllm_engine"} and "vllm_engine" in imports["app"]  # the graph is read

    def circle_from(start, path):
        for nxt in sorted(imports[path[-1]]):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = circle_from(start, path + [nxt])
                if found:
                    return found
        return None

    circles = [c for c in (circle_from(m, [m]) for m in sorted(modules)) if c]
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)
