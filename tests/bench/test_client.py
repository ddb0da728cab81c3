"""The client's reading of OpenAI responses and SSE streams, from a canned local HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import AsyncIterator

from detserve.server.bench.common import BenchClient, build_payload, send_request


def sse(*chunks: dict | str) -> bytes:
    return "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks).encode()


@dataclass
class CannedServer:
    """Answers every request with `status` and `content` (chunked, in `piece`-byte chunks), keeping the
    connection open unless `close_after` is set; records what it saw."""

    status: int
    content: bytes
    piece: int = 1 << 16
    close_after: bool = False
    delay: float = 0.0  # seconds between reading a request and answering it
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.requests.append(head + await reader.readexactly(length))
                await asyncio.sleep(self.delay)
                writer.write(f"HTTP/1.1 {self.status} X\r\ntransfer-encoding: chunked\r\n\r\n".encode())
                for i in range(0, len(self.content), self.piece):
                    part = self.content[i : i + self.piece]
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                if self.close_after:
                    break
        writer.close()


@contextlib.asynccontextmanager
async def client_of(server: CannedServer, api_key: str | None = None, timeout: float = 5) -> AsyncIterator[BenchClient]:
    listening = await asyncio.start_server(server.answer, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    async with listening, BenchClient(f"http://127.0.0.1:{port}/v1", api_key, timeout) as client:
        yield client


def chat_chunk(content: str | None, token: str | None = None, logprob: float = -0.5, **more) -> dict:
    logprobs = {"content": [{"token": token, "logprob": logprob, "top_logprobs": []}]} if token else None
    delta = {"content": content} if content is not None else {"role": "assistant"}
    return {"system_fingerprint": "fp_1", "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}]} | more


CHAT_STREAM = sse(
    chat_chunk(None),  # role-only opener: not a token
    chat_chunk("Hello", "Hello", -0.25),
    chat_chunk("!", "!", -1.5),
    {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]},  # empty closer: not a token
    {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}, "output_digest": "abc"},
    "[DONE]",
)


def chat_request(stream: bool = True) -> dict:
    return build_payload("chat", "m", "hi", 8, temperature=0.0, stream=stream)


async def test_a_chat_stream_collects_text_tokens_logprobs_usage_and_fingerprint():
    async with client_of(CannedServer(200, CHAT_STREAM)) as client:
        result = await send_request(client, "chat", chat_request())
    assert result.ok
    assert (result.text, result.tokens, result.logprobs) == ("Hello!", ["Hello", "!"], [-0.25, -1.5])
    assert (result.prompt_tokens, result.output_tokens, result.num_chunks) == (9, 2, 2)
    assert len(result.itl) == 1
    assert (result.finish_reason, result.fingerprint, result.digest) == ("stop", "fp_1", "abc")
    assert 0 < result.ttft <= result.latency


async def test_a_stream_reads_the_same_whatever_its_bytes_are_cut_into():
    for piece in (1, 7, 64):
        async with client_of(CannedServer(200, CHAT_STREAM.replace(b"\n", b"\r\n"), piece=piece)) as client:
            result = await send_request(client, "chat", chat_request())
        assert (result.error, result.text, result.tokens, result.digest) == ("", "Hello!", ["Hello", "!"], "abc")


async def test_streams_reuse_one_kept_alive_connection_and_send_the_api_key():
    server = CannedServer(200, CHAT_STREAM)
    async with client_of(server, api_key="sk-1") as client:
        results = [await send_request(client, "chat", chat_request()) for _ in range(3)]
    assert [r.text for r in results] == ["Hello!"] * 3
    assert server.connections == 1
    assert all(b"\r\nAuthorization: Bearer sk-1\r\n" in request for request in server.requests)
    assert json.loads(server.requests[0].split(b"\r\n\r\n", 1)[1]) == chat_request()


async def test_a_connection_the_server_closed_while_idle_is_replaced():
    server = CannedServer(200, CHAT_STREAM, close_after=True)
    async with client_of(server) as client:
        results = [await send_request(client, "chat", chat_request()) for _ in range(3)]
        await asyncio.sleep(0)
    assert [r.error for r in results] == [""] * 3
    assert server.connections == 3


async def test_concurrent_streams_each_get_their_own_connection_and_reuse_them():
    server = CannedServer(200, CHAT_STREAM, piece=16, delay=0.01)
    async with client_of(server) as client:
        for _ in range(2):
            results = await asyncio.gather(*(send_request(client, "chat", chat_request()) for _ in range(8)))
            assert [(r.error, r.text, r.digest) for r in results] == [("", "Hello!", "abc")] * 8
    assert server.connections == 8  # the second wave of 8 ran on the first wave's connections


async def test_a_server_that_does_not_answer_in_time_fails_the_request_not_the_client():
    async with client_of(CannedServer(200, CHAT_STREAM, delay=5), timeout=0.2) as client:
        late = await send_request(client, "chat", chat_request())
    assert "TimeoutError" in late.error


async def test_a_completions_stream_without_usage_counts_output_chunks():
    chunks = [{"choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}]} for t in ["a", "b", "c"]]
    async with client_of(CannedServer(200, sse(*chunks, "[DONE]"))) as client:
        result = await send_request(client, "completions", build_payload("completions", "m", "x", 3, temperature=0.0, stream=True))
    assert (result.text, result.tokens, result.output_tokens, len(result.itl)) == ("abc", None, 3, 2)


async def test_an_error_event_mid_stream_fails_the_request():
    body = sse(chat_chunk("Hi", "Hi"), {"error": {"message": "engine died", "code": 500}}, "[DONE]")
    async with client_of(CannedServer(200, body)) as client:
        result = await send_request(client, "chat", chat_request())
    assert not result.ok
    assert result.error == "engine died"


async def test_an_http_error_carries_the_servers_message():
    error = json.dumps({"error": {"message": "The model `m` does not exist.", "code": 404}}).encode()
    for stream in (True, False):
        async with client_of(CannedServer(404, error)) as client:
            result = await send_request(client, "chat", chat_request(stream))
        assert result.error == "HTTP 404: The model `m` does not exist."


async def test_a_non_streamed_completion_reads_its_logprobs():
    body = {"system_fingerprint": "fp_2", "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            "choices": [{"index": 0, "text": "ab", "finish_reason": "length",
                         "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2]}}]}
    async with client_of(CannedServer(200, json.dumps(body).encode())) as client:
        result = await send_request(client, "completions", build_payload("completions", "m", "x", 2, temperature=0.0, stream=False, logprobs=True))
    assert (result.text, result.tokens, result.logprobs, result.fingerprint) == ("ab", ["a", "b"], [-0.1, -0.2], "fp_2")


async def test_an_unreachable_server_is_a_failed_request_not_an_exception():
    async with BenchClient("http://127.0.0.1:9/v1", None, 5) as client:
        for stream in (True, False):
            result = await send_request(client, "chat", chat_request(stream))
            assert not result.ok
            assert "ConnectError" in result.error or "ConnectionRefusedError" in result.error
