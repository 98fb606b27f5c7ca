"""serve.engine=vllm: the base model and every served adapter in vLLM, deployed by Ray Serve's LLM library.

    engine_for(recipe)      the engine that will serve (vllm, or hf with the one-line reason vLLM cannot run here)
    serve_python(recipe)    the interpreter of the serving environment (.venv-serve, see env/README.md)
    build_llm(recipe, ...)  the LLM deployment: `ray.serve.llm.build_llm_deployment` of an `LLMConfig` built from
                            serve.* (replicas, autoscaling, CPUs/GPUs, LoRA rank and count), LoRA multiplexing on
    VllmBackend             what the project's ingress (app.py) calls it through: a Serve handle

The project's ingress stays in front (token, notebook format, limits, OpenAI errors) and does what must not differ
between engines: it tokenizes the prompt (chat formatting included) and sends vLLM token ids, so both engines
complete the very same tokens. Adapters load from local folders: Ray's loader only takes cloud URIs, so the
deployment gets `LocalAdapterLoader` (its `model_downloader` hook), which looks the name up in the job's
AdapterRegistry (adapters.py); Serve's multiplexing (`multiplexed_model_id` = "<base>:<adapter>") then loads it
into the engine, at most serve.max_adapters per replica, least recently used out.

Only the serving environment has vLLM: nothing here imports it, or ray.serve.llm, at module level.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import AsyncIterator, Optional, Tuple, Union

from ftlib.serve.engine import Completion, Job

ROOT = Path(__file__).resolve().parents[2]
SERVE_VENV = ROOT / ".venv-serve"
# Head sizes vLLM's CPU attention has kernels for (vLLM 0.29; there is no fallback backend).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def serve_python(recipe) -> Path:
    return Path(recipe.serve.python) if recipe.serve.python else SERVE_VENV / "bin" / "python"


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _model_config(recipe) -> dict:
    path = Path(recipe.model.name_or_path)
    try:
        return json.loads((path / "config.json").read_text())
    except OSError:
        return {}  # a hub name: its config is only known once downloaded


def model_why_not(recipe) -> Optional[str]:
    """Why vLLM cannot serve this recipe's model (one line), or None."""
    s, m = recipe.serve, recipe.model
    if m.quantization.value != "none":
        return f"vLLM does not load bitsandbytes-quantized bases (model.quantization={m.quantization.value})"
    config = _model_config(recipe)
    heads = config.get("num_attention_heads")
    head = config.get("head_dim") or (config["hidden_size"] // heads if heads and "hidden_size" in config else None)
    if s.gpus_per_replica == 0 and head is not None and head not in CPU_HEAD_SIZES:
        return (f"vLLM's CPU backend has no attention kernel for head size {head} (it has "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}; assets/models/stories260K-hd32 is the tiny model widened "
                f"to 32)")
    return None


def env_why_not(recipe) -> Optional[str]:
    """Why the serving environment cannot run the nodes (one line), or None. env/setup.sh writes its stamp last: a
    .venv-serve without one was interrupted while being built, and is not used half-built."""
    if has_vllm():
        return None  # this interpreter is the serving environment
    python = serve_python(recipe)
    if not python.exists():
        return f"the serving environment {python} is missing (make setup-serve builds it; env/README.md)"
    if not recipe.serve.python and not (SERVE_VENV / ".ftlib-setup").is_file():
        return (f"the serving environment {SERVE_VENV} is half-built (no stamp: its set-up did not finish; "
                f"make setup-serve builds it again)")
    return None


def why_not(recipe) -> Optional[str]:
    """Why vLLM cannot serve this recipe here (one line), or None."""
    return model_why_not(recipe) or env_why_not(recipe)


def engine_for(recipe) -> Tuple[str, Optional[str]]:
    """(the engine that serves, the reason when serve.engine=vllm falls back to hf)."""
    if recipe.serve.engine.value == "hf":
        return "hf", None
    reason = why_not(recipe)
    return ("hf", reason) if reason else ("vllm", None)


def lora_rank(recipe, adapters) -> int:
    """serve.max_lora_rank, else the largest rank among the recipe's and the served adapters', rounded up to a
    rank vLLM takes."""
    if recipe.serve.max_lora_rank:
        want = recipe.serve.max_lora_rank
    else:
        ranks = [recipe.lora.r]
        for path in adapters.values():
            try:
                ranks.append(int(json.loads((Path(path) / "adapter_config.json").read_text())["r"]))
            except (OSError, KeyError, ValueError):
                pass
        want = max(ranks)
    return next((r for r in LORA_RANKS if r >= want), LORA_RANKS[-1])


