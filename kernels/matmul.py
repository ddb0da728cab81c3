"""Batch-invariant matmul `x @ weight.T (+ bias)` in Triton, with a fixed split-K.

A row's bits depend only on the row, the weight and the pinned config, never on M:
- one tiling (BM, BN, BK, warps, stages) for every M, so every tile runs the same MMA shape
  (tiles arrive through plain loads, or on Hopper through TMA bulk copies: either way the same
  tiles meet the same MMA);
- K is cut into S splits, S a pure function of (N, K) and the config; each split accumulates its
  BK-tiles in order starting from zero (`_split_dot`), and the splits are summed in order 0..S-1
  starting from zero, in fp32; the bias is added after the fold, then the sum is cast once.
Small M runs the S splits as parallel programs writing fp32 partials, folded by a second kernel or
(`last_split_folds`) by whichever of a tile's S programs finishes last; large M runs the same S
splits one after another inside each tile's program. All of them execute the same `_split_dot`
and the same fold, so the launch may depend on M and the bits not.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from detserve.kernels.arrivals import arrival_counts, last_to_arrive
from detserve.kernels.configs import LAUNCH_OPTIONS, MatmulConfig

Launch = Literal["auto", "parallel", "sequential"]

_REDUCE_BLOCK = 1024  # elementwise fold kernel: any block gives the same bits (no reduction across lanes)


def num_k_splits(n: int, k: int, config: MatmulConfig) -> int:
    """S for a weight of shape [N, K]: a pure function of (N, K, config), never of M.

    Doubles S while the decode-sized grid (N-tiles x S programs) still fits about one wave and
    every split keeps at least `min_k_tiles_per_split` BK-tiles.
    """
    tiles_n = triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, config.block_k)
    splits = 1
    while (
        splits * 2 <= config.max_splits
        and tiles_n * splits * 2 <= config.target_programs
        and k_tiles >= splits * 2 * config.min_k_tiles_per_split
    ):
        splits *= 2
    return splits


def split_plan(n: int, k: int, config: MatmulConfig) -> tuple[int, int]:
    """(S, inputs per split) for a weight [N, K]: S from `num_k_splits`, each split whole BK-tiles."""
    splits = num_k_splits(n, k, config)
    return splits, triton.cdiv(triton.cdiv(k, config.block_k), splits) * config.block_k


def uses_parallel_splits(m: int, n: int, splits: int, config: MatmulConfig) -> bool:
    """Parallel partials when one program per output tile would leave most of the GPU idle."""
    return splits > 1 and triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n) < config.target_programs


@triton.jit
def _operands(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              TMA: tl.constexpr):
    """What `_split_dot` reads A and B through: the pointers, or (TMA) tensor descriptors whose
    bulk copies zero-fill outside [M, K] and [N, K] as the masked loads do."""
    if TMA:
        a_src = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BM, BK])
        b_src = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BN, BK])
    else:
        a_src = a_ptr
        b_src = b_ptr
    return a_src, b_src


@triton.jit
def _split_dot(
    a_src, b_src, M, N, k_lo, k_hi, stride_am, stride_ak, stride_bn, stride_bk, off_m, off_n,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """fp32 [BM, BN] = A[off_m:+BM, k_lo:k_hi] @ B[k_lo:k_hi, off_n:+BN], BK-tiles in order from zero.

    The one inner loop both launches run: its accumulation order is what makes them agree. Splits
    start at multiples of BK, so a TMA box never reads into the next split: only past K, where it
    reads zeros.
    """
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(k_lo, k_hi, BK):
        if TMA:
            a = a_src.load([off_m, k])  # [BM, BK]
            b = b_src.load([off_n, k]).T  # [BK, BN]
        else:
            ks = k + offs_k
            a = tl.load(
                a_src + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=(offs_m[:, None] < M) & (ks[None, :] < k_hi),
                other=0.0,
            )  # [BM, BK]
            b = tl.load(
                b_src + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=(ks[:, None] < k_hi) & (offs_n[None, :] < N),
                other=0.0,
            )  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_tile(total, bias_ptr, out_ptr, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    """out[tile] = cast(total (+ bias)): the end of every fold, after the splits are summed."""
    if HAS_BIAS:
        total = total + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    rows = offs_m.to(tl.int64)
    tl.store(
        out_ptr + rows[:, None] * N + offs_n[None, :],
        total.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit(do_not_specialize=["M"])
def _matmul_parallel_splits_kernel(
    a_ptr, b_ptr, part_ptr, bias_ptr, out_ptr, arrivals_ptr, M, N, K, S, K_PER_SPLIT,
    stride_am, stride_ak, stride_bn, stride_bk,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, LAST_FOLDS: tl.constexpr,
):
    """Program (tile, split s): partials[s, tile] = split s of the K reduction, fp32.

    With LAST_FOLDS, the tile's last program to finish (its arrival count says so) folds the S
    partials in order 0..S-1 and writes the output; otherwise `_fold_splits_kernel` does. Which
    program arrives last varies from run to run; the fold it runs does not.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BN)
    off_m = (pid // num_pid_n) * BM
    off_n = (pid % num_pid_n) * BN
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    a_src, b_src = _operands(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, BM, BN, BK, TMA)
    acc = _split_dot(
        a_src, b_src, M, N, k_lo, k_hi, stride_am, stride_ak, stride_bn, stride_bk, off_m, off_n,
        BM, BN, BK, PRECISION, TMA,
    )
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    plane = M.to(tl.int64) * N
    tile = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(tile + split.to(tl.int64) * plane, acc, mask=in_bounds)
    if LAST_FOLDS:
        if last_to_arrive(arrivals_ptr + pid, S):
            total = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(0, S):
                total = total + tl.load(tile + s * plane, mask=in_bounds, other=0.0, cache_modifier=".cg")
            _store_tile(total, bias_ptr, out_ptr, offs_m, offs_n, M, N, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _fold_splits_kernel(part_ptr, bias_ptr, out_ptr, M, N, S, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = cast(sum_{s=0..S-1} partials[s] (+ bias)), summed from zero in split order."""
    plane = M.to(tl.int64) * N
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        total = total + tl.load(part_ptr + s * plane + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total = total + tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _matmul_sequential_splits_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, S, K_PER_SPLIT, stride_am, stride_ak, stride_bn, stride_bk,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """Program per output tile; the S splits run one after another and fold in order.

    Sequential, not one long K loop: restarting `acc` per split reproduces the parallel launch's
    partials exactly, so large M pays only S-1 extra tile adds for batch-invariant bits.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows
    a_src, b_src = _operands(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, BM, BN, BK, TMA)
    total = tl.zeros((BM, BN), dtype=tl.float32)
    for split in range(0, S):
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        acc = _split_dot(
            a_src, b_src, M, N, k_lo, k_hi, stride_am, stride_ak, stride_bn, stride_bk, pid_m * BM, pid_n * BN,
            BM, BN, BK, PRECISION, TMA,
        )
        total = total + acc
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    _store_tile(total, bias_ptr, out_ptr, offs_m, offs_n, M, N, HAS_BIAS)


def _tma_can_read(t: torch.Tensor) -> bool:
    """A bulk tensor copy needs contiguous rows, 16-byte row strides and a 16-byte-aligned base."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory where TMA programs write their tensor descriptors (Triton asks at launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: MatmulConfig, launch: Launch = "auto",
    plan_n: int | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias[N]) -> [M, N] in x's dtype, fp32 accumulation.

    `launch` forces one of the two launches (for tests); "auto" picks by M, which is safe because
    both give the same bits. `plan_n`: the outputs of the whole weight that `weight` is a column
    shard of (tensor parallelism): the K-splits are planned for it, so a column's bits are the
    whole weight's (S depends on N, and would otherwise change with the shard). A `tma` config reads through tensor descriptors where the operands
    allow a bulk copy, else through pointers: the same tiles into the same dot either way.
    """
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.dtype != x.dtype:
        raise ValueError(f"linear: x {tuple(x.shape)} {x.dtype} vs weight {tuple(weight.shape)} {weight.dtype}")
    if x.data_ptr() % 16:
        # Triton compiles a separate binary for pointers off 16-byte alignment (e.g. a row view at
        # an odd offset); copying keeps every batch on the one binary that the tests pin down.
        x = x.clone()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    splits, k_per_split = split_plan(plan_n or n, k, config)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays fp32; 16-bit inputs ignore it
    has_bias = bias is not None
    bias_arg = bias if has_bias else out  # never read without HAS_BIAS
    parallel = uses_parallel_splits(m, n, splits, config) if launch == "auto" else launch == "parallel"
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1))
    tma = config.tma and _tma_can_read(x) and _tma_can_read(weight)
    if tma:
        triton.set_allocator(_descriptor_scratch)
    meta = dict(BM=config.block_m, BN=config.block_n, BK=config.block_k, PRECISION=precision, TMA=tma)
    launch_opts = dict(num_warps=config.num_warps, num_stages=config.num_stages, **LAUNCH_OPTIONS)
    if parallel:
        partials = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        last_folds = config.last_split_folds
        arrivals = arrival_counts(tiles, x.device) if last_folds else partials  # never touched without LAST_FOLDS
        _matmul_parallel_splits_kernel[(tiles, splits)](
            x, weight, partials, bias_arg, out, arrivals, m, n, k, splits, k_per_split, *strides,
            HAS_BIAS=has_bias, LAST_FOLDS=last_folds, **meta, **launch_opts,
        )
        if not last_folds:
            _fold_splits_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
                partials, bias_arg, out, m, n, splits, HAS_BIAS=has_bias, BLOCK=_REDUCE_BLOCK, num_warps=4,
                **LAUNCH_OPTIONS,
            )
    else:
        _matmul_sequential_splits_kernel[(tiles,)](
            x, weight, bias_arg, out, m, n, k, splits, k_per_split, *strides,
            HAS_BIAS=has_bias, GROUP_M=config.group_m, **meta, **launch_opts,
        )
    return out
