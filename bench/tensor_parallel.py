"""What tensor parallelism and its TP-size-invariant fold cost: decode steps at TP sizes and K-splits.

For each (TP size, S) the engine loads the model split over that many gloo (CPU) or NCCL (GPU)
processes, and `bench.engine_step.time_decode_steps` times whole decode steps at each batch size,
deterministic (the invariant fold: S float32 partials all-gathered, folded in order) and fast (a
rank's partials folded, then all-reduced). TP 1 with S = 1 is today's single-process engine. The
ranks share the machine's cores: each gets cores / TP threads. Then the latency of one gloo
all-gather and all-reduce between two processes (a CPU TP step's floor), and on paper the bytes a
row-parallel matmul moves per token for a model shape at TP 2, 4 and 8 (`--paper-config`):

    python -m bench.tensor_parallel                      # the default model: TP 1 and 3, S = 1, 3, 6
    python -m bench.tensor_parallel --runs 1:1,1:2,2:2 --config bench/configs/<small>.json --quantization int4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.engine_step import LLAMA3_8B, time_decode_steps
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine


def measure(config: EngineConfig, batches: list[int], steps: int) -> dict[tuple[int, bool], float]:
    """Decode tokens/s per (batch, deterministic) of one engine, closed afterwards."""
    engine = LLMEngine(config)
    try:
        return {(b, d): time_decode_steps(engine, b, 32, steps, d).tokens_per_second
                for b in batches for d in (True, False)}
    finally:
        engine.close()


def bytes_per_token(hidden: int, tp: int, splits: int) -> tuple[float, float]:
    """(invariant, fast) bytes one rank receives per token for one row-parallel matmul's output of
    `hidden` columns: the all-gather of the other ranks' S/TP float32 partials, against a ring
    all-reduce of one float32 row (2 (TP-1)/TP of it in: reduce-scatter, then all-gather; a
    bfloat16 all-reduce, as vLLM's, moves half that)."""
    invariant = (tp - 1) * (splits // tp) * hidden * 4
    fast = 2 * (tp - 1) / tp * hidden * 4
    return invariant, fast


def _time_collectives(rank: int, port: int, hidden: int, results: Path) -> None:
    """One rank of two: microseconds per all-gather and per all-reduce of one `hidden`-float row."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    row = torch.randn(1, hidden)
    gathered = [torch.empty_like(row) for _ in range(2)]
    timings = {}
    for name, op in (("all_gather", lambda: dist.all_gather(gathered, row)), ("all_reduce", lambda: dist.all_reduce(row))):
        for _ in range(50):
            op()
        start = time.perf_counter()
        for _ in range(500):
            op()
        timings[name] = (time.perf_counter() - start) / 500 * 1e6
    dist.destroy_process_group()
    if rank == 0:
        results.write_text(json.dumps(timings))


def print_collective_latency(hidden: int) -> None:
    """What one collective costs between two gloo processes here: the floor of a CPU TP step."""
    results = Path(tempfile.mkdtemp()) / "latency.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_time_collectives, args=(port, hidden, results), nprocs=2)
    timings = json.loads(results.read_text())
    print(f"\n== gloo, 2 processes, one {hidden}-float row: all_gather {timings['all_gather']:.0f} us, "
          f"all_reduce {timings['all_reduce']:.0f} us ==")


def print_paper(shape: dict) -> None:
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    print(f"\n== on paper: {hidden}-wide rows, {layers} layers x 2 row-parallel matmuls (o, down), per token ==")
    print(f"{'TP':>3} {'S':>3} {'invariant KiB/layer':>20} {'fast KiB/layer':>15} {'ratio':>6}")
    for tp in (2, 4, 8):
        for splits in sorted({tp, 8}):
            invariant, fast = (2 * b / 1024 for b in bytes_per_token(hidden, tp, splits))
            print(f"{tp:>3} {splits:>3} {invariant:>20.1f} {fast:>15.1f} {invariant / fast:>5.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tensor_parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="1:1,1:3,1:6,3:3,3:6", help="TP:S pairs (default: %(default)s)")
    parser.add_argument("--config", help="a config.json for random weights (default: the default model)")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--paper-config", help="config.json of the shape on paper (default: Llama-3-8B)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    cores = len(os.sched_getaffinity(0))
    model = {}
    if args.config:
        folder = Path(tempfile.mkdtemp())
        (folder / "config.json").write_text(Path(args.config).read_text())
        model = dict(model=str(folder), load_format="dummy")
    header = " ".join(f"{f'{kind} b={b}':>14}" for b in batches for kind in ("det", "fast"))
    print(f"== decode tok/s, {cores} cores shared by the ranks, torch {torch.__version__} ==")
    print(f"{'TP':>3} {'S':>3} {'threads':>7} {header}")
    previous_threads = torch.get_num_threads()
    try:
        for run in args.runs.split(","):
            tp, splits = (int(v) for v in run.split(":"))
            threads = max(1, cores // tp)
            torch.set_num_threads(threads)  # spawned ranks take rank 0's count
            config = EngineConfig(**model, quantization=args.quantization, tensor_parallel_size=tp,
                                  tp_invariant_splits=splits, kv_cache_tokens=4096)
            rates = measure(config, batches, args.steps)
            cells = " ".join(f"{rates[(b, d)]:>14.1f}" for b in batches for d in (True, False))
            print(f"{tp:>3} {splits:>3} {threads:>7} {cells}", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    print_collective_latency(576)
    paper = json.loads(Path(args.paper_config).read_text()) if args.paper_config else LLAMA3_8B
    print_paper(paper)
    return 0


if __name__ == "__main__":
    sys.exit(main())
