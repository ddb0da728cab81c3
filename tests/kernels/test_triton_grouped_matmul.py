"""The grouped expert matmul: every row equals `matmul.linear` of that row and its expert's weight,
bit for bit, however many rows each expert has (so a token's expert output cannot leak its company).

Runs in the Triton interpreter without a GPU (small shapes), compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from detserve.kernels import grouped_matmul, matmul  # noqa: E402
from tests.kernels.test_triton_matmul import SMALL  # noqa: E402

SETTINGS = settings(max_examples=10, deadline=None)


def _weights(num_experts: int, n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, n, k, generator=g) / k**0.5).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@SETTINGS
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=4), n=st.integers(1, 70), k=st.integers(1, 160),
       seed=st.integers(0, 2**16))
def test_each_row_equals_the_plain_invariant_matmul_of_its_expert(dtype, counts: list[int], n: int, k: int,
                                                                   seed: int) -> None:
    weights = _weights(len(counts), n, k, dtype, seed)
    x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    grouped = grouped_matmul.grouped_linear(x, weights, counts, SMALL)
    start = 0
    for expert, count in enumerate(counts):
        rows = x[start : start + count]
        assert torch.equal(grouped[start : start + count], matmul.linear(rows, weights[expert], None, SMALL))
        start += count


@SETTINGS
@given(before=st.integers(0, 40), after=st.integers(0, 40), others=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_a_rows_bits_do_not_depend_on_how_many_rows_share_its_expert(before: int, after: int, others: int,
                                                                     seed: int) -> None:
    weights = _weights(3, 48, 96, torch.float32, seed)
    g = torch.Generator().manual_seed(seed + 1)
    row = torch.randn(1, 96, generator=g).to(DEVICE)
    alone = grouped_matmul.grouped_linear(row, weights, [0, 1, 0], SMALL)
    crowd = torch.randn(others + before + after, 96, generator=g).to(DEVICE)
    x = torch.cat([crowd[:others], crowd[others : others + before], row, crowd[others + before :]])
    grouped = grouped_matmul.grouped_linear(x, weights, [others, before + 1 + after, 0], SMALL)
    assert torch.equal(grouped[others + before], alone[0])


def test_counts_that_do_not_cover_the_rows_are_refused() -> None:
    weights = _weights(2, 8, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="counts"):
        grouped_matmul.grouped_linear(torch.zeros(5, 16, device=DEVICE), weights, [2, 2], SMALL)
