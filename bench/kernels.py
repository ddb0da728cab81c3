"""What batch invariance costs on this GPU: the invariant Triton kernels against the fast torch path.

Run from the repo root on a CUDA machine: `python -m bench.kernels`. Matmul is timed against
cuBLAS (`F.linear`) at Llama-3-8B layer shapes; attention against torch SDPA on contiguous K/V
(the faster of `enable_gqa` and pre-expanded heads) for decode batches and two prefills; all in
bfloat16 with the configs pinned for this GPU. Every ratio compares two timings from the same run:
eager (do_bench medians, L2 flushed before each run, launch overhead included) or replayed in CUDA
graphs (do_bench_cudagraph medians, weights cycled past L2: the kernels' GPU time). Per-shape lines
come first, a short summary table last.
Prints numbers; asserts nothing.

`--sweep` times candidate tilings instead, to choose what configs.py pins: per weight shape,
each matmul candidate at every M (with its bitwise invariance across M and across the two
split-K launches checked first, and which earlier candidate, if any, gave exactly its bits), and
each attention candidate on the decode cases (with its two launches checked equal). It ends with
the best invariant candidate per shape, ready to paste.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __name__ == "__main__" and not __package__:  # run as a file: import the repo's `kernels`, not this one
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from detserve.kernels import KV_SPLIT_SIZE, AttentionMetadata, configs, matmul, paged_attention

DEVICE, DTYPE = "cuda", torch.bfloat16  # what the tables measure (tests run the code in the Triton interpreter)
# (K, N) of the weights the engine multiplies by, per model: q|k|v and gate|up fused at load, then o
# and down (the LM heads, 128256-152064 rows, are left out: a sweep keeps every candidate's output).
MODEL_SHAPES = {
    "llama-3-8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
    "qwen3-8b": [(4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096)],
    "qwen2.5-7b": [(3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584)],
}
MATMUL_SHAPES = MODEL_SHAPES["llama-3-8b"]  # what `--models` does not widen
MATMUL_M = [1, 8, 32, 128, 512, 2048, 8192]
DECODE = [(1, 1024), (1, 8192), (16, 2048), (64, 1024), (64, 4096), (256, 1024)]  # (batch, keys per sequence)
PREFILL = [(1, 2048), (4, 1024)]  # (sequences, prompt tokens each)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3-8B attention


def _matmul_candidate(
    bm: int, bn: int, bk: int, warps: int, stages: int, programs: int, min_tiles: int, tma: bool = False,
    last_folds: bool = False,
) -> configs.MatmulConfig:
    return configs.MatmulConfig(
        block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps, num_stages=stages,
        target_programs=programs, max_splits=16, min_k_tiles_per_split=min_tiles, tma=tma,
        last_split_folds=last_folds,
    )


# Hopper tilings to sweep (132 SMs: one or two waves of split-K programs at decode sizes); each
# compiles for sm_90 without spills (bench.kernel_compile), which 128x128 tiles on 4 warps and
# 128x256 tiles do not.
MATMUL_CANDIDATES = [
    _matmul_candidate(128, 128, 64, 8, 3, 132, 8),  # the pinned default
    _matmul_candidate(128, 128, 64, 8, 4, 132, 8),
    _matmul_candidate(128, 128, 64, 8, 3, 264, 4),
    _matmul_candidate(128, 128, 32, 8, 4, 132, 8),
    _matmul_candidate(128, 128, 128, 8, 2, 132, 4),
    _matmul_candidate(128, 64, 64, 4, 4, 264, 8),
    _matmul_candidate(64, 128, 64, 4, 4, 132, 8),
    _matmul_candidate(64, 64, 128, 4, 3, 264, 4),
    _matmul_candidate(128, 128, 64, 8, 3, 132, 8, tma=True),  # TMA twins: expected to give the bits of #0, #5, #6
    _matmul_candidate(128, 64, 64, 4, 4, 264, 8, tma=True),
    _matmul_candidate(64, 128, 64, 4, 4, 132, 8, tma=True),
    # One launch at decode sizes (the tile's last split program folds): expected to give the bits
    # of #0, #2 and #5, minus the fold kernel's launch.
    _matmul_candidate(128, 128, 64, 8, 3, 132, 8, last_folds=True),
    _matmul_candidate(128, 128, 64, 8, 3, 264, 4, last_folds=True),
    _matmul_candidate(128, 64, 64, 4, 4, 264, 8, last_folds=True),
]
ATTENTION_CANDIDATES = [
    configs.AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),  # the pinned default
    configs.AttentionConfig(block_m=64, block_n=64, num_warps=8, num_stages=2),
    configs.AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
    configs.AttentionConfig(block_m=64, block_n=128, num_warps=8, num_stages=2),
    configs.AttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
    # Decode-sized row tiles (a decode item fills G of them): less idle MMA and smaller programs,
    # mma.sync instead of wgmma, so prefill pays; the sweep shows both sides.
    configs.AttentionConfig(block_m=16, block_n=64, num_warps=4, num_stages=2),
    configs.AttentionConfig(block_m=32, block_n=64, num_warps=4, num_stages=2),
    # One launch for decode (an item's last split program merges): twins of #0, #1 and #5.
    configs.AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2, last_split_merges=True),
    configs.AttentionConfig(block_m=64, block_n=64, num_warps=8, num_stages=2, last_split_merges=True),
    configs.AttentionConfig(block_m=16, block_n=64, num_warps=4, num_stages=2, last_split_merges=True),
]


def _ms(fn) -> float:
    """Median eager time of fn: launch overhead included, L2 flushed before every run (do_bench)."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _graph_ms(fn, calls: int = 1) -> float:
    """Median time of one of fn's `calls` kernel calls, replayed in a CUDA graph: GPU time alone,
    as an engine that captures its steps in graphs would pay. Nothing flushes L2 between replays,
    so fn should cycle through more weight bytes than L2 holds (`_weight_copies`)."""
    return do_bench_cudagraph(fn, rep=100, return_mode="median") / calls


