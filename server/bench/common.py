"""What both benchmarks share: command-line options, an OpenAI-compatible client with timing, prompts, stats, tables.

Only the public OpenAI API is used (no tokenizer, no server internals), so the same numbers can be
taken from detserve, vLLM, SGLang or llama.cpp and compared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, Literal, Sequence, TypeVar

import httpx2
import numpy as np

from detserve.server.bench.event_stream import EventStreams

try:
    import uvloop
except ImportError:  # Windows: asyncio's own loop
    uvloop = None

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}
T = TypeVar("T")

# Common English words, each about one token in BPE vocabularies, so a prompt of n words is about n
# tokens for any model without needing its tokenizer.
WORDS = (
    "the of and to in is it you that he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very"
).split()


def comma_list(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse `type` for comma-separated values, e.g. `--concurrency 0,8,64`."""

    def parse(text: str) -> list[T]:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from exc

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def add_client_arguments(parser: argparse.ArgumentParser, default_endpoint: Endpoint) -> None:
    """Where to send requests and where the report goes: the same flags in every benchmark."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                        help="the server's OpenAI base URL; /v1 is added when the URL has no path (default: %(default)s)")
    parser.add_argument("--model", help="model id to request (default: the first id from GET /v1/models)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as `Authorization: Bearer <key>` (default: $OPENAI_API_KEY)")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINT_PATHS), default=default_endpoint,
                        help="/v1/chat/completions or /v1/completions (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--output", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar on stderr")


def normalize_base_url(url: str) -> str:
    """`http://host:8000` (vLLM benchmark style) and `http://host:8000/v1` (OpenAI SDK style) both work."""
    url = url.rstrip("/")
    return url + "/v1" if httpx2.URL(url).path in ("", "/") else url


class BenchClient(httpx2.AsyncClient):
    """httpx2 for the plain requests; `streams` for the streamed ones, whose CPU per token matters
    on the machine being measured (`event_stream` says why)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, **kwargs: Any) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__(base_url=base_url, headers=headers, timeout=httpx2.Timeout(timeout), **kwargs)
        self.streams = EventStreams(base_url, headers, timeout)

    async def aclose(self) -> None:
        await self.streams.aclose()
        await super().aclose()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.streams.aclose()
        await super().__aexit__(*exc_info)


def make_client(args: argparse.Namespace) -> BenchClient:
    """One pooled client with no connection cap: the benchmark, not the pool, decides the concurrency."""
    return BenchClient(normalize_base_url(args.base_url), args.api_key, args.timeout,
                       limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None))


def run_client(main: Coroutine[Any, Any, T]) -> T:
    """Run a client's event loop: uvloop's where installed (a dependency off Windows), whose wake-ups
    cost less of the CPU the measured server runs on."""
    if uvloop is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def first_model(client: httpx2.AsyncClient) -> str:
    """The id of the first model the server lists (what vLLM's benchmark also defaults to)."""
    response = await client.get("/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"{client.base_url}models lists no models")
    return models[0]["id"]


def random_prompt(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def sample_length(rng: random.Random, mean: int, range_ratio: float) -> int:
    """Uniform in [mean*(1-r), mean*(1+r)], at least 1: vLLM's random-dataset convention for --range-ratio."""
    low, high = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))
    return max(1, rng.randint(low, high))


