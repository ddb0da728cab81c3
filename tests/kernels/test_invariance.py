"""Batch invariance of every invariant op: a row computed in any company has the same bits as alone.

Compared with torch.equal, never with a tolerance. Accuracy against float64 is checked separately.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import KV_SPLIT_SIZE, AttentionMetadata

SETTINGS = settings(max_examples=25, deadline=None)


def _embed_row(row: torch.Tensor, batch_size: int, position: int, seed: int) -> torch.Tensor:
    """A random batch of `batch_size` rows with `row` at `position`."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randn((batch_size,) + row.shape, generator=g)
    batch[position] = row
    return batch


@st.composite
def companies(draw) -> tuple[int, int, int]:
    batch_size = draw(st.integers(1, 70))
    return batch_size, draw(st.integers(0, batch_size - 1)), draw(st.integers(0, 2**31))


@pytest.mark.parametrize("n,k", [(64, 48), (1536, 576), (576, 1536)])
@SETTINGS
@given(company=companies())
def test_linear_row_is_independent_of_batch(n: int, k: int, company: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(n * k)
    weight, bias, row = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(k, generator=g)
    with kernels.mode("invariant"):
        alone = kernels.linear(row[None], weight, bias)[0]
        batch_size, position, seed = company
        in_batch = kernels.linear(_embed_row(row, batch_size, position, seed), weight, bias)[position]
    assert torch.equal(alone, in_batch)


def test_plain_torch_matmul_is_not_batch_invariant_here() -> None:
    """Why the invariant mode exists: the fast path's rows do change with the batch on this CPU."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(1536, 576, generator=g), torch.randn(64, 576, generator=g)
    with kernels.mode("fast"):
        alone = kernels.linear(x[:1], weight)[0]
        changed = sum(not torch.equal(kernels.linear(x[:m], weight)[0], alone) for m in range(2, 64))
    assert changed > 0


@SETTINGS
@given(company=companies(), dim=st.sampled_from([64, 576]))
def test_rms_norm_row_is_independent_of_batch(company: tuple[int, int, int], dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    weight, row = torch.rand(dim, generator=g) + 0.5, torch.randn(dim, generator=g) * 3
    batch_size, position, seed = company
    with kernels.mode("invariant"):
        alone = kernels.rms_norm(row[None], weight, 1e-5)[0]
        in_batch = kernels.rms_norm(_embed_row(row, batch_size, position, seed), weight, 1e-5)[position]
    assert torch.equal(alone, in_batch)


@SETTINGS
@given(company=companies())
def test_silu_mul_row_is_independent_of_batch(company: tuple[int, int, int]) -> None:
    row = torch.randn(2 * 1536, generator=torch.Generator().manual_seed(1))
    batch_size, position, seed = company
    with kernels.mode("invariant"):
        alone = kernels.silu_mul(row[None])[0]
        in_batch = kernels.silu_mul(_embed_row(row, batch_size, position, seed))[position]
    assert torch.equal(alone, in_batch)


@SETTINGS
@given(company=companies())
def test_log_softmax_row_is_independent_of_batch(company: tuple[int, int, int]) -> None:
    row = torch.randn(49152, generator=torch.Generator().manual_seed(2)) * 5
    batch_size, position, seed = company
    batch_size = min(batch_size, 24)
    position = min(position, batch_size - 1)
    with kernels.mode("invariant"):
        alone = kernels.log_softmax(row[None])[0]
        in_batch = kernels.log_softmax(_embed_row(row, batch_size, position, seed))[position]
    assert torch.equal(alone, in_batch)


@SETTINGS
@given(company=companies(), pos=st.integers(0, 4000))
def test_rope_row_is_independent_of_batch(company: tuple[int, int, int], pos: int) -> None:
    g = torch.Generator().manual_seed(3)
    cos_sin = torch.randn(4096, 64, generator=g)
    q_row, k_row = torch.randn(9, 64, generator=g), torch.randn(3, 64, generator=g)
    batch_size, position, seed = company
    positions = torch.randint(0, 4096, (batch_size,), generator=torch.Generator().manual_seed(seed))
    positions[position] = pos
    q_alone, k_alone = kernels.rope(q_row[None], k_row[None], torch.tensor([pos]), cos_sin)
    q, k = kernels.rope(_embed_row(q_row, batch_size, position, seed), _embed_row(k_row, batch_size, position, seed + 1), positions, cos_sin)
    assert torch.equal(q_alone[0], q[position]) and torch.equal(k_alone[0], k[position])


# --------------------------------------------------------------------------------------------------
# attention over a paged cache


class PagedCache:
    """A small paged KV cache plus bookkeeping, driven the way the engine drives the kernels."""

    def __init__(self, num_blocks: int = 96, block_size: int = 16, num_kv_heads: int = 3, head_dim: int = 32, seed: int = 0):
        self.block_size = block_size
        self.k = torch.zeros(num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.v = torch.zeros_like(self.k)
        self.zero_slot = num_blocks * block_size
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.free = order  # blocks handed out in a scrambled order, as after real traffic
        self.tables: dict[str, list[int]] = {}

    def step(
        self, chunks: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]], mode: str = "invariant"
    ) -> list[torch.Tensor]:
        """chunks: (seq id, q [n, H, D], k [n, Hkv, D], v [n, Hkv, D], start position). One batch."""
        slots, qs, ks, vs, qsl, seq_lens, tables = [], [], [], [], [0], [], []
        for seq, q, k, v, start in chunks:
            table = self.tables.setdefault(seq, [])
            end = start + q.shape[0]
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            qs.append(q), ks.append(k), vs.append(v)
            qsl.append(qsl[-1] + q.shape[0])
            seq_lens.append(end)
            tables.append(table)
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            block_size=self.block_size,
            zero_slot=self.zero_slot,
        )
        with kernels.mode(mode):
            kernels.kv_store(torch.cat(ks), torch.cat(vs), self.k, self.v, torch.tensor(slots))
            out = kernels.attention(torch.cat(qs), self.k, self.v, meta, scale=0.125)
        return [out[qsl[i] : qsl[i + 1]] for i in range(len(chunks))]


def _sequence(length: int, seed: int, num_heads: int = 9, num_kv_heads: int = 3, head_dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(length, num_heads, head_dim, generator=g),
        torch.randn(length, num_kv_heads, head_dim, generator=g),
        torch.randn(length, num_kv_heads, head_dim, generator=g),
    )


def _run_chunked(cache: PagedCache, seq: str, qkv, cuts: list[int], others: list[tuple[str, int, int]] | None = None):
    """Feed a sequence through the cache in chunks ending at `cuts`; optional company per step."""
    q, k, v = qkv
    outs, start = [], 0
    for step, end in enumerate(cuts):
        batch = [(seq, q[start:end], k[start:end], v[start:end], start)]
        for other_id, other_len, other_seed in others or []:
            oq, ok, ov = _sequence(other_len, other_seed + step)
            batch.append((f"{other_id}-{step}", oq, ok, ov, 0))
        position = step % len(batch)
        batch[0], batch[position] = batch[position], batch[0]
        result = cache.step(batch)
        outs.append(result[position])
        for other_id, _, _ in others or []:  # finished: blocks go back, stale K/V and all
            cache.free += cache.tables.pop(f"{other_id}-{step}")
        start = end
    return torch.cat(outs)


@st.composite
def chunkings(draw, max_len: int = 600) -> tuple[int, list[int]]:
    length = draw(st.integers(1, max_len))
    cuts = sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=6)) if length > 1 else []) | {length})
    return length, cuts


@settings(max_examples=15, deadline=None)
@given(chunking=chunkings(), seed=st.integers(0, 1000))
def test_attention_same_bits_for_one_prefill_chunks_and_token_by_token(chunking, seed: int) -> None:
    length, cuts = chunking
    qkv = _sequence(length, seed)
    one_prefill = _run_chunked(PagedCache(seed=seed), "s", qkv, [length])
    chunked = _run_chunked(PagedCache(seed=seed + 1), "s", qkv, cuts)
    assert torch.equal(one_prefill, chunked)
    if length <= 300:
        token_by_token = _run_chunked(PagedCache(seed=seed + 2), "s", qkv, list(range(1, length + 1)))
        assert torch.equal(one_prefill, token_by_token)


@settings(max_examples=15, deadline=None)
@given(
    chunking=chunkings(max_len=400),
    others=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 100)), max_size=5),
    seed=st.integers(0, 1000),
)
def test_attention_same_bits_whatever_else_is_in_the_batch(chunking, others, seed: int) -> None:
    length, cuts = chunking
    qkv = _sequence(length, seed)
    alone = _run_chunked(PagedCache(seed=seed), "s", qkv, [length])
    company = [(f"o{i}", n, s) for i, (n, s) in enumerate(others)]
    crowded = _run_chunked(PagedCache(num_blocks=400, seed=seed + 3), "s", qkv, cuts, company)
    assert torch.equal(alone, crowded)


def test_attention_splits_sit_at_absolute_key_positions() -> None:
    """A query just past a split boundary sees the same bits however the keys before it arrived."""
    length = 2 * KV_SPLIT_SIZE + 3
    qkv = _sequence(length, seed=7)
    whole = _run_chunked(PagedCache(), "s", qkv, [length])
    around_boundary = _run_chunked(PagedCache(), "s", qkv, [KV_SPLIT_SIZE - 1, KV_SPLIT_SIZE + 1, length])
    assert torch.equal(whole, around_boundary)


def _attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    causal = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, -math.inf).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_attention_matches_float64_reference(mode: str) -> None:
    length = KV_SPLIT_SIZE + 77
    q, k, v = _sequence(length, seed=11)
    cache = PagedCache()
    (out,) = cache.step([("s", q, k, v, 0)], mode=mode)
    ref = _attention_float64(q, k, v, 0.125)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_linear_matches_float64_reference() -> None:
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(37, 576, generator=g), torch.randn(1536, 576, generator=g)
    with kernels.mode("invariant"):
        out = kernels.linear(x, w)
    ref = x.double() @ w.double().T
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_mode_is_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError):
        with kernels.mode("fast"):
            raise RuntimeError("boom")
    assert kernels.current_mode() == "invariant"
