"""Paged KV cache bookkeeping: which blocks are free, who holds them, and which prefixes they cache.

Pure Python, no tensors. A full block is keyed by a hash chained over every token up to and
including it *and the kernel mode that wrote it*: invariant K/V are a pure function of the tokens,
so a deterministic request may reuse them bit for bit; K/V written by fast kernels depend on the
batch they were computed in, so a deterministic request never reuses them. A block counts as
invariant only if it and every block before it were written entirely by invariant kernels.

Free blocks sit in an LRU queue; a free block that still caches a prefix can be revived by a hit
until it is handed out again, at which point its hash is forgotten.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Sequence

from detserve.engine.request import Request


def block_hash(parent: int | None, token_ids: Sequence[int], invariant: bool) -> int:
    """Chained, collision-resistant key of one full block (stable across processes and restarts)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q?", parent if parent is not None else -1, invariant))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little", signed=True)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.block_to_hash: dict[int, int] = {}
        self.prefix_cache_queries = 0  # blocks looked up
        self.prefix_cache_hits = 0  # blocks found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Blocks `request` must still get to hold K/V for its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(request.block_table))

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.blocks_needed(request, num_tokens) <= self.num_free_blocks

    def allocate(self, request: Request, num_tokens: int) -> None:
        """Grow the request's block table to cover `num_tokens` tokens (caller checked can_allocate)."""
        for _ in range(self.blocks_needed(request, num_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            old_hash = self.block_to_hash.pop(block, None)
            if old_hash is not None and self.hash_to_block.get(old_hash) == block:
                del self.hash_to_block[old_hash]
            self.ref_counts[block] = 1
            request.block_table.append(block)

    def claim_cached_prefix(self, request: Request) -> int:
        """Attach the longest cached prefix of a request that holds no blocks; return its token count.

        At least one token is always left to compute, so the request's last prompt token still
        yields the logits for its first output token.
        """
        assert not request.block_table, "prefix lookup is for requests that hold no blocks"
        if not self.enable_prefix_caching or request.scores_prompt:
            # Cached positions have no logits to score; recomputing them costs what a miss costs.
            return 0
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        parent: int | None = None
        invariant_chain = True
        for i in range(max_blocks):
            chunk = tokens[i * self.block_size : (i + 1) * self.block_size]
            self.prefix_cache_queries += 1
            found = None
            candidates = [True] if request.deterministic else ([True, False] if invariant_chain else [False])
            for invariant in candidates:
                key = block_hash(parent, chunk, invariant)
                if key in self.hash_to_block:
                    found = (key, self.hash_to_block[key], invariant)
                    break
            if found is None:
                break
            key, block, invariant = found
            self.prefix_cache_hits += 1
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            request.block_table.append(block)
            request.block_hashes.append(key)
            invariant_chain = invariant
            parent = key
        request.invariant_blocks = invariant_chain
        num_cached = len(request.block_table) * self.block_size
        request.num_computed_tokens = num_cached
        return num_cached

    def register_full_blocks(self, request: Request) -> None:
        """Publish the request's newly completed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        for i in range(len(request.block_hashes), num_full):
            parent = request.block_hashes[-1] if request.block_hashes else None
            chunk = request.token_ids(i * self.block_size, (i + 1) * self.block_size)
            key = block_hash(parent, chunk, request.invariant_blocks)
            request.block_hashes.append(key)
            block = request.block_table[i]
            if key not in self.hash_to_block:
                self.hash_to_block[key] = block
                self.block_to_hash[block] = key

    def free(self, request: Request) -> None:
        """Release every block of the request; cached ones stay findable until reused."""
        for block in reversed(request.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        request.block_table = []
        request.block_hashes = []
        request.invariant_blocks = True
