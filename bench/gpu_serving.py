"""Serving a random-weight model through HTTP on the GPU, side by side with the same engine in-process.

`detserve serve --load-format dummy --model <config dir>` (Llama-3-8B's shape by default; the model
has no tokenizer) is driven by `detserve bench serve --dataset random-ids`: closed loop, streamed
completions of random token-id prompts, `--output-len` tokens each (`ignore_eos`), temperature 0,
deterministic and fast. The in-process row sends the same prompts through `LLMEngine.step()` at
the same concurrency, no HTTP: the server should keep at least 90 % of it. The server runs first
and is stopped before the engine loads, so one GPU holds one model at a time. Prints one table of
output tokens per second and the ratios the GPU serving targets are stated in (bench/RESULTS.md).

    python -m bench.gpu_serving [--config bench/configs/llama-3-8b.json] [--concurrency 1,16,64]

`--device cpu --config <a tiny config.json>` runs the same on a CPU (how the tests run it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the repo's packages
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.cpu_serving import Row, client_args, measure_engine, measure_server, table
from bench.engine_step import LLAMA3_8B, where_and_how
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.server.bench.common import free_port, launched

MODES = (True, False)  # deterministic, fast


def engine_flags(args: argparse.Namespace, concurrencies: list[int]) -> dict:
    """The engine's configuration, the same for the server and the in-process engine: room for every
    request of the largest concurrency at once."""
    return {"device": args.device, "max_num_seqs": max(concurrencies), "enforce_eager": args.enforce_eager,
            "kv_cache_tokens": max(concurrencies) * (args.input_len + args.output_len + 32)}


def serve_command(folder: str, flags: dict, port: int) -> list[str]:
    command = [sys.executable, "-m", "detserve.server", "serve", "--model", folder, "--load-format", "dummy",
               "--port", str(port)]
    for name, value in flags.items():
        if isinstance(value, bool):
            command += [f"--{name.replace('_', '-')}"] if value else []
        else:
            command += [f"--{name.replace('_', '-')}", str(value)]
    return command


def run(args: argparse.Namespace, config_json: dict, concurrencies: list[int]) -> list[Row]:
    """Tokens/s of the server, then of the engine in-process, at each concurrency in both modes."""
    rows: list[Row] = []

    def client(url: str, concurrency: int, deterministic: bool) -> argparse.Namespace:
        return client_args(url, concurrency, args.requests_per_slot, deterministic, args.input_len, args.output_len,
                           dataset="random-ids")

    def record(server: str, deterministic: bool, concurrency: int, tokens_per_second: float) -> None:
        mode = "deterministic" if deterministic else "fast"
        rows.append(Row(server, mode, concurrency, tokens_per_second))
        print(f"{server} {mode} concurrency {concurrency}: {tokens_per_second:.1f} tok/s", flush=True)

    flags = engine_flags(args, concurrencies)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config_json))
        port = free_port()
        log = Path(tempfile.gettempdir()) / f"gpu-serving-{port}.log"
        with launched(serve_command(folder, flags, port), port, log):
            for c in concurrencies:
                for d in MODES:
                    record("detserve", d, c, measure_server(client(f"http://127.0.0.1:{port}/v1", c, d)))
        engine = LLMEngine(EngineConfig(model=folder, load_format="dummy", **flags))
        for c in concurrencies:
            for d in MODES:
                record("engine", d, c, measure_engine(engine, client("unused", c, d), d))
        engine.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="a model config.json, random weights (default: Llama-3-8B's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", default="1,16,64", help="(default: %(default)s)")
    parser.add_argument("--requests-per-slot", type=int, default=2,
                        help="requests per unit of concurrency (default: 2)")
    parser.add_argument("--input-len", type=int, default=64, help="prompt token ids (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, in the server and the engine")
    args = parser.parse_args(argv)
    config_json = json.loads(args.config.read_text()) if args.config else LLAMA3_8B
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows = run(args, config_json, concurrencies)
    print(f"\n== output tokens/s through HTTP vs in-process, {config_json['hidden_size']}-wide x "
          f"{config_json['num_hidden_layers']} layers, random weights, {args.input_len}-id prompts, "
          f"{args.output_len}-token outputs, closed loop, {where_and_how(args.device, args.enforce_eager)} ==")
    print(time.strftime("%Y-%m-%d"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
