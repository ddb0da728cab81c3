"""The FastAPI app: thin OpenAI-compatible routes over one AsyncEngine, OpenAI-shaped errors everywhere.

A route only parses its body and hands it to its API's serving object (`server/chat.py`,
`completions.py`, `responses.py`, `tokenization.py`), which admits it and renders the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response

from detserve.engine import __version__
from detserve.engine.async_engine import AsyncEngine
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import ModelInfo
from detserve.server.chat import ServingChat
from detserve.server.completions import ServingCompletion
from detserve.server.config import ServerConfig
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
)
from detserve.server.responses import ServingResponses
from detserve.server.serving import Serving
from detserve.server.tokenization import ServingTokenization

logger = logging.getLogger(__name__)

__all__ = ["ServerConfig", "create_app"]

TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")  # behind the API key, like /v1


@dataclass(frozen=True)
class _API:
    """The serving object of each API surface, and what the probes read."""

    engine: AsyncEngine
    models: Serving
    chat: ServingChat
    completions: ServingCompletion
    responses: ServingResponses
    tokenization: ServingTokenization
    metrics: Metrics
    created: int

    @classmethod
    def of(cls, engine: AsyncEngine, config: ServerConfig, metrics: Metrics) -> "_API":
        return cls(engine, Serving(engine, config), ServingChat(engine, config), ServingCompletion(engine, config),
                   ServingResponses(engine, config), ServingTokenization(engine, config), metrics, int(time.time()))

    def model_card(self, info: ModelInfo) -> dict:
        return {"id": info.name, "object": "model", "created": self.created, "owned_by": "detserve",
                "root": info.root, "parent": None, "max_model_len": info.max_model_len, "permission": []}


def create_app(engine: EngineConfig | AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    """The server app. The model loads in the background at startup, so /health can answer 503 meanwhile."""
    engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    config = config or ServerConfig()
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
    app.state.api = _API.of(engine, config, metrics)
    if config.api_key:  # middleware added last runs first
        protected = ("/v1", *TOKENIZER_ROUTES, *(("/metrics",) if config.protect_metrics else ()))
        app.add_middleware(RequireAPIKey, api_key=config.api_key, protected=protected)
    app.add_middleware(LimitBody, max_bytes=config.max_body_bytes)
    app.add_middleware(TrackRequests, in_flight=in_flight, metrics=metrics, log_prompts=config.log_prompts,
                       retry_after_seconds=config.retry_after_seconds)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    for path, probe in (("/health", health), ("/live", live), ("/metrics", prometheus_metrics), ("/v1/models", models)):
        # HEAD answers as GET without a body (monitoring probes use it); undocumented, like OpenAI's
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)
    app.openapi = functools.partial(_openapi_without_422, app.openapi)
    return app


# -- routes: body -> serving object -> response -------------------------------------------------------

router = APIRouter()


def _api(request: Request) -> _API:
    return request.app.state.api


@router.get("/health")
async def health(request: Request) -> dict:
    """Readiness: 200 only while the model is loaded, the engine runs and the server is not draining."""
    _api(request).models.model_info(None)
    return {"status": "ok"}


@router.get("/live")
async def live(request: Request) -> dict:
    """Liveness: 200 unless the engine has died (loading and draining are alive), so restarts fix only that."""
    engine = _api(request).engine
    if engine.dead:
        raise APIError(503, f"the engine has failed: {engine.error!r}")
    return {"status": "alive"}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(request: Request) -> Response:
    return Response(_api(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    api = _api(request)
    return {"object": "list", "data": [api.model_card(api.models.model_info(None))]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    """One model's card (the SDK's `models.retrieve`); ids may contain slashes, as HF names do."""
    api = _api(request)
    return api.model_card(api.models.model_info(model_id))


@router.post("/v1/chat/completions", responses=SSE_RESPONSE)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _api(request).chat.create(body, request)


@router.post("/v1/completions", responses=SSE_RESPONSE)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _api(request).completions.create(body, request)


@router.post("/v1/responses", responses=SSE_RESPONSE)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """The Responses API subset: runs as a chat completion, answered in the Responses shape."""
    return await _api(request).responses.create(body, request)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    return _api(request).tokenization.tokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    return _api(request).tokenization.tokenizer_info()


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    return _api(request).tokenization.detokenize(body)


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
        logger.exception("the model failed to load; /health answers 503 (`detserve serve` exits)")
        return
    info = engine.info
    logger.info(
        "loaded %s in %.1f s; %s by default; fingerprint %s",
        info.name,
        time.monotonic() - started,
        "deterministic (invariant kernels)" if info.default_deterministic else "fast kernels",
        info.fingerprint(info.default_deterministic),
    )


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
    unknown = [path for path, e in zip(paths, errors) if e["type"] == "extra_forbidden"]
    if unknown:  # OpenAI's own words for a field it does not know
        return _error_response(APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}",
                                        unknown[0]), request)
    message = "; ".join(f"{path}: {e['msg']}" for path, e in list(zip(paths, errors))[:4])
    return _error_response(APIError(400, message, paths[0].split(".")[0] if paths else None), request)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown route, wrong method, body too large) in the OpenAI shape."""
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return _error_response(APIError(exc.status_code, message, headers=exc.headers), request)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: a 500 in the OpenAI shape (Starlette logs the traceback)."""
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}"), request)
