"""`detserve bench soak`: a bounded mixed load with client faults and bad input, watching memory, errors and bits.

`--concurrency` workers send a mix of chat and text completions (streamed or not, n of 1 or 2,
deterministic or fast, greedy or seeded), abandon streams after their first chunk, give up on
requests mid-flight, and send malformed or invalid bodies. Meanwhile a greedy deterministic probe
runs every `--probe-interval` seconds and must return the bits of the first probe, and the server's
resident memory is sampled after every completed request. At the end the server must be idle with
no KV cache in use (read from its /metrics).

The load stops once all of these hold: `--duration` seconds have passed, `--min-requests` requests
have completed and `--min-probes` probes have run. The work minimums make a short soak check the
same amount of work on a slow machine as on a fast one (tests use `--duration 0`); `--max-duration`
only catches a server that stops making progress, and hitting it is a failure.

A pass means: no 5xx, no bad input accepted, no probe mismatch, RSS growth after warm-up within
`--max-rss-growth-mib`, the work minimums met before `--max-duration`, and nothing left running or
holding KV blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx2
import psutil

from detserve.server.bench.common import (
    Endpoint,
    Grid,
    add_client_arguments,
    build_payload,
    emit,
    first_model,
    format_report,
    free_port,
    launched,
    make_client,
    random_prompt,
    run_client,
    send_request,
)

PROBE_PROMPT = "Describe the water cycle in three short sentences."
MIB = 2**20

# (name, endpoint path under /v1, raw body): each must get a 4xx; {model} is filled in.
BAD_INPUTS: list[tuple[str, str, str]] = [
    ("invalid JSON", "/chat/completions", '{"model": "{model}", "messages": ['),
    ("messages not a list", "/chat/completions", '{"model": "{model}", "messages": "hi"}'),
    ("empty messages", "/chat/completions", '{"model": "{model}", "messages": []}'),
    ("unknown model", "/completions", '{"model": "no-such-model", "prompt": "hi"}'),
    ("negative max_tokens", "/completions", '{"model": "{model}", "prompt": "hi", "max_tokens": -5}'),
    ("huge max_tokens", "/completions", '{"model": "{model}", "prompt": "hi", "max_tokens": 100000000000}'),
    ("NaN temperature", "/completions", '{"model": "{model}", "prompt": "hi", "temperature": NaN}'),
    ("top_p out of range", "/completions", '{"model": "{model}", "prompt": "hi", "top_p": 7}'),
    ("token id out of vocab", "/completions", '{"model": "{model}", "prompt": [999999999]}'),
    ("over-long prompt", "/completions", '{"model": "{model}", "prompt": "{long}", "max_tokens": 1}'),
    ("tools", "/chat/completions",
     '{"model": "{model}", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}'),
    ("wrong role", "/chat/completions", '{"model": "{model}", "messages": [{"role": "wizard", "content": "x"}]}'),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "exit status: 0 on a pass, 1 on a failure, 2 when the soak could not run."
    add_client_arguments(parser, default_endpoint="chat")
    parser.add_argument("--launch", action="store_true",
                        help="start a `detserve serve` of our own on a free port (its flags: --server-arg)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="a flag for the launched server, e.g. --server-arg=--max-num-seqs=16 (repeatable)")
    parser.add_argument("--pid", type=int, help="the server's process id, for RSS (default: the launched one)")
    parser.add_argument("--duration", type=float, default=300.0,
                        help="least seconds of load; 0: stop once the work minimums are met (default: %(default)s)")
    parser.add_argument("--min-requests", type=int, default=0,
                        help="least completed requests before the load stops (default: %(default)s)")
    parser.add_argument("--min-probes", type=int, default=1,
                        help="least determinism probes before the load stops (default: %(default)s)")
    parser.add_argument("--max-duration", type=float,
                        help="seconds after which a load short of its minimums stops and fails, a hang "
                             "(default: --duration + 600)")
    parser.add_argument("--concurrency", type=int, default=8, help="workers sending requests (default: %(default)s)")
    parser.add_argument("--probe-interval", type=float, default=5.0,
                        help="seconds between determinism probes (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens a worker asks for (default: %(default)s)")
    parser.add_argument("--warmup-fraction", type=float, default=0.15,
                        help="RSS growth counts from the end of this share of the RSS samples (default: %(default)s)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                        help="most RSS growth after warm-up that still passes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the load mix (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.max_duration is None:
        args.max_duration = args.duration + 600
    if args.concurrency < 1 or args.probe_interval <= 0 or min(args.duration, args.min_requests, args.min_probes) < 0:
        print("error: --concurrency and --probe-interval must be positive, the load bounds not negative",
              file=sys.stderr)
        return 2
    if args.max_duration <= args.duration:
        print("error: --max-duration must be longer than --duration", file=sys.stderr)
        return 2
    try:
        with _launched(args) if args.launch else contextlib.nullcontext():
            figures = run_client(soak(args))
    except (httpx2.HTTPError, RuntimeError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    emit(args, figures.to_json(args.max_rss_growth_mib), figures.table(args.max_rss_growth_mib))
    return 0 if figures.passed(args.max_rss_growth_mib) else 1


# -- the figures ---------------------------------------------------------------------------------------


@dataclass
class SoakFigures:
    """What the soak saw. `verdict` turns it into a pass or a list of reasons."""

    duration_s: float = 0.0
    served: Counter = field(default_factory=Counter)  # completed requests, by kind
    faults: Counter = field(default_factory=Counter)  # injected client faults, by kind
    bad_inputs: int = 0
    bad_inputs_accepted: int = 0
    status_4xx: int = 0
    status_5xx: int = 0
    other_errors: list[str] = field(default_factory=list)  # transport errors and the like, not injected
    probes: int = 0
    probe_mismatches: int = 0
    rss_mib: list[float] = field(default_factory=list)  # one sample per completed request
    rss_warm_index: int = 0  # samples before this are warm-up
    timed_out: bool = False  # the load hit --max-duration before its work minimums were met
    left_running: int | None = None  # after the load: running + waiting (None: no /metrics)
    kv_cache_usage: float | None = None

    @property
    def rss_growth_mib(self) -> float | None:
        """Mean of the last 5 samples minus mean of the first 5 after warm-up."""
        warm = self.rss_mib[self.rss_warm_index:]
        if len(warm) < 2:
            return None
        k = min(5, len(warm) // 2)
        return sum(warm[-k:]) / k - sum(warm[:k]) / k

    def verdict(self, max_rss_growth_mib: float) -> list[str]:
        problems = []
        if sum(self.served.values()) == 0:
            problems.append("no request completed")
        if self.status_5xx:
            problems.append(f"{self.status_5xx} responses were 5xx")
        if self.bad_inputs_accepted:
            problems.append(f"{self.bad_inputs_accepted} bad inputs were accepted")
        if self.other_errors:
            problems.append(f"{len(self.other_errors)} requests failed: {self.other_errors[0]}")
        if self.timed_out:
            problems.append("the load hit --max-duration before its work minimums were met")
        if self.probes == 0 or self.probe_mismatches:
            problems.append(f"{self.probe_mismatches} of {self.probes} probes differed from the first")
        growth = self.rss_growth_mib
        if growth is not None and growth > max_rss_growth_mib:
            problems.append(f"RSS grew {growth:.1f} MiB after warm-up (bound {max_rss_growth_mib:g})")
        if self.left_running:
            problems.append(f"{self.left_running} requests still running or waiting after the load")
        if self.kv_cache_usage:
            problems.append(f"KV cache {self.kv_cache_usage:.1%} in use after the load (leaked blocks)")
        return problems

    def passed(self, max_rss_growth_mib: float) -> bool:
        return not self.verdict(max_rss_growth_mib)

    def to_json(self, max_rss_growth_mib: float) -> dict[str, Any]:
        data = asdict(self)
        data |= {"served": dict(self.served), "faults": dict(self.faults), "rss_growth_mib": self.rss_growth_mib,
                 "problems": self.verdict(max_rss_growth_mib)}
        return data

    def table(self, max_rss_growth_mib: float) -> str:
        warm = self.rss_mib[self.rss_warm_index:] or [0.0]
        growth = self.rss_growth_mib
        rows = [
            ("Duration (s)", self.duration_s),
            ("Requests served", sum(self.served.values())),
            Grid(["kind", "served"], sorted(self.served.items())),
            ("Client faults injected", sum(self.faults.values())),
            Grid(["fault", "count"], sorted(self.faults.items())),
            ("Bad inputs tried", self.bad_inputs),
            ("Bad inputs accepted", self.bad_inputs_accepted),
            ("4xx responses", self.status_4xx),
            ("5xx responses", self.status_5xx),
            ("Other request failures", len(self.other_errors)),
            ("Determinism probes", self.probes),
            ("Probe mismatches", self.probe_mismatches),
            ("RSS after warm-up (MiB)", warm[0]),
            ("RSS at the end (MiB)", warm[-1]),
            ("RSS max (MiB)", max(self.rss_mib or [0.0])),
            ("RSS growth after warm-up (MiB)", "n/a" if growth is None else round(growth, 1)),
            ("Running/waiting after the load", "n/a" if self.left_running is None else self.left_running),
            ("KV cache in use after the load", "n/a" if self.kv_cache_usage is None else f"{self.kv_cache_usage:.1%}"),
        ]
        problems = self.verdict(max_rss_growth_mib)
        rows.append(("Verdict", "PASS" if not problems else "FAIL: " + "; ".join(problems)))
        return format_report("Soak Result", rows)


# -- the load ------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> SoakFigures:
    figures = SoakFigures()
    async with make_client(args) as client:
        model = args.model or await first_model(client)
        process = psutil.Process(args.pid) if args.pid else None
        start = time.monotonic()

        def done() -> bool:
            """After --duration with the work minimums met; at --max-duration without them (a hang, a failure)."""
            elapsed = time.monotonic() - start
            met = sum(figures.served.values()) >= args.min_requests and figures.probes >= args.min_probes
            figures.timed_out = figures.timed_out or (not met and elapsed >= args.max_duration)
            return (met and elapsed >= args.duration) or figures.timed_out

        probe = _probe(client, model, figures, done, args.probe_interval)
        workers = [_worker(client, model, figures, done, process, args, random.Random(args.seed * 1000 + i))
                   for i in range(args.concurrency)]
        await asyncio.gather(*workers, probe)
        figures.rss_warm_index = int(len(figures.rss_mib) * args.warmup_fraction)
        figures.duration_s = round(time.monotonic() - start, 1)
        await _read_leftovers(client, figures)
    return figures


async def _worker(client: httpx2.AsyncClient, model: str, figures: SoakFigures, done: Callable[[], bool],
                  process: psutil.Process | None, args: argparse.Namespace, rng: random.Random) -> None:
    first_rolls = [0.0, 0.2, 1.0]  # every worker opens with one bad input, one fault and one request, done or not
    while first_rolls or not done():
        roll = first_rolls.pop(0) if first_rolls else rng.random()
        if roll < 0.15:
            await _bad_input(client, model, figures, rng)
        elif roll < 0.30:
            try:
                await _fault(client, model, figures, args, rng)
            except httpx2.HTTPError as exc:
                figures.other_errors.append(f"{type(exc).__name__}: {exc}")
        else:
            await _generate(client, model, figures, process, args, rng)


def _payload(model: str, args: argparse.Namespace, rng: random.Random, stream: bool) -> tuple[Endpoint, dict]:
    endpoint: Endpoint = rng.choice(["chat", "completions"])
    deterministic = rng.random() < 0.5
    seeded = rng.random() < 0.5
    body = build_payload(endpoint, model, random_prompt(rng, rng.randint(4, 40)), rng.randint(4, args.max_tokens),
                         temperature=0.8 if seeded else 0.0, stream=stream,
                         seed=rng.randrange(2**31) if seeded else None,
                         extra={"deterministic": deterministic, "n": rng.choice([1, 1, 1, 2])})
    return endpoint, body


async def _generate(client: httpx2.AsyncClient, model: str, figures: SoakFigures, process: psutil.Process | None,
                    args: argparse.Namespace, rng: random.Random) -> None:
    """One request; once it completes, a sample of the server's RSS (so the samples grow with the work)."""
    stream = rng.random() < 0.5
    endpoint, body = _payload(model, args, rng, stream)
    result = await send_request(client, endpoint, body)
    kind = f"{endpoint} {'stream' if stream else 'body'} {'det' if body['deterministic'] else 'fast'}"
    if result.ok:
        figures.served[kind] += 1
        if process is not None:
            figures.rss_mib.append(round(process.memory_info().rss / MIB, 1))
    else:
        _count_failure(figures, result.error)


