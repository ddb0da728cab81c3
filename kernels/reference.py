"""Pure-PyTorch ops: the CPU path in both modes, and the oracle the GPU kernels are tested against.

`invariant` ops make a row's bits independent of its company. Measured on this CPU: row 0 of
`x[:m] @ W.T` changes with `m` for almost every `m`, because the BLAS library picks its blocking
and threading from the whole shape. But a call whose shape is always the same computes every row
the same way, at every row position. So every invariant op here feeds torch fixed-shape chunks of
`ROWS_PER_CALL` rows (the last chunk zero-padded) and the reduction shapes never depend on the
batch. Attention additionally reduces over keys in fixed `KV_SPLIT_SIZE` splits at absolute key
positions, merged in order, so a query sees the same splits whether its keys were cached earlier,
arrive in its own prefill chunk, or were written one token at a time.

`fast` ops are plain torch calls over the whole batch: faster, not batch-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ROWS_PER_CALL = 16
"""Rows per torch call in invariant mode (16 measured fastest among invariant sizes on 2 cores)."""

KV_SPLIT_SIZE = 256
"""Keys per attention split: a fixed split *size*, so splits sit at the same absolute positions."""


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys are, for attention over the paged KV cache.

    The batch is flat: sequence `b` owns query rows `query_start_loc[b]:query_start_loc[b+1]`,
    which are its last tokens; it attends to its first `seq_lens[b]` tokens, whose K/V live in the
    blocks `block_tables[b]` (already written for this step's tokens).
    """

    query_start_loc: list[int]  # [B+1]
    seq_lens: list[int]  # [B], keys per sequence, this step's tokens included
    block_tables: torch.Tensor  # [B, max_blocks] int32, on the model device
    block_size: int
    zero_slot: int  # a cache slot that always holds zeros (reads past a sequence land there)
    invariant_plan: list | None = field(default=None, repr=False)  # built on first use, shared by layers
    fast_plan: list | None = field(default=None, repr=False)  # fast mode's decode groups, likewise

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def in_fixed_row_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a row-wise `fn` to `x` in calls of exactly ROWS_PER_CALL rows (zero-padded tail)."""
    num_rows = x.shape[0]
    if num_rows == 0:
        return fn(x.new_zeros((ROWS_PER_CALL,) + x.shape[1:]))[:0]
    pad = (-num_rows) % ROWS_PER_CALL
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + x.shape[1:])])
    chunks = [fn(x[i : i + ROWS_PER_CALL]) for i in range(0, x.shape[0], ROWS_PER_CALL)]
    return torch.cat(chunks)[:num_rows]


# ---------------------------------------------------------------------------------------------
# row-wise ops


def linear_fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear_invariant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x [T, K], weight [N, K] -> [T, N]; the bias add is elementwise, hence exact at any shape.
    return in_fixed_row_chunks(lambda rows: F.linear(rows, weight, bias), x)


def _rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return (x32 * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def rms_norm_fast(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_rows(x, weight, eps)


def rms_norm_invariant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return in_fixed_row_chunks(lambda rows: _rms_norm_rows(rows, weight, eps), x)


def _silu_mul_rows(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_fast(x: torch.Tensor) -> torch.Tensor:
    return _silu_mul_rows(x)


def silu_mul_invariant(x: torch.Tensor) -> torch.Tensor:
    # Vectorized and scalar paths of exp may differ in the last bit; fixed shapes fix the path.
    return in_fixed_row_chunks(_silu_mul_rows, x)


def log_softmax_fast(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def log_softmax_invariant(logits: torch.Tensor) -> torch.Tensor:
    return in_fixed_row_chunks(lambda rows: torch.log_softmax(rows.float(), dim=-1), logits)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX-style) rotary embedding, as Hugging Face Llama/Qwen apply it.

    q [T, H, D], k [T, Hkv, D], positions [T], cos_sin [max_pos, D] (cos | sin halves, from a
    table computed once). Only gathers, multiplies and adds: exact per element, so invariant as is.
    """
    cos, sin = cos_sin[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# ---------------------------------------------------------------------------------------------
# paged KV cache


def kv_store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V rows [T, Hkv, D] into cache slots (caches [num_blocks, block_size, Hkv, D])."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` keys (or values) of one sequence: [seq_len, Hkv, D]."""
    num_blocks = -(-seq_len // cache.shape[1])
    return cache[block_table[:num_blocks].long()].reshape(-1, *cache.shape[2:])[:seq_len]


FAST_DECODE_KEYS = 1 << 18
"""Keys gathered per batched decode SDPA call in fast mode: bounds its temporary K/V copy."""


def attention_fast(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's cached keys, with torch SDPA.

    Decodes (one query each) share SDPA calls, a group of them per call (`_attend_decodes`);
    longer query runs take one call per sequence.
    """
    out = torch.empty_like(q)
    for b in range(meta.num_seqs):
        start, end = meta.query_start_loc[b], meta.query_start_loc[b + 1]
        seq_len, q_len = meta.seq_lens[b], end - start
        if q_len == 1:
            continue
        k = _gather_kv(k_cache, meta.block_tables[b], seq_len)
        v = _gather_kv(v_cache, meta.block_tables[b], seq_len)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
        out[start:end] = o.transpose(0, 1)
    for decodes in _decode_groups(meta, q.device):
        _attend_decodes(q, k_cache, v_cache, decodes, scale, out)
    return out


@dataclass
class _DecodeGroup:
    """Decode steps that share one fast-mode SDPA call, and where their queries and keys are."""

    rows: torch.Tensor  # [B] flat query row of each decode
    slots: torch.Tensor  # [B, L] cache slots of each sequence's keys, padded with the always-zero slot
    visible: torch.Tensor  # [B, L] True at real keys


def _decode_groups(meta: AttentionMetadata, device: torch.device) -> list[_DecodeGroup]:
    """The step's decodes in groups of at most FAST_DECODE_KEYS padded keys, built once per step
    and shared by every layer (cached in `meta.fast_plan`)."""
    if meta.fast_plan is not None:
        return meta.fast_plan
    groups: list[list[int]] = []
    longest = 0
    for b in range(meta.num_seqs):
        if meta.query_start_loc[b + 1] - meta.query_start_loc[b] != 1:
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
        tables = meta.block_tables[torch.tensor(seqs, device=device)].long()  # [B, max_blocks]
        slots = torch.where(visible, tables[:, positions // bs] * bs + positions % bs, meta.zero_slot)
        rows = torch.tensor([meta.query_start_loc[b] for b in seqs], device=device)
        plan.append(_DecodeGroup(rows, slots, visible))
    meta.fast_plan = plan
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
    o = F.scaled_dot_product_attention(queries, k, v, attn_mask=decodes.visible[:, None, None, :], scale=scale)
    out[decodes.rows] = o.reshape(batch, -1, head_dim)


@dataclass
class _QueryChunk:
    """ROWS_PER_CALL query rows of one sequence and the key splits they attend to."""

    first_row: int  # flat row of the chunk's first query
    num_rows: int  # real rows; the rest repeat the last real row
    row_index: torch.Tensor  # [R] flat rows to gather, padded
    split_masks: list[torch.Tensor | None]  # per split: [1, G*R, S] True where the key is masked


@dataclass
class _SequencePlan:
    key_slots: torch.Tensor  # [padded_len] cache slots of keys 0.., padded with an always-zero slot
    chunks: list[_QueryChunk]


def _plan(meta: AttentionMetadata, group: int, device: torch.device) -> list[_SequencePlan]:
    """Index and mask tensors for invariant attention, built once per step and shared by all layers."""
    if meta.invariant_plan is not None:
        return meta.invariant_plan
    plans = []
    bs = meta.block_size
    for b in range(meta.num_seqs):
        start, end = meta.query_start_loc[b], meta.query_start_loc[b + 1]
        seq_len, q_len = meta.seq_lens[b], end - start
        padded_len = -(-seq_len // KV_SPLIT_SIZE) * KV_SPLIT_SIZE
        key_pos = torch.arange(padded_len, device=device)
        blocks = meta.block_tables[b].long()[(key_pos // bs).clamp(max=meta.block_tables.shape[1] - 1)]
        key_slots = torch.where(key_pos < seq_len, blocks * bs + key_pos % bs, meta.zero_slot)
        chunks = []
        for c in range(0, q_len, ROWS_PER_CALL):
            rows = min(ROWS_PER_CALL, q_len - c)
            offsets = torch.arange(ROWS_PER_CALL, device=device).clamp(max=rows - 1)
            q_pos = (seq_len - q_len + c + offsets).repeat(group)[None, :, None]  # [1, G*R, 1]
            num_splits = int(q_pos.max()) // KV_SPLIT_SIZE + 1
            masks: list[torch.Tensor | None] = []
            for j in range(num_splits):
                split_pos = key_pos[j * KV_SPLIT_SIZE : (j + 1) * KV_SPLIT_SIZE][None, None, :]
                mask = split_pos > q_pos
                masks.append(mask if bool(mask.any()) else None)
            chunks.append(_QueryChunk(start + c, rows, start + c + offsets, masks))
        plans.append(_SequencePlan(key_slots, chunks))
    meta.invariant_plan = plans
    return plans


def attention_invariant(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention whose result for a query depends only on its own keys, never on its company.

    Queries go in fixed chunks of ROWS_PER_CALL rows; keys in fixed KV_SPLIT_SIZE splits starting
    at key 0, merged in order 0, 1, 2, ... by online softmax. A split that lies wholly after a
    query is an exact no-op in that merge (scale exp(0) = 1, contribution 0), so processing extra
    splits for a chunk's later queries leaves its earlier queries' bits untouched. Masked keys get
    probability +0, and keys past the sequence read an always-zero slot, so stale cache contents
    never leak in.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    q = q.float() * scale  # elementwise, hence exact at any shape
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    for plan in _plan(meta, group, q.device):
        k = k_flat[plan.key_slots].float().permute(1, 2, 0)  # [Hkv, D, padded_len]
        v = v_flat[plan.key_slots].float().transpose(0, 1)  # [Hkv, padded_len, D]
        for chunk in plan.chunks:
            # [R, Hkv*G, D] -> [Hkv, G*R, D]: one matmul per KV head serves its whole query group
            qc = q[chunk.row_index].view(ROWS_PER_CALL, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
            o, l = _attend_splits(qc.reshape(num_kv_heads, group * ROWS_PER_CALL, head_dim), k, v, chunk.split_masks)
            o = (o / l).view(num_kv_heads, group, ROWS_PER_CALL, head_dim).permute(2, 0, 1, 3)
            rows = chunk.num_rows
            out[chunk.first_row : chunk.first_row + rows] = o.reshape(ROWS_PER_CALL, num_heads, head_dim)[:rows]
    return out


def _attend_splits(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: list[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax over fixed key splits, merged in order: (weighted values, normalizer).

    q [Hkv, Q, D], k [Hkv, D, L], v [Hkv, L, D]. Split 0 always holds a visible key (key 0), so
    its max is finite and it seeds the running state directly.
    """
    o = m = l = q  # replaced by split 0
    for j, mask in enumerate(masks):
        lo, hi = j * KV_SPLIT_SIZE, (j + 1) * KV_SPLIT_SIZE
        s = torch.matmul(q, k[:, :, lo:hi])  # [Hkv, Q, S]
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        m_j = s.amax(-1, keepdim=True)
        if j == 0:
            p = torch.exp(s - m_j)
            o, m, l = torch.matmul(p, v[:, lo:hi]), m_j, p.sum(-1, keepdim=True)
            continue
        # a query with no visible key here has m_j = -inf: clamp so its p is exp(-inf) = 0, not NaN
        p = torch.exp(s - m_j.clamp(min=torch.finfo(s.dtype).min))
        m_new = torch.maximum(m, m_j)
        alpha, beta = torch.exp(m - m_new), torch.exp(m_j - m_new)
        o = o * alpha + torch.matmul(p, v[:, lo:hi]) * beta
        l = l * alpha + p.sum(-1, keepdim=True) * beta
        m = m_new
    return o, l


# ---------------------------------------------------------------------------------------------
# sampling

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_POSITION_STRIDE = np.uint64(0xD1B54A32D192ED03)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniform_noise(seed: int, position: int, vocab_size: int) -> np.ndarray:
    """Uniforms in (0, 1), float64, one per vocab index: a pure function of (seed, position, index)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed], dtype=np.uint64) ^ (np.uint64(position) * _POSITION_STRIDE))
        z = _splitmix64(base + np.arange(vocab_size, dtype=np.uint64) * _GOLDEN)
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def gumbel_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), float64 [vocab_size], for Gumbel-max sampling."""
    return torch.from_numpy(-np.log(-np.log(uniform_noise(seed, position, vocab_size))))


def gumbel_max(scaled: torch.Tensor, seed: int, position: int) -> int:
    """The seeded draw from float64 logits already divided by the temperature (and filtered):
    argmax(scaled + gumbel_noise(seed, position)), first index on a tie."""
    return int(torch.argmax(scaled + gumbel_noise(seed, position, scaled.shape[0])))


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Per row of logits [S, V]: the Gumbel-max draw from logits / T in float64, or argmax(logits)
    where T = 0 (first index on a tie). Returns [S] int64 on the logits' device."""
    rows = logits.float().cpu()
    tokens = [
        int(torch.argmax(row)) if temperature == 0 else gumbel_max(row.double() / temperature, seed, position)
        for row, temperature, seed, position in zip(rows, temperatures.tolist(), seeds.tolist(), positions.tolist())
    ]
    return torch.tensor(tokens, dtype=torch.int64, device=logits.device)
