"""Attention over the paged KV cache in torch, both modes, and the cache write both modes share.

Attention reduces over keys in fixed `KV_SPLIT_SIZE` splits at absolute key positions, merged in
order, so a query sees the same splits whether its keys were cached earlier, arrive in its own
prefill chunk, or were written one token at a time. Each mode's plan (index and bias tensors of
the step) is built once per step by `plan_invariant` / `plan_fast` and read by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from detserve.kernels.contract import EXP_FLOOR, KV_SPLIT_SIZE
from detserve.kernels.inputs import AttentionMetadata, cache_slots
from detserve.kernels.reference import as_dtype


def kv_store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V rows [T, Hkv, D] into cache slots (caches [num_blocks, block_size, Hkv, D]).
    index_copy_, not an indexed assignment: the same copy in half the host time (a step's slots are
    distinct)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` keys (or values) of one sequence: [seq_len, Hkv, D]."""
    num_blocks = -(-seq_len // cache.shape[1])
    return cache[block_table[:num_blocks].long()].reshape(-1, *cache.shape[2:])[:seq_len]


FAST_DECODE_KEYS = 1 << 18
"""Keys gathered per batched decode SDPA call in fast mode: bounds its temporary K/V copy."""


def _masked_sdpa():
    """SDPA backends for fast mode's masked calls: any but cuDNN. Key lengths change every step, and
    on an H200 cuDNN then spent 6.6 ms of host time per call building a graph (a random Llama-3-8B
    decode step took 70 ms in fast mode, 24 in invariant mode); the memory-efficient kernel takes
    masks and needs no per-shape build. On CPU this changes nothing (flash for CPU, or math)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def attention_fast(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: "FastPlan", scale: float
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's cached keys, with torch SDPA.

    Decodes (one query each) share SDPA calls, a group of them per call (`_attend_decodes`);
    longer query runs take one call per sequence.
    """
    meta = expect_plan(plan, FastPlan).meta
    out = torch.empty_like(q)
    for b in range(meta.num_seqs):
        if meta.is_decode(b):
            continue
        start, end = meta.query_start_loc[b], meta.query_start_loc[b + 1]
        seq_len, q_len = meta.seq_lens[b], end - start
        k = _gather_kv(k_cache, meta.block_tables[b], seq_len)
        v = _gather_kv(v_cache, meta.block_tables[b], seq_len)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        with _masked_sdpa():
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
            )
        out[start:end] = o.transpose(0, 1)
    for decodes in plan.decode_groups:
        _attend_decodes(q, k_cache, v_cache, decodes, scale, out)
    return out


def expect_plan(plan: object, kind: type) -> object:
    """`plan`, if it is of the kind this backend reads (one planned for another mode or device is not)."""
    if not isinstance(plan, kind):
        raise TypeError(f"attention was planned as {type(plan).__name__}, but this backend reads {kind.__name__}: "
                        "plan and attend in the same kernel mode and device")
    return plan


@dataclass
class _DecodeGroup:
    """Decode steps that share one fast-mode SDPA call, and where their queries and keys are."""

    rows: torch.Tensor  # [B] flat query row of each decode
    slots: torch.Tensor  # [B, L] cache slots of each sequence's keys, padded with the always-zero slot
    visible: torch.Tensor  # [B, L] True at real keys


@dataclass
class FastPlan:
    """Fast mode's plan: the step's metadata, and its decodes grouped for shared SDPA calls."""

    meta: AttentionMetadata
    decode_groups: list[_DecodeGroup]


def plan_fast(meta: AttentionMetadata, num_heads: int, num_kv_heads: int, device: torch.device) -> FastPlan:
    return FastPlan(meta, _decode_groups(meta, device))


def _decode_groups(meta: AttentionMetadata, device: torch.device) -> list[_DecodeGroup]:
    """The step's decodes in groups of at most FAST_DECODE_KEYS padded keys."""
    groups: list[list[int]] = []
    longest = 0
    for b in range(meta.num_seqs):
        if not meta.is_decode(b):
            continue
        if groups and (len(groups[-1]) + 1) * max(longest, meta.seq_lens[b]) <= FAST_DECODE_KEYS:
            groups[-1].append(b)
            longest = max(longest, meta.seq_lens[b])
        else:
            groups.append([b])
            longest = meta.seq_lens[b]
    bs = meta.block_size
    plan = []
    for seqs in groups:
        lengths = torch.tensor([meta.seq_lens[b] for b in seqs], device=device)
        positions = torch.arange(max(meta.seq_lens[b] for b in seqs), device=device)
        visible = positions[None, :] < lengths[:, None]  # [B, L]
        seq_rows = torch.tensor(seqs, device=device)[:, None]
        slots = torch.where(visible, cache_slots(meta.block_tables, seq_rows, positions[None, :], bs), meta.zero_slot)
        query_rows = torch.tensor([meta.query_start_loc[b] for b in seqs], device=device)
        plan.append(_DecodeGroup(query_rows, slots, visible))
    return plan


