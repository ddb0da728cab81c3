"""Row-wise ops: each output row is computed from its own input row, so only the float matmul needs
care (fixed-size calls in invariant mode); norms, SiLU, log-softmax and RoPE are invariant as they are.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from detserve.kernels import quantized
from detserve.kernels.contract import ROWS_PER_CALL
from detserve.kernels.inputs import RotaryInputs
from detserve.kernels.quantized import PackedWeight
from detserve.kernels.reference import as_dtype


def in_fixed_row_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a row-wise `fn` to `x` in calls of exactly ROWS_PER_CALL rows (zero-padded tail).

    Invariant but paid for: a single decode row costs a 16-row call. Float weights only; the
    quantized kernels need none of it.
    """
    num_rows = x.shape[0]
    if num_rows == 0:
        return fn(x.new_zeros((ROWS_PER_CALL,) + x.shape[1:]))[:0]
    pad = (-num_rows) % ROWS_PER_CALL
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + x.shape[1:])])
    chunks = [fn(x[i : i + ROWS_PER_CALL]) for i in range(0, x.shape[0], ROWS_PER_CALL)]
    return torch.cat(chunks)[:num_rows]


def linear_fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear_invariant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x [T, K], weight [N, K] -> [T, N]; the bias add is elementwise, hence exact at any shape.
    return in_fixed_row_chunks(lambda rows: F.linear(rows, weight, bias), x)


def _experts_one_by_one(linear: Callable, x: torch.Tensor, weights: "torch.Tensor | list", counts: list[int]
                        ) -> torch.Tensor:
    """x's rows sorted by expert times their expert's weight, one matmul per expert that has rows; a
    packed expert weight runs the CPU's row-invariant integer kernel (both modes), a float one `linear`."""
    first = weights[0]
    parts = [x.new_empty((0, first.out_features if isinstance(first, PackedWeight) else first.shape[0]))]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            weight, rows = weights[expert], x[start : start + count]
            parts.append(quantized.linear(rows, weight, None) if isinstance(weight, PackedWeight)
                         else linear(rows, weight, None))
            start += count
    return torch.cat(parts)


def grouped_linear_invariant(x: torch.Tensor, weights: "torch.Tensor | list", counts: list[int]) -> torch.Tensor:
    return _experts_one_by_one(linear_invariant, x, weights, counts)


def grouped_linear_fast(x: torch.Tensor, weights: "torch.Tensor | list", counts: list[int]) -> torch.Tensor:
    return _experts_one_by_one(linear_fast, x, weights, counts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Both modes: one row's mean of squares is one reduction over its own contiguous elements,
    whose order depends on the row length only, never on the number of rows (tests pin it).

    For float32, torch's own `rms_norm` runs these very ops in C++ (same bits, checked here), in
    one call from Python instead of eight; for 16-bit inputs it rounds differently, hence the
    spelled-out ops there."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return (x32 * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the add rounds to the input dtype before the norm,
    as in the GPU's fused kernel."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """Both modes: silu(gate) * up, with silu as gate / (1 + exp(-gate)) in float32, rounded to x's
    dtype before the multiply (as torch's F.silu rounds). torch's own silu runs other code for the
    vector body and the scalar tail of a loop, so an element's bits would depend on where it sits
    in the batch; exp, add and divide give the same bits on both paths (tests pin it)."""
    gate, up = x.chunk(2, dim=-1)
    g = as_dtype(gate, torch.float32)
    silu = torch.div(g, torch.neg(g).exp_().add_(1))  # fresh tensors only: g may be a view of x
    return as_dtype(silu, x.dtype).mul_(up)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Both modes: torch's CPU log-softmax reduces each row on its own (tests pin it)."""
    return torch.log_softmax(as_dtype(logits, torch.float32), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX-style) rotary embedding, as Hugging Face Llama/Qwen apply it.

    q [T, H, D], k [T, Hkv, D]. Only gathers, multiplies and adds: exact per element, so invariant
    as is. The step's rotation rows were gathered once (`RotaryInputs.of`) for every layer, and q
    and k are rotated as one tensor (four ops in all, not four per tensor).
    """
    half = rotary.cos_sin.shape[-1] // 2
    qk = as_dtype(torch.cat([q, k], dim=1), torch.float32)
    rotated = as_dtype(qk * rotary.cos_cos + torch.roll(qk, half, dims=-1) * rotary.minus_sin_sin, q.dtype)
    return rotated[:, : q.shape[1]], rotated[:, q.shape[1] :]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [S, V] with -inf wherever bitmask [S, ceil(V / 32)] int32 has bit t % 32 of word t // 32
    clear (a structured output's disallowed tokens). Elementwise, so exact in both modes and devices."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).reshape(bitmask.shape[0], -1)[:, : logits.shape[-1]]
    return logits.masked_fill(allowed == 0, float("-inf"))
