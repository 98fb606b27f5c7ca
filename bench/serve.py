"""Serving throughput and latency: the two engines side by side (vLLM vs the HF engine's static batching), or
batching versus no batching in the HF engine.

    .venv/bin/python bench/serve.py [--compare engines|batching] [--served adapter|base] [--max-tokens 32]
                                    [--rounds 4] [--repeats 1] [--recipe recipes/demo.yaml] [key=value ...]

--compare engines (the default): two endpoints of the same recipe, model, adapter, prompts and concurrency, one
replica each, measured one after the other:

  vllm       serve.engine=vllm (continuous batching in vLLM, behind the project's ingress)
  hf         serve.engine=hf, serve.max_batch_size=32 (static batches through HF generate: the baseline)

The shipped tiny model has head size 8, which vLLM's CPU backend lacks: by default this mode runs on
assets/models/stories260K-hd32 (the same model, widened); pass model.name_or_path=... for another model.

--compare batching: two HF endpoints, serve.max_batch_size=32 (batched) and 1 (unbatched); then one-token requests,
one at a time and interleaved: `Generator.generate` called directly in this process, then the same request through
HTTP + Serve to each endpoint; the overhead is the median of the paired differences. Targets: batched >= 5x the
unbatched throughput at concurrency 32; HTTP + Serve adds < 10 ms at p50 (to the unbatched endpoint).

At concurrency 1, 8 and 32 (that many clients, each sending its next request when the previous answer arrives) each
sends `--rounds` x concurrency POST /v1/completions with --max-tokens tokens at temperature 0 over keep-alive
connections; it prints requests/s, generated tokens/s and p50/p95 latency (of the best of --repeats runs, which
alternate between the endpoints), and with --compare engines the p50/p95 time to the first text of a streamed
request (one streamed round at each concurrency). The client runs on the same cores as the server; on a shared
machine the figures scale with the load.
"""
import argparse
import asyncio
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ftlib import recipe as recipe_mod  # noqa: E402
from ftlib.rundir import RunDir  # noqa: E402

PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog was sad because",
           "One day, a bird found a shiny", "Tim wanted to play with his ball"]


