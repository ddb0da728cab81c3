"""Triton elementwise kernels (SwiGLU silu_mul, RoPE): the reference's semantics, batch-invariant.

Runs in the Triton interpreter without a GPU, compiled on a GPU. RoPE only multiplies and adds with
FMA contraction off, so it is compared with `reference.rows.rope` bit for bit. silu_mul goes through
exp, and the interpreter's exp (numpy's) differs from torch's in the last bit for about a third of
float32 inputs (torch's own F.silu differs from x / (1 + torch.exp(-x)) too), so it is checked
against float64 with a tolerance and for invariance bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from detserve import kernels  # noqa: E402
from detserve.kernels import elementwise  # noqa: E402
from detserve.kernels.reference import rows  # noqa: E402

DTYPES = [torch.float16, torch.float32]
SETTINGS = settings(max_examples=12, deadline=None)
MAX_POS = 512


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def _fused_qkv_views(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D] and k [T, Hkv, D] sliced from one [T, (H + 2 Hkv) D] tensor, as the model does."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = _randn(tokens, q_size + 2 * kv_size, dtype=dtype, seed=seed, scale=2.0)
    q = qkv[:, :q_size].reshape(tokens, heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(tokens, kv_heads, head_dim)
    return q, k


def _cos_sin(head_dim: int) -> torch.Tensor:
    """[MAX_POS, D] float32 table of cos | sin halves, as the model builds it."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(MAX_POS, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(DEVICE)


@st.composite
def companies(draw) -> tuple[int, int, int]:
    batch_size = draw(st.integers(1, 40))
    return batch_size, draw(st.integers(0, batch_size - 1)), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [(4, 4, 64), (6, 2, 48), (3, 1, 96), (20, 4, 48)],
    ids=["mha", "gqa-head-dim-48", "mqa-head-dim-96", "more-heads-than-one-head-block"],
)
def test_rope_of_fused_qkv_views_gives_the_bits_of_the_reference(
    dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    q, k = _fused_qkv_views(7, heads, kv_heads, head_dim, dtype, seed=heads * head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    positions = torch.tensor([40, 3, 511, 0, 3, 200, 17], device=DEVICE)  # unsorted, repeated
    cos_sin = _cos_sin(head_dim)
    q_rot, k_rot = elementwise.rope(q, k, positions, cos_sin)
    q_ref, k_ref = rows.rope(q, k, kernels.RotaryInputs.of(positions, cos_sin))
    assert q_rot.dtype == k_rot.dtype == dtype
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(company=companies(), pos=st.integers(0, MAX_POS - 1))
def test_rope_row_is_independent_of_batch(dtype, company, pos: int) -> None:
    batch_size, position, seed = company
    q, k = _fused_qkv_views(batch_size, 6, 2, 48, dtype, seed)
    positions = torch.randint(0, MAX_POS, (batch_size,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    positions[position] = pos
    cos_sin = _cos_sin(48)
    alone = slice(position, position + 1)
    q_alone, k_alone = elementwise.rope(q[alone], k[alone], positions[alone], cos_sin)
    q_rot, k_rot = elementwise.rope(q, k, positions, cos_sin)
    assert torch.equal(q_alone[0], q_rot[position]) and torch.equal(k_alone[0], k_rot[position])


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.float32, 1e-6)])
def test_silu_mul_matches_float64_where_intermediate_is_not_a_multiple_of_the_block(dtype, tolerance: float) -> None:
    inter = elementwise._SILU_BLOCK + 476
    x = _randn(5, 2 * inter, dtype=dtype, seed=1, scale=4.0)
    gate, up = x.double().chunk(2, dim=-1)
    expected = gate / (1 + torch.exp(-gate)) * up
    out = elementwise.silu_mul(x)
    assert out.dtype == dtype and out.shape == (5, inter)
    assert ((out.double() - expected).abs() / expected.abs().clamp(min=1e-3)).max() < tolerance


def test_silu_mul_in_float16_rounds_silu_before_the_multiply_as_torch_does() -> None:
    """Same bits as torch's F.silu(gate) * up but where exp's last fp32 bits tip silu's fp16 rounding.

    Multiplying by up before rounding silu would change about a quarter of the outputs. The bound
    leaves room for the GPU's approximate exp (a few fp32 ulps off numpy's, several more at large
    |gate|), which tips a rounding far more often than the interpreter's one-ulp differences do.
    """
    x = _randn(5, 2 * 1500, dtype=torch.float16, seed=2, scale=4.0)
    gate, up = x.cpu().chunk(2, dim=-1)
    out, expected = elementwise.silu_mul(x).cpu(), torch.nn.functional.silu(gate) * up
    assert (out != expected).float().mean() < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(company=companies())
def test_silu_mul_row_is_independent_of_batch(dtype, company) -> None:
    batch_size, position, seed = company
    x = _randn(batch_size, 2 * 1100, dtype=dtype, seed=seed, scale=4.0)
    alone = elementwise.silu_mul(x[position : position + 1])
    assert torch.equal(alone[0], elementwise.silu_mul(x)[position])


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError(f"launched a kernel over grid {grid} for zero rows")


def test_zero_rows_return_empty_tensors_without_launching(monkeypatch) -> None:
    monkeypatch.setattr(elementwise, "_silu_mul_kernel", _NoLaunch())
    monkeypatch.setattr(elementwise, "_rope_kernel", _NoLaunch())
    assert elementwise.silu_mul(_randn(0, 96, dtype=torch.float16, seed=0)).shape == (0, 48)
    q, k = _fused_qkv_views(0, 6, 2, 48, torch.float16, seed=0)
    q_rot, k_rot = elementwise.rope(q, k, torch.zeros(0, dtype=torch.int64, device=DEVICE), _cos_sin(48))
    assert q_rot.shape == (0, 6, 48) and k_rot.shape == (0, 2, 48)


def test_invariant_mode_routes_silu_mul_and_rope_to_the_triton_kernels(monkeypatch) -> None:
    """Where triton runs (a CUDA tensor in invariant mode), kernels.* call these kernels."""
    calls: list[str] = []
    monkeypatch.setattr(kernels, "_triton_device", lambda x: True)
    monkeypatch.setattr(elementwise, "silu_mul", lambda x: calls.append("silu_mul") or x)
    monkeypatch.setattr(elementwise, "rope", lambda q, k, positions, cos_sin: calls.append("rope") or (q, k))
    q, k = _fused_qkv_views(2, 6, 2, 48, torch.float32, seed=0)
    kernels.silu_mul(_randn(2, 96, dtype=torch.float32, seed=0))
    kernels.rope(q, k, kernels.RotaryInputs.of(torch.tensor([1, 0], device=DEVICE), _cos_sin(48)))
    assert calls == ["silu_mul", "rope"]
