"""The Triton kernels behind the facade's ops, each with the facade's own signature: the tile
configs pinned for the device's arch (`configs.py`) are looked up here, so the dispatch table in
`kernels/__init__.py` names one function per op. Imported only where triton is importable and a
CUDA tensor is at hand."""

from __future__ import annotations

import torch

from detserve.kernels import configs, elementwise, grouped_matmul, matmul, paged_attention, rmsnorm, sampling
from detserve.kernels.inputs import AttentionMetadata, RotaryInputs


def _config(device: torch.device) -> configs.ArchConfig:
    return configs.for_capability(torch.cuda.get_device_capability(device))


def _whole_columns(weight: torch.Tensor, n: int) -> int:
    """The outputs of the whole weight a column shard was cut from (`kernels.column_shard`), else n."""
    return getattr(weight, "whole_columns", n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n = _whole_columns(weight, weight.shape[0])
    return matmul.linear(x, weight, bias, _config(x.device).matmul_for(n, weight.shape[1]), plan_n=n)


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> torch.Tensor:
    n = _whole_columns(weights, weights.shape[1])
    return grouped_matmul.grouped_linear(x, weights, counts, _config(x.device).matmul_for(n, weights.shape[2]),
                                         plan_n=n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rmsnorm.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps, _config(x.device).rows).view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm.add_rms_norm(x, residual, weight, eps, _config(x.device).rows)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return elementwise.silu_mul(x)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return sampling.log_softmax(logits, _config(logits.device).rows)


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    return sampling.sample_tokens(logits, temperatures, seeds, positions, _config(logits.device).rows)


def rope(q: torch.Tensor, k: torch.Tensor, rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return elementwise.rope(q, k, rotary.positions, rotary.cos_sin)


def plan_attention(meta: AttentionMetadata, num_heads: int, num_kv_heads: int,
                   device: torch.device) -> paged_attention.Plan:
    return paged_attention.plan(meta, num_heads // num_kv_heads, _config(device).attention, device)


def capacity_attention_plan(meta: AttentionMetadata, num_heads: int, num_kv_heads: int, table: torch.Tensor,
                            max_splits: int) -> paged_attention.Plan:
    return paged_attention.capacity_plan(meta, num_heads // num_kv_heads, _config(table.device).attention, table,
                                         max_splits)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: paged_attention.Plan,
              scale: float) -> torch.Tensor:
    return paged_attention.paged_attention(q, k_cache, v_cache, plan, scale)