def build_llm(recipe, base_name: str, adapters, context_length: int):
    """The LLM deployment (a bound Serve application) for the recipe. Call with Ray connected."""
    from ray.serve.llm import LLMConfig, build_llm_deployment

    s = recipe.serve
    # On CPU the replica's placement group is one bundle of serve.cpus_per_replica CPUs, the engine's processes
    # included: Ray's default adds the engine's own CPU bundle to the replica actor's, so 2 CPUs per replica asked
    # for 3 and never scheduled on 2-CPU nodes. On GPUs the library's default bundles (one per GPU) stay.
    on_cpu = s.gpus_per_replica == 0
    deployment = {"max_ongoing_requests": s.max_concurrent_requests,
                  "ray_actor_options": {"num_cpus": 0 if on_cpu else s.cpus_per_replica}}
    if s.autoscaling:
        deployment["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                            "target_ongoing_requests": s.max_batch_size}
    else:
        deployment["num_replicas"] = s.replicas
    engine = {"dtype": recipe.model.dtype.value, "max_model_len": context_length, "enable_lora": True,
              "max_lora_rank": lora_rank(recipe, adapters), "max_loras": s.max_adapters,
              "tokenizer": recipe.model.tokenizer or recipe.model.name_or_path,
              "trust_remote_code": recipe.model.trust_remote_code}
    env = {}
    if s.gpus_per_replica == 0:
        engine["enforce_eager"] = True
        env["VLLM_CPU_KVCACHE_SPACE"] = str(s.vllm_kv_cache_gb)
    elif s.gpus_per_replica > 1:
        engine["tensor_parallel_size"] = int(s.gpus_per_replica)
    env.update(s.vllm_env)
    config = LLMConfig(
        model_loading_config={"model_id": base_name, "model_source": recipe.model.name_or_path},
        # CPU: "kind": "cpu" (accelerator_type="CPU" is refused, and nothing set means GPU).
        **({"accelerator_config": {"kind": "cpu"}} if s.gpus_per_replica == 0 else {}),
        lora_config={"max_num_adapters_per_replica": s.max_adapters},
        **({"placement_group_config": {"bundles": [{"CPU": s.cpus_per_replica}]}} if on_cpu else {}),
        engine_kwargs=engine, deployment_config=deployment,
        runtime_env={"env_vars": env} if env else None)
    return build_llm_deployment(config, name_prefix="vllm:", bind_kwargs={"model_downloader": LocalAdapterLoader})


class LocalAdapterLoader:
    """Ray's `model_downloader` hook for LLMServer: the adapter's local folder, from the job's registry, instead of
    a download from cloud storage. `lora_model_id` is "<base>:<adapter>"."""

    def __init__(self, download_timeout_s=None, max_tries: int = 1):
        self.known = {}

    async def load_model_from_config(self, lora_model_id: str, llm_config):
        import ray
        from ray.llm._internal.common.models import global_id_manager
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        from ftlib.serve.adapters import REGISTRY

        if lora_model_id not in self.known:
            name = lora_model_id.split(":", 1)[1]
            path = (await ray.get_actor(REGISTRY).all.remote()).get(name)
            if path is None:
                raise ValueError(f"adapter {name!r} is not registered")
            self.known[lora_model_id] = DiskMultiplexConfig.model_validate({
                "model_id": lora_model_id, "max_total_tokens": None, "local_path": path,
                "lora_assigned_int_id": global_id_manager.next()})
        return self.known[lora_model_id]


class EngineError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param


class VllmBackend:
    """The ingress's side: one job, one request to the LLM deployment, plain or streamed."""

    def __init__(self, handle, base_name: str, recipe, adapters):
        self.handle, self.base_name = handle, base_name
        self.max_lora_rank = lora_rank(recipe, adapters)

    def _call(self, job: Job, stream: bool):
        from ray.serve.llm.openai_api_models import CompletionRequest

        s = job.sampling
        if s.num_beams > 1:
            raise EngineError(400, "num_beams: beam search is served by serve.engine=hf only", param="num_beams")
        model = self.base_name if job.model == self.base_name else f"{self.base_name}:{job.model}"
        fields = dict(model=model, prompt=job.prompt_ids, max_tokens=job.max_tokens, stream=stream, n=1,
                      stop=job.stop or None, temperature=s.temperature)
        if s.temperature > 0:
            fields.update(top_p=s.top_p, seed=s.seed, **({"top_k": s.top_k} if s.top_k else {}))
        if stream:
            fields["stream_options"] = {"include_usage": True}
        handle = self.handle.options(stream=True, multiplexed_model_id="" if model == self.base_name else model)
        return handle.completions.remote(CompletionRequest(**fields))

    async def complete(self, job: Job) -> Completion:
        async for answer in self._call(job, stream=False):
            _raise_if_error(answer)
            choice = answer.choices[0]
            return Completion(choice.text, choice.finish_reason or "length", len(job.prompt_ids),
                              answer.usage.completion_tokens)
        raise EngineError(500, "the engine returned no answer")

    async def stream(self, job: Job) -> AsyncIterator[Union[str, Completion]]:
        """Text pieces as they are generated, then the Completion (its text the whole text)."""
        text, finish, tokens = "", None, 0
        async for batch in self._call(job, stream=True):
            for item in batch if isinstance(batch, list) else [batch]:
                _raise_if_error(item)
                if not isinstance(item, str):
                    continue
                for line in item.splitlines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event and not event.get("choices"):
                        raise EngineError(event["error"].get("code") or 500, event["error"].get("message", ""))
                    for choice in event.get("choices") or []:
                        if choice.get("text"):
                            text += choice["text"]
                            yield choice["text"]
                        finish = choice.get("finish_reason") or finish
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
        yield Completion(text, finish or "length", len(job.prompt_ids), tokens)


def _raise_if_error(answer) -> None:
    error = getattr(answer, "error", None)
    if error is not None and type(answer).__name__ == "ErrorResponse":
        code = getattr(error, "code", 500)
        raise EngineError(code if isinstance(code, int) and 400 <= code < 600 else 500, str(error.message))
