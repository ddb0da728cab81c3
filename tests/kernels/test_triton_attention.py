"""Triton paged attention: a query's bits ignore chunking, cached prefixes, company and launch.

Runs in the Triton interpreter without a GPU (small shapes: 4 query heads, 2 KV heads, head_dim
32, block_size 16, up to ~300 keys so queries see 2 splits of KV_SPLIT_SIZE), compiled on a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.paged import PagedCache, attention_float64, run_chunked, sequence, triton_attend
from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from detserve.kernels import KV_SPLIT_SIZE  # noqa: E402
from detserve.kernels.arrivals import arrival_counts  # noqa: E402
from detserve.kernels.configs import AttentionConfig  # noqa: E402

# 16 query tokens x 2 heads per program; 4 key tiles per split.
SMALL = AttentionConfig(block_m=32, block_n=64, num_warps=4, num_stages=2)
SCALE = 0.125
DTYPES = [torch.float16, torch.float32]


def _cache(dtype: torch.dtype, seed: int, launch: str = "auto", head_dim: int = 32, **kwargs) -> PagedCache:
    def attend(q, k_cache, v_cache, meta):
        return triton_attend(q, k_cache, v_cache, meta, SCALE, SMALL, launch)

    return PagedCache(attend, head_dim=head_dim, seed=seed, dtype=dtype, device=DEVICE, **kwargs)


# float32 goes token by token from the first token; float16 (to save interpreter time) only over
# the tokens around the split boundary, after a prefill.
@pytest.mark.parametrize("dtype,prefill", [(torch.float32, 0), (torch.float16, KV_SPLIT_SIZE - 6)])
def test_one_prefill_chunks_and_token_by_token_give_the_same_bits(dtype, prefill: int) -> None:
    length = KV_SPLIT_SIZE + 24
    qkv = sequence(length, seed=1)
    one_prefill = run_chunked(_cache(dtype, 0), "s", qkv, [length])
    chunked = run_chunked(_cache(dtype, 1), "s", qkv, [5, 100, KV_SPLIT_SIZE, KV_SPLIT_SIZE + 1, length])
    assert torch.equal(one_prefill, chunked)
    token_cuts = ([prefill] if prefill else []) + list(range(prefill + 1, length + 1))
    token_by_token = run_chunked(_cache(dtype, 2), "s", qkv, token_cuts)
    assert torch.equal(one_prefill, token_by_token)


@st.composite
def chunkings(draw, max_len: int = 300) -> tuple[int, list[int]]:
    length = draw(st.integers(1, max_len))
    cuts = draw(st.lists(st.integers(1, length - 1), max_size=3)) if length > 1 else []
    return length, sorted(set(cuts) | {length})


@settings(max_examples=10, deadline=None)
@given(
    chunking=chunkings(),
    company=st.lists(st.tuples(st.integers(1, 200), st.integers(0, 100)), max_size=2),
    seed=st.integers(0, 1000),
)
def test_bits_ignore_chunking_and_whatever_else_is_in_the_batch(chunking, company, seed: int) -> None:
    length, cuts = chunking
    qkv = sequence(length, seed)
    alone = run_chunked(_cache(torch.float32, seed), "s", qkv, [length])
    others = [(f"o{i}", n, s) for i, (n, s) in enumerate(company)]
    crowded = run_chunked(_cache(torch.float32, seed + 1, num_blocks=96), "s", qkv, cuts, others)
    assert torch.equal(alone, crowded)


@pytest.mark.parametrize("dtype,num_heads", [(torch.float32, 4), (torch.float16, 4), (torch.float32, 6)])
def test_parallel_and_sequential_split_launches_give_the_same_bits(dtype, num_heads: int) -> None:
    """One mixed step: decodes (1 to 3 splits, next to a split boundary), a short chunk, a long chunk;
    2 or 3 query heads per KV head. The parallel launch merges in a second kernel or, with
    `last_split_merges`, in the last split program of each item."""
    cache = _cache(dtype, seed=3, num_blocks=120)
    spans = {"decode-a": (529, 530), "decode-b": (256, 257), "decode-c": (1, 2), "chunk": (270, 280), "long": (220, 290)}
    seqs = {name: sequence(end, seed, num_heads=num_heads) for seed, (name, (_, end)) in enumerate(spans.items())}
    cache.step([(name, *(t[:cut] for t in seqs[name]), 0) for name, (cut, _) in spans.items()])
    q, meta = cache.store([(name, *(t[cut:] for t in seqs[name]), cut) for name, (cut, _) in spans.items()])
    parallel, sequential, auto = (
        triton_attend(q, cache.k, cache.v, meta, SCALE, SMALL, launch) for launch in ("parallel", "sequential", "auto")
    )
    assert torch.equal(parallel, sequential) and torch.equal(parallel, auto)
    # Queries alternate, so a merge that ran before every split had arrived would read the other
    # query's stale partials; each twice, so a counter left nonzero would skip the next merge.
    last_merges = dataclasses.replace(SMALL, last_split_merges=True)
    negated = triton_attend(-q, cache.k, cache.v, meta, SCALE, SMALL, "parallel")
    for query, expected in [(q, parallel), (-q, negated)] * 2:
        assert torch.equal(triton_attend(query, cache.k, cache.v, meta, SCALE, last_merges, "parallel"), expected)


@pytest.mark.parametrize(
    "dtype,head_dim,tolerance", [(torch.float32, 32, 1e-5), (torch.float16, 32, 3e-3), (torch.float32, 48, 1e-5)]
)
def test_matches_float64_reference(dtype, head_dim: int, tolerance: float) -> None:
    """head_dim 48 is padded to a 64-wide tile and masked."""
    length = KV_SPLIT_SIZE + 44
    q, k, v = (t.to(dtype) for t in sequence(length, seed=11, head_dim=head_dim))
    out = run_chunked(_cache(dtype, 4, head_dim=head_dim), "s", (q, k, v), [150, length])
    ref = attention_float64(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), SCALE)
    assert (out.double() - ref).abs().max() < tolerance


@pytest.mark.parametrize("last_merges", [False, True])
def test_a_capacity_plan_gives_the_bits_of_the_step_planned_alone(last_merges: bool) -> None:
    """A CUDA graph's decode plan: every decode runs a program per split it could have (here 5),
    the spare ones doing nothing, with the same bits as the step's own plan (1 to 3 splits each)."""
    from detserve.kernels import graph_plan, paged_attention

    cache = _cache(torch.float32, seed=5, num_blocks=120)
    lengths = {"a": 530, "b": 257, "c": 2, "d": 256}
    seqs = {name: sequence(n, seed) for seed, (name, n) in enumerate(lengths.items())}
    cache.step([(name, *(t[:-1] for t in qkv), 0) for name, qkv in seqs.items()])
    q, meta = cache.store([(name, *(t[-1:] for t in qkv), lengths[name] - 1) for name, qkv in seqs.items()])
    config = dataclasses.replace(SMALL, last_split_merges=last_merges)
    planned = triton_attend(q, cache.k, cache.v, meta, SCALE, config)
    table = torch.tensor(graph_plan.capacity_items(meta.seq_lens, max_splits=5), dtype=torch.int32, device=DEVICE)
    capacity = paged_attention.capacity_plan(meta, 2, config, table, max_splits=5)
    negated = triton_attend(-q, cache.k, cache.v, meta, SCALE, config)
    for query, expected in [(q, planned), (-q, negated)] * 2:
        assert torch.equal(paged_attention.paged_attention(query, cache.k, cache.v, capacity, SCALE), expected)
        # A spare program that counted itself in would leave a counter nonzero, and on a GPU the next
        # launch's item would merge before its splits arrived (the interpreter's in-order programs hide it).
        assert int(arrival_counts(1, q.device).count_nonzero()) == 0
    with pytest.raises(ValueError, match="more than 2 splits"):
        graph_plan.capacity_items(meta.seq_lens, max_splits=2)


def test_arrival_counters_outgrown_by_a_larger_launch_stay_allocated_for_graphs_captured_before() -> None:
    """A CUDA graph captured at a small batch keeps the address of the counters it counted on; a
    larger batch's launch must not free them under it."""
    import gc
    import weakref

    device = torch.device(DEVICE)
    earlier = arrival_counts(1, device)
    captured = weakref.ref(earlier)
    grown = arrival_counts(earlier.numel() + 1, device)
    del earlier
    gc.collect()
    assert grown.numel() > captured().numel() and int(captured().count_nonzero()) == 0
