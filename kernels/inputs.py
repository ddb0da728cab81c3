"""What the kernels take besides activations and weights: one step's positions and cache layout.

The model runner builds these once per step and every layer passes the same objects. What a
backend derives from them once per step (the attention plan) is built explicitly by the runner
(`kernels.plan_attention`) and carried, typed, in the forward batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cache_slots(block_tables: torch.Tensor, seqs: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 cache slots (block * block_size + offset) of the tokens at `positions` of sequences `seqs`
    (rows of `block_tables`; the two broadcast). A position past its table's end reads the table's
    last block: callers mask such keys."""
    blocks = block_tables[seqs, (positions // block_size).clamp(max=block_tables.shape[1] - 1)].long()
    return blocks * block_size + positions % block_size


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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def is_decode(self, b: int) -> bool:
        """Whether sequence b has one query this step (a decode, or a one-token prefill chunk)."""
        return self.query_start_loc[b + 1] - self.query_start_loc[b] == 1


@dataclass(frozen=True)
class RotaryInputs:
    """Each token's position and the model's rotary table, for `kernels.rope`, with the step's
    rotation rows gathered once for every layer: (cos | cos) and (-sin | sin) of each token. With
    them, [x1 | x2] becomes [x1*cos + x2*(-sin) | x2*cos + x1*sin], which is x1*cos - x2*sin to the
    bit, in 4 ops a tensor (the torch path; the Triton kernel reads the table itself)."""

    positions: torch.Tensor  # [T] int64
    cos_sin: torch.Tensor  # [max_positions, head_dim] float32: cos | sin halves
    cos_cos: torch.Tensor  # [T, 1, head_dim] float32
    minus_sin_sin: torch.Tensor  # [T, 1, head_dim] float32

    @classmethod
    def of(cls, positions: torch.Tensor, cos_sin: torch.Tensor) -> "RotaryInputs":
        cos, sin = cos_sin[positions].split(cos_sin.shape[-1] // 2, dim=-1)  # [T, D/2] each
        return cls(positions, cos_sin, torch.cat([cos, cos], dim=-1)[:, None, :],
                   torch.cat([-sin, sin], dim=-1)[:, None, :])
