"""Operating the server: Prometheus metrics, request ids, one JSON log line per request, and the limits."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from detserve.engine.async_engine import AsyncEngine
from detserve.server.app import ServerConfig
from tests.server.conftest import LiveServer, serve

KEY = "sk-ops-test"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: httpx2.Client, **headers: str) -> Samples:
    response = http.get("/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_count_tokens_modes_and_latencies(server: LiveServer, http: httpx2.Client, client: openai.OpenAI):
    before = scrape(http)
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True, "deterministic": True},
    )
    chunks = list(client.completions.create(
        model=server.model, prompt="The sky is", max_tokens=3, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "deterministic": False},
    ))
    server.wait_idle()
    after = scrape(http)
    prompt_tokens = chat.usage.prompt_tokens + chunks[-1].usage.prompt_tokens
    assert grew(before, after, "detserve:prompt_tokens_total") == prompt_tokens
    assert grew(before, after, "detserve:generation_tokens_total") == 5 + 3
    assert grew(before, after, "detserve:requests_total", mode="deterministic") == 1
    assert grew(before, after, "detserve:requests_total", mode="fast") == 1
    assert grew(before, after, "detserve:request_success_total", finished_reason="length") == 2
    for histogram, observations in [
        ("detserve:time_to_first_token_seconds", 2),
        ("detserve:inter_token_latency_seconds", 4 + 2),
        ("detserve:e2e_request_latency_seconds", 2),
        ("detserve:request_queue_time_seconds", 2),
    ]:
        assert grew(before, after, histogram + "_count") == observations, histogram
        assert grew(before, after, histogram + "_sum") > 0, histogram
    assert value(after, "detserve:num_requests_running") == 0
    assert value(after, "detserve:num_requests_waiting") == 0
    assert value(after, "detserve:kv_cache_usage_perc") == 0
    assert value(after, "detserve:engine_healthy") == 1 and value(after, "detserve:draining") == 0


def test_metrics_show_a_running_request_and_errors_by_status(server: LiveServer, http: httpx2.Client):
    before = scrape(http)
    body = {"model": server.model, "prompt": "Tell me a story.", "max_tokens": 12, "ignore_eos": True,
            "stream": True, "deterministic": False}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        during = scrape(http)
        list(lines)
    assert http.post("/v1/completions", json={"model": server.model, "prompt": "x", "max_tokens": -1}).status_code == 400
    assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    server.wait_idle()
    after = scrape(http)
    assert value(during, "detserve:num_requests_running") == 1
    assert 0 < value(during, "detserve:kv_cache_usage_perc") < 1
    assert value(during, "detserve:http_requests_in_flight") >= 1
    assert grew(before, after, "detserve:request_errors_total", status="400") == 1
    assert grew(before, after, "detserve:request_errors_total", status="404") == 1
    assert value(after, "detserve:prefix_cache_queries_total") >= value(after, "detserve:prefix_cache_hits_total")


def test_every_response_names_its_request_id(server: LiveServer, http: httpx2.Client):
    response = http.post("/v1/chat/completions", json={
        "model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == response.json()["id"]


def _log_lines(caplog: pytest.LogCaptureFixture, request_id: str, timeout: float = 120.0) -> list[dict]:
    """The request log lines for `request_id` (the line is written just after the response goes out).

    Returns as soon as one is there: `timeout` only catches a line that never comes.
    """
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "detserve.requests"]
        mine = [line for line in lines if line["request_id"] == request_id]
        if mine or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


SECRET = "zebra-violet-lighthouse"


def test_each_request_logs_one_json_line_without_the_prompt(server: LiveServer, http: httpx2.Client,
                                                            caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="detserve.requests"):
        response = http.post("/v1/chat/completions", json={
            "model": server.model, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 3,
            "temperature": 0, "ignore_eos": True})
        [line] = _log_lines(caplog, response.json()["id"])
        bad = http.post("/v1/chat/completions", json={"model": server.model, "messages": []})
        [bad_line] = _log_lines(caplog, bad.headers["x-request-id"])
    usage = response.json()["usage"]
    assert line["status"] == 200 and line["path"] == "/v1/chat/completions" and line["method"] == "POST"
    assert line["deterministic"] is True and line["stream"] is False and line["n"] == 1
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], 3)
    assert line["finish_reasons"] == ["length"]
    assert 0 < line["ttft_s"] <= line["latency_s"]
    assert "prompt" not in line
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert bad.status_code == 400 and bad_line["status"] == 400
    assert bad_line["error"] == bad.json()["error"]["message"]


def test_log_prompts_puts_the_prompt_in_the_log_line(server: LiveServer, caplog: pytest.LogCaptureFixture):
    with serve(server.engine, ServerConfig(log_prompts=True)) as live, httpx2.Client(base_url=live.url) as http:
        with caplog.at_level(logging.INFO, logger="detserve.requests"):
            response = http.post("/v1/completions", json={"model": server.model, "prompt": SECRET, "max_tokens": 1})
            [line] = _log_lines(caplog, response.json()["id"])
    assert line["prompt"] == SECRET


def test_configured_limits_answer_in_the_openai_shape(server: LiveServer):
    config = ServerConfig(max_n=2, max_prompt_tokens=8, max_body_bytes=2000, api_key=KEY, protect_metrics=True)
    with serve(server.engine, config) as live, httpx2.Client(
            base_url=live.url, headers={"authorization": f"Bearer {KEY}"}, timeout=60) as http:
        chat = {"model": server.model, "max_tokens": 1}
        too_many = http.post("/v1/chat/completions", json=chat | {"n": 3, "messages": [{"role": "user", "content": "hi"}]})
        long_prompt = http.post("/v1/completions", json=chat | {"prompt": "one two three four five six seven eight nine"})
        huge = http.post("/v1/completions", json=chat | {"prompt": "x" * 3000})
        two = http.post("/v1/completions", json=chat | {"n": 2, "prompt": "hi"})
        metrics_without_key = httpx2.get(live.url + "/metrics")
        health_without_key = httpx2.get(live.url + "/health")
        metrics_with_key = http.get("/metrics")
    assert (too_many.status_code, too_many.json()["error"]["param"]) == (400, "n")
    assert (long_prompt.status_code, long_prompt.json()["error"]["param"]) == (400, "prompt")
    assert "at most 8" in long_prompt.json()["error"]["message"]
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "RequestTooLargeError"
    assert two.status_code == 200 and len(two.json()["choices"]) == 2
    assert metrics_without_key.status_code == 401 and metrics_with_key.status_code == 200
    assert health_without_key.status_code == 200


async def test_a_full_queue_gets_429_with_retry_after_and_admitted_requests_finish(make_engine):
    engine = AsyncEngine(make_engine(max_num_seqs=1).config, engine=make_engine(max_num_seqs=1))
    with serve(engine, ServerConfig(max_waiting_requests=2)) as live:
        async with httpx2.AsyncClient(base_url=live.url, timeout=120) as http:
            body = {"model": live.model, "prompt": "Write a long poem.", "ignore_eos": True, "stream": True,
                    "deterministic": False}

            async def stream(max_tokens: int, started: asyncio.Event | None = None) -> list[str]:
                async with http.stream("POST", "/v1/completions", json=body | {"max_tokens": max_tokens}) as r:
                    assert r.status_code == 200
                    lines = []
                    async for line in r.aiter_lines():
                        if started is not None and not lines:
                            started.set()
                        lines += [line] if line else []
                    return lines

            running = asyncio.Event()
            first = asyncio.create_task(stream(40, running))
            await running.wait()
            queued = [asyncio.create_task(stream(3)) for _ in range(2)]
            while engine.stats().num_waiting < 2:
                await asyncio.sleep(0.02)
            rejected = await http.post("/v1/completions", json=body | {"max_tokens": 1, "stream": False})
            sdk = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, http_client=http)
            with pytest.raises(openai.RateLimitError):
                await sdk.completions.create(model=live.model, prompt="hi", max_tokens=1)
            finished = await asyncio.gather(first, *queued)
    assert rejected.status_code == 429 and rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["type"] == "RateLimitError"
    for lines, n in zip(finished, (40, 3, 3)):
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in lines[:-1]]
        assert sum(1 for e in events if e["choices"][0]["text"] or e["choices"][0]["finish_reason"]) >= 1
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert engine.stats().kv_cache_usage == 0
