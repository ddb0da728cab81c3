"""Stream plumbing between the engine and HTTP: a job's outputs as they come, SSE, and disconnects.

Each choice is its own engine request. Several choices' streams are merged by one task per choice
(a single choice is read directly); closing the merged stream (finished, failed, or the client went
away) closes each engine stream and so aborts its request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from detserve.engine.async_engine import AsyncEngine
from detserve.engine.llm_engine import AdmittedRequest
from detserve.engine.request import RequestOutput
from detserve.server.metrics import RequestTrace

T = TypeVar("T")
Outputs = AsyncIterator[tuple[int, RequestOutput]]
"""(choice index, output) pairs from every choice of one job, as they come."""


async def outputs(engine: AsyncEngine, job_id: str, requests: list[AdmittedRequest],
                  trace: RequestTrace | None) -> Outputs:
    """(choice index, output) from every choice's engine stream, as they come, until all finish;
    each output told to `trace` (metrics and the request log)."""
    streams = _one_stream(engine, job_id, requests[0]) if len(requests) == 1 else \
        _merged_streams(engine, job_id, requests)
    async with contextlib.aclosing(streams) as results:
        async for i, out in results:
            if trace is not None:
                trace.output(i, out)
            yield i, out


async def _one_stream(engine: AsyncEngine, job_id: str, request: AdmittedRequest) -> Outputs:
    """The usual request, one choice, read straight from its engine stream: the pump task and queue
    of `_merged_streams` would cost the event loop a task switch per token, CPU that a small
    machine takes out of the engine's step."""
    async with contextlib.aclosing(engine.generate(f"{job_id}-0", request)) as stream:
        async for out in stream:
            yield 0, out


async def _merged_streams(engine: AsyncEngine, job_id: str, requests: list[AdmittedRequest]) -> Outputs:
    """Several choices' engine streams, merged as their outputs come by one pump task per choice."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async with contextlib.aclosing(engine.generate(f"{job_id}-{i}", requests[i])) as stream:
                async for out in stream:
                    queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(requests))]
    try:
        unfinished = len(tasks)
        while unfinished:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            unfinished -= item.finished
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, or cancel it (aborting its engine requests) and return None if the client leaves first.

    Starlette never cancels a non-streaming handler whose client went away, so we watch for it.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def sse_event(payload: dict, event: str | None = None) -> str:
    """One server-sent event holding `payload` as JSON (named `event`, as the Responses API names them)."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """Closes its event stream however the response ends, so a client that leaves aborts at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
