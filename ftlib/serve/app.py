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

`model` picks the adapter (or the base model by its name). The request models bound every field (max_tokens,
temperature, top_p, top_k, num_beams, stop, seed, the number of prompts), with the recipe's limits where it sets
them; every bad request gets a 4xx answer in OpenAI's error format ({"error": {"message", "type", "param", "code"}})
and the replica carries on. Every route but /health needs `Authorization: Bearer <token>` (401 otherwise: the
`authorize` dependency). A body over `body_limit` (1 MiB at least) gets 413 before it is read; error messages quote
the request only in short excerpts; prompts are tokenized off the event loop, so /health answers meanwhile.

Concurrent requests meet in `Endpoint.generate_batch` (`@serve.batch`): up to serve.max_batch_size prompts, waiting
at most serve.batch_wait_timeout_s, go through one `Generator.generate` call (requests for different adapters
included; see engine.py).
"""

import asyncio
import hashlib
import hmac
import json
import reprlib
import time
import uuid
from typing import Annotated, List, Literal, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, RootModel, ValidationError, WrapValidator,
                      model_validator)
from pydantic_core import PydanticCustomError
import ray
from ray import serve
from starlette.exceptions import HTTPException

from ftlib.serve.adapters import AdapterError, check_adapter, registry
from ftlib.serve.engine import Completion, Generator, Job, Prompts, Sampling

api = FastAPI(title="ftlib endpoint", docs_url=None, redoc_url=None, openapi_url=None)


# ----------------------------------------------------------------------------------------------------- errors
MAX_MESSAGE = 1000  # characters: a message quotes the request only in excerpts (_excerpt); this is the backstop


class ApiError(Exception):
    """A request we refuse, answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        message = _cut(message, MAX_MESSAGE)
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.status in CLOSE_AFTER:
            headers["Connection"] = "close"
        return JSONResponse(body, status_code=self.status, headers=headers)


# Answers after which the connection ends: a client without the token gets nothing more (its body, if any, is not
# read), nor does one whose body stopped arriving. Not 413: the client may still be sending its body, and a closed
# connection would lose it the answer (the proxy's keep-alive timeout ends it if it stops sending).
CLOSE_AFTER = (401, 408)


async def _openai_error(request: Request, e: Exception) -> JSONResponse:
    """Every error answer, in OpenAI's format: our refusals, Starlette's (unknown path, wrong method), and any
    other exception as a 500."""
    if isinstance(e, HTTPException):
        e = ApiError(e.status_code, f"{request.method} {_cut(request.url.path)}: {e.detail}")
    elif not isinstance(e, ApiError):
        e = ApiError(500, f"internal error: {type(e).__name__}: {_cut(str(e), 200)}", kind="server_error")
    return e.response()


# Starlette looks handlers up by the exception's class: one function, registered for the three kinds.
for _kind in (ApiError, HTTPException, Exception):
    api.add_exception_handler(_kind, _openai_error)


_SHORT = reprlib.Repr()  # reprlib cuts long strings, lists and deep nesting before it formats them
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 4, 4, 60, 60


def _excerpt(value, limit: int = 80) -> str:
    """A request's value quoted in an error message: at most `limit` characters, however long or deep it is."""
    return _cut(_SHORT.repr(value), limit)


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _invalid(e: ValidationError) -> ApiError:
    """The first field pydantic found wrong, as '<field>: <what is wrong>, got <excerpt>'."""
    def field(err):  # pydantic names the alternatives of a Union in the location: text.str, stop.list[...];
        # a location that starts with a number is an item of the notebook's list: the field is the parameter.
        loc = err["loc"][1:] if err["loc"] and isinstance(err["loc"][0], int) else err["loc"]
        return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p in TYPE_TAGS or "[" in p or "-" in p)))

    def wrong_type(err):  # in a Union, also each alternative that the value's type is not
        return err["type"].endswith("_type")

    errors = e.errors(include_url=False)
    err = next((err for err in errors if not wrong_type(err)), errors[0])  # the value's own fault, if there is one
    where = field(err)
    reasons = list(dict.fromkeys(x["msg"] for x in errors if field(x) == where and wrong_type(x) == wrong_type(err)))
    got = f", got {_excerpt(err['input'])}" if "input" in err and err["type"] != "missing" else ""
    return ApiError(400, f"{where or 'body'}: {', or '.join(reasons)}{got}", param=where or None)


TYPE_TAGS = {"str", "int", "float", "bool", "none"}


