"""What the kernels take besides activations and weights: one step's positions and cache layout.

The model runner builds these once per step; every layer passes the same objects, so a backend
derives what it needs from them (index tensors, masks, rotary rows) on first use and the other
layers reuse it through `plan`. Each backend names and types its own plans; these classes only
hold them for the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, TypeVar

import torch

Plan = TypeVar("Plan")


@dataclass
class StepInputs:
    """Per-step plans, built by their backend on first use and shared by every layer of the step."""

    plans: dict[Hashable, object] = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    def plan(self, key: Hashable, build: Callable[[], Plan]) -> Plan:
        """The plan stored under `key` (a backend's name, plus whatever shapes it depends on), built once."""
        if key not in self.plans:
            self.plans[key] = build()
        return self.plans[key]  # type: ignore[return-value]


def cache_slots(block_tables: torch.Tensor, seqs: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 cache slots (block * block_size + offset) of the tokens at `positions` of sequences `seqs`
    (rows of `block_tables`; the two broadcast). A position past its table's end reads the table's
    last block: callers mask such keys."""
    blocks = block_tables[seqs, (positions // block_size).clamp(max=block_tables.shape[1] - 1)].long()
    return blocks * block_size + positions % block_size


@dataclass
class AttentionMetadata(StepInputs):
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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def is_decode(self, b: int) -> bool:
        """Whether sequence b has one query this step (a decode, or a one-token prefill chunk)."""
        return self.query_start_loc[b + 1] - self.query_start_loc[b] == 1


@dataclass
class RotaryInputs(StepInputs):
    """Each token's position and the model's rotary table, for `kernels.rope`."""

    positions: torch.Tensor  # [T] int64
    cos_sin: torch.Tensor  # [max_positions, head_dim] float32: cos | sin halves
