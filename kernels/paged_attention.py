"""Batch-invariant causal attention over the paged KV cache in Triton, for prefill and decode.

(Not `kernels/attention.py`: importing a submodule of that name would rebind `kernels.attention`,
the op the model calls, to the module.)

A query's bits depend only on its own keys, never on its company:
- keys are reduced in fixed splits of KV_SPLIT_SIZE at absolute key positions (0-255, 256-511,
  ...), so the splits are the same whether a key came from the cache or from the current chunk;
- inside a split, fixed BLOCK_N key tiles run in order with online softmax; a tile (or a whole
  split) past a query's position is an exact no-op for it (max unchanged, so its running state
  is scaled by exactly 1 and gains weight 0), so how far a program reads for its other rows never
  touches this row;
- split results merge in order 0, 1, 2, ... from an empty state (the first merge reproduces
  split 0 exactly), with `_merge` on both launches;
- one program serves BLOCK_M rows = query tokens x the query heads of one KV head (GQA), with the
  same tiles and warps on every launch, so each row meets the same MMA shapes wherever it sits.
Decode-sized sequences run their splits as parallel programs writing fp32 partials, merged in
order by a second kernel or (`last_split_merges`) by the item's last split program to finish;
longer query runs take the splits one after another in one program.
Both launches run `_attend_split` and `_merge`, compiled without FMA contraction so elementwise
code in different kernels rounds identically: the launch may depend on the batch, the bits not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from detserve.kernels import graph_plan
from detserve.kernels.arrivals import arrival_counts, last_to_arrive
from detserve.kernels.configs import LAUNCH_OPTIONS, AttentionConfig
from detserve.kernels.inputs import AttentionMetadata
from detserve.kernels.contract import KV_SPLIT_SIZE

Launch = Literal["auto", "parallel", "sequential"]

SPLIT: tl.constexpr = tl.constexpr(KV_SPLIT_SIZE)
ITEM_FIELDS: tl.constexpr = tl.constexpr(graph_plan.ITEM_FIELDS)


@triton.jit
def _load_item(items_ptr, item):
    """One work item: up to BLOCK_M // G consecutive query tokens of one sequence."""
    base = items_ptr + item * ITEM_FIELDS
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4), tl.load(base + 5)


