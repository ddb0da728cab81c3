"""The FastAPI app: OpenAI-compatible routes over one AsyncEngine, with OpenAI-shaped errors everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from detserve.engine import __version__
from detserve.engine.async_engine import AsyncEngine
from detserve.engine.config import EngineConfig, option
from detserve.engine.llm_engine import ModelInfo
from detserve.engine.structured import GrammarError, StructuredOutput
from detserve.engine.tokenizer import Tokenizer
from detserve.server import responses, streaming, tools
from detserve.server.metrics import CONTENT_TYPE, InFlight, Metrics, RequestTrace
from detserve.server.middleware import LimitBody, RequireAPIKey, TrackRequests
from detserve.server.protocol import (
    ERROR_RESPONSES,
    SSE_RESPONSE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
    ToolUse,
    GenerationRequest,
)

logger = logging.getLogger(__name__)

DIGEST_HEADER = "x-detserve-output-digest"


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side's options: access, limits that protect the engine, and operations."""

    api_key: str | None = option(None, "require `Authorization: Bearer <key>` on /v1 (default: $DETSERVE_API_KEY)")
    protect_metrics: bool = option(False, "require the API key on /metrics too")
    max_body_bytes: int = option(8 * 2**20, "largest request body accepted; more is a 413")
    max_n: int = option(128, "most choices (n) per request")  # OpenAI's own cap
    max_prompt_tokens: int | None = option(
        None, "longest prompt accepted, in tokens (default: whatever fits the context window)")
    max_waiting_requests: int = option(1024, "requests queued behind the running batch before new ones get 429")
    retry_after_seconds: int = option(1, "the Retry-After of a 429")
    drain_timeout: float = option(30.0, "seconds in-flight requests get to finish after SIGTERM")
    log_prompts: bool = option(False, "put prompt text in the request log lines")

    def __post_init__(self) -> None:
        if self.api_key == "":  # an empty $DETSERVE_API_KEY means no key
            object.__setattr__(self, "api_key", None)
        for name in ("max_body_bytes", "max_n", "max_waiting_requests", "retry_after_seconds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be at least 1")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")


