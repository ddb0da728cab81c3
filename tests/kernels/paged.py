"""A small paged KV cache driven the way the engine drives the kernels, for any attention op.

The attention function, dtype and device are injected, so the CPU reference ops and the Triton
kernels run the same scenarios.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from detserve.kernels import AttentionMetadata
from detserve.kernels.reference.attention import kv_store

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
Chunk = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]  # seq id, q [n, H, D], k, v [n, Hkv, D], start


class PagedCache:
    """Caches [num_blocks + 1, block_size, Hkv, D] with an always-zero last block, blocks handed out scrambled."""

    def __init__(
        self, attend: Attend, num_blocks: int = 64, block_size: int = 16, num_kv_heads: int = 2, head_dim: int = 32,
        seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
    ) -> None:
        self.attend = attend
        self.block_size = block_size
        self.device = device
        self.k = torch.zeros(num_blocks + 1, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.zero_slot = num_blocks * block_size
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[str, list[int]] = {}

    def step(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """chunks: (seq id, q [n, H, D], k [n, Hkv, D], v [n, Hkv, D], start position); one batch."""
        q, meta = self.store(chunks)
        out = self.attend(q, self.k, self.v, meta)
        qsl = meta.query_start_loc
        return [out[qsl[i] : qsl[i + 1]] for i in range(len(chunks))]

    def store(self, chunks: list[Chunk]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Write the chunks' K/V into the cache; return the step's queries [T, H, D] and metadata."""
        slots, qsl, seq_lens, tables = [], [0], [], []
        for seq, q, _, _, start in chunks:
            table = self.tables.setdefault(seq, [])
            end = start + q.shape[0]
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            qsl.append(qsl[-1] + q.shape[0])
            seq_lens.append(end)
            tables.append(table)
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=self.device
            ),
            block_size=self.block_size,
            zero_slot=self.zero_slot,
        )
        q, k, v = (torch.cat([c[i] for c in chunks]).to(self.device, self.k.dtype) for i in (1, 2, 3))
        kv_store(k, v, self.k, self.v, torch.tensor(slots, device=self.device))
        return q, meta

    def release(self, seq: str) -> None:
        """Free a sequence's blocks; they keep their stale K/V for the next owner to ignore."""
        self.free += self.tables.pop(seq)


def triton_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, config, launch: str = "auto") -> torch.Tensor:
    """The Triton paged attention of one step, planned for `config` and `launch` and run."""
    from detserve.kernels import paged_attention

    plan = paged_attention.plan(meta, q.shape[1] // k_cache.shape[2], config, q.device, launch)
    return paged_attention.paged_attention(q, k_cache, v_cache, plan, scale)


def sequence(length: int, seed: int, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 32):
    """Random float32 (q [L, H, D], k [L, Hkv, D], v [L, Hkv, D]) of one sequence."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(length, num_heads, head_dim, generator=g),
        torch.randn(length, num_kv_heads, head_dim, generator=g),
        torch.randn(length, num_kv_heads, head_dim, generator=g),
    )


def run_chunked(
    cache: PagedCache, seq: str, qkv, cuts: list[int], company: list[tuple[str, int, int]] = ()
) -> torch.Tensor:
    """Feed one sequence through the cache in chunks ending at `cuts`, each step with fresh company
    (other id, length, seed) prefilled alongside it; returns the sequence's outputs in order."""
    q, k, v = qkv
    outs, start = [], 0
    for step, end in enumerate(cuts):
        batch = [(seq, q[start:end], k[start:end], v[start:end], start)]
        for other_id, other_len, other_seed in company:
            oq, ok, ov = sequence(other_len, other_seed + step, q.shape[1], k.shape[1], q.shape[2])
            batch.append((f"{other_id}-{step}", oq, ok, ov, 0))
        position = step % len(batch)
        batch[0], batch[position] = batch[position], batch[0]
        outs.append(cache.step(batch)[position])
        for other_id, _, _ in company:
            cache.release(f"{other_id}-{step}")
        start = end
    return torch.cat(outs)


def attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one whole sequence in float64: q [L, H, D], k/v [L, Hkv, D] -> [L, H, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    causal = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, -math.inf).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)