def _l2_bytes() -> int:
    return torch.cuda.get_device_properties(DEVICE).L2_cache_size


def _weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight and enough copies that cycling through them streams over twice L2 from HBM."""
    count = min(8, math.ceil(2 * _l2_bytes() / (weight.numel() * weight.element_size())))
    return [weight] + [weight.clone() for _ in range(count - 1)]


def measured_bandwidth_gbs() -> float:
    """HBM bandwidth as a large device-to-device copy achieves it (bytes read + written / time)."""
    source = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    return 2 * source.numel() / _ms(lambda: target.copy_(source)) / 1e6


def bench_matmul(arch: configs.ArchConfig) -> list[tuple[str, int, float, float, float, float]]:
    """Per shape and M: (shape, M, ours, cuBLAS) eager, then (ours, cuBLAS) in CUDA graphs."""
    rows = []
    print(f"\nmatmul {DTYPE}, invariant Triton vs cuBLAS F.linear; eager (do_bench, L2 flushed) and in CUDA graphs")
    print(f"{'K x N':>13} {'M':>5} {'S':>3} {'launch':>10} {'ours ms':>9} {'cuBLAS ms':>9} {'ratio':>6}"
          f" {'graph ms':>9} {'cuBLAS':>9} {'ratio':>6} {'TF/s':>6}")
    for k, n in MATMUL_SHAPES:
        config = arch.matmul_for(n, k)
        print(f"{k:>6} x {n:<5} {config}")
        weights = _weight_copies(torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5)
        w = weights[0]
        splits = matmul.num_k_splits(n, k, config)
        for m in MATMUL_M:
            x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
            ours = _ms(lambda: matmul.linear(x, w, None, config))
            cublas = _ms(lambda: F.linear(x, w))
            ours_graph = _graph_ms(lambda: [matmul.linear(x, wi, None, config) for wi in weights], len(weights))
            cublas_graph = _graph_ms(lambda: [F.linear(x, wi) for wi in weights], len(weights))
            launch = "parallel" if matmul.uses_parallel_splits(m, n, splits, config) else "sequential"
            tflops = 2 * m * n * k / ours_graph / 1e9
            print(f"{k:>6} x {n:<5} {m:>5} {splits:>3} {launch:>10} {ours:9.4f} {cublas:9.4f} {ours / cublas:6.2f}"
                  f" {ours_graph:9.4f} {cublas_graph:9.4f} {ours_graph / cublas_graph:6.2f} {tflops:6.0f}")
            rows.append((f"{k}x{n}", m, ours, cublas, ours_graph, cublas_graph))
    return rows


def _paged(batch: int, seq_len: int, q_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q for the last `q_len` tokens of `batch` sequences of `seq_len` keys each, and a
    random paged cache holding those keys in scrambled blocks."""
    blocks_per_seq = triton.cdiv(seq_len, BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    tables = torch.randperm(num_blocks, device=DEVICE).view(batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(batch * q_len, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    meta = AttentionMetadata(
        query_start_loc=[b * q_len for b in range(batch + 1)],
        seq_lens=[seq_len] * batch,
        block_tables=tables,
        block_size=BLOCK_SIZE,
        zero_slot=num_blocks * BLOCK_SIZE,
    )
    return q, k_cache, v_cache, meta


def bench_attention(config: configs.AttentionConfig) -> list[tuple[str, float, float, float, float | None]]:
    """Decode: achieved HBM bandwidth (K and V bytes read / time), eager and, where K and V are
    over twice L2 (so replays cannot hit in L2), in CUDA graphs. Prefill: time only."""
    rows = []
    scale = HEAD_DIM**-0.5
    l2_bytes = _l2_bytes()
    print(f"\nattention {DTYPE} ({NUM_HEADS} q heads, {NUM_KV_HEADS} KV heads, d={HEAD_DIM}), invariant paged Triton"
          f" vs SDPA on contiguous K/V  ({config})")
    print(f"{'case':>22} {'ours ms':>9} {'SDPA ms':>9} {'ours GB/s':>9} {'SDPA GB/s':>9} {'ratio':>6} {'plan ms':>8}"
          f" {'graph GB/s':>10}")
    for kind, cases in (("decode", DECODE), ("prefill", PREFILL)):
        for batch, seq_len in cases:
            q_len = 1 if kind == "decode" else seq_len
            q, k_cache, v_cache, meta = _paged(batch, seq_len, q_len)
            planned = _attention_plan(meta, config)
            plan = _ms(lambda: paged_attention.paged_attention(q, k_cache, v_cache, _attention_plan(meta, config), scale))
            ours = _ms(lambda: paged_attention.paged_attention(q, k_cache, v_cache, planned, scale))  # planned once
            sdpa = _sdpa_ms(q.view(batch, q_len, NUM_HEADS, HEAD_DIM).transpose(1, 2), seq_len, kind == "prefill", scale)
            kv_bytes = 2 * batch * seq_len * NUM_KV_HEADS * HEAD_DIM * 2
            case = f"{kind} {batch} x {seq_len}"
            graph = None
            if kind == "decode" and kv_bytes > 2 * l2_bytes:
                graph = kv_bytes / _graph_ms(lambda: paged_attention.paged_attention(q, k_cache, v_cache, planned, scale)) / 1e6
            bandwidth = f"{kv_bytes / ours / 1e6:9.0f} {kv_bytes / sdpa / 1e6:9.0f}" if kind == "decode" else f"{'':9} {'':9}"
            shown = f"{graph:10.0f}" if graph else f"{'-':>10}"
            print(f"{case:>22} {ours:9.4f} {sdpa:9.4f} {bandwidth} {ours / sdpa:6.2f} {max(plan - ours, 0.0):8.3f} {shown}")
            rows.append((case, ours, sdpa, kv_bytes / ours / 1e6, graph))
    return rows


def _sdpa_ms(q: torch.Tensor, seq_len: int, causal: bool, scale: float) -> float:
    """The faster of SDPA with `enable_gqa` and SDPA on K/V expanded to all heads beforehand:
    whichever backend torch picks for GQA, the baseline is torch's best here."""
    k = torch.randn(q.shape[0], NUM_KV_HEADS, seq_len, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    v = torch.randn_like(k)
    gqa = _ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True))
    group = NUM_HEADS // NUM_KV_HEADS
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return min(gqa, _ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)))


