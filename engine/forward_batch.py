"""The explicit inputs of one forward pass, built by the model runner and read by the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from detserve.engine.request import Request
from detserve.kernels import AttentionMetadata, AttentionPlan


@dataclass(frozen=True)
class PromptScore:
    """A prompt position whose logits score the prompt's next token (a prompt logprob)."""

    request: Request
    position: int  # the logits at this position ...
    token_id: int  # ... give the logprob of the prompt token at position + 1
    top: int  # alternatives to report


@dataclass
class ForwardBatch:
    """A flat batch: every scheduled request's new tokens back to back, decodes and prefill chunks alike."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, each token's position in its own sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block * block_size + offset) of each token
    attention: AttentionMetadata
    attention_plan: AttentionPlan  # built once for the step's mode by the runner, read by every layer
    logits_indices: torch.Tensor  # [S + P] int64: rows that sample the next token, then rows scored
    scored: list[PromptScore] = field(default_factory=list)  # the P scored rows, in order

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
