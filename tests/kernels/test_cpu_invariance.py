"""The CPU path's ops are batch-invariant by construction: proven over the served models' shapes
(torch's integer kernels and the C 4-bit matmul).

Every test draws a batch size M in 1..128, a row position and a thread count (1 or 2: torch's
pool on this machine's two cores), and compares the row computed in that company with the same
row computed alone at one thread, with torch.equal. The weight shapes are SmolLM2-135M's (the
default model: q|k|v 960x576, o 576x576, gate|up 3072x576, down 576x1536, the tied head
49152x576) and Qwen2.5-0.5B's layers (hidden 896, intermediate 4864, 14 query / 2 KV heads).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detserve import kernels
from detserve.kernels import cpu_native
from detserve.kernels.reference import noise
from detserve.kernels.quantized import QuantizedWeight, quantize_int4, quantize_int8

SMOLLM2 = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
QWEN25_05B = [(1152, 896), (896, 896), (9728, 896), (896, 4864)]
SHAPES = SMOLLM2 + QWEN25_05B
SETTINGS = settings(max_examples=25, deadline=None)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@st.composite
def companies(draw) -> tuple[int, int, int, int]:
    """(batch size M, the row's position, thread count, seed of the other rows)."""
    m = draw(st.integers(1, 128))
    return m, draw(st.integers(0, m - 1)), draw(st.sampled_from([1, 2])), draw(st.integers(0, 2**31))


def in_company(row: torch.Tensor, company: tuple[int, int, int, int], scale: float = 1.0) -> torch.Tensor:
    m, position, _, seed = company
    batch = torch.randn((m,) + row.shape, generator=torch.Generator().manual_seed(seed)) * scale
    batch[position] = row
    return batch


@functools.cache
def packed(n: int, k: int, bits: int, native: bool) -> kernels.PackedWeight:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k + bits)) * 0.05
    return (quantize_int4(weight) if bits == 4 else quantize_int8(weight)).pack(native)


KERNELS = [(4, False), (4, True), (8, False)]
"""(bits, native): torch's 4-bit and 8-bit kernels, and the C 4-bit matmul (where it builds)."""


@pytest.mark.parametrize("bits,native", KERNELS)
@pytest.mark.parametrize("n,k", SHAPES)
@SETTINGS
@given(company=companies())
def test_quantized_linear_row_is_independent_of_batch_and_threads(n: int, k: int, bits: int, native: bool,
                                                                   company) -> None:
    if native and not cpu_native.enabled():
        pytest.skip("the C ops do not build here")
    weight = packed(n, k, bits, native)
    row = torch.randn(k, generator=torch.Generator().manual_seed(k))
    with threads(1):
        alone = kernels.linear(row[None], weight)[0]
    with threads(company[2]):
        for mode in kernels.MODES:  # the integer kernels serve both modes
            with kernels.mode(mode):
                assert torch.equal(kernels.linear(in_company(row, company), weight)[company[1]], alone)


@pytest.mark.parametrize("bits,native", KERNELS)
def test_quantized_linear_computes_the_dequantized_product(bits: int, native: bool) -> None:
    if native and not cpu_native.enabled():
        pytest.skip("the C ops do not build here")
    g = torch.Generator().manual_seed(bits)
    weight, x, bias = torch.randn(192, 256, generator=g), torch.randn(7, 256, generator=g), torch.randn(192, generator=g)
    q = quantize_int4(weight) if bits == 4 else quantize_int8(weight)
    out = kernels.linear(x, q.pack(native), bias)
    ref = x.bfloat16().double() @ q.dequantize().double().T + bias.double()
    assert out.dtype == torch.float32
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 2e-2  # bfloat16 scales and output
    assert float((q.dequantize() - weight).abs().max()) < (0.3 if bits == 4 else 0.03)