def _attention_plan(meta: AttentionMetadata, config: configs.AttentionConfig, launch: str = "auto"):
    """The step's attention plan, as the engine builds it once per step."""
    return paged_attention.plan(meta, NUM_HEADS // NUM_KV_HEADS, config, meta.block_tables.device, launch)


@dataclass
class MatmulTrial:
    """One candidate tiling on one weight shape: its time over cuBLAS's per M, and whether it is invariant."""

    k: int
    n: int
    config: configs.MatmulConfig
    invariant: bool
    ratios: list[float]  # per M of the sweep, ours / cuBLAS; empty when not invariant (never timed)
    same_bits_as: int | None = None  # the first earlier candidate whose output had exactly these bits

    @property
    def worst(self) -> float:
        return max(self.ratios) if self.ratios else math.inf

    @property
    def geomean(self) -> float:
        return math.exp(sum(map(math.log, self.ratios)) / len(self.ratios)) if self.ratios else math.inf


def matmul_is_invariant(x: torch.Tensor, w: torch.Tensor, m_values: list[int], config: configs.MatmulConfig) -> bool:
    """Rows of every M equal the same rows of the largest batch, and both split-K launches agree."""
    full = matmul.linear(x, w, None, config)
    if not all(torch.equal(matmul.linear(x[:m], w, None, config), full[:m]) for m in m_values):
        return False
    small = x[: min(m_values)]
    return torch.equal(
        matmul.linear(small, w, None, config, launch="parallel"), matmul.linear(small, w, None, config, launch="sequential")
    )


def sweep_matmul(
    candidates: list[configs.MatmulConfig], shapes: list[tuple[int, int]], m_values: list[int],
    timer: Callable[[Callable[[], object], int], float], device: str, dtype: torch.dtype,
    replicate: Callable[[torch.Tensor], list[torch.Tensor]] = lambda w: [w],
) -> list[MatmulTrial]:
    """Every candidate on every (K, N) shape. `timer(fn, calls)` returns the time of one of the
    `calls` products fn runs, one per copy of the weight that `replicate` makes (`_graph_ms` and
    `_weight_copies` on the GPU, so that every product streams its weight from HBM)."""
    trials = []
    for k, n in shapes:
        g = torch.Generator(device=device).manual_seed(k * 100_003 + n)
        weights = replicate((torch.randn(n, k, generator=g, device=device) * k**-0.5).to(dtype))
        w = weights[0]
        x = torch.randn(max(m_values), k, generator=g, device=device).to(dtype)

        def time_each(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[int, float]:
            return {m: timer(lambda m=m: [product(x[:m], wi) for wi in weights], len(weights)) for m in m_values}

        cublas = time_each(F.linear)
        outputs: list[torch.Tensor] = []
        for config in candidates:
            invariant = matmul_is_invariant(x, w, m_values, config)
            ours = time_each(lambda a, b, config=config: matmul.linear(a, b, None, config)) if invariant else {}
            ratios = [ours[m] / cublas[m] for m in m_values] if invariant else []
            outputs.append(matmul.linear(x, w, None, config))
            same = next((i for i, earlier in enumerate(outputs[:-1]) if torch.equal(earlier, outputs[-1])), None)
            trials.append(MatmulTrial(k, n, config, invariant, ratios, same))
    return trials


def best_matmul_per_shape(trials: list[MatmulTrial]) -> dict[tuple[int, int], MatmulTrial]:
    """Per (K, N): the invariant candidate with the lowest worst-case ratio over M (then geomean)."""
    best: dict[tuple[int, int], MatmulTrial] = {}
    for trial in trials:
        if trial.invariant:
            current = best.get((trial.k, trial.n))
            if current is None or (trial.worst, trial.geomean) < (current.worst, current.geomean):
                best[(trial.k, trial.n)] = trial
    return best


def print_matmul_sweep(trials: list[MatmulTrial], candidates: list[configs.MatmulConfig], m_values: list[int]) -> None:
    print("\n== matmul sweep: ours / cuBLAS per M (x = not batch-invariant, not timed) ==")
    print("(=#: gave exactly the bits of candidate #, so the two tilings could serve different M ranges)")
    print(f"{'K x N':>13} {'#':>2} {'=#':>2} " + " ".join(f"{'M=' + str(m):>6}" for m in m_values) + f" {'worst':>6} {'geo':>5}  config")
    for trial in trials:
        index = candidates.index(trial.config)
        same = "-" if trial.same_bits_as is None else str(trial.same_bits_as)
        cells = " ".join(f"{r:6.2f}" for r in trial.ratios) if trial.invariant else " ".join(f"{'x':>6}" for _ in m_values)
        print(f"{trial.k:>6} x {trial.n:<5} {index:>2} {same:>2} {cells} {trial.worst:6.2f} {trial.geomean:5.2f}  {trial.config}")
    print("\nbest invariant tiling per weight, as configs.ArchConfig.matmul_by_shape entries ((N, K), config):")
    for (k, n), trial in sorted(best_matmul_per_shape(trials).items()):
        print(f"    (({n}, {k}), {trial.config!r}),  # worst {trial.worst:.2f}x, geomean {trial.geomean:.2f}x cuBLAS")


def sweep_attention(candidates: list[configs.AttentionConfig]) -> None:
    """Each candidate's decode bandwidth and prefill time, after checking its two launches agree
    on a mixed step (one config serves both, so a decode win must not cost prefill too much)."""
    scale = HEAD_DIM**-0.5
    print("\n== attention sweep: decode GB/s of K+V read, prefill ms (x = launches disagree, not timed) ==")
    cases = [f"{b}x{n}" for b, n in DECODE] + [f"pre {b}x{n}" for b, n in PREFILL]
    print(f"{'#':>2} " + " ".join(f"{case:>10}" for case in cases) + "  config")
    for index, config in enumerate(candidates):
        q, k_cache, v_cache, meta = _paged(8, 700, 3)
        runs = [paged_attention.paged_attention(q, k_cache, v_cache, _attention_plan(meta, config, launch), scale)
                for launch in ("parallel", "sequential")]
        if not torch.equal(*runs):
            print(f"{index:>2} " + " ".join(f"{'x':>10}" for _ in cases) + f"  {config}")
            continue
        cells = []
        for batch, seq_len, q_len in [(b, n, 1) for b, n in DECODE] + [(b, n, n) for b, n in PREFILL]:
            q, k_cache, v_cache, meta = _paged(batch, seq_len, q_len)
            planned = _attention_plan(meta, config)
            ms = _ms(lambda: paged_attention.paged_attention(q, k_cache, v_cache, planned, scale))
            cells.append(f"{2 * batch * seq_len * NUM_KV_HEADS * HEAD_DIM * 2 / ms / 1e6:10.0f}" if q_len == 1 else f"{ms:10.3f}")
        print(f"{index:>2} " + " ".join(cells) + f"  {config}")


def sweep() -> None:
    """Every candidate tiling, attention then matmul, ending with the entries to pin."""
    sweep_attention(ATTENTION_CANDIDATES)
    trials = sweep_matmul(MATMUL_CANDIDATES, MATMUL_SHAPES, MATMUL_M, _graph_ms, DEVICE, DTYPE, _weight_copies)
    print_matmul_sweep(trials, MATMUL_CANDIDATES, MATMUL_M)


def report(arch: configs.ArchConfig) -> None:
    """The pinned kernels against torch: per-shape lines, then the summary tables."""
    hbm = measured_bandwidth_gbs()
    print(f"HBM bandwidth measured by a 1 GiB device-to-device copy: {hbm:.0f} GB/s")
    mm = bench_matmul(arch)
    attn = bench_attention(arch.attention)

    print("\n== summary: time ratio invariant / torch (below 1 = faster than torch) ==")
    for title, ours_at, ref_at in (("CUDA graphs (kernel time)", 4, 5), ("eager (launch overhead included)", 2, 3)):
        print(f"matmul, {title}")
        print(f"{'K x N':>14} " + " ".join(f"{'M=' + str(m):>6}" for m in MATMUL_M) + f" {'geomean':>8} {'worst':>6}")
        for shape in dict.fromkeys(row[0] for row in mm):
            ratios = [row[ours_at] / row[ref_at] for row in mm if row[0] == shape]
            geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(f"{shape:>14} " + " ".join(f"{r:6.2f}" for r in ratios) + f" {geomean:8.2f} {max(ratios):6.2f}")
    print(f"{'attention':>22} {'ratio':>6} {'ours GB/s':>9} {'% of HBM':>8} {'in graphs':>9}")
    for case, ours, ref, bandwidth, graph in attn:
        shown = f"{bandwidth:9.0f} {100 * bandwidth / hbm:7.0f}%" if case.startswith("decode") else f"{'-':>9} {'-':>8}"
        in_graphs = f"{100 * graph / hbm:8.0f}%" if graph else f"{'-':>9}"
        print(f"{case:>22} {ours / ref:6.2f} {shown} {in_graphs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time candidate tilings instead of the pinned ones")
    parser.add_argument("--models", default="llama-3-8b",
                        help=f"whose matmul shapes, comma-separated, of {', '.join(MODEL_SHAPES)} (default: %(default)s)")
    args = parser.parse_args()
    global MATMUL_SHAPES
    MATMUL_SHAPES = list(dict.fromkeys(shape for name in args.models.split(",") for shape in MODEL_SHAPES[name]))
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU")
    capability = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()} sm_{capability[0]}{capability[1]}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"KV split size {KV_SPLIT_SIZE}; configs pinned for this arch: {capability in configs.PINNED}")
    if args.sweep:
        sweep()
    else:
        report(configs.for_capability(capability))


if __name__ == "__main__":
    main()
