"""Batch-invariant row-wise log-softmax in Triton.

One program owns one row and walks the vocab in fixed blocks, in order: a lane-wise running max
and rescaled sum of exponentials (online softmax), folded across lanes once at the end. The
blocks, lanes and fold never depend on the number of rows, so neither do a row's bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.configs import LAUNCH_OPTIONS, RowConfig

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


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
