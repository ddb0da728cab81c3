"""Triton row-wise reductions (RMSNorm, fused add + RMSNorm, log-softmax, sampling): batch-invariant, accurate.

Runs in the Triton interpreter without a GPU, compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from detserve.kernels import configs, rmsnorm, sampling  # noqa: E402
from detserve.kernels.reference import noise  # noqa: E402

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


def _sampling_inputs(num_rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Temperatures cycling through greedy and three sampling temperatures, int64 seeds (negative
    ones too: both sides read their two's complement bits), positions."""
    g = torch.Generator().manual_seed(seed)
    temperatures = torch.tensor([(0.0, 0.7, 1.0, 1.6)[i % 4] for i in range(num_rows)], dtype=torch.float64)
    seeds = torch.randint(-(2**63), 2**63 - 1, (num_rows,), generator=g, dtype=torch.int64)
    positions = torch.randint(0, 100_000, (num_rows,), generator=g, dtype=torch.int64)
    return tuple(t.to(DEVICE) for t in (temperatures, seeds, positions))


def test_sampled_tokens_equal_the_reference_gumbel_max_and_greedy_choices() -> None:
    # On a GPU the float64 log is libdevice's, not numpy's; a choice could only flip if two keys
    # of a row lay within a few ulps of each other, which random logits do not produce.
    logits = _rows(12, 9000, torch.float32, 11, scale=2.0)
    logits[1, ::3] = float("-inf")  # banned tokens are never drawn
    logits[4, [17, 4000, 8999]] = 50.0  # a three-way tie at the top: the lowest index wins, greedy or not
    logits[8, [5, 6]] = 90.0
    temperatures, seeds, positions = _sampling_inputs(12, 0)
    tokens = sampling.sample_tokens(logits, temperatures, seeds, positions, ROWS)
    assert torch.equal(tokens.cpu(), noise.sample_tokens(logits, temperatures, seeds, positions).cpu())
    assert tokens[4] == 17 and tokens[8] == 5 and tokens[1] % 3 != 0


@SETTINGS
@given(company=companies())
def test_a_rows_sampled_token_is_independent_of_batch(company) -> None:
    batch_size, position, seed = company
    batch_size, position = min(batch_size, 8), min(position, 7, batch_size - 1)
    logits = _rows(batch_size, 3000, torch.float32, seed, scale=0.5)  # flat logits: the noise decides
    temperatures, seeds, positions = _sampling_inputs(batch_size, seed)
    one = slice(position, position + 1)
    alone = sampling.sample_tokens(logits[one], temperatures[one], seeds[one], positions[one], ROWS)
    assert alone[0] == sampling.sample_tokens(logits, temperatures, seeds, positions, ROWS)[position]


def test_a_row_with_every_token_banned_picks_token_zero_like_torch_argmax() -> None:
    logits = torch.full((2, 5000), float("-inf"), device=DEVICE)
    temperatures, seeds, positions = _sampling_inputs(2, 1)
    assert sampling.sample_tokens(logits, temperatures, seeds, positions, ROWS).tolist() == [0, 0]
