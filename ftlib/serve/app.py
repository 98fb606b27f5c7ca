"""The Serve application: one deployment (`Endpoint`) whose FastAPI routes are the HTTP API.

    POST /                      the notebook's format: [{"text": "<prompt>"}] (or {"text": [...]}) ->
                                [{"responses": "<prompt><completion>"}], one answer per prompt, prompt included as
                                in the notebook's output (the prompt is used as sent: the client builds it)
    POST /v1/completions        OpenAI completions (a prompt or a list of prompts; "stream": true for SSE)
    POST /v1/chat/completions   OpenAI chat completions; messages are formatted as the run's training data was: its
                                chat template for `messages` data, else the notebook's Alpaca style
                                (data.prompt_style), see Generator.encode_chat
    GET  /v1/models             the served names: the run's adapter (the default), serve.adapters, the base model
    GET  /health                no token needed; the answering replica, its node and its batching counters

`model` picks the adapter (or the base model by its name). Generation parameters (max_tokens, temperature, top_p,
top_k, num_beams, stop, seed) are checked against the recipe's limits; every bad request gets a 4xx answer in
OpenAI's error format ({"error": {"message", "type", "param", "code"}}) and the replica carries on. Every route but
/health needs `Authorization: Bearer <token>` (401 otherwise).

Concurrent requests meet in `Endpoint.generate_batch` (`@serve.batch`): up to serve.max_batch_size prompts, waiting
at most serve.batch_wait_timeout_s, go through one `Generator.generate` call (requests for different adapters
included; see engine.py).
"""

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
import ray
from ray import serve
from starlette.exceptions import HTTPException

from ftlib.serve.engine import Completion, Generator, Job, Sampling

api = FastAPI(title="ftlib endpoint", docs_url=None, redoc_url=None, openapi_url=None)


# ----------------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """A request we refuse, answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request, e: ApiError):
    return e.response()


@api.exception_handler(HTTPException)
async def _http_error(request, e: HTTPException):  # unknown path, wrong method
    return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()


@api.exception_handler(Exception)
async def _internal_error(request, e: Exception):
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()


def _invalid(e: ValidationError) -> ApiError:
    """The first field pydantic found wrong, as '<field>: <what is wrong>'."""
    def field(err):  # pydantic names the alternatives of a Union in the location: text.str, text.list[str]
        return ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and (p in TYPE_TAGS or "[" in p)))

    errors = e.errors()
    where = field(errors[0])
    reasons = list(dict.fromkeys(err["msg"] for err in errors if field(err) == where))  # a Union: each alternative
    err = errors[0]
    got = f" (got {json.dumps(err['input'])[:80]})" if "input" in err and err["type"] != "missing" else ""
    return ApiError(400, f"{where or 'body'}: {', or '.join(reasons)}{got}", param=where or None)


TYPE_TAGS = {"str", "int", "float", "bool", "none"}


# ----------------------------------------------------------------------------------------------------- requests
class Strict(BaseModel):
    # strict: "0.5" is not a temperature and true is not a max_tokens. Unknown fields (user, logprobs: null, ...)
    # that OpenAI clients send are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class GenerationFields(Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    num_beams: Optional[int] = None
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = None


class NotebookItem(GenerationFields):
    text: Union[str, List[str]]


class CompletionRequest(GenerationFields):
    prompt: Union[str, List[str]]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerationFields):
    messages: List[Message]
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens


