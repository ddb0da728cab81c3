"""ASGI guards around the routes, outermost first: request tracking and draining, body size, API key.

They are plain ASGI middleware rather than FastAPI dependencies because they must also cover
what never reaches a route: an unknown path, a body cut off at the limit, a client with no key.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from detserve.server.metrics import InFlight, Metrics, RequestTrace
from detserve.server.protocol import APIError

REQUEST_ID_HEADER = "x-request-id"


class TrackRequests:
    """Gives each request a `RequestTrace` (in `request.state.trace`), counts it in flight, and closes it.

    While the server drains, new requests get 503 with Retry-After, except the liveness probe and
    the metrics, so a load balancer moves on and an orchestrator sees the drain.
    """

    OPEN_WHILE_DRAINING = ("/live", "/metrics")

    def __init__(self, app: ASGIApp, in_flight: InFlight, metrics: Metrics, log_prompts: bool,
                 retry_after_seconds: int) -> None:
        self.app = app
        self.in_flight = in_flight
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.retry_after = str(retry_after_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace = RequestTrace(scope["method"], scope["path"], self.metrics)
        scope.setdefault("state", {})["trace"] = trace
        status = 500  # unless a response starts: an exception escaped to the server's 500 handler

        async def send_tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, trace.request_id)
            await send(message)

        if self.in_flight.draining and scope["path"] not in self.OPEN_WHILE_DRAINING:
            error = APIError(503, "the server is shutting down; retry (another replica will answer)",
                             headers={"Retry-After": self.retry_after})
            await error.response()(scope, receive, send_tracked)
            trace.close(status, self.log_prompts)
            return
        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send_tracked)
        finally:
            self.in_flight.count -= 1
            trace.close(status, self.log_prompts)


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
            await APIError(413, too_large.detail).response()(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large  # FastAPI re-raises HTTPExceptions from body reading: the app answers 413
            return message

        await self.app(scope, receive_limited, send)


class RequireAPIKey:
    """Routes under the protected prefixes need `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str, protected: tuple[str, ...]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.protected = protected

    def _is_protected(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.protected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._is_protected(scope.get("path", "")):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or invalid API key: send Authorization: Bearer <key>")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