def _attend_decodes(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decodes: _DecodeGroup, scale: float,
    out: torch.Tensor,
) -> None:
    """One SDPA call for a group of decode steps, written into their rows of out [T, H, D].

    Their keys are gathered into a batch padded to the longest (padding masked out), and each
    sequence's query heads become G queries of its KV head: GQA without a copy of K/V per head.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, num_kv_heads, head_dim)[decodes.slots].transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.view(-1, num_kv_heads, head_dim)[decodes.slots].transpose(1, 2)
    batch = decodes.rows.shape[0]
    queries = q[decodes.rows].view(batch, num_kv_heads, -1, head_dim)  # [B, Hkv, G, D]
    with _masked_sdpa():
        o = F.scaled_dot_product_attention(queries, k, v, attn_mask=decodes.visible[:, None, None, :], scale=scale)
    out[decodes.rows] = o.reshape(batch, -1, head_dim)


@dataclass
class _DecodePlan:
    """The step's decodes (one query each) as N matmul items, one per (split, decode, KV head), each
    decode with as many splits as its own keys fill. Items are split-major, and the decodes in order
    of descending split count (stable): split j's items are those of the first `split_decodes[j]`
    decodes, each decode's KV heads in turn."""

    rows: torch.Tensor  # [B] flat query row of each decode, in the items' decode order
    in_order: bool  # whether that order is the step's (then the rows are the output's as they lie)
    query_items: tuple[torch.Tensor, torch.Tensor]  # [N] query row and KV head of each item
    key_rows: torch.Tensor  # [N * S] rows of the cache viewed as [slots * Hkv, D] (see _split_key_rows)
    bias: torch.Tensor  # [N, 1, S] float: -inf at keys after the query, else 0
    split_decodes: list[int]  # per split j: how many decodes have one


@dataclass
class _PrefillPlan:
    """One sequence's run of several queries: their rows, keys, and per split the bias of each query."""

    start: int
    end: int
    key_rows: torch.Tensor  # [J * Hkv * S] (see _split_key_rows)
    split_biases: list[torch.Tensor]  # per split: [R, 1, S] (-inf where masked), or [1, 1, S] zeros if none is


@dataclass
class InvariantPlan:
    """Index and bias tensors for `attention_invariant`, built once per step and shared by every layer."""

    decodes: _DecodePlan | None
    prefills: list[_PrefillPlan]