async def _fault(client: httpx2.AsyncClient, model: str, figures: SoakFigures, args: argparse.Namespace,
                 rng: random.Random) -> None:
    if rng.random() < 0.5:
        figures.faults["stream abandoned after its first chunk"] += 1
        endpoint, body = _payload(model, args, rng, stream=True)
        path = "/chat/completions" if endpoint == "chat" else "/completions"
        async with client.stream("POST", path, json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break
            if response.status_code >= 500:
                figures.status_5xx += 1
    else:
        figures.faults["client gave up mid-request"] += 1
        endpoint, body = _payload(model, args, rng, stream=False)
        path = "/chat/completions" if endpoint == "chat" else "/completions"
        try:
            response = await client.post(path, json=body, timeout=rng.uniform(0.05, 0.5))
        except httpx2.TimeoutException:
            return
        if response.status_code >= 500:
            figures.status_5xx += 1


async def _bad_input(client: httpx2.AsyncClient, model: str, figures: SoakFigures, rng: random.Random) -> None:
    name, path, template = rng.choice(BAD_INPUTS)
    raw = template.replace("{model}", model).replace("{long}", "word " * 9000)
    figures.bad_inputs += 1
    response = await client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    if response.status_code >= 500:
        figures.status_5xx += 1
    elif response.status_code < 400:
        figures.bad_inputs_accepted += 1
    else:
        figures.status_4xx += 1


def _count_failure(figures: SoakFigures, error: str) -> None:
    if error.startswith("HTTP 5"):
        figures.status_5xx += 1
    elif error.startswith("HTTP 4"):
        figures.status_4xx += 1
        figures.other_errors.append(error)  # a valid request refused is a failure too
    else:
        figures.other_errors.append(error)


async def _probe(client: httpx2.AsyncClient, model: str, figures: SoakFigures, done: Callable[[], bool],
                 interval: float) -> None:
    """The same greedy deterministic request again and again: its tokens, logprobs and digest never change."""
    body = build_payload("completions", model, PROBE_PROMPT, 16, temperature=0.0, stream=False, logprobs=True,
                         extra={"deterministic": True, "ignore_eos": True})
    first = None
    while not done():
        result = await send_request(client, "completions", body)
        if not result.ok:
            _count_failure(figures, result.error)
        else:
            bits = (result.text, result.tokens, result.logprobs, result.digest)
            first = first or bits
            figures.probes += 1
            figures.probe_mismatches += bits != first
        await asyncio.sleep(interval)


async def _read_leftovers(client: httpx2.AsyncClient, figures: SoakFigures, timeout: float = 300.0) -> None:
    """Wait for the server to go idle (abandoned requests finish or abort), then read its gauges."""
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(root + "/metrics")
        if response.status_code != 200:
            return
        gauges = parse_gauges(response.text)
        figures.left_running = int(gauges.get("detserve:num_requests_running", 0)
                                   + gauges.get("detserve:num_requests_waiting", 0))
        figures.kv_cache_usage = gauges.get("detserve:kv_cache_usage_perc")
        if (not figures.left_running and not figures.kv_cache_usage) or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.5)


def parse_gauges(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition: `name value` lines."""
    gauges = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            gauges[parts[0]] = float(parts[1])
    return gauges


# -- a server of our own -------------------------------------------------------------------------------


@contextlib.contextmanager
def _launched(args: argparse.Namespace) -> Iterator[None]:
    """Start `detserve serve` on a free port, point args at it, stop it (SIGTERM, drained) at the end."""
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"detserve-soak-{port}.log"
    command = [sys.executable, "-m", "detserve.server", "serve", "--host", "127.0.0.1", "--port", str(port), *args.server_arg]
    with launched(command, port, log, timeout=300) as process:
        args.base_url, args.pid = f"http://127.0.0.1:{port}/v1", process.pid
        print(f"soak: serving on port {port} (pid {process.pid}, log {log})", file=sys.stderr)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detserve.server.bench.soak", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
