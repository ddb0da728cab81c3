"""CPU serving speed, side by side in one run: detserve (deterministic and fast requests), the same
engine in-process, and optionally llama.cpp's `llama-server` on the same GGUF.

Each server is started with its default flags, one at a time (the machine's cores are shared), and
driven by `detserve bench serve`'s client: closed loop, streamed chat completions of random
prompts (about 40 tokens with the chat template), 128 output tokens each (`ignore_eos`),
temperature 0. The in-process row runs the same prompts through `LLMEngine.step()` with the same
concurrency, no HTTP: the server should keep at least 90 % of it. Each cell is the median of
`--rounds` runs, deterministic and fast runs alternating (this machine is shared and noisy). Prints
one table of output tokens per second and the ratios the CPU targets are stated in
(bench/RESULTS.md).

    python -m bench.cpu_serving --llama-server /path/to/llama-server

llama-server runs with `-np <max concurrency> -t <threads>` (its slots, our cores); build it from the
`llama-cpp-python` sdist's vendored llama.cpp (bench/RESULTS.md says how). It is a reference, never
a dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from server.bench import serve
from server.bench.common import free_port, launched
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from engine.weights import default_model_path


@dataclass
class Row:
    server: str  # detserve | engine | llama.cpp
    mode: str  # deterministic | fast | -
    concurrency: int
    tokens_per_second: float


def client_args(base_url: str, concurrency: int, requests_per_slot: int, deterministic: bool | None,
                input_words: int, output_len: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    argv = ["--base-url", base_url, "--endpoint", "chat", "--dataset", "random", "--disable-tqdm",
            "--num-prompts", str(concurrency * requests_per_slot), "--input-len", str(input_words),
            "--output-len", str(output_len), "--max-concurrency", str(concurrency), "--ignore-eos"]
    if deterministic is not None:
        argv.append("--deterministic" if deterministic else "--no-deterministic")
    return parser.parse_args(argv)


def measure_server(args: argparse.Namespace) -> float:
    """Output tokens per second of one closed-loop run (a warm-up request first, untimed)."""
    warm = argparse.Namespace(**{**vars(args), "num_prompts": 1, "max_concurrency": 1, "output_len": 8})
    asyncio.run(serve.benchmark(warm, serve.load_workload(warm)))
    report = asyncio.run(serve.benchmark(args, serve.load_workload(args)))
    if report.metrics.failed:
        raise RuntimeError(f"{report.metrics.failed} requests failed: {report.results[0].error}")
    return report.metrics.output_throughput


def measure_engine(engine: LLMEngine, args: argparse.Namespace, deterministic: bool) -> float:
    """The same workload through the engine in this process: closed loop at the same concurrency."""
    items = serve.load_workload(args)
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": i.prompt}]) for i in items]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, deterministic=deterministic)
    engine.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
    pending, running, tokens = list(prompts), 0, 0
    started = time.perf_counter()
    while pending or running:
        while pending and running < args.max_concurrency:
            engine.add_request(f"bench-{len(pending)}-{deterministic}", pending.pop(), params)
            running += 1
        for output in engine.step():
            tokens += len(output.new_token_ids)
            running -= output.finished
    return tokens / (time.perf_counter() - started)


def table(rows: list[Row]) -> str:
    by = {(r.server, r.mode, r.concurrency): r.tokens_per_second for r in rows}
    lines = [f"{'':28}" + "".join(f"{f'concurrency {c}':>16}" for c in sorted({r.concurrency for r in rows}))]
    for server, mode in dict.fromkeys((r.server, r.mode) for r in rows):
        cells = "".join(f"{by.get((server, mode, c), float('nan')):>16.1f}" for c in sorted({r.concurrency for r in rows}))
        lines.append(f"{server + ' ' + mode:28}{cells}")
    ratios = [("deterministic / fast", ("detserve", "deterministic"), ("detserve", "fast")),
              ("server / engine, deterministic", ("detserve", "deterministic"), ("engine", "deterministic")),
              ("deterministic / llama.cpp", ("detserve", "deterministic"), ("llama.cpp", "-"))]
    for name, top, bottom in ratios:
        cells = [by.get((*top, c), float("nan")) / by.get((*bottom, c), float("nan"))
                 for c in sorted({r.concurrency for r in rows})]
        lines.append(f"{name:28}" + "".join(f"{x:>16.2f}" for x in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", type=Path, help="a llama-server binary to compare with (default: none)")
    parser.add_argument("--gguf", type=Path, help="the model (default: the default model's GGUF)")
    parser.add_argument("--concurrency", default="1,8", help="(default: %(default)s)")
    parser.add_argument("--requests-per-slot", type=int, default=3, help="requests per unit of concurrency (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per cell; the table shows the median (default: 3)")
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

    def run_server(name: str, command: list[str], port: int, modes: list[bool | None]) -> None:
        with launched(command, port, logs / f"cpu-serving-{name}-{port}.log"):
            url = f"http://127.0.0.1:{port}/v1"
            for c in concurrencies:
                runs: dict[bool | None, list[float]] = {m: [] for m in modes}
                for _ in range(args.rounds):
                    for deterministic in modes:
                        client = client_args(url, c, args.requests_per_slot, deterministic, args.input_words,
                                             args.output_len)
                        runs[deterministic].append(measure_server(client))
                for deterministic, values in runs.items():
                    record(name, "-" if deterministic is None else "deterministic" if deterministic else "fast", c, values)

    port = free_port()
    model_flag = ["--model", str(gguf)] if args.gguf else []
    run_server("detserve", [sys.executable, "-m", "server", "serve", *model_flag, "--port", str(port)], port,
               [True, False])
    if args.llama_server:
        port = free_port()
        run_server("llama.cpp", [str(args.llama_server), "-m", str(gguf), "--port", str(port), "-t", str(args.threads),
                                 "-np", str(max(concurrencies)), "-c", str(max(concurrencies) * 1024)], port, [None])
    if not args.skip_engine:
        engine = LLMEngine(EngineConfig(model=str(gguf)))
        for c in concurrencies:
            runs = {True: [], False: []}
            for _ in range(args.rounds):
                for deterministic in (True, False):
                    client = client_args("http://unused", c, args.requests_per_slot, deterministic, args.input_words,
                                         args.output_len)
                    runs[deterministic].append(measure_engine(engine, client, deterministic))
            for deterministic, values in runs.items():
                record("engine", "deterministic" if deterministic else "fast", c, values)
    print(f"\n== output tokens/s, {args.output_len}-token outputs, closed loop, {gguf.name} ==")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
