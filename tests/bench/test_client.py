"""The client's reading of OpenAI responses and SSE streams, over a mock transport (no server)."""

from __future__ import annotations

import json

import httpx2

from detserve.server.bench.common import build_payload, send_request


def sse(*chunks: dict | str) -> bytes:
    return "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks).encode()


def client_answering(status: int, content: bytes) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(base_url="http://test/v1", transport=httpx2.MockTransport(lambda _: httpx2.Response(status, content=content)))


def chat_chunk(content: str | None, token: str | None = None, logprob: float = -0.5, **more) -> dict:
    logprobs = {"content": [{"token": token, "logprob": logprob, "top_logprobs": []}]} if token else None
    delta = {"content": content} if content is not None else {"role": "assistant"}
    return {"system_fingerprint": "fp_1", "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}]} | more


async def test_a_chat_stream_collects_text_tokens_logprobs_usage_and_fingerprint():
    body = sse(
        chat_chunk(None),  # role-only opener: not a token
        chat_chunk("Hello", "Hello", -0.25),
        chat_chunk("!", "!", -1.5),
        {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]},  # empty closer: not a token
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}, "output_digest": "abc"},
        "[DONE]",
    )
    async with client_answering(200, body) as client:
        result = await send_request(client, "chat", build_payload("chat", "m", "hi", 8, temperature=0.0, stream=True))
    assert result.ok
    assert (result.text, result.tokens, result.logprobs) == ("Hello!", ["Hello", "!"], [-0.25, -1.5])
    assert (result.prompt_tokens, result.output_tokens, result.num_chunks) == (9, 2, 2)
    assert len(result.itl) == 1
    assert (result.finish_reason, result.fingerprint, result.digest) == ("stop", "fp_1", "abc")
    assert 0 < result.ttft <= result.latency


async def test_a_completions_stream_without_usage_counts_output_chunks():
    chunks = [{"choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}]} for t in ["a", "b", "c"]]
    async with client_answering(200, sse(*chunks, "[DONE]")) as client:
        result = await send_request(client, "completions", build_payload("completions", "m", "x", 3, temperature=0.0, stream=True))
    assert (result.text, result.tokens, result.output_tokens, len(result.itl)) == ("abc", None, 3, 2)


async def test_an_error_event_mid_stream_fails_the_request():
    body = sse(chat_chunk("Hi", "Hi"), {"error": {"message": "engine died", "code": 500}}, "[DONE]")
    async with client_answering(200, body) as client:
        result = await send_request(client, "chat", build_payload("chat", "m", "hi", 8, temperature=0.0, stream=True))
    assert not result.ok
    assert result.error == "engine died"


async def test_an_http_error_carries_the_servers_message():
    error = json.dumps({"error": {"message": "The model `m` does not exist.", "code": 404}}).encode()
    async with client_answering(404, error) as client:
        result = await send_request(client, "chat", build_payload("chat", "m", "hi", 8, temperature=0.0, stream=False))
    assert result.error == "HTTP 404: The model `m` does not exist."


async def test_a_non_streamed_completion_reads_its_logprobs():
    body = {"system_fingerprint": "fp_2", "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            "choices": [{"index": 0, "text": "ab", "finish_reason": "length",
                         "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2]}}]}
    async with client_answering(200, json.dumps(body).encode()) as client:
        result = await send_request(client, "completions", build_payload("completions", "m", "x", 2, temperature=0.0, stream=False, logprobs=True))
    assert (result.text, result.tokens, result.logprobs, result.fingerprint) == ("ab", ["a", "b"], [-0.1, -0.2], "fp_2")


async def test_an_unreachable_server_is_a_failed_request_not_an_exception():
    async with httpx2.AsyncClient(base_url="http://127.0.0.1:9/v1", timeout=5) as client:
        result = await send_request(client, "chat", build_payload("chat", "m", "hi", 8, temperature=0.0, stream=True))
    assert not result.ok
    assert "ConnectError" in result.error