def _split_key_rows(meta: AttentionMetadata, pairs: list[tuple[int, int]], num_kv_heads: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For (sequence, split) pairs: the rows of a cache viewed as [slots * Hkv, D] holding each
    split's KV_SPLIT_SIZE keys, in (pair, KV head, key) order, [P * Hkv * S] (one index_select then
    yields every matmul item contiguous, at the cost of a block gather: measured); and which keys lie
    past their sequence, [P, S] (they read the always-zero slot). Built from one host list: a few
    tensors in all, not ops per split."""
    seqs, splits, lengths = torch.tensor([(b, j, meta.seq_lens[b]) for b, j in pairs], device=device).T
    key_pos = splits[:, None] * KV_SPLIT_SIZE + torch.arange(KV_SPLIT_SIZE, device=device)  # [P, S]
    masked = key_pos >= lengths[:, None]
    slots = torch.where(masked, meta.zero_slot, cache_slots(meta.block_tables, seqs[:, None], key_pos, meta.block_size))
    heads = torch.arange(num_kv_heads, device=device)
    return (slots[:, None, :] * num_kv_heads + heads[None, :, None]).reshape(-1), masked


def _bias(masked: torch.Tensor) -> torch.Tensor:
    """float32 0 where a key is visible, -inf where `masked`: added to the scores inside the matmul."""
    return torch.zeros(masked.shape, device=masked.device).masked_fill_(masked, float("-inf"))


def _plan_decodes(meta: AttentionMetadata, decodes: list[int], num_kv_heads: int, device: torch.device
                  ) -> _DecodePlan:
    """The decodes' items (see `_DecodePlan`): a decode attends over its own splits only, so its
    work and its bits do not depend on how long the longest sequence in its company is."""
    splits = {b: -(-meta.seq_lens[b] // KV_SPLIT_SIZE) for b in decodes}
    decodes = sorted(decodes, key=lambda b: -splits[b])
    split_decodes = [sum(splits[b] > j for b in decodes) for j in range(splits[decodes[0]])]
    pairs = [(b, j) for j, n in enumerate(split_decodes) for b in decodes[:n]]  # every item's but its KV head
    key_rows, masked = _split_key_rows(meta, pairs, num_kv_heads, device)
    query_rows = torch.tensor([meta.query_start_loc[b] for b, _ in pairs for _ in range(num_kv_heads)], device=device)
    return _DecodePlan(
        rows=torch.tensor([meta.query_start_loc[b] for b in decodes], device=device),
        in_order=decodes == sorted(decodes),
        query_items=(query_rows, torch.arange(num_kv_heads, device=device).repeat(len(pairs))),
        key_rows=key_rows, bias=_bias(masked[:, None, :].expand(-1, num_kv_heads, -1)).view(-1, 1, KV_SPLIT_SIZE),
        split_decodes=split_decodes)


def plan_invariant(meta: AttentionMetadata, num_heads: int, num_kv_heads: int, device: torch.device) -> InvariantPlan:
    decodes = [b for b in range(meta.num_seqs) if meta.is_decode(b)]
    decode_plan = _plan_decodes(meta, decodes, num_kv_heads, device) if decodes else None
    prefills = []
    visible = torch.zeros(1, 1, KV_SPLIT_SIZE, device=device)
    for b in range(meta.num_seqs):
        if meta.is_decode(b):
            continue
        start, end = meta.query_start_loc[b], meta.query_start_loc[b + 1]
        seq_len = meta.seq_lens[b]
        num_splits = -(-seq_len // KV_SPLIT_SIZE)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=device)[:, None, None]  # [R, 1, 1]
        biases = []
        for j in range(num_splits):
            masked = torch.arange(j * KV_SPLIT_SIZE, (j + 1) * KV_SPLIT_SIZE, device=device)[None, None, :] > q_pos
            biases.append(_bias(masked) if bool(masked.any()) else visible)
        key_rows, _ = _split_key_rows(meta, [(b, j) for j in range(num_splits)], num_kv_heads, device)
        prefills.append(_PrefillPlan(start, end, key_rows, biases))
    return InvariantPlan(decode_plan, prefills)


def _gather_items(cache: torch.Tensor, key_rows: torch.Tensor) -> torch.Tensor:
    """float32 [len(key_rows) / S, S, D]: the keys (or values) at `key_rows`, one matmul item per S."""
    rows = cache.view(-1, cache.shape[-1]).index_select(0, key_rows)
    return as_dtype(rows.view(-1, KV_SPLIT_SIZE, cache.shape[-1]), torch.float32)


def attention_invariant(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: InvariantPlan, scale: float
) -> torch.Tensor:
    """Causal attention whose result for a query depends only on its own keys, never on its company.

    Why it is invariant: CPU matmuls change a row's bits with the number of rows M (measured), but
    a batched matmul computes each batch item alike whatever the batch count. So every matmul here
    is a batch of items of one fixed shape: one query row's G heads of one KV head ([G, D]) against
    one fixed split of KV_SPLIT_SIZE keys at absolute positions. The step's decodes share one
    batched call per layer (their keys gathered in one copy, each decode's own splits only); a
    prefill run shares each split's keys among its queries through a stride-0 batch (no copy: a
    batch across heads or sequences would need one copy of the keys per query row; keys times a
    prompt's queries as columns would need none, but a column's bits change with the number of
    columns, measured).
    The splits' partial softmax states are merged in order 0, 1, 2, ... by elementwise ops, which
    are exact (or, for exp, the same code at every position: tests pin that). A split wholly after
    a query is an exact no-op in the merge (scale exp(0) = 1, contribution 0). Masked keys get
    probability exactly +0 (exp(-inf)), and keys past a sequence read the always-zero slot.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    expect_plan(plan, InvariantPlan)
    dtype, q = q.dtype, as_dtype(q, torch.float32)
    if plan.decodes is not None:
        result = as_dtype(_attend_decodes_invariant(q, k_cache, v_cache, plan.decodes, scale), dtype)
        if plan.decodes.in_order and plan.decodes.rows.shape[0] == num_tokens:
            return result
    out = q.new_empty(q.shape, dtype=dtype)
    if plan.decodes is not None:
        out[plan.decodes.rows] = result
    for p in plan.prefills:
        rows, splits = p.end - p.start, len(p.split_biases)
        keys = _gather_items(k_cache, p.key_rows).view(splits, num_kv_heads, KV_SPLIT_SIZE, head_dim)
        values = _gather_items(v_cache, p.key_rows).view(splits, num_kv_heads, KV_SPLIT_SIZE, head_dim)
        queries = q[p.start : p.end].view(rows, num_kv_heads, group, head_dim)
        for h in range(num_kv_heads):
            partials = [  # each split's keys are shared by the run's queries through a stride-0 batch
                _attend_split(queries[:, h], keys[j, h][None].expand(rows, -1, -1),
                              values[j, h][None].expand(rows, -1, -1), bias, scale)
                for j, bias in enumerate(p.split_biases)
            ]
            o, l = _merge_splits(partials)
            out[p.start : p.end, h * group : (h + 1) * group] = o / l
    return out


