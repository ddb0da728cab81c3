"""Streamed responses for the benchmark clients: HTTP/1.1 parsed by httptools (C) over asyncio streams.

Why not httpx2, which sends the benchmarks' other requests: its path for each streamed chunk
(httpcore2's read under an anyio timeout, h11's chunk parsing in Python, the text and line
decoders) cost 0.31 ms of CPU per token (0.21 under uvloop), against 0.07 here under uvloop
(2026-12-07, 2-core AMD EPYC, 8 streams of 128 tokens). A benchmark shares the machine with the
server it measures: on 2 cores that CPU comes out of the engine's step, and at 64 streams it would
make the client, not the server, what a GPU run measures.

Connections are kept alive and reused (a new one per request would put a TCP, and a TLS, handshake
into every TTFT); a reused connection the server closed while idle is replaced once, before
anything of the response came. A request's whole exchange is bounded by the client's timeout. The
streams connect directly: proxy variables in the environment are not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from typing import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

_READ_SIZE = 1 << 16


class _Parsed:
    """What httptools' callbacks report of one response, as `parser` reads it."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers_done = False
        self.keep_alive = False  # known once the headers are in (the parser forgets it at the end)
        self.complete = False
        self.body: list[bytes] = []

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def receive(self, parsed: _Parsed, cut_short: str) -> None:
        """Feed the next bytes that arrive to `parsed`; ConnectionError("... `cut_short`") if none will."""
        received = await self.reader.read(_READ_SIZE)
        if not received:
            raise ConnectionError(f"the server closed the connection {cut_short}")
        parsed.parser.feed_data(received)

    def close(self) -> None:
        self.writer.close()


class StreamedResponse:
    """One response as it arrives: `status` once its headers are in, then its body by lines or whole."""

    def __init__(self, connection: _Connection, parsed: _Parsed) -> None:
        self._connection = connection
        self._parsed = parsed
        self.status: int = parsed.parser.get_status_code()

    @property
    def reusable(self) -> bool:
        """Read to its end on a connection the server keeps open."""
        return self._parsed.complete and self._parsed.keep_alive

    async def _chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer encoding removed)."""
        parsed = self._parsed
        while True:
            if parsed.body:
                data = b"".join(parsed.body)
                parsed.body.clear()
                yield data
            if parsed.complete:
                return
            await self._connection.receive(parsed, "before the response ended")

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines (an SSE stream's fields and the blank lines between its events), without
        their line ends."""
        pending = b""
        async for data in self._chunks():
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode()
        if pending:
            yield pending.rstrip(b"\r").decode()

    async def read(self) -> bytes:
        """The whole body (an error's, say), or what is left of it."""
        return b"".join([data async for data in self._chunks()])


class EventStreams:
    """POSTs whose responses are read as they stream, over kept-alive connections to one server."""

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout: float) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"{base_url}: the benchmark clients speak http and https only")
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._path = url.path.rstrip("/")
        self._head = "".join(f"{name}: {value}\r\n" for name, value in
                             {"host": url.netloc, "accept": "text/event-stream", **headers}.items())
        self._timeout = timeout
        self._idle: list[_Connection] = []

    @contextlib.asynccontextmanager
    async def post(self, path: str, payload: dict) -> AsyncIterator[StreamedResponse]:
        """POST `payload` as JSON to the base URL's `path`; the response once its headers are in."""
        body = json.dumps(payload).encode()
        request = (f"POST {self._path}{path} HTTP/1.1\r\n{self._head}content-type: application/json\r\n"
                   f"content-length: {len(body)}\r\n\r\n").encode() + body
        async with asyncio.timeout(self._timeout):
            connection, response = await self._send(request)
            try:
                yield response
                await response.read()  # what is left (an SSE stream's end after `[DONE]`): then it is reusable
            finally:
                if response.reusable:
                    self._idle.append(connection)
                else:
                    connection.close()

    async def _send(self, request: bytes) -> tuple[_Connection, StreamedResponse]:
        """Send on an idle connection, or a new one when none is idle or the idle one was closed."""
        while self._idle:
            connection = self._idle.pop()
            try:
                return connection, await self._exchange(connection, request)
            except ConnectionError:  # closed while idle; nothing of a response came
                connection.close()
        connection = _Connection(*await asyncio.open_connection(self._host, self._port, ssl=self._ssl))
        try:
            return connection, await self._exchange(connection, request)
        except BaseException:
            connection.close()
            raise

    @staticmethod
    async def _exchange(connection: _Connection, request: bytes) -> StreamedResponse:
        """Write the request and read until the response's headers are in."""
        connection.writer.write(request)
        parsed = _Parsed()
        while not parsed.headers_done:
            await connection.receive(parsed, "before it answered")
        return StreamedResponse(connection, parsed)

    async def aclose(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
