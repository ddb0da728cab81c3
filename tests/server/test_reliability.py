"""Faults over HTTP: hostile clients, a failing request, a dying engine, and a KV cache far too small.

Each test ends by checking the engine's own counters: no request left running or waiting, every
KV block free, no stream left registered. That is what "nothing leaked" means here.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx2
import pytest

from detserve.engine.async_engine import AsyncEngine
from detserve.engine.tokenizer import IncrementalDetokenizer
from tests.server.conftest import LiveServer, serve
from tests.server.test_operations import grew, scrape

pytestmark = pytest.mark.slow


def assert_nothing_leaked(live: LiveServer) -> None:
    live.wait_idle()
    stats = live.engine.stats()
    assert stats.kv_cache_usage == 0, "leaked KV blocks"
    assert stats.num_running == stats.num_waiting == live.engine.num_streams == 0, "stuck requests"


async def _raw_request(port: int, body: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: detserve\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    return reader, writer


async def test_500_hostile_connections_leave_no_leaked_blocks_and_no_stuck_requests(server: LiveServer):
    """Clients that hang up mid-stream, never read, send half a request, or time out; a few behave."""
    port = int(server.url.rsplit(":", 1)[1])
    rng = random.Random(7)
    words = "red fish blue moon seven stones quiet river".split()

    def body(stream: bool) -> dict:
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        return {"model": server.model, "prompt": prompt, "max_tokens": rng.randint(1, 6), "stream": stream,
                "deterministic": rng.random() < 0.3, "ignore_eos": True}

    async def hang_up_after_first_chunk() -> str:
        reader, writer = await _raw_request(port, body(True))
        await reader.readuntil(b"data: ")
        writer.close()
        return "hung up"

    async def never_read() -> str:
        _, writer = await _raw_request(port, body(True))
        await asyncio.sleep(rng.uniform(0.5, 5))
        writer.close()
        return "never read"

    async def half_a_request() -> str:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: detserve\r\ncontent-length: 500\r\n\r\n{\"model\"")
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.5, 5))
        writer.close()
        return "half"

    async def impatient(http: httpx2.AsyncClient) -> str:
        try:
            await http.post("/v1/completions", json=body(False), timeout=rng.uniform(0.05, 1.0))
        except httpx2.TimeoutException:
            return "timed out"
        return "finished"

    async def well_behaved(http: httpx2.AsyncClient) -> int:
        response = await http.post("/v1/completions", json=body(False), timeout=300)
        assert response.status_code == 200, response.text
        return len(response.json()["choices"][0]["text"]) >= 0

    limits = httpx2.Limits(max_connections=1000)
    async with httpx2.AsyncClient(base_url=server.url, limits=limits) as http:
        kinds = [hang_up_after_first_chunk, never_read, half_a_request, lambda: impatient(http)] * 120
        clients = [kind() for kind in kinds] + [well_behaved(http) for _ in range(20)]
        rng.shuffle(clients)
        results = await asyncio.gather(*clients)
    assert len(results) == 500 and results.count(True) == 20
    assert_nothing_leaked(server)
    after = httpx2.get(server.url + "/v1/models")
    assert after.status_code == 200 and server.engine.ready


async def test_a_fault_in_one_request_is_a_500_in_openai_shape_and_the_others_finish(server: LiveServer,
                                                                                       monkeypatch):
    poison = 4242  # a prompt starting with this token id fails while its output is detokenized
    real_add = IncrementalDetokenizer.add

    def add(self: IncrementalDetokenizer, token_id: int) -> str:
        if self.token_ids and self.token_ids[0] == poison:
            raise RuntimeError("injected fault")
        return real_add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    async with httpx2.AsyncClient(base_url=server.url, timeout=120) as http:
        before = scrape(httpx2.Client(base_url=server.url))
        common = {"model": server.model, "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        poisoned, healthy, poisoned_stream = await asyncio.gather(
            http.post("/v1/completions", json=common | {"prompt": [poison, 11, 12]}),
            http.post("/v1/completions", json=common | {"prompt": "a healthy prompt"}),
            http.post("/v1/completions", json=common | {"prompt": [poison, 13, 14], "stream": True}),
        )
    after = scrape(httpx2.Client(base_url=server.url))
    assert poisoned.status_code == 500
    assert poisoned.json()["error"]["type"] == "InternalServerError" and "injected" in poisoned.json()["error"]["message"]
    assert healthy.status_code == 200 and healthy.json()["usage"]["completion_tokens"] == 4
    events = [line[6:] for line in poisoned_stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 500
    assert grew(before, after, "detserve:request_errors_total", status="500") == 2
    assert_nothing_leaked(server)


async def test_a_fatal_engine_error_fails_health_and_liveness(make_engine, monkeypatch):
    llm = make_engine(max_num_seqs=3)
    engine = AsyncEngine(llm.config, engine=llm)
    with serve(engine) as live:
        def broken_step():
            raise RuntimeError("injected fatal fault")

        monkeypatch.setattr(llm, "step", broken_step)
        async with httpx2.AsyncClient(base_url=live.url, timeout=60) as http:
            failed = await http.post("/v1/completions", json={"model": live.model, "prompt": "hi", "max_tokens": 2})
            health, alive, later = await asyncio.gather(
                http.get("/health"), http.get("/live"),
                http.post("/v1/completions", json={"model": live.model, "prompt": "hi", "max_tokens": 2}))
            metrics = (await http.get("/metrics")).text
    monkeypatch.undo()
    for request_id in list(llm.requests):
        llm.abort_request(request_id)
    assert failed.status_code == 503 and "injected fatal fault" in failed.json()["error"]["message"]
    assert health.status_code == alive.status_code == later.status_code == 503
    assert "detserve:engine_healthy 0.0" in metrics


async def test_preemption_storm_finishes_every_request_and_deterministic_ones_keep_their_bits(make_engine):
    """64 concurrent requests on a 12-block KV cache: about 4 fit at once, so requests are preempted
    and recomputed over and over; every deterministic answer must equal the one it gives alone."""
    llm = make_engine(kv_cache_tokens=192, max_num_seqs=64)
    with serve(AsyncEngine(llm.config, engine=llm)) as live:
        prompts = [f"Story {i}: the {w} went over the hill and" for i, w in enumerate("cat dog fox owl".split())]
        unique = [{"prompt": p, "temperature": 0} for p in prompts]
        unique += [{"prompt": p, "temperature": 0.8, "seed": 100 + i} for i, p in enumerate(prompts)]
        common = {"model": live.model, "max_tokens": 16, "ignore_eos": True, "logprobs": 1}
        async with httpx2.AsyncClient(base_url=live.url, timeout=600) as http:
            async def run(body: dict) -> dict:
                response = await http.post("/v1/completions", json=common | body)
                assert response.status_code == 200, response.text
                return response.json()

            alone = [await run(body | {"deterministic": True}) for body in unique]
            storm = [unique[i % len(unique)] | {"deterministic": True} for i in range(48)]
            storm += [{"prompt": prompts[i % 4] + " then", "temperature": 0.7, "deterministic": False}
                      for i in range(16)]
            random.Random(3).shuffle(storm)
            before = llm.stats().num_preemptions
            results = await asyncio.gather(*(run(body) for body in storm))
    assert llm.stats().num_preemptions - before > 20, "the cache was not small enough to force preemptions"
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)

    def bits(result: dict) -> tuple:
        logprobs = result["choices"][0]["logprobs"]
        return result["choices"][0]["text"], logprobs["tokens"], logprobs["token_logprobs"], result["output_digest"]

    expected = {json.dumps(body, sort_keys=True): bits(r) for body, r in zip(unique, alone)}
    checked = 0
    for body, result in zip(storm, results):
        key = json.dumps({k: v for k, v in body.items() if k != "deterministic"}, sort_keys=True)
        if body["deterministic"]:
            assert bits(result) == expected[key], body
            checked += 1
    assert checked == 48
    assert llm.stats().kv_cache_usage == 0 and not llm.has_unfinished_requests()