# ----------------------------------------------------------------------------------------------------- requests
# Every bound on a request is here, in its model. The fixed ones are pydantic Field bounds; those that come from the
# recipe (serve.max_new_tokens, ...) are read from the validation context, which is the recipe's `serve` section:
# Model.model_validate(body, context=recipe.serve).
BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                "string_too_short", "string_too_long", "out_of_bounds"}


def bounded(kind, why: str, at_most: Optional[str] = None, **field_bounds):
    """`kind` within pydantic Field bounds (ge, gt, le, lt, min_length, max_length) and, with `at_most`, at most the
    recipe's serve.<at_most>. Out of bounds, the message is 'must be <why>', `why` filled in with the recipe's
    serve section ("between 1 and {max_new_tokens}")."""
    def check(value, handler, info):
        try:
            value = handler(value)
        except ValidationError as e:
            if not any(err["type"] in BOUND_ERRORS for err in e.errors(include_url=False)):
                raise  # the wrong type: pydantic's own message
        else:
            if at_most is None or value <= getattr(info.context, at_most):
                return value
        limits = vars(info.context) if info.context is not None else {}
        raise PydanticCustomError("out_of_bounds", "must be {why}", {"why": why.format_map(limits)})

    return Annotated[(kind, *([Field(**field_bounds)] if field_bounds else []), WrapValidator(check))]


def _unicode(text: str) -> str:
    """Refuses a lone surrogate ("\\ud800", a valid JSON escape): it is no text, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("unicode", "must be valid Unicode: a lone surrogate ({char}) at character {at}",
                                  {"char": f"\\u{ord(text[e.start]):04x}", "at": e.start}) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every text a request carries
MaxTokens = bounded(int, "between 1 and {max_new_tokens} (serve.max_new_tokens)", ge=1, at_most="max_new_tokens")
NumBeams = bounded(int, "between 1 and {max_num_beams} (serve.max_num_beams)", ge=1, at_most="max_num_beams")
Temperature = bounded(float, "between 0 and 2", ge=0, le=2)
TopP = bounded(float, "in (0, 1]", gt=0, le=1)
TopK = bounded(int, "0 (off) or positive", ge=0)
Seed = bounded(int, "between 0 and 2**63-1", ge=0, lt=2**63)
OneChoice = bounded(int, "1 (only n=1 is supported)", ge=1, le=1)
NonEmpty = Annotated[Text, Field(min_length=1)]
Stop = bounded(Union[NonEmpty, Annotated[List[NonEmpty], Field(max_length=4)]], "up to 4 non-empty strings")


# Checks across fields (or list items) raise ApiError, which pydantic lets through unchanged: pydantic would report
# them for the whole model, with no field to name in `param`.
def _count_prompts(n: int, param: str, limits) -> None:
    if n == 0:
        raise ApiError(400, f"{param}: no prompt given", param=param)
    if n > limits.max_prompts_per_request:
        raise ApiError(400, f"{param}: {n} prompts in one request; the limit is {limits.max_prompts_per_request} "
                       f"(serve.max_prompts_per_request)", param=param)


class Strict(BaseModel):
    # strict: "0.5" is not a temperature and true is not a max_tokens. Unknown fields (user, logprobs: null, ...)
    # that OpenAI clients send are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class GenerationFields(Strict):
    model: Optional[Text] = None
    max_tokens: Optional[MaxTokens] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[TopK] = None
    num_beams: Optional[NumBeams] = None
    stop: Optional[Stop] = None
    seed: Optional[Seed] = None
    n: Optional[OneChoice] = None
    stream: Optional[bool] = None

    @model_validator(mode="after")
    def _beams_cannot_stream(self):
        if (self.num_beams or 1) > 1 and self.stream:
            raise ApiError(400, "num_beams: beam search cannot stream; use num_beams 1 or stream false",
                           param="num_beams")
        return self


class NotebookItem(GenerationFields):
    text: Union[Text, List[Text]]

    @property
    def texts(self) -> List[str]:
        return [self.text] if isinstance(self.text, str) else self.text


class NotebookRequest(RootModel[List[NotebookItem]]):
    @model_validator(mode="before")
    @classmethod
    def _a_list(cls, body):
        if not isinstance(body, list):
            raise ApiError(400, f"the body must be a JSON list like [{{\"text\": \"...\"}}], got {type(body).__name__}")
        if not body:
            raise ApiError(400, "the list is empty: send [{\"text\": \"<prompt>\"}]")
        return body

    @model_validator(mode="after")
    def _prompt_count(self, info):
        _count_prompts(sum(len(item.texts) for item in self.root), "text", info.context)
        return self


class CompletionRequest(GenerationFields):
    prompt: Union[Text, List[Text]]

    @property
    def prompts(self) -> List[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @model_validator(mode="after")
    def _prompt_count(self, info):
        _count_prompts(len(self.prompts), "prompt", info.context)
        if self.stream and len(self.prompts) > 1:
            raise ApiError(400, "stream: streaming takes one prompt, got a list", param="stream")
        return self


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, List[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerationFields):
    messages: bounded(List[Message], "a list of at least one message", min_length=1)
    max_completion_tokens: Optional[MaxTokens] = None  # the newer name of max_tokens

    @model_validator(mode="after")
    def _max_tokens(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class AdapterRequest(Strict):
    name: Text
    path: Text


# ----------------------------------------------------------------------------------------------------- bodies
# The largest request body a replica reads (body_limit); a bigger one gets 413 before it is parsed. A body's bulk is
# its prompts, and a prompt longer than the model's context is refused (400) anyway once tokenized. A token is ~4
# bytes of English and seldom over 16 bytes of JSON, \u escapes included, so every request that can succeed fits in
# serve.max_prompts_per_request x context x 16 bytes; the 1 MiB floor leaves room for the JSON around the prompts and
# for chat histories on small-context models. Without a limit, a 20 MB prompt held a replica's event loop 15-20 s
# (tokenizing it), its memory peaked 1.8 GB higher and stayed ~330 MB higher, all for its certain 400.
BODY_BYTES_PER_TOKEN = 16
MIN_BODY_BYTES = 1 << 20
BODY_IDLE_S, BODY_TOTAL_S = 10, 60  # a body that stalls this long, or takes longer in all, gets 408
MAX_DIGITS = 100  # in a JSON number: no field takes over 19 (seed < 2**63); Python's int() refuses over 4,300


def body_limit(limits, context_length: int) -> int:
    return max(MIN_BODY_BYTES, limits.max_prompts_per_request * context_length * BODY_BYTES_PER_TOKEN)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, or 413 as soon as it is known to pass `limit` bytes: by its Content-Length before any of
    it is read, or (chunked, no length) once the bytes read pass the limit; 408 when it stalls (BODY_IDLE_S without a
    byte) or takes over BODY_TOTAL_S in all, rather than holding a connection and a request slot for as long as the
    client likes (ApiError closes the connection with these answers)."""
    too_large = ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and (len(length) > 18 or int(length) > limit):
        raise too_large
    chunks, size = [], 0
    deadline = time.monotonic() + BODY_TOTAL_S
    stream = request.stream().__aiter__()
    while True:
        wait = min(BODY_IDLE_S, deadline - time.monotonic())
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(wait, 0))
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body stopped arriving ({size} bytes after "
                           f"{BODY_TOTAL_S - (deadline - time.monotonic()):.0f} s; a body must come in "
                           f"{BODY_TOTAL_S} s, without a pause of {BODY_IDLE_S} s)", code="request_timeout") from None
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)