def _attend_decodes_invariant(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: _DecodePlan,
                              scale: float) -> torch.Tensor:
    """float32 [B, H, D]: the step's decodes in `d.rows` order, every split of every decode in one
    batched call per matmul, then each decode's splits merged in order."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    queries = q.view(num_tokens, num_kv_heads, group, head_dim)[d.query_items]  # [N, G, D]
    o, m, l = _attend_split(queries, _gather_items(k_cache, d.key_rows), _gather_items(v_cache, d.key_rows),
                            d.bias, scale)
    o, l = _merge_split_prefixes(o, m, l, [n * num_kv_heads for n in d.split_decodes])
    return (o / l).view(-1, num_heads, head_dim)


def _merge_split_prefixes(o: torch.Tensor, m: torch.Tensor, l: torch.Tensor, counts: list[int]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`_merge_splits` for split-major items whose split j covers the first counts[j] items of split
    0 (counts non-increasing): each item's state takes its splits in order 0, 1, ..., by
    `_merge_step`, so an item's bits do not depend on how many splits the others have."""
    o_state, m_state, l_state = o[: counts[0]], m[: counts[0]], l[: counts[0]]
    start = counts[0]
    for count in counts[1:]:
        mine = (o_state[:count], m_state[:count], l_state[:count])
        split = (o[start : start + count], m[start : start + count], l[start : start + count])
        for state, merged in zip(mine, _merge_step(mine, split)):
            state.copy_(merged)
        start += count
    return o_state, l_state


_NO_KEY = torch.finfo(torch.float32).min
"""The max score of a split with no visible key (all -inf): finite, so exp(-inf - max) is 0, not NaN."""


def _attend_split(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One split's partial softmax state per item: (weighted values [N, G, D], max score [N, G, 1],
    normalizer [N, G, 1]).

    q [N, G, D], k and v [N, S, D]; `bias` [N or 1, 1, S] is 0 at visible keys and -inf at masked
    ones, added to the scaled scores by the matmul itself. Masked keys get weight exactly +0; a
    split with no visible key gives max _NO_KEY, normalizer 0 and values 0.
    """
    s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    m = s.amax(-1, keepdim=True).clamp_(min=_NO_KEY)
    p = torch.exp(s.sub_(m))
    return torch.bmm(p, v), m, p.sum(-1, keepdim=True)


_State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A softmax state over some splits: (weighted values, max score, normalizer)."""


def _merge_step(state: _State, split: _State) -> _State:
    """The state of splits 0..j-1 merged with split j's: the one step both merges take, so a split's
    arithmetic is the same whichever merge runs it."""
    o, m, l = state
    o_j, m_j, l_j = split
    m_new = torch.maximum(m, m_j)
    alpha = torch.exp((m - m_new).clamp(min=EXP_FLOOR))
    beta = torch.exp((m_j - m_new).clamp(min=EXP_FLOOR))  # an empty split: o_j = l_j = 0, so no change
    return o * alpha + o_j * beta, m_new, l * alpha + l_j * beta


def _merge_splits(partials: list[_State]) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of split states in order 0, 1, ...: (weighted values, normalizer).

    Split 0 always holds a visible key (key 0), so its max is finite and it seeds the state as is.
    """
    state = partials[0]
    for split in partials[1:]:
        state = _merge_step(state, split)
    return state[0], state[2]

