"""CPU serving speed, side by side in one run: detserve (deterministic and fast requests), the same
engine in-process, and optionally llama.cpp's `llama-server` on the same GGUF.

Each server is started with its default flags and driven by `detserve bench serve`'s client:
closed loop, streamed chat completions of random prompts (about 40 tokens with the chat template),
128 output tokens each (`ignore_eos`), temperature 0. The in-process row runs the same prompts
through `LLMEngine.step()` with the same concurrency, no HTTP: the server should keep at least
90 % of it. The `detserve (curl)` row drives the server with `curl` processes instead, whose CPU
per token is next to nothing (`measure_with_curl` says why that matters on 2 cores). All of them
stay up (an idle one takes no CPU) and each round runs every one in turn, so a drift of the
shared, noisy machine hits all alike; each cell is the median of `--rounds` rounds. Prints one
table of output tokens per second and the ratios the CPU targets are stated in (bench/RESULTS.md).

    python -m bench.cpu_serving --llama-server /path/to/llama-server

llama-server runs with `-np <max concurrency> -t <threads>` (its slots, our cores); build it from the
`llama-cpp-python` sdist's vendored llama.cpp (bench/RESULTS.md says how). It is a reference, never
a dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx2

from detserve.server.bench import serve
from detserve.server.bench.common import build_payload, free_port, launched, run_client
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import SamplingParams
from detserve.engine.weights import default_model_path


@dataclass
class Row:
    server: str  # detserve | engine | llama.cpp
    mode: str  # deterministic | fast | -
    concurrency: int
    tokens_per_second: float


def client_args(base_url: str, concurrency: int, requests_per_slot: int, deterministic: bool | None,
                input_words: int, output_len: int, dataset: str = "random") -> argparse.Namespace:
    """`detserve bench serve`'s arguments for one closed-loop run: chat requests of random words, or
    with dataset `random-ids` completions of random token ids (a model served without a tokenizer)."""
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    endpoint = "completions" if dataset == "random-ids" else "chat"
    argv = ["--base-url", base_url, "--endpoint", endpoint, "--dataset", dataset, "--disable-tqdm",
            "--num-prompts", str(concurrency * requests_per_slot), "--input-len", str(input_words),
            "--output-len", str(output_len), "--max-concurrency", str(concurrency), "--ignore-eos"]
    if deterministic is not None:
        argv.append("--deterministic" if deterministic else "--no-deterministic")
    return parser.parse_args(argv)


def measure_server(args: argparse.Namespace) -> float:
    """Output tokens per second of one closed-loop run (a warm-up request first, untimed)."""
    warm = argparse.Namespace(**{**vars(args), "num_prompts": 1, "max_concurrency": 1, "output_len": 8})
    run_client(serve.benchmark(warm, serve.load_workload(warm)))
    report = run_client(serve.benchmark(args, serve.load_workload(args)))
    if report.metrics.failed:
        raise RuntimeError(f"{report.metrics.failed} requests failed: {report.results[0].error}")
    return report.metrics.output_throughput


def measure_with_curl(args: argparse.Namespace) -> float:
    """The same closed loop with `curl` processes as the clients: output tokens per second.

    The Python client's CPU per streamed token (0.07 ms under uvloop with `event_stream`; 0.14-0.31
    with httpx2 before) comes out of the engine's step on 2 cores, and more than once: the step's
    other OpenMP thread spins at the next barrier while one is preempted. curl costs next to
    nothing per token (but a process per request), so this row shows what the server itself keeps
    of the engine's speed. Tokens are counted from each response's final usage chunk, read after
    the clock stops.
    """
    model = httpx2.get(f"{args.base_url}/models", timeout=30).json()["data"][0]["id"]
    extra = {"ignore_eos": True} | ({} if args.deterministic is None else {"deterministic": args.deterministic})
    bodies = [json.dumps(build_payload("chat", model, item.prompt, item.max_tokens, temperature=0.0, stream=True,
                                       extra=extra)) for item in serve.load_workload(args)]
    with tempfile.TemporaryDirectory() as out:
        def one_slot(slot: int) -> None:
            for i in range(slot, len(bodies), args.max_concurrency):
                subprocess.run(["curl", "-sSfN", "-o", f"{out}/{i}", "-H", "content-type: application/json",
                                "--data-binary", "@-", f"{args.base_url}/chat/completions"],
                               input=bodies[i].encode(), check=True)

        started = time.perf_counter()
        with ThreadPoolExecutor(args.max_concurrency) as slots:
            list(slots.map(one_slot, range(args.max_concurrency)))
        duration = time.perf_counter() - started
        tokens = sum(_completion_tokens(Path(out, str(i)).read_text()) for i in range(len(bodies)))
    return tokens / duration


def _completion_tokens(stream: str) -> int:
    chunks = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: {")]
    usage = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    if not usage:
        raise RuntimeError("a streamed response ended without its usage chunk")
    return usage[-1]["completion_tokens"]


def measure_engine(engine: LLMEngine, args: argparse.Namespace, deterministic: bool) -> float:
    """The same workload through the engine in this process: closed loop at the same concurrency
    (a chat prompt through the chat template, token ids as they are)."""
    items = serve.load_workload(args)
    prompts = [i.prompt if isinstance(i.prompt, list) else
               engine.tokenizer.apply_chat_template([{"role": "user", "content": i.prompt}]) for i in items]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, deterministic=deterministic)
    engine.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
    pending, running, tokens = list(prompts), 0, 0
    started = time.perf_counter()
    while pending or running:
        while pending and running < args.max_concurrency:
            engine.add_request(f"bench-{len(pending)}-{deterministic}", engine.admit(pending.pop(), params))
            running += 1
        for output in engine.step():
            tokens += len(output.new_token_ids)
            running -= output.finished
    return tokens / (time.perf_counter() - started)


def _mode(deterministic: bool | None) -> str:
    return "-" if deterministic is None else "deterministic" if deterministic else "fast"


def table(rows: list[Row]) -> str:
    """Tokens/s per system and concurrency, then the ratios whose both sides ran."""
    by = {(r.server, r.mode, r.concurrency): r.tokens_per_second for r in rows}
    lines = [f"{'':32}" + "".join(f"{f'concurrency {c}':>16}" for c in sorted({r.concurrency for r in rows}))]
    for server, mode in dict.fromkeys((r.server, r.mode) for r in rows):
        cells = "".join(f"{by.get((server, mode, c), float('nan')):>16.1f}" for c in sorted({r.concurrency for r in rows}))
        lines.append(f"{server + ' ' + mode:32}{cells}")
    ratios = [("deterministic / fast", ("detserve", "deterministic"), ("detserve", "fast")),
              ("server / engine, deterministic", ("detserve", "deterministic"), ("engine", "deterministic")),
              ("server / engine, fast", ("detserve", "fast"), ("engine", "fast")),
              ("server / engine, curl", ("detserve (curl)", "deterministic"), ("engine", "deterministic")),
              ("deterministic / llama.cpp", ("detserve", "deterministic"), ("llama.cpp", "-"))]
    ran = {(r.server, r.mode) for r in rows}
    for name, top, bottom in ratios:
        if top not in ran or bottom not in ran:
            continue
        cells = [by.get((*top, c), float("nan")) / by.get((*bottom, c), float("nan"))
                 for c in sorted({r.concurrency for r in rows})]
        lines.append(f"{name:32}" + "".join(f"{x:>16.2f}" for x in cells))
    return "\n".join(lines)


_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
              "avx10")


def machine() -> str:
    """The CPU a number came from: its model, the ISA extensions the kernels can use, the cores, torch.

    The same benchmark gave 0.45x llama.cpp at one client on one 2-core machine and 0.62x on another,
    so a number without its machine cannot be compared."""
    import os
    import platform

    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = [f for f in _ISA_FLAGS if f in flags or (f == "avx10" and any(g.startswith("avx10") for g in flags))]
    return f"{model}; {' '.join(isa) or 'no AVX2'}; {os.cpu_count()} cores; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", type=Path, help="a llama-server binary to compare with (default: none)")
    parser.add_argument("--gguf", type=Path, help="the model (default: the default model's GGUF)")
    parser.add_argument("--concurrency", default="1,8", help="(default: %(default)s)")
    parser.add_argument("--requests-per-slot", type=int, default=3, help="requests per unit of concurrency (default: 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each running every system once; a cell is their median (default: 3)")
    parser.add_argument("--input-words", type=int, default=30, help="random words per prompt (default: 30)")
    parser.add_argument("--output-len", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="llama-server's -t (default: %(default)s)")
    parser.add_argument("--skip-engine", action="store_true", help="leave out the in-process engine rows")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    gguf = args.gguf or default_model_path()
    logs = Path("/tmp")
    rows: list[Row] = []

    def record(name: str, mode: str, concurrency: int, runs: list[float]) -> None:
        rows.append(Row(name, mode, concurrency, statistics.median(runs)))
        print(f"{name} {mode} concurrency {concurrency}: {' '.join(f'{r:.1f}' for r in runs)} tok/s", flush=True)

    model_flag = ["--model", str(gguf)] if args.gguf else []
    with contextlib.ExitStack() as running:
        systems: list[tuple[str, str, Callable[[int], float]]] = []  # (server, mode, tokens/s at a concurrency)

        def client(url: str, concurrency: int, deterministic: bool | None) -> argparse.Namespace:
            return client_args(url, concurrency, args.requests_per_slot, deterministic, args.input_words,
                               args.output_len)

        def serve_http(name: str, command: Callable[[int], list[str]], modes: list[bool | None]) -> None:
            port = free_port()
            running.enter_context(launched(command(port), port, logs / f"cpu-serving-{name}-{port}.log"))
            url = f"http://127.0.0.1:{port}/v1"
            for d in modes:
                systems.append((name, _mode(d), lambda c, d=d: measure_server(client(url, c, d))))
            if name == "detserve" and shutil.which("curl"):
                systems.append(("detserve (curl)", "deterministic",
                                lambda c: measure_with_curl(client(url, c, True))))

        serve_http("detserve", lambda port: [sys.executable, "-m", "detserve.server", "serve", *model_flag, "--port", str(port)],
                   [True, False])
        if args.llama_server:
            serve_http("llama.cpp", lambda port: [str(args.llama_server), "-m", str(gguf), "--port", str(port), "-t",
                                                  str(args.threads), "-np", str(max(concurrencies)), "-c",
                                                  str(max(concurrencies) * 1024)], [None])
        if not args.skip_engine:
            engine = LLMEngine(EngineConfig(model=str(gguf)))
            for d in (True, False):
                systems.append(("engine", _mode(d), lambda c, d=d: measure_engine(engine, client("unused", c, d), d)))
        for c in concurrencies:
            runs: dict[tuple[str, str], list[float]] = {(name, mode): [] for name, mode, _ in systems}
            for _ in range(args.rounds):
                for name, mode, measure in systems:
                    runs[name, mode].append(measure(c))
            for (name, mode), values in runs.items():
                record(name, mode, c, values)
    print(f"\n== output tokens/s, {args.output_len}-token outputs, closed loop, {gguf.name} ==")
    print(f"on {machine()}, {time.strftime('%Y-%m-%d')}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
