"""Batch-invariant row-wise log-softmax and token sampling in Triton.

One program owns one row and walks the vocab in fixed blocks, in order: for log-softmax a
lane-wise running max and rescaled sum of exponentials (online softmax), folded across lanes once
at the end; for sampling a lane-wise running argmax. The blocks, lanes and fold never depend on
the number of rows, so neither do a row's bits.

Sampling is Gumbel-max: argmax(logits / T + g) with g = -log(-log(u)) in float64, where u comes
from a counter-based hash (splitmix64) of (seed, token position, vocab index), bit for bit the
hash of `reference.noise.uniform_noise`. No generator state exists, so a row's draw depends on nothing
but its own seed and position, and only the chosen token ids leave the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from detserve.kernels import contract
from detserve.kernels.configs import LAUNCH_OPTIONS, RowConfig

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# splitmix64 and the stream constants of the host's noise (`reference.noise.uniform_noise`)
GOLDEN: tl.constexpr = tl.constexpr(contract.GOLDEN)
MIX1: tl.constexpr = tl.constexpr(contract.MIX1)
MIX2: tl.constexpr = tl.constexpr(contract.MIX2)
POSITION_STRIDE: tl.constexpr = tl.constexpr(contract.POSITION_STRIDE)
TWO_POW_MINUS_53: tl.constexpr = tl.constexpr(1.1102230246251565e-16)


@triton.jit
def _log_softmax_kernel(x_ptr, out_ptr, V, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)  # per lane, log2 domain
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32) * LOG2E
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with nothing finite yet keeps s = 0
        s = s * tl.exp2(m - m_safe) + tl.exp2(x - m_safe)
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp2(m - m_row), axis=0)
    lse = (m_row + tl.log2(s_row)) * LN2  # back to natural log
    out_row = out_ptr + row * stride_out
    for start in range(0, V, BLOCK):
        mask = start + offs < V
        x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + start + offs, x - lse, mask=mask)


def log_softmax(logits: torch.Tensor, config: RowConfig) -> torch.Tensor:
    """log_softmax over the last dim of logits [S, V], computed and returned in float32."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    if rows:
        _log_softmax_kernel[(rows,)](
            logits, out, vocab, logits.stride(0), out.stride(0),
            BLOCK=config.softmax_block, num_warps=config.softmax_warps, **LAUNCH_OPTIONS,
        )
    return out


@triton.jit
def _splitmix64(z):
    """The splitmix64 finalizer on uint64 (multiplications wrap, shifts are logical)."""
    z = (z ^ (z >> 30)) * MIX1
    z = (z ^ (z >> 27)) * MIX2
    return z ^ (z >> 31)


@triton.jit
def _sample_kernel(logits_ptr, tokens_ptr, temperature_ptr, seed_ptr, position_ptr, V, stride, BLOCK: tl.constexpr):
    """Program per row: argmax of logits / T + Gumbel(seed, position, index) in float64, or of the
    logits when T = 0; the lowest index wins a tie, as in torch.argmax."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    temperature = tl.load(temperature_ptr + row)  # float64
    seed = tl.load(seed_ptr + row).to(tl.uint64, bitcast=True)
    position = tl.load(position_ptr + row).to(tl.uint64, bitcast=True)
    stream = _splitmix64(seed ^ (position * POSITION_STRIDE))
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float64)  # per lane: the first maximum it met
    best_index = offs
    for start in range(0, V, BLOCK):
        index = start + offs
        x = tl.load(logits_ptr + row * stride + index, mask=index < V, other=float("-inf")).to(tl.float64)
        if temperature > 0:
            z = _splitmix64(stream + index.to(tl.uint64) * GOLDEN)
            u = ((z >> 11).to(tl.float64) + 0.5) * TWO_POW_MINUS_53  # in (0, 1)
            x = x / temperature - tl.log(-tl.log(u))
        better = x > best
        best = tl.where(better, x, best)
        best_index = tl.where(better, index, best_index)
    top = tl.max(best, axis=0)
    tl.store(tokens_ptr + row, tl.min(tl.where(best == top, best_index, V), axis=0).to(tl.int64))


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, config: RowConfig
) -> torch.Tensor:
    """Token ids [S] int64 for logits [S, V]; temperatures [S] float64 (0 = greedy), seeds and
    positions [S] int64, all on the logits' device."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _sample_kernel[(rows,)](
            logits, out, temperatures, seeds, positions, vocab, logits.stride(0),
            BLOCK=config.softmax_block, num_warps=config.softmax_warps, **LAUNCH_OPTIONS,
        )
    return out
