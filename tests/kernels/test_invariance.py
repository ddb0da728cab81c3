"""Batch invariance of every invariant op: a row computed in any company has the same bits as alone.

Compared with torch.equal, never with a tolerance. Accuracy against float64 is checked separately.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detserve import kernels
from detserve.kernels import KV_SPLIT_SIZE, cpu_native
from detserve.kernels.reference import attention as torch_attention
from tests.kernels.paged import PagedCache, attention_float64, run_chunked, sequence

SETTINGS = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True, scope="module", params=["native", "torch"])
def cpu_kernels(request: pytest.FixtureRequest):
    """Every test for both CPU backends of the facade: the C ops and the torch ops."""
    if request.param == "native" and not cpu_native.enabled():
        pytest.skip("the C ops do not build here (no C compiler)")
    with cpu_native.selected(request.param):
        yield request.param


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
    q_alone, k_alone = kernels.rope(q_row[None], k_row[None], kernels.RotaryInputs.of(torch.tensor([pos]), cos_sin))
    q, k = kernels.rope(_embed_row(q_row, batch_size, position, seed), _embed_row(k_row, batch_size, position, seed + 1),
                        kernels.RotaryInputs.of(positions, cos_sin))
    assert torch.equal(q_alone[0], q[position]) and torch.equal(k_alone[0], k[position])


# --------------------------------------------------------------------------------------------------
# attention over a paged cache


def _attend(mode: str):
    def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta) -> torch.Tensor:
        with kernels.mode(mode):
            plan = kernels.plan_attention(meta, q.shape[1], k_cache.shape[2])
            return kernels.attention(q, k_cache, v_cache, plan, scale=0.125)

    return attend


def _cache(num_blocks: int = 96, seed: int = 0, mode: str = "invariant") -> PagedCache:
    return PagedCache(_attend(mode), num_blocks=num_blocks, num_kv_heads=3, seed=seed)


def _sequence(length: int, seed: int):
    return sequence(length, seed, num_heads=9, num_kv_heads=3)


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
    one_prefill = run_chunked(_cache(seed=seed), "s", qkv, [length])
    chunked = run_chunked(_cache(seed=seed + 1), "s", qkv, cuts)
    assert torch.equal(one_prefill, chunked)
    if length <= 300:
        token_by_token = run_chunked(_cache(seed=seed + 2), "s", qkv, list(range(1, length + 1)))
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
    alone = run_chunked(_cache(seed=seed), "s", qkv, [length])
    company = [(f"o{i}", n, s) for i, (n, s) in enumerate(others)]
    crowded = run_chunked(_cache(num_blocks=400, seed=seed + 3), "s", qkv, cuts, company)
    assert torch.equal(alone, crowded)


def test_attention_splits_sit_at_absolute_key_positions() -> None:
    """A query just past a split boundary sees the same bits however the keys before it arrived."""
    length = 2 * KV_SPLIT_SIZE + 3
    qkv = _sequence(length, seed=7)
    whole = run_chunked(_cache(), "s", qkv, [length])
    around_boundary = run_chunked(_cache(), "s", qkv, [KV_SPLIT_SIZE - 1, KV_SPLIT_SIZE + 1, length])
    assert torch.equal(whole, around_boundary)


def _decode_after_prefill(cache: PagedCache, seqs: dict[str, tuple]) -> list[torch.Tensor]:
    """Prefill each sequence's tokens but its last in one step, then decode the last ones in one."""
    cache.step([(name, q[:-1], k[:-1], v[:-1], 0) for name, (q, k, v) in seqs.items()])
    return cache.step([(name, q[-1:], k[-1:], v[-1:], q.shape[0] - 1) for name, (q, k, v) in seqs.items()])


def test_a_decode_attends_over_its_own_splits_only_with_the_bits_it_has_alone() -> None:
    """Decodes of 1, 3, 2 and 1 splits in one step: 7 splits' items per KV head, not 4 x 3, taken out
    of the step's order (most splits first), and each decode's output is its output alone."""
    lengths = {"a": 100, "b": 3 * KV_SPLIT_SIZE - 20, "c": KV_SPLIT_SIZE + 9, "d": 40}
    seqs = {name: _sequence(length, seed) for seed, (name, length) in enumerate(lengths.items())}
    together = _decode_after_prefill(_cache(num_blocks=200), seqs)
    for (name, qkv), out in zip(seqs.items(), together):
        assert torch.equal(out, _decode_after_prefill(_cache(num_blocks=200, seed=5), {name: qkv})[0])
    cache = _cache(num_blocks=200)
    cache.step([(name, q[:-1], k[:-1], v[:-1], 0) for name, (q, k, v) in seqs.items()])
    _, meta = cache.store([(name, q[-1:], k[-1:], v[-1:], q.shape[0] - 1) for name, (q, k, v) in seqs.items()])
    plan = torch_attention.plan_invariant(meta, 9, 3, torch.device("cpu")).decodes
    assert plan.split_decodes == [4, 2, 1] and plan.bias.shape[0] == 3 * 7
    assert plan.rows.tolist() == [1, 2, 0, 3] and not plan.in_order


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_attention_matches_float64_reference(mode: str) -> None:
    length = KV_SPLIT_SIZE + 77
    q, k, v = _sequence(length, seed=11)
    (out,) = _cache(mode=mode).step([("s", q, k, v, 0)])
    ref = attention_float64(q, k, v, 0.125)
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


def test_fast_attention_batches_decodes_of_any_length_beside_a_prefill_and_stays_accurate(monkeypatch,
                                                                                         cpu_kernels) -> None:
    if cpu_kernels == "native":
        pytest.skip("the torch ops' fast plan: the C attention has no decode groups")
    # A small key budget forces several decode groups; stale keys of released blocks must not leak in.
    monkeypatch.setattr(torch_attention, "FAST_DECODE_KEYS", 700)
    cache = _cache(num_blocks=256, mode="fast")
    cache.step([("stale", *_sequence(300, seed=99), 0)])
    cache.release("stale")
    lengths = {"a": 1, "b": 17, "c": 300, "d": 64, "e": 129}
    seqs = {name: _sequence(n, seed=i) for i, (name, n) in enumerate(lengths.items())}
    cache.step([(name, *(t[:-1] for t in seqs[name]), 0) for name, n in lengths.items() if n > 1])
    prefill = _sequence(40, seed=50)
    decodes = [(name, *(t[-1:] for t in seqs[name]), n - 1) for name, n in lengths.items()]
    q, meta = cache.store(decodes[:2] + [("p", *prefill, 0)] + decodes[2:])
    with kernels.mode("fast"):
        plan = kernels.plan_attention(meta, q.shape[1], cache.k.shape[2])
        out = kernels.attention(q, cache.k, cache.v, plan, scale=0.125)
        assert torch.equal(kernels.attention(q, cache.k, cache.v, plan, scale=0.125), out)  # the plan is reusable
    assert len(plan.decode_groups) == 3  # groups [a, b], [c, d], [e]
    outs = [out[meta.query_start_loc[i] : meta.query_start_loc[i + 1]] for i in range(meta.num_seqs)]
    for out, name in zip(outs[:2] + outs[3:], lengths):
        assert torch.allclose(out.double(), attention_float64(*seqs[name], 0.125)[-1:], rtol=1e-5, atol=1e-5)
    assert torch.allclose(outs[2].double(), attention_float64(*prefill, 0.125), rtol=1e-5, atol=1e-5)
