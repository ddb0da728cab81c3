"""The Triton matmul: rows independent of the batch, both split-K launches equal, accurate.

Runs in the Triton interpreter without a GPU (small shapes, a small config that yields several
splits and tiles), compiled on a GPU. Bitwise checks use torch.equal; accuracy is separate.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from detserve.kernels import configs, matmul  # noqa: E402
from detserve.kernels.configs import MatmulConfig  # noqa: E402

# Small tiles so K <= 256, N <= 96 give up to 4 splits and 3x3 tiles, and M <= 40 meets both launches.
SMALL = MatmulConfig(
    block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2,
    target_programs=6, max_splits=4, min_k_tiles_per_split=1,
)
DTYPES = [torch.float16, torch.float32]
SETTINGS = settings(max_examples=12, deadline=None)


def _operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


@st.composite
def shapes(draw) -> tuple[int, int, int]:
    return draw(st.integers(1, 40)), draw(st.integers(1, 96)), draw(st.integers(1, 256))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_parallel_and_sequential_split_launches_give_the_same_bits(dtype, shape, bias: bool, seed: int) -> None:
    m, n, k = shape
    x, w, b = _operands(m, n, k, dtype, seed, bias)
    parallel = matmul.linear(x, w, b, SMALL, launch="parallel")
    sequential = matmul.linear(x, w, b, SMALL, launch="sequential")
    assert torch.equal(parallel, sequential)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes(), data=st.data(), seed=st.integers(0, 2**16))
def test_a_row_has_the_same_bits_alone_and_anywhere_in_any_batch(dtype, shape, data, seed: int) -> None:
    m, n, k = shape
    x, w, b = _operands(m, n, k, dtype, seed)
    position = data.draw(st.integers(0, m - 1))
    alone = matmul.linear(x[position : position + 1], w, b, SMALL)
    in_batch = matmul.linear(x, w, b, SMALL)  # the launch picked by M: different for m = 1 and m = 40
    assert torch.equal(alone[0], in_batch[position])


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_tma_tiles_give_the_bits_of_pointer_loads_in_both_launches(dtype, shape, bias: bool, seed: int) -> None:
    m, n, k = shape
    k = max(8, k // 8 * 8)  # 16-byte rows, as a bulk tensor copy needs; M, N and K still end mid-tile
    x, w, b = _operands(m, n, k, dtype, seed, bias)
    tma = dataclasses.replace(SMALL, tma=True)
    for launch in ("parallel", "sequential"):
        assert torch.equal(matmul.linear(x, w, b, tma, launch), matmul.linear(x, w, b, SMALL, launch)), launch


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_the_last_split_program_folds_to_the_bits_of_the_fold_kernel(dtype, shape, bias: bool, seed: int) -> None:
    m, n, k = shape
    x, w, b = _operands(m, n, k, dtype, seed, bias)
    last_folds = dataclasses.replace(SMALL, last_split_folds=True)
    expected = {sign: matmul.linear(sign * x, w, b, SMALL, launch="parallel") for sign in (1, -1)}
    # Inputs alternate, so a fold that ran before every split had arrived would read the other
    # input's stale partials; each twice, so a counter left nonzero would skip the next fold.
    for sign in (1, -1, 1, -1):
        assert torch.equal(matmul.linear(sign * x, w, b, last_folds, launch="parallel"), expected[sign])


def test_a_tma_tiling_reads_rows_a_bulk_copy_cannot_through_pointers() -> None:
    x, w, b = _operands(9, 40, 70, torch.float16, seed=4)  # 140-byte rows
    tma = dataclasses.replace(SMALL, tma=True)
    assert not matmul._tma_can_read(x)
    assert torch.equal(matmul.linear(x, w, b, tma), matmul.linear(x, w, b, SMALL))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_pinned_sm90_tiles_are_batch_invariant_too(dtype) -> None:
    config = configs.PINNED[(9, 0)].matmul
    x, w, b = _operands(150, 80, 200, dtype, seed=1)
    batch = matmul.linear(x, w, b, config)
    assert all(torch.equal(matmul.linear(x[i : i + 1], w, b, config)[0], batch[i]) for i in (0, 77, 149))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_matches_float64_reference(dtype, tolerance: float) -> None:
    x, w, b = _operands(37, 90, 250, dtype, seed=2)
    out = matmul.linear(x, w, b, SMALL)
    ref = x.double() @ w.double().T + b.double()
    assert out.dtype == dtype
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < tolerance


def test_an_empty_batch_gives_an_empty_result() -> None:
    x, w, b = _operands(0, 32, 64, torch.float16, seed=3)
    assert matmul.linear(x, w, b, SMALL).shape == (0, 32)


def test_on_sm90_decode_runs_the_k_splits_in_parallel_and_prefill_runs_them_in_sequence() -> None:
    """At Llama-3-8B shapes, so that both launches (and their equality) matter in production."""
    config = configs.PINNED[(9, 0)].matmul
    for n, k in [(4096, 4096), (1024, 4096), (4096, 14336)]:
        splits = matmul.num_k_splits(n, k, config)
        assert splits > 1
        assert matmul.uses_parallel_splits(1, n, splits, config)
        assert not matmul.uses_parallel_splits(8192, n, splits, config)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_column_shard_planned_as_its_whole_weight_gives_the_whole_weights_bits(dtype) -> None:
    """Tensor parallelism's column pieces on the GPU: S depends on N (192 columns: 1 split with the
    small config, 96: 2), so a shard takes the whole weight's plan (`plan_n`), and then its columns
    are bitwise the whole weight's; planned as itself, they are not."""
    x, w, _ = _operands(5, 192, 256, dtype, seed=3)
    assert matmul.num_k_splits(192, 256, SMALL) != matmul.num_k_splits(96, 256, SMALL)
    whole = matmul.linear(x, w, None, SMALL)
    for start in (0, 96):
        shard = w[start : start + 96].contiguous()
        assert torch.equal(matmul.linear(x, shard, None, SMALL, plan_n=192), whole[:, start : start + 96])
    if dtype == torch.float32:  # (a float16 output's rounding can hide the other fold order)
        assert not torch.equal(matmul.linear(x, w[:96].contiguous(), None, SMALL), whole[:, :96])
