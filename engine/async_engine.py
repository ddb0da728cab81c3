"""The asyncio face of the engine: one background loop drives `step()`; each request streams from its queue.

Engine state is only touched between steps, on the event loop: new requests and aborts are queued
and applied before the next step, and the step itself runs in a worker thread so the event loop
keeps serving HTTP while the model computes. Always the same thread: torch's OpenMP pool belongs
to the thread that calls it, and a step hopping between two threads of asyncio's default pool
kept two pools whose idle workers spin on the cores the other needs (measured: 33 against 78
tokens/s in-process at concurrency 1, on 2 cores).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import AsyncIterator

from engine.config import EngineConfig
from engine.llm_engine import AdmittedRequest, EngineStats, LLMEngine, ModelInfo
from engine.request import RequestOutput, SamplingParams
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served until the process restarts."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (a server fault); the engine and every other request go on."""


class AsyncEngine:
    """What the server uses of the engine, and all it uses: the model's facts (`info`, `tokenizer`),
    `admit` to check a request, `generate` to run it, `abort`, `stats()`, and the lifecycle."""

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None) -> None:
        """`engine`: an already loaded engine for `config` (shared between tests, or embedded use)."""
        self.config = config
        self.engine = engine
        self.error: BaseException | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending_adds: list[tuple[str, str | list[int], SamplingParams]] = []
        self._pending_aborts: list[str] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detserve-engine")

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (in a thread, so the server can answer 503 meanwhile) and start the loop."""
        if self.engine is None:
            try:
                self.engine = await asyncio.get_running_loop().run_in_executor(self._thread, LLMEngine, self.config)
            except BaseException as exc:
                self.error = exc
                raise
        self._loop_task = asyncio.create_task(self._run(), name="detserve-engine-loop")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, EngineDeadError):
                pass
            self._loop_task = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.error is None and self._loop_task is not None

    @property
    def dead(self) -> bool:
        return self.error is not None

    @property
    def info(self) -> ModelInfo:
        """The served model's facts (once loaded; still known after the engine loop failed)."""
        return self._loaded().info

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer, for chat templates and token text; None for a model without one."""
        return self._loaded().tokenizer

    def admit(self, prompt: str | list[int], params: SamplingParams) -> AdmittedRequest:
        """Check a request and settle its defaults (`LLMEngine.admit`); ValueError says what is wrong."""
        return self._require_engine().admit(prompt, params)

    # -- requests ----------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until it finishes. Closing the stream early aborts the request.

        Raises ValueError before the first output for a request the engine cannot serve (admission
        runs when the engine takes the request, between steps).
        """
        self._require_engine()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append((request_id, prompt, params))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (e.g. its client disconnected); its blocks are freed before the next step."""
        self._pending_aborts.append(request_id)
        self._wake.set()

    def abort_all(self) -> None:
        """Abort every request (a drain ran out of time): each stream ends with an abort, not a hang."""
        for request_id in list(self._queues):
            self.abort(request_id)

    @property
    def num_streams(self) -> int:
        """Requests whose output stream is open (0 once every request has ended one way or another)."""
        return len(self._queues)

    def stats(self) -> EngineStats:
        """The engine's snapshot; requests admitted but not yet taken by the loop count as waiting."""
        stats = self._require_engine().stats()
        return replace(stats, num_waiting=stats.num_waiting + len(self._pending_adds))

    def _loaded(self) -> LLMEngine:
        if self.engine is None:
            raise EngineDeadError(f"the engine failed to load: {self.error!r}" if self.error else
                                  "the engine is still loading")
        return self.engine

    def _require_engine(self) -> LLMEngine:
        """The engine, if it can take work."""
        if self.error is not None:
            raise EngineDeadError(f"the engine has failed: {self.error!r}")
        return self._loaded()

    # -- the loop ----------------------------------------------------------------------------------

    def _apply_pending(self, engine: LLMEngine) -> None:
        adds, self._pending_adds = self._pending_adds, []
        for request_id, prompt, params in adds:
            if request_id not in self._queues:  # aborted before it was ever added
                continue
            try:
                engine.add_request(request_id, prompt, params)
            except ValueError as exc:  # the client's fault, as if generate() had raised it
                self._queues.pop(request_id).put_nowait(exc)
        aborts, self._pending_aborts = self._pending_aborts, []
        for request_id in aborts:
            output = engine.abort_request(request_id)
            queue = self._queues.pop(request_id, None)
            if output is not None and queue is not None:
                queue.put_nowait(output)

    async def _run(self) -> None:
        engine = self._require_engine()
        try:
            while True:
                self._apply_pending(engine)
                if not engine.has_unfinished_requests():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                for output in await asyncio.get_running_loop().run_in_executor(self._thread, engine.step):
                    queue = self._queues.get(output.request_id)
                    if queue is None:
                        continue
                    queue.put_nowait(RequestFailedError(output.error) if output.error else output)
                    if output.finished:
                        del self._queues[output.request_id]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.exception("engine loop failed")
            self.error = exc
            for queue in self._queues.values():
                queue.put_nowait(EngineDeadError(f"the engine failed: {exc!r}"))
            self._queues.clear()
            raise EngineDeadError(str(exc)) from exc
