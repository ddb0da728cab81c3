"""The ops the model runs on, in two modes: `invariant` (batch-invariant bits) and `fast`.

The model calls these functions and never knows the mode: determinism is a kernel mode, not a
different model. `with kernels.mode("invariant"): ...` selects the mode for the forward pass in
the current context and restores the previous one afterwards, even on error.

Every device currently runs the pure-PyTorch implementations in `reference.py`; a GPU backend
plugs in here by registering its own table for (device type, mode).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Literal

import torch

from kernels import reference
from kernels.reference import KV_SPLIT_SIZE, ROWS_PER_CALL, AttentionMetadata

Mode = Literal["invariant", "fast"]
MODES: tuple[Mode, ...] = ("invariant", "fast")

_current_mode: contextvars.ContextVar[Mode] = contextvars.ContextVar("detserve_kernel_mode", default="invariant")


@contextlib.contextmanager
def mode(name: Mode) -> Iterator[None]:
    if name not in MODES:
        raise ValueError(f"unknown kernel mode {name!r}; expected one of {MODES}")
    token = _current_mode.set(name)
    try:
        yield
    finally:
        _current_mode.reset(token)


def current_mode() -> Mode:
    return _current_mode.get()


def _invariant() -> bool:
    return _current_mode.get() == "invariant"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight[N, K].T (+ bias) -> [T, N]."""
    return (reference.linear_invariant if _invariant() else reference.linear_fast)(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm over the last dim; x [T, D] (or [T, H, D] for per-head q/k norms)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = (reference.rms_norm_invariant if _invariant() else reference.rms_norm_fast)(x2, weight, eps)
    return out.view(shape)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up for x = [gate | up], [T, 2I] -> [T, I]."""
    return (reference.silu_mul_invariant if _invariant() else reference.silu_mul_fast)(x)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float32: [S, V] -> [S, V]."""
    return (reference.log_softmax_invariant if _invariant() else reference.log_softmax_fast)(logits)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding; elementwise and exact, so the same in both modes."""
    return reference.rope(q, k, positions, cos_sin)


def kv_store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V into the paged cache before attention reads it (both modes)."""
    reference.kv_store(k, v, k_cache, v_cache, slot_mapping)


def attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged cache; returns [T, H, D]."""
    return (reference.attention_invariant if _invariant() else reference.attention_fast)(
        q, k_cache, v_cache, meta, scale
    )


def config_digest() -> str:
    """The pinned kernel configuration, for the system fingerprint."""
    return f"torch-ref:rows={ROWS_PER_CALL}:kvsplit={KV_SPLIT_SIZE}"


__all__ = [
    "AttentionMetadata",
    "KV_SPLIT_SIZE",
    "MODES",
    "Mode",
    "attention",
    "config_digest",
    "current_mode",
    "kv_store",
    "linear",
    "log_softmax",
    "mode",
    "rms_norm",
    "rope",
    "silu_mul",
]