async def _parse(request: Request, schema):
    """The request's JSON body validated against `schema` (a model, or a list of models)."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if isinstance(schema, list):
        if not isinstance(body, list):
            raise ApiError(400, f"the body must be a JSON list like [{{\"text\": \"...\"}}], got {type(body).__name__}")
        try:
            return [schema[0].model_validate(item) for item in body]
        except ValidationError as e:
            raise _invalid(e) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise _invalid(e) from None


def _usage(done: List[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in done)
    completion = sum(c.completion_tokens for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ----------------------------------------------------------------------------------------------------- deployment
# serve.ingress pickles the FastAPI app, routes included, when the class is decorated: everything the routes use
# must be defined above this line.
@serve.deployment
@serve.ingress(api)
class Endpoint:
    def __init__(self, recipe, token_sha256: str):
        self.generator = Generator(recipe)
        self.limits = recipe.serve
        self.token_sha256 = token_sha256  # the token itself never leaves the process that made it
        self.created = int(time.time())
        self.stats = {"requests": 0, "batches": 0, "batched_prompts": 0, "largest_batch": 0}
        self.where = {"replica": serve.get_replica_context().replica_id.unique_id,
                      "node_id": ray.get_runtime_context().get_node_id()}
        self.generate_batch.set_max_batch_size(recipe.serve.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(recipe.serve.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # the recipe's values are set in __init__
    async def generate_batch(self, jobs: List[Job]) -> List[Completion]:
        self.stats["batches"] += 1
        self.stats["batched_prompts"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        if any(job.on_text for job in jobs):
            # Streaming needs this event loop free to send tokens while the batch generates.
            return await asyncio.to_thread(self.generator.generate, jobs)
        # Otherwise generate right here. In a thread, the GIL-hungry generate loop would starve this event loop,
        # which takes in the next requests (the next batch): with bench/serve.py here, running in a thread gave
        # ~40% less throughput at concurrency 32. Requests arriving meanwhile wait in Serve's queue.
        return self.generator.generate(jobs)

    # ------------------------------------------------------------------------------------------- routes
    @api.get("/health")
    async def health(self):
        return {"status": "ok", "models": self.generator.models, **self.where, **self.stats}

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "ftlib"} for name in self.generator.models]}

    @api.post("/")
    async def notebook(self, request: Request):
        self._authorize(request)
        items = await _parse(request, [NotebookItem])
        if not items:
            raise ApiError(400, "the list is empty: send [{\"text\": \"<prompt>\"}]")
        prompts = [(item, text) for item in items for text in ([item.text] if isinstance(item.text, str)
                                                               else item.text)]
        self._check_count(len(prompts), "text")
        jobs = [self._job(item, self.generator.encode(text), "text") for item, text in prompts]
        done = await asyncio.gather(*(self.generate_batch(job) for job in jobs))
        return [{"responses": text + c.text} for (_, text), c in zip(prompts, done)]

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = await _parse(request, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._check_count(len(prompts), "prompt")
        jobs = [self._job(body, self.generator.encode(p), "prompt") for p in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": jobs[0].model}
        if body.stream:
            if len(jobs) > 1:
                raise ApiError(400, "stream: streaming takes one prompt, got a list", param="stream")
            return self._stream(jobs[0], lambda text, finish: {
                **head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})
        done = await asyncio.gather(*(self.generate_batch(job) for job in jobs))
        choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(done)]
        return {**head, "choices": choices, "usage": _usage(done)}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await _parse(request, ChatRequest)
        if not body.messages:
            raise ApiError(400, "messages: at least one message is needed", param="messages")
        if body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        job = self._job(body, self.generator.encode_chat(messages), "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": job.model}
        if body.stream:
            def chunk(text, finish, first=False):
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return self._stream(job, chunk, first_chunk=chunk("", None, first=True))
        c = await self.generate_batch(job)
        return {**head, "usage": _usage([c]), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}]}

    # ------------------------------------------------------------------------------------------- helpers
    def _authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token_sha256):
            raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer <token>' (the token is in "
                           "the file that endpoint.json names)", code="invalid_api_key")
        self.stats["requests"] += 1

    def _check_count(self, n: int, param: str) -> None:
        if n == 0:
            raise ApiError(400, f"{param}: no prompt given", param=param)
        if n > self.limits.max_prompts_per_request:
            raise ApiError(400, f"{param}: {n} prompts in one request; the limit is "
                           f"{self.limits.max_prompts_per_request} (serve.max_prompts_per_request)", param=param)

    def _job(self, body: GenerationFields, prompt_ids: List[int], prompt_param: str) -> Job:
        """A generation job from a request's fields, after checking each against the recipe's limits."""
        lim = self.limits

        def bad(param, why):
            raise ApiError(400, f"{param}: {why}", param=param)

        model = body.model or self.generator.models[0]
        if model not in self.generator.models:
            raise ApiError(404, f"model: {model!r} is not served here; the models are "
                           f"{', '.join(self.generator.models)}", param="model", code="model_not_found")
        if body.n not in (None, 1):
            bad("n", f"only n=1 is supported, got {body.n}")
        room = self.generator.context_length - len(prompt_ids)
        if room <= 0:
            raise ApiError(400, f"{prompt_param}: the prompt has {len(prompt_ids)} tokens; this model's context is "
                           f"{self.generator.context_length} tokens", param=prompt_param,
                           code="context_length_exceeded")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(lim.default_max_new_tokens, room)
        if not 1 <= max_tokens <= lim.max_new_tokens:
            bad("max_tokens", f"must be between 1 and {lim.max_new_tokens} (serve.max_new_tokens), got {max_tokens}")
        if max_tokens > room:
            raise ApiError(400, f"max_tokens: the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) "
                           f"exceed this model's context of {self.generator.context_length} tokens",
                           param="max_tokens", code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        top_k = body.top_k or 0
        num_beams = body.num_beams or 1
        if not 0 <= temperature <= 2:
            bad("temperature", f"must be between 0 and 2, got {temperature}")
        if not 0 < top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {top_p}")
        if top_k < 0:
            bad("top_k", f"must be 0 (off) or positive, got {top_k}")
        if not 1 <= num_beams <= lim.max_num_beams:
            bad("num_beams", f"must be between 1 and {lim.max_num_beams} (serve.max_num_beams), got {num_beams}")
        if num_beams > 1 and body.stream:
            bad("num_beams", "beam search cannot stream; use num_beams 1 or stream false")
        if body.seed is not None and not 0 <= body.seed < 2**63:
            bad("seed", f"must be between 0 and 2**63-1, got {body.seed}")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            bad("stop", f"up to 4 non-empty strings, got {stop!r}")
        return Job(prompt_ids, model, max_tokens, Sampling(temperature, top_p, top_k, num_beams, body.seed), stop)

    def _stream(self, job: Job, chunk, first_chunk=None) -> StreamingResponse:
        """Server-sent events: the text as it is generated, then the finish reason, then [DONE]. `chunk(text,
        finish_reason)` makes one event's JSON."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        task = asyncio.ensure_future(self.generate_batch(job))

        def event(data) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            if first_chunk is not None:
                yield event(first_chunk)
            sent = ""
            while not (task.done() and pieces.empty()):
                piece = asyncio.ensure_future(pieces.get())
                await asyncio.wait({piece, task}, return_when=asyncio.FIRST_COMPLETED)
                if piece.done():
                    sent += piece.result()
                    yield event(chunk(piece.result(), None))
                else:
                    piece.cancel()
            try:
                c = task.result()
            except Exception as e:  # the status line has gone out already: report it in the stream
                yield event({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                       "param": None, "code": None}})
            else:
                yield event(chunk(c.text[len(sent):], c.finish_reason))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(recipe, token: str):
    """The Serve application for a recipe: replicas, their resources and autoscaling from `serve.*`."""
    s = recipe.serve
    options = dict(
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        # A replica must take at least a full batch at once; beyond max_ongoing_requests requests wait in the
        # proxy, and beyond max_queued_requests more they get 503.
        max_ongoing_requests=max(s.max_concurrent_requests, s.max_batch_size),
        max_queued_requests=s.max_concurrent_requests,
    )
    if s.autoscaling:
        options["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": s.max_batch_size}
    else:
        options["num_replicas"] = s.replicas
    return Endpoint.options(**options).bind(recipe, hashlib.sha256(token.encode()).hexdigest())
