"""What the server did, two ways: Prometheus metrics on `GET /metrics`, and one JSON log line per request.

Each HTTP request carries a `RequestTrace` from the moment it arrives. The routes fill in what
they learn (the job id, prompt size, mode), the streams report every engine output to it (so
time-to-first-token and inter-token latency are observed live, per engine request), and when the
response has gone out the tracking middleware closes it: one log line and the per-request
counters. Engine-wide gauges are read from the engine at scrape time rather than kept in step.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from detserve.engine.async_engine import AsyncEngine
from detserve.engine.request import RequestOutput

request_log = logging.getLogger("detserve.requests")

PROBE_PATHS = ("/health", "/live", "/metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


@dataclass
class InFlight:
    """HTTP requests being served now, and whether the server is draining (no new work admitted)."""

    count: int = 0
    draining: bool = False


class Metrics:
    """The server's metrics, in a registry of its own (so several apps in one process never collide)."""

    def __init__(self, engine: AsyncEngine, in_flight: InFlight) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, in_flight))
        r = self.registry
        self.prompt_tokens = Counter("detserve:prompt_tokens", "Prompt tokens prefilled (per engine request).", registry=r)
        self.generation_tokens = Counter("detserve:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("detserve:requests", "Generation requests admitted, by kernel mode.", ["mode"], registry=r)
        self.request_success = Counter("detserve:request_success", "Engine requests finished, by finish reason.",
                                       ["finished_reason"], registry=r)
        self.errors = Counter("detserve:request_errors", "HTTP requests that ended in an error, by status.",
                              ["status"], registry=r)
        self.ttft = Histogram("detserve:time_to_first_token_seconds", "From arrival to an engine request's first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("detserve:inter_token_latency_seconds", "Time per output token after the first (TPOT).",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("detserve:e2e_request_latency_seconds", "From arrival to an engine request's last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("detserve:request_queue_time_seconds", "Time an engine request waited for its "
                                    "first step.", buckets=_LATENCY_BUCKETS, registry=r)
        for mode in ("deterministic", "fast"):
            self.requests.labels(mode)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges and engine-side counters, read from the engine when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine, in_flight: InFlight) -> None:
        self.engine = engine
        self.in_flight = in_flight

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("detserve:http_requests_in_flight", "HTTP requests being served.", self.in_flight.count)
        yield GaugeMetricFamily("detserve:draining", "1 while shutting down: new requests get 503.",
                                int(self.in_flight.draining))
        yield GaugeMetricFamily("detserve:engine_healthy", "1 once the model is loaded and the engine loop runs.",
                                int(self.engine.ready))
        if not self.engine.ready:
            return
        stats = self.engine.stats()
        yield GaugeMetricFamily("detserve:num_requests_running", "Engine requests in the running batch.",
                                stats.num_running)
        yield GaugeMetricFamily("detserve:num_requests_waiting", "Engine requests queued for a place in the batch.",
                                stats.num_waiting)
        yield GaugeMetricFamily("detserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                                stats.kv_cache_usage)
        yield CounterMetricFamily("detserve:num_preemptions", "Requests preempted for lack of KV cache blocks.",
                                  stats.num_preemptions)
        yield CounterMetricFamily("detserve:prefix_cache_queries", "KV blocks looked up in the prefix cache.",
                                  stats.prefix_cache_queries)
        yield CounterMetricFamily("detserve:prefix_cache_hits", "KV blocks found in the prefix cache.",
                                  stats.prefix_cache_hits)
        rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        yield GaugeMetricFamily("detserve:prefix_cache_hit_rate", "Prefix-cache hits / queries since start.", rate)


@dataclass
class _ChoiceTiming:
    seen: bool = False  # an output of the choice came
    first_token: float | None = None
    last_token: float | None = None


@dataclass
class RequestTrace:
    """One HTTP request's story: filled in as it goes, logged and counted when its response is done."""

    method: str
    path: str
    metrics: Metrics | None = None
    start: float = field(default_factory=time.monotonic)
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex}")  # the job's id once admitted
    deterministic: bool | None = None
    stream: bool | None = None
    n: int | None = None
    prompt: str | None = None  # only with --log-prompts
    user: str | None = None  # the request's `user` (or `safety_identifier`): whom it was for
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reasons: list[str | None] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    _choices: dict[int, _ChoiceTiming] = field(default_factory=dict)

    def admitted(self, request_id: str, deterministic: bool, stream: bool, n: int, num_choices: int) -> None:
        self.request_id = request_id
        self.deterministic = deterministic
        self.stream = stream
        self.n = n
        self.finish_reasons = [None] * num_choices
        if self.metrics is not None:
            self.metrics.requests.labels("deterministic" if deterministic else "fast").inc()

    def output(self, choice: int, out: RequestOutput) -> None:
        """An engine output for `choice`: observe TTFT on its first token, then the gap per token."""
        now = time.monotonic()
        timing = self._choices.setdefault(choice, _ChoiceTiming())
        new = len(out.new_token_ids)
        self.completion_tokens += new
        m = self.metrics
        if not timing.seen:  # the choice's first output, with or without a token (a scored prompt has none)
            timing.seen = True
            if choice % (self.n or 1) == 0:  # each prompt once, as the response's usage counts it
                self.prompt_tokens += out.num_prompt_tokens
                self.cached_tokens += out.num_cached_tokens
            if m is not None:
                m.prompt_tokens.inc(out.num_prompt_tokens)
                if out.queue_seconds is not None:
                    m.queue_time.observe(out.queue_seconds)
        if new and timing.first_token is None:
            timing.first_token = now
            if m is not None:
                m.ttft.observe(now - self.start)
        elif new and m is not None:
            for _ in range(new):
                m.itl.observe((now - timing.last_token) / new)
        if new:
            timing.last_token = now
            if m is not None:
                m.generation_tokens.inc(new)
        if out.finished:
            reason = out.finish_reason.value if out.finish_reason else None
            if choice < len(self.finish_reasons):
                self.finish_reasons[choice] = reason
            if m is not None:
                m.request_success.labels(reason).inc()
                m.e2e.observe(now - self.start)

    def failed(self, status: int, message: str) -> None:
        """The response failed after it began (a stream's error event): log that, not the 200 sent first."""
        self.status = status
        self.error = message

    def close(self, http_status: int, log_prompts: bool) -> None:
        """The response is done: count an error status and write the log line."""
        status = self.status if self.status is not None else http_status
        if self.metrics is not None and status >= 400:
            self.metrics.errors.labels(str(status)).inc()
        if self.path in PROBE_PATHS:
            return  # probes and scrapes every few seconds would drown the log: failures are counted above
        record = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": status,
            "latency_s": round(time.monotonic() - self.start, 4),
            "ttft_s": self._ttft(),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "n": self.n,
            "stream": self.stream,
            "deterministic": self.deterministic,
            "finish_reasons": self.finish_reasons,
        }
        if self.user is not None:
            record["user"] = self.user
        if self.error is not None:
            record["error"] = self.error
        if log_prompts and self.prompt is not None:
            record["prompt"] = self.prompt
        request_log.info(json.dumps(record, ensure_ascii=False))

    def _ttft(self) -> float | None:
        firsts = [t.first_token for t in self._choices.values() if t.first_token is not None]
        return round(min(firsts) - self.start, 4) if firsts else None
