"""A tiny OpenAI-compatible server whose answers the test controls: divergence, logprob drift, failures, delays.

It tells probes (requests whose prompt is `Behaviour.probe_prompt`) from background load, numbers
the probes in arrival order, and records what it saw, so tests can check both what the benchmarks
report and what they sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, StreamingResponse

from detserve.server.bench.determinism import DEFAULT_PROMPT

MODEL = "fake-model"
FINGERPRINT = "fp_fake"
ANSWER = ["Richard", " Feynman", " was", " a", " physicist", "."]


@dataclass
class Behaviour:
    """Every `k`-th probe (k = the `*_every` value; 0 = never) is changed; the k-1, 2k-1, ... th in arrival order."""

    probe_prompt: str = DEFAULT_PROMPT
    diverge_every: int = 0  # these probes get the token " alt<probe number>" at `diverge_at`
    diverge_at: int = 2
    drift_every: int = 0  # these probes get `drift` added to the logprob at `drift_at`
    drift_at: int = 1
    drift: float = 0.25
    fail_every: int = 0  # these probes get an HTTP 500
    token_delay: float = 0.0  # seconds per generated token
    gather: int = 0  # each request waits (at most a minute) until this many have arrived since the reset


@dataclass
class Seen:
    """One request as the fake received it."""

    body: dict[str, Any]
    probe: bool
    background_in_flight: int  # non-probe requests being served when it arrived


@dataclass
class FakeServer:
    url: str = ""  # the /v1 base URL, once serving
    behaviour: Behaviour = field(default_factory=Behaviour)
    seen: list[Seen] = field(default_factory=list)
    num_probes: int = 0
    in_flight: int = 0
    background_in_flight: int = 0
    max_in_flight: int = 0

    def reset(self, **behaviour: Any) -> FakeServer:
        """A new behaviour and an empty record; the in-flight counts stay live."""
        self.behaviour = Behaviour(**behaviour)
        self.seen = []
        self.num_probes = 0
        self.max_in_flight = self.in_flight
        return self

    @property
    def probes(self) -> list[Seen]:
        return [s for s in self.seen if s.probe]

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": MODEL, "object": "model", "root": MODEL, "owned_by": "test"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._generate("chat", await request.json())

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate("completions", await request.json())

        return app

    async def _generate(self, kind: str, body: dict[str, Any]):
        prompt = body["messages"][-1]["content"] if kind == "chat" else body["prompt"]
        probe = prompt == self.behaviour.probe_prompt
        self.seen.append(Seen(body, probe, self.background_in_flight))
        number = self.num_probes
        self.num_probes += probe
        if probe and _every(self.behaviour.fail_every, number):
            return JSONResponse({"error": {"message": "injected failure", "type": "InternalServerError"}}, 500)
        tokens, logprobs = self._output(body.get("max_tokens") or 16, probe, number)
        wants_logprobs = bool(body.get("logprobs")) if kind == "chat" else body.get("logprobs") is not None
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens),
                 "total_tokens": len(prompt.split()) + len(tokens)}
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)
            events = self._events(kind, tokens, logprobs, wants_logprobs, usage if include_usage else None)
            return StreamingResponse(self._stream(events, probe), media_type="text/event-stream")
        with self._in_flight(probe):
            await self._gathered()
            await asyncio.sleep(self.behaviour.token_delay * len(tokens))
        choice = _choice(kind, "".join(tokens), tokens, logprobs, wants_logprobs, "message", "length")
        return {"id": "x", "object": kind, "model": MODEL, "system_fingerprint": FINGERPRINT,
                "choices": [choice], "usage": usage}

    def _output(self, max_tokens: int, probe: bool, number: int) -> tuple[list[str], list[float]]:
        if not probe:
            return [" bg"] * max_tokens, [-1.0] * max_tokens
        b = self.behaviour
        tokens = [ANSWER[i % len(ANSWER)] for i in range(max_tokens)]
        logprobs = [-0.5 - 0.01 * i for i in range(max_tokens)]
        if _every(b.diverge_every, number) and b.diverge_at < max_tokens:
            tokens[b.diverge_at] = f" alt{number}"
        if _every(b.drift_every, number) and b.drift_at < max_tokens:
            logprobs[b.drift_at] += b.drift
        return tokens, logprobs

    @contextlib.contextmanager
    def _in_flight(self, probe: bool) -> Iterator[None]:
        self.in_flight += 1
        self.background_in_flight += not probe
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.background_in_flight -= not probe

    async def _gathered(self) -> None:
        """Hold a request until `Behaviour.gather` have arrived: overlap then shows however slow the client is."""
        deadline = time.monotonic() + 60
        while len(self.seen) < self.behaviour.gather and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def _stream(self, events: AsyncIterator[str], probe: bool) -> AsyncIterator[str]:
        """`events`, counted as in flight until they end or the client goes away."""
        with self._in_flight(probe):
            await self._gathered()
            async for event in events:
                yield event

    async def _events(
        self, kind: str, tokens: list[str], logprobs: list[float], wants_logprobs: bool, usage: dict | None
    ) -> AsyncIterator[str]:
        """Like vLLM: a role-only opener (chat), a chunk per token, an empty closer with the finish reason."""
        def event(choices: list[dict], **more: Any) -> str:
            chunk = {"id": "x", "object": kind, "model": MODEL, "system_fingerprint": FINGERPRINT, "choices": choices}
            return f"data: {json.dumps(chunk | more)}\n\n"

        if kind == "chat":
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        for token, logprob in zip(tokens, logprobs):
            await asyncio.sleep(self.behaviour.token_delay)
            yield event([_choice(kind, token, [token], [logprob], wants_logprobs, "delta", None)])
        yield event([_choice(kind, "", [], [], False, "delta", "length")])
        if usage is not None:
            yield event([], usage=usage)
        yield "data: [DONE]\n\n"


def _every(k: int, number: int) -> bool:
    return k > 0 and number % k == k - 1


def _choice(kind: str, text: str, tokens: list[str], logprobs: list[float], wants_logprobs: bool, key: str,
            finish_reason: str | None) -> dict[str, Any]:
    if kind == "chat":
        content = [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in zip(tokens, logprobs)]
        return {"index": 0, key: {"role": "assistant", "content": text},
                "logprobs": {"content": content} if wants_logprobs else None, "finish_reason": finish_reason}
    lp = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": [{t: v} for t, v in zip(tokens, logprobs)],
          "text_offset": [0] * len(tokens)}
    return {"index": 0, "text": text, "logprobs": lp if wants_logprobs else None, "finish_reason": finish_reason}