def _int(digits: str) -> int:
    if len(digits) > MAX_DIGITS:
        raise ApiError(400, f"the request body has a number of {len(digits)} digits; numbers of up to {MAX_DIGITS} "
                       f"digits are taken")
    return int(digits)


def _load_json(raw: bytes):
    try:
        return json.loads(raw, parse_int=_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {_cut(str(e), 200)}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None


def _usage(done: List[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in done)
    completion = sum(c.completion_tokens for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def authorize(request: Request) -> None:
    """The dependency of every route but /health: 401 unless the request has `Authorization: Bearer <token>`."""
    endpoint = serve.get_replica_context().servable_object  # this replica's Endpoint (Ray gives it to routes as self)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = hashlib.sha256(token.strip().encode()).hexdigest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, endpoint.token_sha256):
        raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer <token>' (the token is in "
                       "the file that endpoint.json names)", code="invalid_api_key")
    endpoint.stats["requests"] += 1


AUTHORIZED = [Depends(authorize)]


# ----------------------------------------------------------------------------------------------------- deployment
# serve.ingress pickles the FastAPI app, routes included, when the class is decorated: everything the routes use
# must be defined above this line.
@serve.deployment
@serve.ingress(api)
class Endpoint:
    def __init__(self, recipe, token_sha256: str, llm=None):
        """`llm`: the handle of the vLLM deployment (serve.engine=vllm); without it this replica generates itself
        (serve.engine=hf)."""
        self.engine = "vllm" if llm is not None else "hf"
        if llm is not None:
            from ftlib.serve.vllm_engine import VllmBackend

            self.generator = Prompts(recipe)
            self.backend = VllmBackend(llm, self.generator.base_name, recipe, self.generator.adapters)
        else:
            self.generator = Generator(recipe)
        self.recipe = recipe
        self.base_path = recipe.model.name_or_path
        self.adapters = registry(dict(self.generator.adapters))  # the job's served adapters (adapters.py)
        self._served = dict(self.generator.adapters)  # {name: folder}: the registry's, as of this replica's last look
        self.limits = recipe.serve
        self.max_body_bytes = body_limit(recipe.serve, self.generator.context_length)
        self.token_sha256 = token_sha256  # the token itself never leaves the process that made it
        self.created = int(time.time())
        self.stats = {"requests": 0, "batches": 0, "batched_prompts": 0, "largest_batch": 0}
        self.where = {"replica": serve.get_replica_context().replica_id.unique_id,
                      "node_id": ray.get_runtime_context().get_node_id()}
        self.generate_batch.set_max_batch_size(recipe.serve.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(recipe.serve.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # the recipe's values are set in __init__
    async def generate_batch(self, jobs: List[Job]) -> List[Completion]:
        """serve.engine=hf: a batch of jobs through this replica's Generator."""
        for name in {job.model for job in jobs} - set(self.generator.models):
            # An adapter loaded at run time (POST /admin/adapters): into the model before its first batch.
            # Batches run one at a time, so no generate call is under way.
            await asyncio.to_thread(self.generator.add, name, self._served[name])
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
        return {"status": "ok", "engine": self.engine, "models": self.models, **self.where, **self.stats}

    @api.get("/v1/models", dependencies=AUTHORIZED)
    async def list_models(self):
        await self._refresh_adapters()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "ftlib"} for name in self.models]}

    @api.post("/admin/adapters", dependencies=AUTHORIZED)
    async def add_adapter(self, request: Request):
        """Serve one more adapter from a local folder, by name, without a restart (every replica: adapters.py)."""
        body = await self._parse(request, AdapterRequest)
        max_rank = self.backend.max_lora_rank if self.engine == "vllm" else None
        try:
            await asyncio.to_thread(check_adapter, body.name, body.path, self.base_path, max_rank)
        except AdapterError as e:
            raise ApiError(400, str(e), param=str(e).split(":")[0]) from None
        if body.name == self.generator.base_name or not await self.adapters.add.remote(body.name, body.path):
            raise ApiError(409, f"name: {_excerpt(body.name)} is served already", param="name",
                           code="adapter_exists")
        await self._refresh_adapters()
        return JSONResponse({"name": body.name, "path": body.path, "models": self.models}, status_code=201)

    @api.post("/", dependencies=AUTHORIZED)
    async def notebook(self, request: Request):
        items = (await self._parse(request, NotebookRequest)).root
        prompts = [(item, text) for item in items for text in item.texts]
        ids = await self._encode(self.generator.encode, [text for _, text in prompts])
        jobs = [await self._job(item, prompt_ids, "text") for (item, _), prompt_ids in zip(prompts, ids)]
        done = await asyncio.gather(*(self._complete(job) for job in jobs))
        return [{"responses": text + c.text} for (_, text), c in zip(prompts, done)]

    @api.post("/v1/completions", dependencies=AUTHORIZED)
    async def completions(self, request: Request):
        body = await self._parse(request, CompletionRequest)
        ids = await self._encode(self.generator.encode, body.prompts)
        jobs = [await self._job(body, prompt_ids, "prompt") for prompt_ids in ids]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": jobs[0].model}
        if body.stream:
            return self._stream(jobs[0], lambda text, finish: {
                **head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})
        done = await asyncio.gather(*(self._complete(job) for job in jobs))
        choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(done)]
        return {**head, "choices": choices, "usage": _usage(done)}

    @api.post("/v1/chat/completions", dependencies=AUTHORIZED)
    async def chat_completions(self, request: Request):
        body = await self._parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        [prompt_ids] = await self._encode(self.generator.encode_chat, [messages])
        job = await self._job(body, prompt_ids, "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": job.model}
        if body.stream:
            def chunk(text, finish, first=False):
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return self._stream(job, chunk, first_chunk=chunk("", None, first=True))
        c = await self._complete(job)
        return {**head, "usage": _usage([c]), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}]}

    # ------------------------------------------------------------------------------------------- helpers
    async def _parse(self, request: Request, schema):
        """The request's JSON body validated against `schema`, within the recipe's limits."""
        body = _load_json(await _read_body(request, self.max_body_bytes))
        if not issubclass(schema, RootModel) and not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
        try:
            return schema.model_validate(body, context=self.limits)
        except ValidationError as e:
            raise _invalid(e) from None

    @staticmethod
    async def _encode(encode, inputs: list) -> List[List[int]]:
        """`encode` of each input, in a thread: a long prompt takes a while to tokenize (~0.5 s for 1 MB), and this
        event loop must go on answering meanwhile (/health, the next requests, the streams)."""
        return await asyncio.to_thread(lambda: [encode(x) for x in inputs])

    @property
    def models(self) -> List[str]:
        return [*self._served, self.generator.base_name]

    async def _refresh_adapters(self) -> None:
        """Learn the adapters loaded at run time (by any replica) from the job's registry."""
        self._served.update(await self.adapters.all.remote())

    async def _job(self, body: GenerationFields, prompt_ids: List[int], prompt_param: str) -> Job:
        """A generation job from a request's fields. The request models have checked them against the recipe's
        limits; what is left needs the model: its names, and its context length against the prompt's tokens."""
        gen = self.generator
        model = body.model or self.models[0]
        if model not in self.models:
            await self._refresh_adapters()
        if model not in self.models:
            raise ApiError(404, f"model: {_excerpt(model)} is not served here; the models are "
                           f"{', '.join(self.models)}", param="model", code="model_not_found")
        room = gen.context_length - len(prompt_ids)
        if room <= 0:
            raise ApiError(400, f"{prompt_param}: the prompt has {len(prompt_ids)} tokens; this model's context is "
                           f"{gen.context_length} tokens", param=prompt_param, code="context_length_exceeded")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(self.limits.default_max_new_tokens, room)
        if max_tokens > room:
            raise ApiError(400, f"max_tokens: the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) "
                           f"exceed this model's context of {gen.context_length} tokens",
                           param="max_tokens", code="context_length_exceeded")
        sampling = Sampling(1.0 if body.temperature is None else body.temperature,
                            1.0 if body.top_p is None else body.top_p, body.top_k or 0, body.num_beams or 1, body.seed)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Job(prompt_ids, model, max_tokens, sampling, stop)

    async def _complete(self, job: Job) -> Completion:
        if self.engine == "hf":
            return await self.generate_batch(job)
        from ftlib.serve.vllm_engine import EngineError

        try:
            return await self.backend.complete(job)
        except EngineError as e:
            raise ApiError(e.status, str(e), param=e.param,
                           kind="invalid_request_error" if e.status < 500 else "server_error") from None

    async def _pieces(self, job: Job):
        """The job's text as it is generated (str pieces), then its Completion."""
        if self.engine == "vllm":
            async for piece in self.backend.stream(job):
                yield piece
            return
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        task = asyncio.ensure_future(self.generate_batch(job))
        while not (task.done() and pieces.empty()):
            piece = asyncio.ensure_future(pieces.get())
            await asyncio.wait({piece, task}, return_when=asyncio.FIRST_COMPLETED)
            if piece.done():
                yield piece.result()
            else:
                piece.cancel()
        yield task.result()

    def _stream(self, job: Job, chunk, first_chunk=None) -> StreamingResponse:
        """Server-sent events: the text as it is generated, then the finish reason, then [DONE]. `chunk(text,
        finish_reason)` makes one event's JSON."""
        def event(data) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            if first_chunk is not None:
                yield event(first_chunk)
            sent = ""
            try:
                async for piece in self._pieces(job):
                    if isinstance(piece, Completion):
                        yield event(chunk(piece.text[len(sent):], piece.finish_reason))
                    elif piece:
                        sent += piece
                        yield event(chunk(piece, None))
            except Exception as e:  # the status line has gone out already: report it in the stream
                yield event({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                       "param": None, "code": None}})
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
    token_sha256 = hashlib.sha256(token.encode()).hexdigest()
    from ftlib.serve.vllm_engine import engine_for

    if engine_for(recipe)[0] == "hf":
        return Endpoint.options(**options).bind(recipe, token_sha256)
    # vllm: this deployment is the ingress only (tokenizing, checks, routing); the LLM deployment, built by Ray
    # Serve's LLM library, holds the model and does the batching (continuously), with its own replicas.
    from ftlib.serve.vllm_engine import build_llm

    prompts = Prompts(recipe)
    llm = build_llm(recipe, prompts.base_name, prompts.adapters, prompts.context_length)
    options["ray_actor_options"] = {"num_cpus": 0}  # takes no core from the engine (2-core nodes)
    options["max_ongoing_requests"] = options["max_queued_requests"] = s.max_concurrent_requests * max(s.replicas, 1)
    return Endpoint.options(**options).bind(recipe, token_sha256, llm)