def make_adapter(path: Path, recipe) -> None:
    """A LoRA adapter with non-zero B matrices on the recipe's base model (as if trained)."""
    import torch
    from peft import get_peft_model

    from ftlib.model import load_base, lora_config

    torch.manual_seed(0)
    config = lora_config(recipe)
    config.init_lora_weights = False
    get_peft_model(load_base(recipe, device="cpu"), config).save_pretrained(path)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def load(url: str, token: str, concurrency: int, requests_each: int, max_tokens: int, model: str):
    """(requests/s, tokens/s, latencies in s) of `concurrency` clients sending requests back to back."""
    headers = {"Authorization": f"Bearer {token}"}
    latencies, tokens = [], []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector) as session:
        async def client(k):
            for i in range(requests_each):
                body = {"model": model, "prompt": PROMPTS[(k + i) % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0}
                t = time.perf_counter()
                async with session.post("/v1/completions", json=body) as r:
                    answer = await r.json()
                    assert r.status == 200, answer
                latencies.append(time.perf_counter() - t)
                tokens.append(answer["usage"]["completion_tokens"])

        await client(0)  # warm-up: a first request, not counted
        latencies.clear(), tokens.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, sum(tokens) / elapsed, latencies


async def first_text(url: str, token: str, concurrency: int, requests_each: int, max_tokens: int, model: str):
    """Times (s) to the first text of streamed completions, `concurrency` clients at once."""
    headers = {"Authorization": f"Bearer {token}"}
    times = []
    async with aiohttp.ClientSession(url, headers=headers, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def client(k):
            for i in range(requests_each):
                body = {"model": model, "prompt": PROMPTS[(k + i) % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0, "stream": True}
                t, first = time.perf_counter(), None
                async with s.post("/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    async for line in r.content:
                        if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                            first = time.perf_counter() - t
                times.append(first if first is not None else time.perf_counter() - t)

        await asyncio.gather(*(client(k) for k in range(concurrency)))
    return times


async def get_health(url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as r:
            return await r.json()


def one_token_latencies(recipe, endpoints, model: str, n: int):
    """Latencies (s) of one-token requests, interleaved so that all see the same machine load: `Generator.generate`
    called directly in this process (with as many torch threads as a replica gets: serve.cpus_per_replica), then
    the same request through HTTP + Serve to each endpoint (keep-alive connections)."""
    import torch

    from ftlib.serve.engine import Generator, Job, Sampling

    torch.set_num_threads(max(1, int(recipe.serve.cpus_per_replica)))
    gen = Generator(recipe)
    connections = {}
    for name, ep in endpoints.items():
        url = urlsplit(ep.url)
        connections[name] = (http.client.HTTPConnection(url.hostname, url.port), ep.token)
    times = {"direct": [], **{name: [] for name in endpoints}}
    for i in range(n + 3):  # the first three warm up
        prompt = PROMPTS[i % len(PROMPTS)]
        t = time.perf_counter()
        gen.generate([Job(gen.encode(prompt), model, 1, Sampling(temperature=0))])
        times["direct"].append(time.perf_counter() - t)
        for name, (conn, token) in connections.items():
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
            t = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {token}",
                                                           "Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200, response.read()
            response.read()
            times[name].append(time.perf_counter() - t)
    return {name: values[3:] for name, values in times.items()}


def best_runs(args, endpoints, concurrency: int, model: str) -> dict:
    """{endpoint name: (req/s, tok/s, latencies)} of the best of --repeats runs at this concurrency, the runs
    alternating between the endpoints so that both see the same load."""
    best = {}
    for _ in range(args.repeats):
        for name, ep in endpoints.items():
            run = asyncio.run(load(ep.url, ep.token, concurrency, args.rounds, args.max_tokens, model))
            if name not in best or run[0] > best[name][0]:
                best[name] = run
    return best


def stop_all(endpoints, tmp: Path, finished: bool) -> None:
    """Stop the endpoints; keep their logs in tmp if the run did not finish."""
    for ep in endpoints.values():
        ep.stop()
    if finished:
        shutil.rmtree(tmp)
    else:
        print(f"failed; the endpoints' logs are in {tmp}", file=sys.stderr)


def compare_engines(args, adapter, tmp):
    from ftlib.serve.engine import base_model_name
    from ftlib.serve.local import start_local

    recipes = {}
    for name in ("vllm", "hf"):
        recipes[name] = recipe_mod.load(args.recipe, [
            *args.overrides, f"run.dir={tmp / name}", f"serve.adapters={{bench: {adapter}}}", "serve.replicas=1",
            "serve.autoscaling=false", "serve.max_batch_size=32", "serve.max_concurrent_requests=64",
            f"serve.engine={name}", f"serve.max_new_tokens={max(args.max_tokens, 1)}",
            "serve.default_max_new_tokens=1"])
    model = recipes["vllm"].model.name_or_path
    served = "bench" if args.served == "adapter" else base_model_name(recipes["vllm"])
    print(f"model {model}, requests to {served!r} ({args.served}); starting two endpoints (vllm, and hf with "
          f"max_batch_size 32) ...", flush=True)
    endpoints, results, finished = {}, {}, False
    try:
        for name, r in recipes.items():
            t = time.perf_counter()
            endpoints[name] = start_local(r, log_file=str(tmp / f"{name}.log"))
            engine = asyncio.run(get_health(endpoints[name].url))["engine"]
            assert engine == name, f"{name}: the endpoint runs {engine} (see {tmp / (name + '.log')})"
            print(f"  {name}: ready in {time.perf_counter() - t:.0f} s", flush=True)
        print(f"\n{'':6} {'conc':>4} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'ttft50':>8} {'ttft95':>8}")
        for concurrency in (1, 8, 32):
            for name, (rps, tps, lat) in best_runs(args, endpoints, concurrency, served).items():
                ep = endpoints[name]
                ttft = asyncio.run(first_text(ep.url, ep.token, concurrency, 1, args.max_tokens, served))
                results[name, concurrency] = (rps, tps)
                print(f"{name:6} {concurrency:>4} {rps:8.1f} {tps:8.0f} {percentile(lat, 50) * 1e3:8.1f} "
                      f"{percentile(lat, 95) * 1e3:8.1f} {percentile(ttft, 50) * 1e3:8.1f} "
                      f"{percentile(ttft, 95) * 1e3:8.1f}", flush=True)
        finished = True
    finally:
        stop_all(endpoints, tmp, finished)
    print("\nvllm / hf throughput (generated tokens/s):")
    for c in (1, 8, 32):
        print(f"  concurrency {c:>2}: {results['vllm', c][1] / results['hf', c][1]:5.2f}x"
              + ("   (target >= 3x on a ~100M model)" if c == 32 else ""))
    print(f"(load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; figures scale with it)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="requests per client at each concurrency")
    parser.add_argument("--one-token", type=int, default=100, help="one-token requests for the overhead figure")
    parser.add_argument("--repeats", type=int, default=1, help="runs per concurrency and endpoint; the best counts")
    parser.add_argument("--compare", choices=["engines", "batching"], default="engines")
    parser.add_argument("--served", choices=["adapter", "base"], default="adapter",
                        help="--compare engines: requests to the LoRA adapter (default) or to the base model")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from ftlib.serve.local import start_local

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.compare == "engines" and not any(o.startswith("model.name_or_path=") for o in args.overrides):
        args.overrides.append(f"model.name_or_path={ROOT / 'assets' / 'models' / 'stories260K-hd32'}")
    base = recipe_mod.load(args.recipe, args.overrides)
    adapter = RunDir.of(base).adapter
    if not (adapter / "adapter_config.json").is_file() or args.compare == "engines":
        adapter = tmp / "adapter"
        make_adapter(adapter, base)
    if args.compare == "engines":
        return compare_engines(args, adapter, tmp)
    recipes = {}
    for name, batch in (("batched", 32), ("unbatched", 1)):
        recipes[name] = recipe_mod.load(args.recipe, [
            *args.overrides, f"run.dir={tmp / name}", f"serve.adapters={{bench: {adapter}}}", "serve.replicas=1",
            "serve.autoscaling=false", f"serve.max_batch_size={batch}", "serve.max_concurrent_requests=64",
            f"serve.max_new_tokens={max(args.max_tokens, 1)}", "serve.default_max_new_tokens=1"])
    print(f"starting two endpoints (batched: max_batch_size 32, batch_wait_timeout_s "
          f"{recipes['batched'].serve.batch_wait_timeout_s}; unbatched: max_batch_size 1) ...", flush=True)
    endpoints, results, finished = {}, {}, False
    try:
        for name, r in recipes.items():
            endpoints[name] = start_local(r, log_file=str(tmp / f"{name}.log"))
        print(f"\n{'':10} {'conc':>4} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
        for concurrency in (1, 8, 32):
            before = asyncio.run(get_health(endpoints["batched"].url))
            for name, (rps, tps, lat) in best_runs(args, endpoints, concurrency, "bench").items():
                results[name, concurrency] = rps
                print(f"{name:10} {concurrency:>4} {rps:8.1f} {tps:8.0f} {percentile(lat, 50) * 1e3:8.1f} "
                      f"{percentile(lat, 95) * 1e3:8.1f}", flush=True)
        after = asyncio.run(get_health(endpoints["batched"].url))
        print(f"batched endpoint at concurrency 32: {after['batched_prompts'] - before['batched_prompts']} requests "
              f"in {after['batches'] - before['batches']} generate calls (largest batch {after['largest_batch']})")
        one = one_token_latencies(recipes["batched"], endpoints, "bench", args.one_token)
        finished = True
    finally:
        stop_all(endpoints, tmp, finished)
    direct_times = one.pop("direct")
    direct = statistics.median(direct_times)

    print("\nbatched / unbatched throughput (requests/s):")
    for c in (1, 8, 32):
        print(f"  concurrency {c:>2}: {results['batched', c] / results['unbatched', c]:5.2f}x"
              + ("   (target >= 5x)" if c == 32 else ""))
    print(f"\none-token request, p50: generate() directly {direct * 1e3:.1f} ms")
    for name, lat in one.items():
        # The median of paired differences (each HTTP request right after its direct twin) resists load changes.
        adds = statistics.median(h - d for h, d in zip(lat, direct_times))
        print(f"  through HTTP + Serve ({name:9}): {statistics.median(lat) * 1e3:5.1f} ms  -> adds {adds * 1e3:5.1f} ms"
              f"{'   (target < 10 ms)' if name == 'unbatched' else '   (includes the batch wait)'}")
    print(f"(load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; figures scale with it)")


if __name__ == "__main__":
    main()