def create_app(engine: EngineConfig | AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    """The server app. The model loads in the background at startup, so /health can answer 503 meanwhile."""
    engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    config = config or ServerConfig()
    created = int(time.time())
    in_flight = InFlight()
    metrics = Metrics(engine, in_flight)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine.ready:  # started by the caller, who also stops it
            yield
            return
        loading = asyncio.create_task(_load(engine))
        yield
        loading.cancel()
        await engine.stop()

    app = FastAPI(title="detserve", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.engine = engine
    app.state.config = config
    app.state.in_flight = in_flight
    if config.api_key:  # middleware added last runs first
        protected = ("/v1", "/metrics") if config.protect_metrics else ("/v1",)
        app.add_middleware(RequireAPIKey, api_key=config.api_key, protected=protected)
    app.add_middleware(LimitBody, max_bytes=config.max_body_bytes)
    app.add_middleware(TrackRequests, in_flight=in_flight, metrics=metrics, log_prompts=config.log_prompts,
                       retry_after_seconds=config.retry_after_seconds)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.openapi = functools.partial(_openapi_without_422, app.openapi)

    def served(model: str | None) -> ModelInfo:
        """The served model's facts, if `model` (when given) is the one we serve; else 503 or 404."""
        if engine.dead:
            raise APIError(503, f"the engine has failed: {engine.error!r}")
        if not engine.ready:
            raise APIError(503, "the model is still loading")
        if model is not None and model != engine.info.name:
            raise APIError(404, f"The model `{model}` does not exist.", "model")
        return engine.info

    @app.get("/health")
    async def health() -> dict:
        """Readiness: 200 only while the model is loaded, the engine runs and the server is not draining."""
        served(None)
        return {"status": "ok"}

    @app.get("/live")
    async def live() -> dict:
        """Liveness: 200 unless the engine has died (loading and draining are alive), so restarts fix only that."""
        if engine.dead:
            raise APIError(503, f"the engine has failed: {engine.error!r}")
        return {"status": "alive"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    def model_card(info: ModelInfo) -> dict:
        return {"id": info.name, "object": "model", "created": created, "owned_by": "detserve",
                "root": info.root, "parent": None, "max_model_len": info.max_model_len, "permission": []}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(served(None))]}

    for path, probe in (("/health", health), ("/live", live), ("/metrics", prometheus_metrics), ("/v1/models", models)):
        # HEAD answers as GET without a body (monitoring probes use it); undocumented, like OpenAI's
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        """One model's card (the SDK's `models.retrieve`); ids may contain slashes, as HF names do."""
        return model_card(served(model_id))

    @app.post("/v1/chat/completions", responses=SSE_RESPONSE)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job, messages = chat_job(body)
        return await _respond(engine, config, job, body, request, messages)

    @app.post("/v1/responses", responses=SSE_RESPONSE)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        """The Responses API subset: runs as a chat completion, answered in the Responses shape."""
        served(body.model)
        with _bad_request():
            chat = body.as_chat()
        job, messages = chat_job(chat)
        job.id = "resp_" + job.id.removeprefix("chatcmpl-")
        settings = body.settings()
        return await _respond(engine, config, job, chat, request, messages,
                              stream=lambda: responses.stream(engine, job, settings),
                              complete=lambda: responses.complete(engine, job, settings))

    def chat_job(body: ChatCompletionRequest) -> tuple[streaming.Job, list[dict]]:
        """The engine job of a chat request: its prompt rendered with tools, its output constraint."""
        info = served(body.model)
        with _bad_request():
            body.check_supported()
            tool_use, structured = body.tool_use(), body.structured_output()
            tokenizer = _tokenizer(engine)
            messages = [m.template_dict() for m in body.messages]
            offered = tool_use.tools if tool_use is not None else []
            takes_tools = tokenizer.template_takes_tools
            prompt = tokenizer.apply_chat_template(tools.prompt_messages(messages, offered, takes_tools),
                                                   tools=offered if takes_tools and offered else None)
            if tool_use is not None and tool_use.forced:
                if structured is not None:
                    raise APIError(400, "a forced tool call cannot also follow a response_format or "
                                        "structured_outputs", "tool_choice")
                structured = tools.forced_call(tool_use.forced), "tool_choice"
            job = _job("chat", engine, info, config, body, [prompt], echo=False, logprobs=body.num_logprobs,
                       max_tokens=body.requested_max_tokens, structured=structured, tool_use=tool_use)
        return job, messages

    @app.post("/v1/completions", responses=SSE_RESPONSE)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        info = served(body.model)
        with _bad_request():
            body.check_supported()
            job = _job("completion", engine, info, config, body, body.prompts(), echo=body.echo,
                       logprobs=body.logprobs, max_tokens=body.max_tokens, structured=body.structured_output())
        return await _respond(engine, config, job, body, request, body.prompt)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        info = served(body.model)
        with _bad_request():
            if (body.prompt is None) == (body.messages is None):
                raise APIError(400, "send exactly one of prompt or messages", "prompt")
            if body.messages is not None:
                tokenizer = _tokenizer(engine)
                messages = tools.prompt_messages([m.template_dict() for m in body.messages], [],
                                                 tokenizer.template_takes_tools)
                tokens = tokenizer.apply_chat_template(messages, body.add_generation_prompt)
            else:
                tokens = _tokenizer(engine).encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        info = served(body.model)
        try:
            info.check_token_ids(body.tokens, "tokens")
        except ValueError as exc:
            raise APIError(400, str(exc), "tokens") from exc
        with _bad_request():
            tokenizer = _tokenizer(engine)
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app


def _openapi_without_422(default_openapi: Callable[[], dict]) -> dict:
    """FastAPI documents its 422 for invalid bodies; this server answers those with 400 (as OpenAI does)."""
    schema = default_openapi()
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    return schema


async def _load(engine: AsyncEngine) -> None:
    started = time.monotonic()
    try:
        await engine.start()
    except Exception:
        logger.exception("the model failed to load; /health answers 503 until a restart")
        return
    info = engine.info
    logger.info(
        "loaded %s in %.1f s; %s by default; fingerprint %s",
        info.name,
        time.monotonic() - started,
        "deterministic (invariant kernels)" if info.default_deterministic else "fast kernels",
        info.fingerprint(info.default_deterministic),
    )


# -- requests -> engine jobs -------------------------------------------------------------------------


@contextlib.contextmanager
def _bad_request() -> Iterator[None]:
    """Turn the ValueErrors that validation raises (engine and protocol alike) into 400s."""
    try:
        yield
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def _tokenizer(engine: AsyncEngine) -> Tokenizer:
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer; send prompts as token ids to /v1/completions")
    return engine.tokenizer


def _job(
    kind: Literal["chat", "completion"],
    engine: AsyncEngine,
    info: ModelInfo,
    config: ServerConfig,
    body: GenerationRequest,
    prompts: list[str | list[int]],
    echo: bool,
    logprobs: int | None,
    max_tokens: int | None,
    structured: tuple[StructuredOutput, str] | None,
    tool_use: ToolUse | None = None,
) -> streaming.Job:
    """`body.n` choices per prompt, each admitted by the engine (which settles max_tokens and the mode).
    `structured`: the output's constraint and the parameter that set it (named in its errors)."""
    if body.n > config.max_n:
        raise APIError(400, f"n must be at most {config.max_n} on this server", "n")
    choice_prompts, choice_params, choice_echoes = [], [], []
    tokenizer = engine.tokenizer
    structured, structured_param = structured or (None, None)
    for prompt in prompts:
        try:
            first = engine.admit(prompt, body.sampling_params(0, max_tokens, logprobs, info, structured))
        except GrammarError as exc:
            raise APIError(400, f"{structured_param}: {exc}", structured_param) from exc
        prompt_ids = first.prompt_token_ids
        if config.max_prompt_tokens is not None and len(prompt_ids) > config.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                                f"{config.max_prompt_tokens}", "messages" if kind == "chat" else "prompt")
        others = [engine.admit(prompt_ids, body.sampling_params(i, max_tokens, logprobs, info, structured))
                  for i in range(1, body.n)]
        if not echo:
            shown = ""
        else:  # after admission, which checked the token ids that decoding reads
            shown = prompt if isinstance(prompt, str) else _tokenizer(engine).decode(prompt, skip_special_tokens=False)
        choice_prompts += [prompt_ids] * body.n
        choice_params += [a.params for a in [first, *others]]
        choice_echoes += [shown] * body.n
    deterministic = choice_params[0].deterministic
    return streaming.Job(
        kind=kind,
        id=("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex,
        model=info.name,
        fingerprint=info.fingerprint(deterministic),
        deterministic=deterministic,
        prompts=choice_prompts,
        params=choice_params,
        echoes=choice_echoes,
        n=body.n,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
        continuous_usage=body.stream_options is not None and body.stream_options.continuous_usage_stats,
        token_text=(lambda t: tokenizer.decode([t], skip_special_tokens=False))
        if tokenizer and not body.return_tokens_as_token_ids else "token_id:{}".format,
        tool_use=tool_use,
        echo_logprobs=echo and logprobs is not None,
        show_prompt_logprobs=body.prompt_logprobs is not None,
        return_token_ids=body.return_token_ids,
    )


async def _respond(
    engine: AsyncEngine,
    config: ServerConfig,
    job: streaming.Job,
    body: GenerationRequest,
    request: Request,
    prompt: object,
    stream: Callable[[], AsyncIterator[str]] | None = None,
    complete: Callable[[], Awaitable[dict]] | None = None,
) -> Response:
    """Admit the job (or 429 when the queue is full), then stream it or answer with the whole body
    (chat and text completions by default; `stream` and `complete` give another API's shape)."""
    waiting = engine.stats().num_waiting
    if waiting + len(job.prompts) > config.max_waiting_requests:
        raise APIError(429, f"the server is at capacity ({waiting} requests waiting); retry shortly",
                       headers={"Retry-After": str(config.retry_after_seconds)})
    trace: RequestTrace = request.state.trace
    trace.admitted(job.id, job.deterministic, body.stream, body.n, len(job.prompts))
    if config.log_prompts:
        trace.prompt = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    job.trace = trace
    if body.stream:
        return streaming.SSEResponse(stream() if stream else streaming.stream(engine, job))
    try:
        result = await streaming.until_disconnected(request, complete() if complete else streaming.complete(engine, job))
    except Exception as exc:
        raise APIError.of(exc) from exc
    if result is None:
        trace.failed(499, "the client disconnected")
        return Response(status_code=499)  # the client is gone; nobody reads this
    digest = result.get("output_digest")
    return JSONResponse(result, headers={DIGEST_HEADER: digest} if digest else None)


# -- errors ------------------------------------------------------------------------------------------


def _error_response(error: APIError, request: Request) -> Response:
    trace: RequestTrace | None = getattr(request.state, "trace", None)
    if trace is not None:
        trace.error = error.message
    return error.response()


async def _api_error(request: Request, exc: APIError) -> Response:
    return _error_response(exc, request)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    """400, not FastAPI's 422, with a message naming the offending fields."""
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return _error_response(APIError(400, f"the request body is not valid JSON: {errors[0]['ctx']['error']}"),
                               request)
    paths = [".".join(str(p) for p in e["loc"][1:]) or "body" for e in errors]
    message = "; ".join(f"{path}: {e['msg']}" for path, e in list(zip(paths, errors))[:4])
    return _error_response(APIError(400, message, paths[0].split(".")[0] if paths else None), request)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown route, wrong method, body too large) in the OpenAI shape."""
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return _error_response(APIError(exc.status_code, message, headers=exc.headers), request)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: a 500 in the OpenAI shape (Starlette logs the traceback)."""
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}"), request)
