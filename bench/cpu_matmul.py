"""The CPU's C matmuls per code path: µs per call of each path this CPU runs (plain C, AVX2,
AVX-512 with VNNI) on the default model's weight shapes, side by side in one process.

Each round calls every path in turn on the same inputs (hot weights: a kernel's own speed, not a
step's memory traffic), so a drift of the shared machine hits all alike; each cell is the median
over rounds. Every path's output is checked bit-equal to the first's before it is timed. Prints the
CPU it ran on and one table; asserts nothing else.

    python -m bench.cpu_matmul [--isas avx2,avx512] [--rows 1,8,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __name__ == "__main__" and not __package__:  # run as a file: import the repo's `bench`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench.cpu_serving import machine
from detserve.kernels import cpu_native

# (name, bits, N, K) of the default model's matmuls: q|k|v, gate|up and down fused or not, the head
SHAPES = [("q|k|v", 4, 960, 576), ("o", 4, 576, 576), ("gate|up", 4, 3072, 576), ("down", 4, 576, 1536),
          ("head-q8_0", 8, 49152, 576)]


def packed(bits: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight in the C matmul's layout (GGUF-like: float16 scales, Q4_1 minimums)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(n, k // cpu_native.GROUP, generator=g) * 0.01 + 1e-4
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        return cpu_native.pack_int4(q, scales, -8 * scales)
    return cpu_native.pack_int8(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), scales)


def time_paths(kernel: Callable, x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor], isas: list[str],
               rounds: int) -> dict[str, float]:
    """Median µs per call of each path, every path's bits checked against the first's."""
    first = kernel(x, *weight, isa=isas[0])
    for isa in isas[1:]:
        if not torch.equal(kernel(x, *weight, isa=isa), first):
            raise AssertionError(f"the {isa} code gave other bits than the {isas[0]} code")
    calls = max(1, int(2e5 // (weight[0].numel() * x.shape[0]) ** 0.5))  # fewer calls for bigger work
    times: dict[str, list[float]] = {isa: [] for isa in isas}
    for _ in range(rounds):
        for isa in isas:
            started = time.perf_counter()
            for _ in range(calls):
                kernel(x, *weight, isa=isa)
            times[isa].append((time.perf_counter() - started) / calls * 1e6)
    return {isa: statistics.median(values) for isa, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_matmul", description=__doc__.split("\n\n")[0])
    parser.add_argument("--isas", help="code paths, comma-separated (default: every one this CPU runs)")
    parser.add_argument("--rows", default="1,8,64", help="activation rows M per call (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=9, help="(default: %(default)s)")
    parser.add_argument("--shapes", help="names from SHAPES, comma-separated (default: all)")
    args = parser.parse_args(argv)
    isas = args.isas.split(",") if args.isas else list(cpu_native.matmul_isas())
    missing = [isa for isa in isas if isa not in cpu_native.matmul_isas()]
    if missing:
        parser.error(f"this CPU does not run {', '.join(missing)} (it runs {', '.join(cpu_native.matmul_isas())})")
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    print(f"== C matmuls, µs per call, median of {args.rounds} rounds ==\non {machine()}")
    ratio = f"{isas[-1]}/{isas[-2]}" if len(isas) > 1 else ""  # the widest path against the next
    print(f"{'weight':>12} {'NxK':>11} {'M':>4} " + " ".join(f"{isa:>8}" for isa in isas) + f" {ratio:>13}")
    for name, bits, n, k in shapes:
        weight = packed(bits, n, k)
        kernel = cpu_native.int4_linear if bits == 4 else cpu_native.int8_linear
        for rows in map(int, args.rows.split(",")):
            us = time_paths(kernel, torch.randn(rows, k), weight, isas, args.rounds)
            line = f"{name:>12} {f'{n}x{k}':>11} {rows:>4} " + " ".join(f"{us[isa]:8.0f}" for isa in isas)
            print(line + (f" {us[isas[-1]] / us[isas[-2]]:13.2f}" if len(isas) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
