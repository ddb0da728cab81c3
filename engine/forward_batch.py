"""The explicit inputs of one forward pass, built by the model runner and read by the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import AttentionMetadata


@dataclass
class ForwardBatch:
    """A flat batch: every scheduled request's new tokens back to back, decodes and prefill chunks alike."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, each token's position in its own sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block * block_size + offset) of each token
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64, rows whose hidden state predicts a next token

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