def build_payload(
    endpoint: Endpoint,
    model: str,
    prompt: str | list[int],
    max_tokens: int,
    *,
    temperature: float,
    stream: bool,
    seed: int | None = None,
    logprobs: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A request body; `extra` is merged at the top level, as the OpenAI SDK's `extra_body` is."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        if logprobs:
            body |= {"logprobs": True, "top_logprobs": 1}
    else:
        body["prompt"] = prompt
        if logprobs:
            body["logprobs"] = 1
    if seed is not None:
        body["seed"] = seed
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body | (extra or {})


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds from sending the request."""

    error: str = ""
    text: str = ""
    tokens: list[str] | None = None  # None when the server sent no logprobs
    logprobs: list[float] | None = None  # the chosen tokens' logprobs, aligned with `tokens`
    prompt_tokens: int | None = None  # from usage
    completion_tokens: int | None = None  # from usage
    num_chunks: int = 0  # stream chunks that carried output
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between output-carrying chunks
    latency: float = 0.0
    finish_reason: str | None = None
    fingerprint: str | None = None
    digest: str | None = None  # detserve's output_digest

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def output_tokens(self) -> int:
        """The server's usage count when it sent one; else what the chunks show."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.tokens) if self.tokens is not None else self.num_chunks


async def send_request(
    client: BenchClient,
    endpoint: Endpoint,
    payload: dict[str, Any],
    first_output: asyncio.Event | None = None,
) -> RequestResult:
    """Send one request (streamed if the payload says so); failures come back in `.error`, never raised.

    `first_output` is set when a streamed request's first output arrives: the server is now serving it.
    """
    result = RequestResult()
    start = time.perf_counter()
    try:
        if payload.get("stream"):
            await _read_stream(client, endpoint, payload, result, start, first_output)
        else:
            response = await client.post(ENDPOINT_PATHS[endpoint], json=payload)
            if response.status_code != 200:
                result.error = _http_error(response.status_code, response.content)
            else:
                body = response.json()
                _absorb(result, body, endpoint, "message")
                result.error = "" if body.get("choices") else "the response has no choices"
            result.ttft = time.perf_counter() - start
    except Exception as exc:  # whatever a server sends back fails this request only, not the benchmark
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - start
    return result


async def _read_stream(
    client: BenchClient,
    endpoint: Endpoint,
    payload: dict[str, Any],
    result: RequestResult,
    start: float,
    first_output: asyncio.Event | None,
) -> None:
    """TTFT and ITL count only chunks carrying output: a role-only opener or an empty closer is no token."""
    async with client.streams.post(ENDPOINT_PATHS[endpoint], payload) as response:
        if response.status != 200:
            result.error = _http_error(response.status, await response.read())
            return
        last = start
        async for line in response.lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = _error_message(chunk)
                return
            if not _absorb(result, chunk, endpoint, "delta"):
                continue
            if result.num_chunks == 0:
                result.ttft = now - start
                if first_output is not None:
                    first_output.set()
            else:
                result.itl.append(now - last)
            result.num_chunks += 1
            last = now


def _absorb(result: RequestResult, body: dict[str, Any], endpoint: Endpoint, message_key: str) -> bool:
    """Fold a response body or stream chunk into `result`; whether it carried output (text, tokens
    with logprobs, or vLLM's token_ids)."""
    result.fingerprint = body.get("system_fingerprint") or result.fingerprint
    result.digest = body.get("output_digest") or result.digest
    if usage := body.get("usage"):
        result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
        result.completion_tokens = usage.get("completion_tokens", result.completion_tokens)
    carried = False
    for choice in body.get("choices") or []:
        text = choice.get("text") if endpoint == "completions" else (choice.get(message_key) or {}).get("content")
        result.text += text or ""
        result.finish_reason = choice.get("finish_reason") or result.finish_reason
        tokens, logprobs = _chosen_logprobs(choice.get("logprobs"), endpoint)
        if tokens is not None:
            if result.tokens is None:
                result.tokens, result.logprobs = [], []
            result.tokens += tokens
            result.logprobs += logprobs
        carried = carried or bool(text) or bool(tokens) or bool(choice.get("token_ids"))
    return carried


def _chosen_logprobs(logprobs: dict[str, Any] | None, endpoint: Endpoint) -> tuple[list[str] | None, list[float]]:
    """The sampled tokens and their logprobs, from either endpoint's logprobs shape."""
    if not logprobs:
        return None, []
    if endpoint == "chat":
        entries = logprobs.get("content") or []
        return [e["token"] for e in entries], [e["logprob"] for e in entries]
    return list(logprobs.get("tokens") or []), list(logprobs.get("token_logprobs") or [])


def _http_error(status: int, content: bytes) -> str:
    try:
        return f"HTTP {status}: {_error_message(json.loads(content))}"
    except ValueError:
        return f"HTTP {status}: {content[:200].decode(errors='replace')}"


def _error_message(body: Any) -> str:
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


@dataclass
class Summary:
    """Mean, median, population std and percentiles, computed as numpy (and so vLLM's benchmark) does."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]


def summarize(values: Sequence[float], percentiles: Sequence[float]) -> Summary:
    """No values summarize as zeros, like vLLM's `np.mean(x or 0)`, so a report always has every field."""
    data = np.asarray(values if len(values) else [0.0], dtype=np.float64)
    return Summary(
        mean=float(np.mean(data)),
        median=float(np.median(data)),
        std=float(np.std(data)),
        percentiles={p: float(np.percentile(data, p)) for p in percentiles},
    )


def percentile_label(p: float) -> str:
    """`99` for 99.0 and `99.9` for 99.9: vLLM's key names (`p99_ttft_ms`)."""
    return str(int(p)) if int(p) == p else str(p)


@dataclass
class Grid:
    """A column-aligned table inside a report."""

    headers: Sequence[str]
    rows: Sequence[Sequence[object]]

    def render(self) -> str:
        cells = [[str(h) for h in self.headers]] + [[str(cell) for cell in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.headers))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


Row = tuple[str, object] | str | Grid


def format_report(title: str, rows: Sequence[Row]) -> str:
    """vLLM's result layout: a `=` banner, `label: value` lines; a string row is a `-` section banner."""
    lines = [f" {title} ".center(50, "=")]
    for row in rows:
        if isinstance(row, Grid):
            lines.append(row.render())
        elif isinstance(row, str):
            lines.append(f" {row} ".center(50, "-"))
        else:
            label, value = row
            lines.append(f"{label + ':':<40} {f'{value:.2f}' if isinstance(value, float) else value}")
    lines.append("=" * 50)
    return "\n".join(lines)


def emit(args: argparse.Namespace, report: dict[str, Any], table: str) -> None:
    """The table (or JSON with --json) on stdout; the JSON also to --output when given."""
    text = json.dumps(report, indent=2)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text if args.json else table)


# -- a server of our own --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def launched(command: list[str], port: int, log: Path, timeout: float = 600) -> Iterator[subprocess.Popen]:
    """Run a server (output to `log`) until its /health answers 200; yield the process; stop it at the
    end (SIGTERM, so detserve drains, then a kill after 120 s)."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(f"http://127.0.0.1:{port}"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{Path(command[0]).name} did not start; its log: {log}")
            time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


def _healthy(url: str) -> bool:
    try:
        return httpx2.get(url + "/health", timeout=5).status_code == 200
    except httpx2.TransportError:
        return False
