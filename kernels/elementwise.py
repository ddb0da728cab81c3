"""Fused elementwise ops in Triton: SwiGLU activation (silu_mul) and rotary embedding (rope).

Why Triton here: fusion, not invariance. Torch runs silu-mul as chunk + silu + mul (two kernels
and a temporary) and RoPE as a gather, chunks, four multiplies, two adds, a cat and casts per
tensor; each kernel below is one launch that reads its inputs once and writes its outputs once.
Both are batch-invariant by construction: every output element is computed from its own inputs
only (no reduction across elements), by the same instructions whatever the grid, so the block
sizes change which program computes an element, never its bits. That is also why the blocks are
module constants rather than part of the pinned, fingerprinted configs.

Op order follows kernels/reference/rows.py, with FMA contraction off (LAUNCH_OPTIONS) so each multiply
and add rounds on its own as in torch. RoPE only multiplies and adds, so it reproduces
`reference.rows.rope` bit for bit. silu_mul's exp and division are Triton's fast fp32 ones on the GPU
(ex2.approx, div.full: within a few ulp) and numpy's in the interpreter, so its fp32 silu may
differ from torch's in the last bits: the reference's op order, not necessarily its bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from detserve.kernels.configs import LAUNCH_OPTIONS

_SILU_BLOCK = 1024  # output columns per program
_SILU_WARPS = 4
_ROPE_HEADS = 16  # heads per step of a token's program: 16 x 64 lanes at head_dim 128
_ROPE_WARPS = 4


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    x_row = x_ptr + row * stride_x
    gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + I + offs, mask=mask, other=0.0).to(tl.float32)
    # torch's F.silu on a 16-bit tensor computes in fp32 and rounds; the product rounds once more
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    out = silu.to(tl.float32) * up
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] of shape [T, 2I] -> [T, I], in x's dtype, one launch."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(inter, _SILU_BLOCK))](
            x, out, inter, x.stride(0), out.stride(0), BLOCK=_SILU_BLOCK, num_warps=_SILU_WARPS, **LAUNCH_OPTIONS,
        )
    return out


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, token, num_heads, half, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rotate every head of one token: [x1 | x2] -> [x1*cos - x2*sin | x2*cos + x1*sin]."""
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    offs = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D], within a half
    for first in range(0, num_heads, BLOCK_H):
        head = first + heads
        mask = (head < num_heads) & (offs < half)  # [BLOCK_H, BLOCK_D]
        x1_ptrs = x_ptr + token * stride_xt + head * stride_xh + offs
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + half, mask=mask, other=0.0).to(tl.float32)
        out1_ptrs = out_ptr + token * stride_ot + head * stride_oh + offs
        tl.store(out1_ptrs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out1_ptrs + half, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr, H, HKV, half,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token)
    offs = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    cs_ptrs = cos_sin_ptr + pos * stride_cs + offs
    cos = tl.load(cs_ptrs, mask=offs < half, other=0.0)  # the token's row, loaded once for q and k
    sin = tl.load(cs_ptrs + half, mask=offs < half, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, token, H, half, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin,
                  BLOCK_H, BLOCK_D)
    _rotate_heads(k_ptr, k_out_ptr, token, HKV, half, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin,
                  BLOCK_H, BLOCK_D)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [T, H, D] and k [T, Hkv, D] in one launch; the bits of `reference.rows.rope`.

    q and k may be strided views (slices of the fused qkv output); positions [T] int, cos_sin
    [max_pos, D] float32 (cos | sin halves). Returns new contiguous tensors in the inputs' dtype.
    """
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    positions = positions.contiguous()
    cos_sin = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
    tokens, heads, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D], contiguous
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # [T, Hkv, D]
    if tokens:
        half = head_dim // 2
        _rope_kernel[(tokens,)](
            q, k, q_out, k_out, positions, cos_sin, heads, k.shape[1], half,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
            BLOCK_H=_ROPE_HEADS, BLOCK_D=triton.next_power_of_2(half), num_warps=_ROPE_WARPS, **LAUNCH_OPTIONS,
        )
    return q_out, k_out
