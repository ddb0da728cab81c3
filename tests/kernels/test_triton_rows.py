"""Triton row-wise reductions (RMSNorm, fused add + RMSNorm, log-softmax): batch-invariant, accurate.

Runs in the Triton interpreter without a GPU, compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from kernels import configs, rmsnorm, sampling  # noqa: E402

ROWS = configs.PINNED[(9, 0)].rows
DTYPES = [torch.float16, torch.float32]
SETTINGS = settings(max_examples=12, deadline=None)


def _rows(num_rows: int, dim: int, dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(num_rows, dim, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


@st.composite
def companies(draw) -> tuple[int, int, int]:
    batch_size = draw(st.integers(1, 40))
    return batch_size, draw(st.integers(0, batch_size - 1)), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(company=companies(), dim=st.sampled_from([64, 96, 576]))
def test_rms_norm_row_is_independent_of_batch(dtype, company, dim: int) -> None:
    batch_size, position, seed = company
    x = _rows(batch_size, dim, dtype, seed)
    weight = _rows(1, dim, dtype, dim, scale=0.5)[0] + 1
    alone = rmsnorm.rms_norm(x[position : position + 1], weight, 1e-5, ROWS)
    assert torch.equal(alone[0], rmsnorm.rms_norm(x, weight, 1e-5, ROWS)[position])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_residual_add_gives_the_bits_of_add_then_norm(dtype) -> None:
    x, residual = _rows(9, 96, dtype, 1), _rows(9, 96, dtype, 2)
    weight = _rows(1, 96, dtype, 3)[0]
    normed, total = rmsnorm.add_rms_norm(x, residual, weight, 1e-6, ROWS)
    assert torch.equal(total, x + residual)
    assert torch.equal(normed, rmsnorm.rms_norm(x + residual, weight, 1e-6, ROWS))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.float32, 1e-6)])
def test_rms_norm_matches_the_reference_op_order_in_float64(dtype, tolerance: float) -> None:
    x = _rows(7, 200, dtype, 4)
    weight = _rows(1, 200, dtype, 5)[0]
    x64 = x.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    out = rmsnorm.rms_norm(x, weight, 1e-5, ROWS)
    assert out.dtype == dtype
    assert ((out.double() - expected).abs() / expected.abs().clamp(min=1)).max() < tolerance


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(company=companies(), vocab=st.sampled_from([1000, 9000]))
def test_log_softmax_row_is_independent_of_batch(dtype, company, vocab: int) -> None:
    batch_size, position, seed = company
    batch_size, position = min(batch_size, 8), min(position, 7, batch_size - 1)
    logits = _rows(batch_size, vocab, dtype, seed)
    alone = sampling.log_softmax(logits[position : position + 1], ROWS)
    assert torch.equal(alone[0], sampling.log_softmax(logits, ROWS)[position])


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_matches_float64_and_keeps_banned_tokens_at_minus_infinity(dtype) -> None:
    logits = _rows(3, 9000, dtype, 6, scale=8.0)
    logits[1, ::7] = float("-inf")
    out = sampling.log_softmax(logits, ROWS)
    expected = torch.log_softmax(logits.double(), dim=-1)
    assert out.dtype == torch.float32
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert (out.double()[finite] - expected[finite]).abs().max() < 1e-5
