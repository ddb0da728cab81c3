"""The host side of a CUDA graph's decode attention: its work-item table, in pure Python.

A graph replays the launches it captured, so a decode step's attention must launch the same
programs whatever the sequences' lengths: every decode gets a program for each split it could
have (`max_splits`, from the context window), and those past its own splits do nothing
(`paged_attention.capacity_plan` reads the table). The table's length depends only on the batch
and `max_splits`, so it lives in a static device buffer the engine refills each step. This module
imports no Triton, so the engine builds and tests the table on any host.
"""

from __future__ import annotations

from detserve.kernels.contract import KV_SPLIT_SIZE

ITEM_FIELDS = 6
"""An attention work item's int32 fields: sequence, first token, rows, first query position,
splits, first partial slot (the Triton kernels read them in this order)."""


def splits_for(num_keys: int) -> int:
    """The fixed-size key splits a query at position num_keys - 1 reads."""
    return (num_keys - 1) // KV_SPLIT_SIZE + 1


def table_length(batch: int, max_splits: int) -> int:
    """int32 entries of `capacity_items` for `batch` decodes."""
    return batch * (ITEM_FIELDS + 2 * max_splits)


def capacity_items(seq_lens: list[int], max_splits: int) -> list[int]:
    """The table for decodes of `seq_lens` keys: item b is sequence b's one query (token b), as the
    step's own plan makes it, its partials in slots from b * max_splits; then a split program
    (b, j) for every j < max_splits, whatever the item's own splits."""
    if max(seq_lens) > max_splits * KV_SPLIT_SIZE:
        raise ValueError(f"a decode of {max(seq_lens)} keys needs more than {max_splits} splits")
    items = [f for b, n in enumerate(seq_lens) for f in (b, b, 1, n - 1, splits_for(n), b * max_splits)]
    return items + [f for b in range(len(seq_lens)) for j in range(max_splits) for f in (b, j)]