def test_quantized_weights_round_trip_through_their_tensors_and_fuse_along_outputs() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = quantize_int4(torch.randn(64, 96, generator=g)), quantize_int4(torch.randn(32, 96, generator=g))
    back = QuantizedWeight.from_tensors(a.to_tensors("w"), "w")
    assert torch.equal(back.dequantize(), a.dequantize())
    fused = QuantizedWeight.cat([a, b])
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert torch.equal(fused.rows(torch.tensor([70, 2])), fused.dequantize()[[70, 2]])
    eight = quantize_int8(torch.randn(16, 64, generator=g))
    assert torch.equal(QuantizedWeight.from_tensors(eight.to_tensors("e"), "e").dequantize(), eight.dequantize())


@pytest.mark.parametrize("dim", [576, 896, 64])
@SETTINGS
@given(company=companies())
def test_rms_norm_row_is_independent_of_batch_and_threads(dim: int, company) -> None:
    g = torch.Generator().manual_seed(dim)
    weight, row = torch.rand(dim, generator=g) + 0.5, torch.randn(dim, generator=g) * 3
    with threads(1):
        alone = kernels.rms_norm(row[None], weight, 1e-5)[0]
    with threads(company[2]):
        assert torch.equal(kernels.rms_norm(in_company(row, company, 3.0), weight, 1e-5)[company[1]], alone)


@pytest.mark.parametrize("intermediate", [1536, 4864, 100])
@SETTINGS
@given(company=companies())
def test_silu_mul_row_is_independent_of_batch_and_threads(intermediate: int, company) -> None:
    row = torch.randn(2 * intermediate, generator=torch.Generator().manual_seed(intermediate)) * 4
    with threads(1):
        alone = kernels.silu_mul(row[None])[0]
    with threads(company[2]):
        assert torch.equal(kernels.silu_mul(in_company(row, company, 4.0))[company[1]], alone)


def test_exp_gives_the_same_bits_in_the_vector_body_and_the_scalar_tail() -> None:
    """What silu_mul and attention rely on (torch's own silu fails this: see reference.rows.silu_mul),
    down to results that underflow and the masked scores' exp(-inf) = 0."""
    x = torch.cat([torch.linspace(-120, 0, 200_003), torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 20,
                   torch.full((5_000,), float("-inf"))])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))].clamp(max=80)
    whole = torch.exp(x)  # almost all in 16-wide vectors
    one_by_one = torch.cat([torch.exp(x[i : i + 1]) for i in range(0, x.numel(), 997)])  # scalar code
    assert torch.equal(whole[::997], one_by_one)


@SETTINGS
@given(company=companies())
def test_log_softmax_and_sampling_rows_are_independent_of_batch_and_threads(company) -> None:
    m, position, num_threads, seed = company
    m = min(m, 24)  # vocab-wide rows: keep the batch small
    company = (m, min(position, m - 1), num_threads, seed)
    row = torch.randn(49152, generator=torch.Generator().manual_seed(2)) * 5
    batch = in_company(row, company, 5.0)
    temperatures = torch.tensor([0.0, 0.8] * m, dtype=torch.float64)[:m]
    seeds, positions = torch.arange(m) * 7919 + seed % 1000, torch.arange(m) + 3
    one = slice(company[1], company[1] + 1)
    with threads(1):
        alone = kernels.log_softmax(row[None])[0]
        token = kernels.sample_tokens(row[None], temperatures[one], seeds[one], positions[one])[0]
    with threads(num_threads):
        assert torch.equal(kernels.log_softmax(batch)[company[1]], alone)
        assert kernels.sample_tokens(batch, temperatures, seeds, positions)[company[1]] == token


def test_batched_gumbel_noise_equals_each_row_drawn_alone() -> None:
    seeds, positions = np.array([5, 2**62, 5]), np.array([9, 0, 10])
    rows = noise.uniform_noise(seeds, positions, 1000)
    for i in range(3):
        assert np.array_equal(rows[i], noise.uniform_noise(seeds[i : i + 1], positions[i : i + 1], 1000)[0])
