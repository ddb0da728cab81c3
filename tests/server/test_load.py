"""Under load: many concurrent streams, bitwise-identical greedy answers, and clients that hang up."""

from __future__ import annotations

import asyncio
import json
import random

import httpx2
import openai
import pytest

from tests.server.conftest import LiveServer

WORDS = "apple river stone cloud seven quietly blue engine forest tomorrow paper light".split()


async def _stream_events(http: httpx2.AsyncClient, body: dict) -> list[dict | str]:
    async with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in response.aiter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


async def test_32_concurrent_streams_all_finish_with_usage_and_done(server: LiveServer):
    async with httpx2.AsyncClient(base_url=server.url, timeout=120) as http:
        bodies = [
            {"model": server.model, "messages": [{"role": "user", "content": " ".join(WORDS[: 1 + i % len(WORDS)])}],
             "max_tokens": 4, "temperature": 0.7, "seed": i, "ignore_eos": True,
             "stream_options": {"include_usage": True}}
            for i in range(32)
        ]
        streams = await asyncio.gather(*(_stream_events(http, body) for body in bodies))
    for events in streams:
        assert events[-1] == "[DONE]"
        *chunks, usage_chunk = events[:-1]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
        assert len(usage_chunk["output_digest"]) == 64
    server.wait_idle()


async def test_repeated_greedy_chat_is_bitwise_identical_while_others_stream(
    aclient: openai.AsyncOpenAI, server: LiveServer
):
    probe = dict(model=server.model, messages=[{"role": "user", "content": "Describe the sea in one line."}],
                 max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)

    async def answer() -> tuple:
        raw = await aclient.chat.completions.with_raw_response.create(**probe)
        resp = raw.parse()
        assert raw.headers["x-detserve-output-digest"] == resp.model_extra["output_digest"]
        choice = resp.choices[0]
        digest = resp.model_extra["output_digest"]
        return choice.message.content, choice.logprobs.content, digest, resp.system_fingerprint

    alone = await answer()
    stop = asyncio.Event()
    streaming = [asyncio.Event() for _ in range(4)]

    async def noise(seed: int) -> int:
        rng, served = random.Random(seed), 0
        while not stop.is_set():
            stream = await aclient.chat.completions.create(
                model=server.model, stream=True, max_tokens=rng.randint(1, 8), temperature=rng.choice([0, 0.9]),
                messages=[{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))}],
                extra_body={"deterministic": rng.random() < 0.5},
            )
            async for _ in stream:
                streaming[seed].set()
            served += 1
        return served

    background = [asyncio.create_task(noise(seed)) for seed in range(4)]
    await asyncio.gather(*(event.wait() for event in streaming))  # company from the first probe, however slow
    answers = []
    for _ in range(5):  # 20 probes, 4 at a time, in changing company
        answers += await asyncio.gather(*(answer() for _ in range(4)))
    stop.set()
    assert all(served > 0 for served in await asyncio.gather(*background))
    assert all(a == alone for a in answers)
    server.wait_idle()


def aborts(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids the engine is asked to abort from now on: a request cut short, not one that ran to its end."""
    aborted: list[str] = []
    real_abort = server.engine.abort

    def abort(request_id: str) -> None:
        aborted.append(request_id)
        real_abort(request_id)

    monkeypatch.setattr(server.engine, "abort", abort)
    return aborted


def test_client_leaving_mid_stream_aborts_its_request_and_frees_its_blocks(server: LiveServer, monkeypatch):
    aborted = aborts(server, monkeypatch)
    usage_before = server.kv_cache_usage
    body = {"model": server.model, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx2.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            assert server.engine.stats().num_running == 1 and server.kv_cache_usage > usage_before
    server.wait_idle()
    assert len(aborted) == 1 and server.kv_cache_usage == usage_before


async def test_client_leaving_a_non_streamed_request_aborts_it(server: LiveServer, monkeypatch):
    aborted = aborts(server, monkeypatch)
    usage_before = server.kv_cache_usage
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True}
    async with httpx2.AsyncClient(base_url=server.url, timeout=120) as http:
        request = asyncio.create_task(http.post("/v1/completions", json=body))
        while server.engine.stats().num_running == 0:  # leave once it runs, not after a guess at its speed
            assert not request.done(), "the request ended before it was seen running"
            await asyncio.sleep(0.01)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    server.wait_idle()
    assert len(aborted) == 1 and server.kv_cache_usage == usage_before
