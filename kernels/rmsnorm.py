"""Batch-invariant RMSNorm in Triton, optionally fused with the residual add before it.

One program normalizes one row, with one block whose size follows from the row length alone, so
the reduction tree over a row is the same whatever the batch. The op order is the reference's:
x in fp32, mean of squares, x * rsqrt(var + eps), cast to the input dtype, times the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from detserve.kernels.configs import LAUNCH_OPTIONS, RowConfig


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, D, stride_x, stride_res, stride_out, stride_sum, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the add rounds to the input dtype first, exactly like torch's `x + residual`
        res = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / D
    normed = (x32 * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, config: RowConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = x if x.stride(-1) == 1 else x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    rows, dim = x.shape
    block = triton.next_power_of_2(dim)
    num_warps = max(1, min(block // 512, config.norm_max_warps))
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # as the reference's `normed * weight`
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    if rows:
        res_arg = residual if residual is not None else x  # never read without HAS_RESIDUAL
        sum_arg = total if total is not None else out
        _rms_norm_kernel[(rows,)](
            x, res_arg, weight, out, sum_arg, dim, x.stride(0), res_arg.stride(0), out.stride(0), sum_arg.stride(0),
            eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps, **LAUNCH_OPTIONS,
        )
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, config: RowConfig) -> torch.Tensor:
    """RMSNorm of each row of x [T, D] -> [T, D] in x's dtype (promoted with the weight's, as torch does)."""
    return _launch(x, None, weight, eps, config)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, config: RowConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over the rows; x, residual [T, D]."""
    out, total = _launch(x, residual, weight, eps, config)
    return out, total