@triton.jit
def _query_rows(tok0, num_rows, qpos0, kv_head, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile row r holds query token r // G, head kv_head * G + r % G; rows past the item repeat its last token."""
    rows = tl.arange(0, BLOCK_M)
    qi = rows // G
    row_ok = qi < num_rows
    qi = tl.minimum(qi, num_rows - 1)
    return qi, (tok0 + qi).to(tl.int64), kv_head * G + rows % G, qpos0 + qi, row_ok


@triton.jit
def _rescale(m_old, m_new, m_safe):
    """exp2(m_old - m_new), but exactly 1 where the max did not move: a masked tile or split must
    leave the state bit for bit, whether or not the GPU's exp2(0) is exactly 1. (m_safe is m_new
    with -inf replaced by 0, so that no NaN is formed even in the discarded branch.)"""
    return tl.where(m_new == m_old, 1.0, tl.exp2(m_old - m_safe))


@triton.jit
def _attend_split(
    q, q_pos, k_ptr, v_ptr, table_ptr, kv_head, split, key_end, page_size, stride_slot, stride_head, qk_scale, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """(acc [BLOCK_M, HEAD], m [BLOCK_M], l [BLOCK_M]) of one key split, log2 domain, from an empty state.

    Reads keys [split * SPLIT, min((split + 1) * SPLIT, key_end)); keys beyond `key_end` load as 0
    and, like all keys after a row's own position, get weight 0.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD)
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_M, HEAD), dtype=tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, key_end)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N] absolute key positions
        key_ok = pos < hi
        block = tl.load(table_ptr + pos // page_size, mask=key_ok, other=0)
        base = (block.to(tl.int64) * page_size + pos % page_size) * stride_slot + kv_head * stride_head
        k = tl.load(k_ptr + base[None, :] + offs_d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        qk = tl.where(pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: keep p = 0, no NaN
        alpha = _rescale(m, m_new, m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base[:, None] + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    return acc, m, l


@triton.jit
def _merge(o, m, l, acc_j, m_j, l_j):
    """Fold split j into the running state (o, m, l).

    From the empty state (0, -inf, 0) this yields split j itself; a split with nothing visible
    (m_j = -inf, acc_j = 0, l_j = 0) leaves the state exactly as it was.
    """
    m_new = tl.maximum(m, m_j)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _rescale(m, m_new, m_safe)
    beta = _rescale(m_j, m_new, m_safe)
    return o * alpha[:, None] + acc_j * beta[:, None], m_new, l * alpha + l_j * beta


@triton.jit
def _store_out(out_ptr, o, l, tok, head, row_ok, stride_ot, stride_oh, D, HEAD: tl.constexpr):
    offs_d = tl.arange(0, HEAD)
    out = o / l[:, None]
    ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _load_queries(q_ptr, tok, head, stride_qt, stride_qh, D, HEAD: tl.constexpr):
    offs_d = tl.arange(0, HEAD)
    ptrs = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)  # [BLOCK_M, HEAD]


@triton.jit
def _merge_partials(
    out_ptr, part_o_ptr, part_ml_ptr, qi, tok, head, row_ok, num_splits, slot0, stride_ot, stride_oh, D, H,
    BLOCK_M: tl.constexpr, HEAD: tl.constexpr,
):
    """An item's split partials merged in order 0, 1, 2, ..., normalized and stored (read from L2:
    the last split program may run this right after other programs wrote them)."""
    offs_d = tl.arange(0, HEAD)
    o = tl.zeros((BLOCK_M, HEAD), dtype=tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for split in range(0, num_splits):
        slot_head = (slot0 + qi * num_splits + split).to(tl.int64) * H + head
        acc_j = tl.load(part_o_ptr + slot_head[:, None] * HEAD + offs_d[None, :], cache_modifier=".cg")
        m_j = tl.load(part_ml_ptr + 2 * slot_head, cache_modifier=".cg")
        l_j = tl.load(part_ml_ptr + 2 * slot_head + 1, cache_modifier=".cg")
        o, m, l = _merge(o, m, l, acc_j, m_j, l_j)
    _store_out(out_ptr, o, l, tok, head, row_ok, stride_ot, stride_oh, D, HEAD)


# The step's block-table width and item table offsets vary with the batch: kept out of Triton's
# specialisation so that every step runs one binary per model.
@triton.jit(do_not_specialize=["stride_table"])
def _attention_sequential_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, items_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table, stride_slot, stride_head, page_size, qk_scale, D,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (item, KV head): every split of the item in order, merged as it goes."""
    kv_head = tl.program_id(1)
    seq, tok0, num_rows, qpos0, num_splits, _ = _load_item(items_ptr, tl.program_id(0))
    _, tok, head, q_pos, row_ok = _query_rows(tok0, num_rows, qpos0, kv_head, G, BLOCK_M)
    q = _load_queries(q_ptr, tok, head, stride_qt, stride_qh, D, HEAD)
    table = tables_ptr + seq.to(tl.int64) * stride_table
    o = tl.zeros((BLOCK_M, HEAD), dtype=tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for split in range(0, num_splits):
        acc_j, m_j, l_j = _attend_split(
            q, q_pos, k_ptr, v_ptr, table, kv_head, split, qpos0 + num_rows, page_size, stride_slot, stride_head,
            qk_scale, D, BLOCK_M, BLOCK_N, HEAD, PRECISION,
        )
        o, m, l = _merge(o, m, l, acc_j, m_j, l_j)
    _store_out(out_ptr, o, l, tok, head, row_ok, stride_ot, stride_oh, D, HEAD)


@triton.jit(do_not_specialize=["stride_table"], do_not_specialize_on_alignment=["programs_ptr"])
def _attention_split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, items_ptr, programs_ptr, part_o_ptr, part_ml_ptr, arrivals_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table, stride_slot, stride_head, page_size, qk_scale, D, H,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, PRECISION: tl.constexpr,
    LAST_MERGES: tl.constexpr,
):
    """Program (item split, KV head): one split's (acc, m, l) into its partial slots, fp32.

    With LAST_MERGES, the last of the item's split programs to finish (for this KV head) merges
    them, as `_attention_merge_kernel` does otherwise. A program past its item's splits does
    nothing: a CUDA graph's launch has a program for every split an item could have
    (`capacity_plan`), while a step's items have only those their keys reach.
    """
    kv_head = tl.program_id(1)
    item = tl.load(programs_ptr + 2 * tl.program_id(0))
    split = tl.load(programs_ptr + 2 * tl.program_id(0) + 1)
    seq, tok0, num_rows, qpos0, num_splits, slot0 = _load_item(items_ptr, item)
    if split < num_splits:
        qi, tok, head, q_pos, row_ok = _query_rows(tok0, num_rows, qpos0, kv_head, G, BLOCK_M)
        q = _load_queries(q_ptr, tok, head, stride_qt, stride_qh, D, HEAD)
        table = tables_ptr + seq.to(tl.int64) * stride_table
        acc, m, l = _attend_split(
            q, q_pos, k_ptr, v_ptr, table, kv_head, split, qpos0 + num_rows, page_size, stride_slot, stride_head,
            qk_scale, D, BLOCK_M, BLOCK_N, HEAD, PRECISION,
        )
        slot_head = (slot0 + qi * num_splits + split).to(tl.int64) * H + head  # [BLOCK_M]
        offs_d = tl.arange(0, HEAD)
        tl.store(part_o_ptr + slot_head[:, None] * HEAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + 2 * slot_head, m, mask=row_ok)
        tl.store(part_ml_ptr + 2 * slot_head + 1, l, mask=row_ok)
        if LAST_MERGES:
            if last_to_arrive(arrivals_ptr + item * tl.num_programs(1) + kv_head, num_splits):
                _merge_partials(
                    out_ptr, part_o_ptr, part_ml_ptr, qi, tok, head, row_ok, num_splits, slot0, stride_ot,
                    stride_oh, D, H, BLOCK_M, HEAD,
                )


@triton.jit(do_not_specialize=["first_item"])
def _attention_merge_kernel(
    out_ptr, items_ptr, part_o_ptr, part_ml_ptr, first_item, stride_ot, stride_oh, D, H,
    G: tl.constexpr, BLOCK_M: tl.constexpr, HEAD: tl.constexpr,
):
    """Program (item, KV head): the item's split partials merged in order, then normalized."""
    kv_head = tl.program_id(1)
    _, tok0, num_rows, qpos0, num_splits, slot0 = _load_item(items_ptr, first_item + tl.program_id(0))
    qi, tok, head, _, row_ok = _query_rows(tok0, num_rows, qpos0, kv_head, G, BLOCK_M)
    _merge_partials(
        out_ptr, part_o_ptr, part_ml_ptr, qi, tok, head, row_ok, num_splits, slot0, stride_ot, stride_oh, D, H,
        BLOCK_M, HEAD,
    )


@dataclass
class Plan:
    """Work items of one step, built once by `plan` and shared by every layer (all layers have equal
    shapes), for the tiles of `config`."""

    meta: AttentionMetadata
    group: int  # query heads per KV head
    config: AttentionConfig
    items: torch.Tensor  # int32, flat: [num_items, ITEM_FIELDS] (sequential items first), then `programs`
    programs: torch.Tensor  # int32, flat: [num_programs, 2] (item, split) of each parallel split program
    num_sequential: int
    num_parallel: int
    num_slots: int  # partial slots: sum over parallel items of rows x splits


def plan(meta: AttentionMetadata, group: int, config: AttentionConfig, device: torch.device,
         launch: Launch = "auto") -> Plan:
    """The step's work items for `group` query heads per KV head. `launch` forces one launch for
    every sequence (for tests); "auto" splits decode-sized sequences in parallel, which is safe
    because both launches give the same bits."""
    _check_config(group, config)
    rows_per_item = config.block_m // group
    sequential: list[list[int]] = []
    parallel: list[list[int]] = []
    programs: list[tuple[int, int]] = []
    num_slots = 0
    for b in range(meta.num_seqs):
        start, end = meta.query_start_loc[b], meta.query_start_loc[b + 1]
        seq_len, q_len = meta.seq_lens[b], end - start
        if launch == "auto":
            split_up = q_len <= rows_per_item and seq_len > KV_SPLIT_SIZE
        else:
            split_up = launch == "parallel"
        for c in range(0, q_len, rows_per_item):
            rows = min(rows_per_item, q_len - c)
            qpos0 = seq_len - q_len + c
            splits = graph_plan.splits_for(qpos0 + rows)  # through the split of the item's last query
            if split_up:
                programs += [(len(parallel), j) for j in range(splits)]
                parallel.append([b, start + c, rows, qpos0, splits, num_slots])
                num_slots += rows * splits
            else:
                sequential.append([b, start + c, rows, qpos0, splits, 0])
    num_items = len(sequential) + len(parallel)
    flat = [f for item in sequential + parallel for f in item]
    flat += [f for item, split in programs for f in (len(sequential) + item, split)]  # absolute item index
    table = torch.tensor(flat, dtype=torch.int32).to(device)  # one copy to the device per step
    return Plan(
        meta=meta,
        group=group,
        config=config,
        items=table,
        programs=table[num_items * ITEM_FIELDS.value :],
        num_sequential=len(sequential),
        num_parallel=len(parallel),
        num_slots=num_slots,
    )


def _check_config(group: int, config: AttentionConfig) -> None:
    if group > config.block_m or KV_SPLIT_SIZE % config.block_n:
        raise ValueError(f"attention config {config} cannot serve {group} query heads per KV head")


def capacity_plan(meta: AttentionMetadata, group: int, config: AttentionConfig, table: torch.Tensor,
                  max_splits: int) -> Plan:
    """A decode step's plan whose work items are read from `table` (int32 on the device, as
    `graph_plan.capacity_items` fills it for meta's `num_seqs` decodes): its launches are the same whatever the
    sequences' lengths, as a CUDA graph replays them, and each item's arithmetic is `plan`'s, so
    are its bits."""
    _check_config(group, config)
    batch = meta.num_seqs
    return Plan(meta=meta, group=group, config=config, items=table, programs=table[batch * ITEM_FIELDS.value :],
                num_sequential=0, num_parallel=batch, num_slots=batch * max_splits)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Plan,
                    scale: float) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged caches [num_blocks, block_size, Hkv, D] -> [T, H, D],
    as `plan` (built once per step) lays it out. The step's K/V must already be in the cache."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    meta, config, group = plan.meta, plan.config, plan.group
    if group != num_heads // num_kv_heads:
        raise ValueError(f"the plan is for {group} query heads per KV head, not {num_heads // num_kv_heads}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.stride() == v_cache.stride()):
        raise ValueError("paged attention needs contiguous K/V caches of one layout")
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)
    head = triton.next_power_of_2(head_dim)
    qk_scale = scale * math.log2(math.e)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays fp32; 16-bit inputs ignore it
    tables = meta.block_tables
    cache_args = (tables.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_size, qk_scale, head_dim)
    tiles = dict(G=group, BLOCK_M=config.block_m, HEAD=head)
    # Without FMA contraction the merge arithmetic rounds the same in the sequential and merge kernels.
    launch_opts = dict(num_warps=config.num_warps, num_stages=config.num_stages, **LAUNCH_OPTIONS)
    if plan.num_sequential:
        _attention_sequential_kernel[(plan.num_sequential, num_kv_heads)](
            q, k_cache, v_cache, out, tables, plan.items, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *cache_args, BLOCK_N=config.block_n, PRECISION=precision, **tiles, **launch_opts,
        )
    if plan.num_parallel:
        part_o = torch.empty((plan.num_slots, num_heads, head), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((plan.num_slots, num_heads, 2), dtype=torch.float32, device=q.device)
        last_merges = config.last_split_merges
        # Counters indexed by (absolute item, KV head); never touched without LAST_MERGES.
        pieces = (plan.num_sequential + plan.num_parallel) * num_kv_heads
        arrivals = arrival_counts(pieces, q.device) if last_merges else part_ml
        _attention_split_kernel[(plan.programs.numel() // 2, num_kv_heads)](
            q, k_cache, v_cache, out, tables, plan.items, plan.programs, part_o, part_ml, arrivals,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_args, num_heads,
            BLOCK_N=config.block_n, PRECISION=precision, LAST_MERGES=last_merges, **tiles, **launch_opts,
        )
        if not last_merges:
            _attention_merge_kernel[(plan.num_parallel, num_kv_heads)](
                out, plan.items, part_o, part_ml, plan.num_sequential, out.stride(0), out.stride(1), head_dim,
                num_heads, **tiles, **launch_opts,
            )
    return out
