"""The FastAPI app: OpenAI-compatible routes over one AsyncEngine, with OpenAI-shaped errors everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from typing import AsyncIterator, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import engine as engine_package
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.tokenizer import Tokenizer
from server import streaming
from server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    GenerationRequest,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20
DIGEST_HEADER = "x-detserve-output-digest"


def create_app(engine: EngineConfig | AsyncEngine, api_key: str | None = None) -> FastAPI:
    """The server app. The model loads in the background at startup, so /health can answer 503 meanwhile."""
    engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine.ready:  # started by the caller, who also stops it
            yield
            return
        loading = asyncio.create_task(_load(engine))
        yield
        loading.cancel()
        await engine.stop()

    app = FastAPI(title="detserve", version=engine_package.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(LimitBody, max_bytes=MAX_BODY_BYTES)
    if api_key:
        app.add_middleware(RequireAPIKey, api_key=api_key)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

    def served(model: str | None) -> LLMEngine:
        """The loaded engine, if `model` (when given) is the one we serve; else 503 or 404."""
        if engine.dead:
            raise APIError(503, f"the engine has failed: {engine.error!r}")
        if not engine.ready:
            raise APIError(503, "the model is still loading")
        if model is not None and model != engine.engine.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model")
        return engine.engine

    @app.get("/health")
    async def health() -> dict:
        served(None)
        return {"status": "ok"}

    @app.get("/version")
    async def version() -> dict:
        return {"version": engine_package.__version__}

    @app.get("/v1/models")
    async def models() -> dict:
        llm = served(None)
        card = {"id": llm.model_name, "object": "model", "created": created, "owned_by": "detserve",
                "root": str(llm.model_dir), "parent": None, "max_model_len": llm.max_model_len, "permission": []}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        llm = served(body.model)
        with _bad_request():
            body.check_supported()
            prompt = _tokenizer(llm).apply_chat_template([m.template_dict() for m in body.messages])
            job = _job("chat", llm, body, [prompt], [""], body.requested_max_tokens, body.num_logprobs)
        return await _respond(engine, job, body.stream, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        llm = served(body.model)
        with _bad_request():
            body.check_supported()
            prompts = body.prompts()
            echoes = [_echo_text(llm, p) if body.echo else "" for p in prompts]
            job = _job("completion", llm, body, [llm.encode_prompt(p) for p in prompts], echoes, body.max_tokens,
                       body.logprobs)
        return await _respond(engine, job, body.stream, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        llm = served(body.model)
        with _bad_request():
            if (body.prompt is None) == (body.messages is None):
                raise APIError(400, "send exactly one of prompt or messages", "prompt")
            if body.messages is not None:
                messages = [m.template_dict() for m in body.messages]
                tokens = _tokenizer(llm).apply_chat_template(messages, body.add_generation_prompt)
            else:
                tokens = _tokenizer(llm).encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": llm.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        llm = served(body.model)
        vocab_size = llm.model_config.vocab_size
        if not all(0 <= t < vocab_size for t in body.tokens):
            raise APIError(400, f"tokens must be token ids in [0, {vocab_size})", "tokens")
        with _bad_request():
            tokenizer = _tokenizer(llm)
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app


async def _load(engine: AsyncEngine) -> None:
    started = time.monotonic()
    try:
        await engine.start()
    except Exception:
        logger.exception("the model failed to load; /health answers 503 until a restart")
        return
    llm = engine.engine
    logger.info(
        "loaded %s in %.1f s; %s by default; fingerprint %s",
        llm.model_name,
        time.monotonic() - started,
        "deterministic (invariant kernels)" if llm.config.default_deterministic else "fast kernels",
        llm.system_fingerprint(llm.config.default_deterministic),
    )


# -- requests -> engine jobs -------------------------------------------------------------------------


@contextlib.contextmanager
def _bad_request() -> Iterator[None]:
    """Turn the ValueErrors that validation raises (engine and protocol alike) into 400s."""
    try:
        yield
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def _tokenizer(llm: LLMEngine) -> Tokenizer:
    if llm.tokenizer is None:
        raise ValueError("this model has no tokenizer; send prompts as token ids to /v1/completions")
    return llm.tokenizer


def _echo_text(llm: LLMEngine, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else _tokenizer(llm).decode(prompt, skip_special_tokens=False)


def _job(
    kind: Literal["chat", "completion"],
    llm: LLMEngine,
    body: GenerationRequest,
    prompts: list[list[int]],
    echoes: list[str],
    max_tokens: int | None,
    logprobs: int | None,
) -> streaming.Job:
    """`body.n` choices per prompt; without max_tokens a choice may use the rest of the context."""
    vocab_size = llm.model_config.vocab_size
    context = min(llm.max_model_len, llm.config.num_kv_blocks * llm.config.block_size)
    choice_prompts, choice_params, choice_echoes = [], [], []
    for prompt, echo in zip(prompts, echoes):
        limit = max_tokens if max_tokens is not None else max(1, context - len(prompt))
        choice_params += [body.sampling_params(i, limit, logprobs, vocab_size) for i in range(body.n)]
        llm.check_fits(len(prompt), limit)
        choice_prompts += [prompt] * body.n
        choice_echoes += [echo] * body.n
    deterministic = llm.config.default_deterministic if body.deterministic is None else body.deterministic
    tokenizer = llm.tokenizer
    return streaming.Job(
        kind=kind,
        id=("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex,
        model=llm.model_name,
        fingerprint=llm.system_fingerprint(deterministic),
        deterministic=deterministic,
        prompts=choice_prompts,
        params=choice_params,
        echoes=choice_echoes,
        n=body.n,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
        token_text=(lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else "token_id:{}".format,
    )


async def _respond(engine: AsyncEngine, job: streaming.Job, stream: bool, request: Request) -> Response:
    if stream:
        return streaming.SSEResponse(streaming.stream(engine, job))
    try:
        body = await streaming.until_disconnected(request, streaming.complete(engine, job))
    except Exception as exc:
        raise APIError.of(exc) from exc
    if body is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    digest = body.get("output_digest")
    return JSONResponse(body, headers={DIGEST_HEADER: digest} if digest else None)


# -- errors ------------------------------------------------------------------------------------------


def _error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400, not FastAPI's 422, with a message naming the offending fields."""
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return _error_response(APIError(400, f"the request body is not valid JSON: {errors[0]['ctx']['error']}"))
    paths = [".".join(str(p) for p in e["loc"][1:]) or "body" for e in errors]
    message = "; ".join(f"{path}: {e['msg']}" for path, e in list(zip(paths, errors))[:4])
    return _error_response(APIError(400, message, paths[0].split(".")[0] if paths else None))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method, body too large) in the OpenAI shape."""
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return _error_response(APIError(exc.status_code, message), exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: a 500 in the OpenAI shape (Starlette logs the traceback)."""
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}"))


class LimitBody:
    """413 for a body over `max_bytes`: declared up front, or found while reading a chunked one."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = HTTPException(413, f"the request body is over {self.max_bytes} bytes")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _error_response(APIError(413, too_large.detail))(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large  # FastAPI re-raises HTTPExceptions from body reading: _http_error answers
            return message

        await self.app(scope, receive_limited, send)


class RequireAPIKey:
    """Every /v1 route needs `Authorization: Bearer <key>`; /health and the rest stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or invalid API key: send Authorization: Bearer <key>")
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
