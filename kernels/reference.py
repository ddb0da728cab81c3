"""Pure-PyTorch ops: the CPU path in both modes, and the oracle the GPU kernels are tested against.

`invariant` ops make a row's bits independent of its company. Measured on this CPU: row 0 of
`x[:m] @ W.T` changes with `m` for almost every `m`, because the BLAS library picks its blocking
and threading from the whole shape. Two shapes of call are invariant by construction:
- a call whose shape never changes: a float matmul runs in chunks of exactly `ROWS_PER_CALL`
  rows (the last zero-padded);
- a batched matmul, whose items all have one fixed shape: each item is computed alike whatever
  the batch count. Attention is built from those (`attention_invariant`).
Row-wise norms, SiLU and log-softmax reduce each row on its own and need neither (both modes share
them). Attention reduces over keys in fixed `KV_SPLIT_SIZE` splits at absolute key positions,
merged in order, so a query sees the same splits whether its keys were cached earlier, arrive in
its own prefill chunk, or were written one token at a time. Quantized matmuls: `quantized.py`.

`fast` ops are plain torch calls over the whole batch: faster, not batch-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from detserve.kernels.inputs import AttentionMetadata, RotaryInputs, cache_slots

ROWS_PER_CALL = 16
"""Rows per call of an invariant float matmul (16 measured fastest among invariant sizes on 2 cores)."""

KV_SPLIT_SIZE = 256
"""Keys per attention split: a fixed split *size*, so splits sit at the same absolute positions."""

VERSION = 3
"""Bumped whenever these ops' arithmetic changes (2: SiLU via exp, attention as batched items;
3: the attention scale and mask applied inside the score matmul),
so the system fingerprint stops promising the old bits."""


def in_fixed_row_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a row-wise `fn` to `x` in calls of exactly ROWS_PER_CALL rows (zero-padded tail).

    Invariant but paid for: a single decode row costs a 16-row call. Float weights only; the
    quantized kernels need none of it.
    """
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Both modes: one row's mean of squares is one reduction over its own contiguous elements,
    whose order depends on the row length only, never on the number of rows (tests pin it).

    For float32, torch's own `rms_norm` runs these very ops in C++ (same bits, checked here), in
    one call from Python instead of eight; for 16-bit inputs it rounds differently, hence the
    spelled-out ops there."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return (x32 * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """Both modes: silu(gate) * up, with silu as gate / (1 + exp(-gate)) in float32, rounded to x's
    dtype before the multiply (as torch's F.silu rounds). torch's own silu runs other code for the
    vector body and the scalar tail of a loop, so an element's bits would depend on where it sits
    in the batch; exp, add and divide give the same bits on both paths (tests pin it)."""
    gate, up = x.chunk(2, dim=-1)
    g = gate.float()
    silu = torch.div(g, torch.neg(g).exp_().add_(1))  # fresh tensors only: g may be a view of x
    return (silu if x.dtype == torch.float32 else silu.to(x.dtype)).mul_(up)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Both modes: torch's CPU log-softmax reduces each row on its own (tests pin it)."""
    return torch.log_softmax(logits.float(), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX-style) rotary embedding, as Hugging Face Llama/Qwen apply it.

    q [T, H, D], k [T, Hkv, D]. Only gathers, multiplies and adds: exact per element, so invariant
    as is. The step's rotation rows are gathered once and shared by every layer, and q and k are
    rotated as one tensor (four ops in all, not four per tensor).
    """
    half = rotary.cos_sin.shape[-1] // 2
    cos_cos, minus_sin_sin = rotary.plan("reference", lambda: _rotation_rows(rotary))
    qk = torch.cat([q, k], dim=1).float()
    rotated = (qk * cos_cos + torch.roll(qk, half, dims=-1) * minus_sin_sin).to(q.dtype)
    return rotated[:, : q.shape[1]], rotated[:, q.shape[1] :]


def _rotation_rows(rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 1, D] rows (cos | cos) and (-sin | sin) of each token: with them, [x1 | x2] becomes
    [x1*cos + x2*(-sin) | x2*cos + x1*sin], which is x1*cos - x2*sin to the bit, in 4 ops a tensor."""
    cos, sin = rotary.cos_sin[rotary.positions].split(rotary.cos_sin.shape[-1] // 2, dim=-1)  # [T, D/2] each
    return torch.cat([cos, cos], dim=-1)[:, None, :], torch.cat([-sin, sin], dim=-1)[:, None, :]


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


def _masked_sdpa():
    """SDPA backends for fast mode's masked calls: any but cuDNN. Key lengths change every step, and
    on an H200 cuDNN then spent 6.6 ms of host time per call building a graph (a random Llama-3-8B
    decode step took 70 ms in fast mode, 24 in invariant mode); the memory-efficient kernel takes
    masks and needs no per-shape build. On CPU this changes nothing (flash for CPU, or math)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def attention_fast(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's cached keys, with torch SDPA.

    Decodes (one query each) share SDPA calls, a group of them per call (`_attend_decodes`);
    longer query runs take one call per sequence.
    """
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
    for decodes in meta.plan("fast", lambda: _decode_groups(meta, q.device)):
        _attend_decodes(q, k_cache, v_cache, decodes, scale, out)
    return out


@dataclass
class _DecodeGroup:
    """Decode steps that share one fast-mode SDPA call, and where their queries and keys are."""

    rows: torch.Tensor  # [B] flat query row of each decode
    slots: torch.Tensor  # [B, L] cache slots of each sequence's keys, padded with the always-zero slot
    visible: torch.Tensor  # [B, L] True at real keys


def _decode_groups(meta: AttentionMetadata, device: torch.device) -> list[_DecodeGroup]:
    """The step's decodes in groups of at most FAST_DECODE_KEYS padded keys (fast mode's plan)."""
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
    """The step's decodes (one query each) as matmul items, one per (KV head, sequence, split)."""

    rows: torch.Tensor  # [B] flat query row of each decode
    key_rows: torch.Tensor  # [Hkv * B * J * S] rows of the cache viewed as [slots * Hkv, D], see _key_rows
    bias: torch.Tensor  # [Hkv * B * J, 1, S] float: -inf at keys after the query, else 0
    num_splits: int  # J: the most splits any decode has


@dataclass
class _PrefillPlan:
    """One sequence's run of several queries: their rows, keys, and per split the bias of each query."""

    start: int
    end: int
    key_rows: torch.Tensor  # [Hkv * J * S]
    split_biases: list[torch.Tensor]  # per split: [R, 1, S] (-inf where masked), or [1, 1, S] zeros if none is


@dataclass
class InvariantPlan:
    """Index and bias tensors for `attention_invariant`, built once per step and shared by every layer."""

    decodes: _DecodePlan | None
    prefills: list[_PrefillPlan]


def _key_rows(meta: AttentionMetadata, seqs: list[int], num_splits: int, num_kv_heads: int,
              device: torch.device) -> torch.Tensor:
    """Rows of a cache viewed as [slots * Hkv, D] holding keys 0 .. J * S - 1 of each sequence, in
    (KV head, sequence, key) order: one index_select then yields every matmul item contiguous,
    [Hkv * len(seqs) * J, S, D], at the cost of a block gather (measured). Keys past a sequence's
    length read the always-zero slot."""
    bs = meta.block_size
    key_pos = torch.arange(num_splits * KV_SPLIT_SIZE, device=device)
    rows = torch.tensor(seqs, device=device)[:, None]
    lengths = torch.tensor([meta.seq_lens[b] for b in seqs], device=device)
    slots = torch.where(key_pos[None, :] < lengths[:, None], cache_slots(meta.block_tables, rows, key_pos[None, :], bs),
                        meta.zero_slot)  # [B, J*S]
    return (slots[None] * num_kv_heads + torch.arange(num_kv_heads, device=device)[:, None, None]).reshape(-1)


def _bias(masked: torch.Tensor) -> torch.Tensor:
    """float32 0 where a key is visible, -inf where `masked`: added to the scores inside the matmul."""
    return torch.zeros(masked.shape, device=masked.device).masked_fill_(masked, float("-inf"))


def _invariant_plan(meta: AttentionMetadata, num_kv_heads: int, device: torch.device) -> InvariantPlan:
    decodes = [b for b in range(meta.num_seqs) if meta.is_decode(b)]
    decode_plan = None
    if decodes:
        num_splits = -(-max(meta.seq_lens[b] for b in decodes) // KV_SPLIT_SIZE)
        key_pos = torch.arange(num_splits * KV_SPLIT_SIZE, device=device)
        lengths = torch.tensor([meta.seq_lens[b] for b in decodes], device=device)
        masked = (key_pos[None, :] >= lengths[:, None]).view(1, len(decodes) * num_splits, 1, KV_SPLIT_SIZE)
        bias = _bias(masked.expand(num_kv_heads, -1, -1, -1)).view(-1, 1, KV_SPLIT_SIZE)
        rows = torch.tensor([meta.query_start_loc[b] for b in decodes], device=device)
        key_rows = _key_rows(meta, decodes, num_splits, num_kv_heads, device)
        decode_plan = _DecodePlan(rows, key_rows, bias, num_splits)
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
        prefills.append(_PrefillPlan(start, end, _key_rows(meta, [b], num_splits, num_kv_heads, device), biases))
    return InvariantPlan(decode_plan, prefills)


def _gather_items(cache: torch.Tensor, key_rows: torch.Tensor) -> torch.Tensor:
    """float32 [len(key_rows) / S, S, D]: the keys (or values) at `key_rows`, one matmul item per S."""
    rows = cache.view(-1, cache.shape[-1]).index_select(0, key_rows)
    return rows.view(-1, KV_SPLIT_SIZE, cache.shape[-1]).float()


def attention_invariant(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention whose result for a query depends only on its own keys, never on its company.

    Why it is invariant: CPU matmuls change a row's bits with the number of rows M (measured), but
    a batched matmul computes each batch item alike whatever the batch count. So every matmul here
    is a batch of items of one fixed shape: one query row's G heads of one KV head ([G, D]) against
    one fixed split of KV_SPLIT_SIZE keys at absolute positions. The step's decodes share one
    batched call per layer (their keys gathered head-major, one copy); a prefill run shares each
    split's keys among its queries through a stride-0 batch (no copy: a batch across heads or
    sequences would need one copy of the keys per query row; keys times a prompt's queries as
    columns would need none, but a column's bits change with the number of columns, measured).
    The splits' partial softmax states are merged in order 0, 1, 2, ... by elementwise ops, which
    are exact (or, for exp, the same code at every position: tests pin that). A split wholly after
    a query is an exact no-op in the merge (scale exp(0) = 1, contribution 0). Masked keys get
    probability exactly +0 (exp(-inf)), and keys past a sequence read the always-zero slot.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    q = q.float()
    plan = meta.plan(("reference", num_kv_heads), lambda: _invariant_plan(meta, num_kv_heads, q.device))
    if plan.decodes is not None:
        d = plan.decodes
        batch, splits = d.rows.shape[0], d.num_splits
        queries = (q if batch == num_tokens else q.index_select(0, d.rows)).view(batch, num_kv_heads, 1, group, head_dim)
        queries = queries.transpose(0, 1).expand(-1, -1, splits, -1, -1).reshape(-1, group, head_dim)
        o, m, l = _attend_split(queries, _gather_items(k_cache, d.key_rows), _gather_items(v_cache, d.key_rows),
                                d.bias, scale, (num_kv_heads, batch, splits, group))
        if splits > 1:
            o, l = _merge_splits([(o[:, :, j], m[:, :, j], l[:, :, j]) for j in range(splits)])
        result = (o / l).view(num_kv_heads, batch, group, head_dim).transpose(0, 1)
        result = result.reshape(batch, num_heads, head_dim).to(out.dtype)
        if batch == num_tokens:
            return result
        out[d.rows] = result
    for p in plan.prefills:
        rows, splits = p.end - p.start, len(p.split_biases)
        keys = _gather_items(k_cache, p.key_rows).view(num_kv_heads, splits, KV_SPLIT_SIZE, head_dim)
        values = _gather_items(v_cache, p.key_rows).view(num_kv_heads, splits, KV_SPLIT_SIZE, head_dim)
        queries = q[p.start : p.end].view(rows, num_kv_heads, group, head_dim)
        for h in range(num_kv_heads):
            partials = [  # each split's keys are shared by the run's queries through a stride-0 batch
                _attend_split(queries[:, h], keys[h, j][None].expand(rows, -1, -1),
                              values[h, j][None].expand(rows, -1, -1), bias, scale, (rows, group))
                for j, bias in enumerate(p.split_biases)
            ]
            o, l = _merge_splits(partials)
            out[p.start : p.end, h * group : (h + 1) * group] = o / l
    return out


EXP_FLOOR = -80.0
"""Exponents in the split merge are clamped to [EXP_FLOOR, 0]: torch's CPU exp takes a slow path
(2.3x here for a tensor where every third result underflows), and below e^-80 (~1.8e-35) a split's
weight is nothing next to the maximum's weight of 1. The clamp is elementwise, hence invariant.
Within a split the scores are not clamped: masked keys must come out of exp(-inf) as exactly 0."""

_NO_KEY = torch.finfo(torch.float32).min
"""The max score of a split with no visible key (all -inf): finite, so exp(-inf - max) is 0, not NaN."""


def _attend_split(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One split's partial softmax state per item: (weighted values, max score, normalizer).

    q [N, G, D], k and v [N, S, D] with N * G = prod(shape); `bias` [N or 1, 1, S] is 0 at visible
    keys and -inf at masked ones, added to the scaled scores by the matmul itself. The state comes
    back as shape + (D,) and shape + (1,). Masked keys get weight exactly +0; a split with no
    visible key gives max _NO_KEY, normalizer 0 and values 0.
    """
    s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    m = s.amax(-1, keepdim=True).clamp_(min=_NO_KEY)
    p = torch.exp(s.sub_(m))
    o = torch.bmm(p, v).view(*shape, v.shape[-1])
    return o, m.view(*shape, 1), p.sum(-1, keepdim=True).view(*shape, 1)


def _merge_splits(partials: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of split states in order 0, 1, ...: (weighted values, normalizer).

    Split 0 always holds a visible key (key 0), so its max is finite and it seeds the state as is.
    """
    o, m, l = partials[0]
    for o_j, m_j, l_j in partials[1:]:
        m_new = torch.maximum(m, m_j)
        alpha = torch.exp((m - m_new).clamp(min=EXP_FLOOR))
        beta = torch.exp((m_j - m_new).clamp(min=EXP_FLOOR))  # an empty split: o_j = l_j = 0, so no change
        o = o * alpha + o_j * beta
        l = l * alpha + l_j * beta
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


def uniform_noise(seeds: np.ndarray, positions: np.ndarray, vocab_size: int) -> np.ndarray:
    """Uniforms in (0, 1), float64 [S, vocab_size]: row i a pure function of (seeds[i], positions[i], index)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(seeds.astype(np.uint64) ^ (positions.astype(np.uint64) * _POSITION_STRIDE))
        z = _splitmix64(base[:, None] + np.arange(vocab_size, dtype=np.uint64)[None, :] * _GOLDEN)
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), float64 [S, vocab_size], for Gumbel-max sampling."""
    u = uniform_noise(seeds.cpu().numpy(), positions.cpu().numpy(), vocab_size)
    return torch.from_numpy(-np.log(-np.log(u)))


def gumbel_max(scaled: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The seeded draws from float64 logits [S, V] already divided by the temperature (and filtered):
    argmax(scaled + gumbel_noise(seed, position)) per row, first index on a tie; [S] int64."""
    return torch.argmax(scaled + gumbel_noise(seeds, positions, scaled.shape[-1]).to(scaled.device), dim=-1)


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Per row of logits [S, V]: the Gumbel-max draw from logits / T in float64, or argmax(logits)
    where T = 0 (first index on a tie). Returns [S] int64 on the logits' device.

    One argmax over all rows and one noise draw for the sampled ones: each row's result is exact
    (an argmax rounds nothing), so batching rows cannot change it.
    """
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)
    sampled = (temperatures != 0).nonzero()[:, 0]
    if len(sampled):
        scaled = logits[sampled].double() / temperatures[sampled, None]
        tokens[sampled] = gumbel_max(scaled, seeds[sampled], positions[sampled])
    return tokens
