"""The experts' matmul of a mixture-of-experts layer in one Triton launch, batch-invariant.

`x` holds every (token, expert) row sorted by expert, `counts[e]` rows for expert e; row r of
expert e becomes `x[r] @ weights[e].T`. Each program computes one tile of one expert's rows
against one BN-wide slice of that expert's weight with the very inner loop and split fold of
`matmul.linear` (`_split_dot`, S splits from `split_plan` summed in order from zero), with the
tiling pinned for the weight's shape. A row's bits therefore depend on the row, the weight and
the config only: not on how many rows chose its expert, where its tile starts, or which other
experts ran in the launch. They equal `matmul.linear` of the same row and weight, bit for bit
(tests/kernels/test_triton_grouped_matmul.py), so grouping changes the speed, never the answer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from detserve.kernels.configs import LAUNCH_OPTIONS, MatmulConfig
from detserve.kernels.matmul import _split_dot, _store_tile, split_plan


@triton.jit
def _grouped_kernel(
    a_ptr, b_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, tile_rows_ptr, N, K, S, K_PER_SPLIT,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (tile, n-slice): out[start:start+rows, slice] = x[start:+rows] @ weights[expert, slice].T."""
    tile = tl.program_id(0)
    off_n = tl.program_id(1) * BN
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile).to(tl.int64)
    rows = tl.load(tile_rows_ptr + tile)
    a_tile = a_ptr + start * stride_am
    b_expert = b_ptr + expert * stride_be
    total = tl.zeros((BM, BN), dtype=tl.float32)
    for split in range(0, S):
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        acc = _split_dot(a_tile, b_expert, rows, N, k_lo, k_hi, stride_am, stride_ak, stride_bn, stride_bk, 0, off_n,
                         BM, BN, BK, PRECISION, False)
        total = total + acc
    offs_m = tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    _store_tile(total, out_ptr, out_ptr + start * N, offs_m, offs_n, rows, N, False)


def _tiles(counts: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(expert, first row, rows) of every tile: each expert's rows cut into BM-row tiles from its first."""
    experts, starts, rows = [], [], []
    start = 0
    for expert, count in enumerate(counts):
        for offset in range(0, count, block_m):
            experts.append(expert)
            starts.append(start + offset)
            rows.append(min(block_m, count - offset))
        start += count
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (experts, starts, rows))


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, counts: list[int], config: MatmulConfig,
                   plan_n: int | None = None) -> torch.Tensor:
    """x [M, K] (rows sorted by expert, `counts[e]` of expert e) @ weights[e].T -> [M, N] in x's
    dtype, fp32 accumulation; weights [E, N, K]; `config` the tiling pinned for [N, K]."""
    m, k = x.shape
    num_experts, n, _ = weights.shape
    if weights.shape[2] != k or weights.dtype != x.dtype or len(counts) != num_experts or sum(counts) != m:
        raise ValueError(f"grouped_linear: x {tuple(x.shape)} {x.dtype}, weights {tuple(weights.shape)} "
                         f"{weights.dtype}, counts summing to {sum(counts)} over {len(counts)} experts")
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    splits, k_per_split = split_plan(plan_n or n, k, config)  # plan_n: as `matmul.linear`'s
    tile_expert, tile_start, tile_rows = _tiles(counts, config.block_m, x.device)
    grid = (tile_expert.shape[0], triton.cdiv(n, config.block_n))
    _grouped_kernel[grid](
        x, weights, out, tile_expert, tile_start, tile_rows, n, k, splits, k_per_split,
        x.stride(0), x.stride(1), weights.stride(0), weights.stride(1), weights.stride(2),
        BM=config.block_m, BN=config.block_n, BK=config.block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **LAUNCH_OPTIONS,
    )
    return out
