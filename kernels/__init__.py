"""The ops the model runs on, in two modes: `invariant` (batch-invariant bits) and `fast`.

The model calls these functions and never knows the mode: determinism is a kernel mode, not a
different model. `with kernels.mode("invariant"): ...` selects the mode for the forward pass in
the current context and restores the previous one afterwards, even on error.

On CPU both modes run the pure-PyTorch ops in `reference.py`; only float matmuls and attention
differ between the modes there (RMSNorm, SiLU-mul, log-softmax and the 4/8-bit matmuls of
`quantized.py` are row-invariant as they are, and tests prove it). On a CUDA tensor, `fast` is plain
torch (cuBLAS, SDPA) and `invariant` runs the Triton kernels (matmul.py, rmsnorm.py,
paged_attention.py, sampling.py's log-softmax, elementwise.py) with the tile configs pinned for
the GPU's arch in configs.py, when triton can be imported. Reductions (matmul, RMSNorm, attention,
log-softmax) are where the batch leaks in, hence those kernels. Elementwise ops compute each
output element by the same formula whatever the shape, so they are batch-invariant as they are:
RoPE and SiLU-mul run in Triton for fusion (one launch instead of several torch kernels and
temporaries), while residual adds and kv_store stay torch in both modes. Token sampling
(`sample_tokens`) has one implementation per device, used in both modes: on CUDA its Triton
kernel keeps the logits on the GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
from typing import Iterator, Literal

import torch

from detserve.kernels import configs, quantized, reference
from detserve.kernels.quantized import PackedWeight, QuantizedWeight, int4_fits, quantize
from detserve.kernels.inputs import AttentionMetadata, RotaryInputs, cache_slots
from detserve.kernels.reference import KV_SPLIT_SIZE, ROWS_PER_CALL

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


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_config(device: torch.device) -> configs.ArchConfig:
    return configs.for_capability(torch.cuda.get_device_capability(device))


def _triton_device(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x: a CUDA tensor, with triton importable."""
    return x.is_cuda and _triton_available()


def _use_triton(x: torch.Tensor) -> bool:
    """Invariant mode on a Triton device: run the Triton kernels (device first: the CPU answers at once)."""
    return _triton_device(x) and _invariant()


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight[N, K].T (+ bias) -> [T, N]; a packed 4/8-bit weight runs its CPU kernel in both modes."""
    if isinstance(weight, PackedWeight):
        return quantized.linear(x, weight, bias)
    if _use_triton(x):
        from detserve.kernels import matmul

        return matmul.linear(x, weight, bias, _triton_config(x.device).matmul_for(*weight.shape))
    return (reference.linear_invariant if _invariant() else reference.linear_fast)(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm over the last dim; x [T, D] (or [T, H, D] for per-head q/k norms)."""
    if _use_triton(x):
        from detserve.kernels import rmsnorm

        return rmsnorm.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps, _triton_config(x.device).rows).view(x.shape)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [T, D]; fused into one pass on the GPU.

    Same bits as the two ops apart: the add rounds to the input dtype before the norm either way.
    """
    if _use_triton(x):
        from detserve.kernels import rmsnorm

        return rmsnorm.add_rms_norm(x, residual, weight, eps, _triton_config(x.device).rows)
    total = x + residual
    return rms_norm(total, weight, eps), total


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up for x = [gate | up], [T, 2I] -> [T, I]."""
    if _use_triton(x):
        from detserve.kernels import elementwise

        return elementwise.silu_mul(x)
    return reference.silu_mul(x)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float32: [S, V] -> [S, V]."""
    if _use_triton(logits):
        from detserve.kernels import sampling

        return sampling.log_softmax(logits, _triton_config(logits.device).rows)
    return reference.log_softmax(logits)


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Next token per row of logits [S, V]: Gumbel-max over (seed, position)-hashed noise, greedy at T = 0.

    temperatures [S] float64, seeds and positions [S] int64, on the logits' device; returns [S]
    int64 there. One implementation per device in both modes: it is row-wise by construction and
    cheap, and on the GPU it keeps the [S, V] logits off the host (only S token ids cross).
    """
    if _triton_device(logits):
        from detserve.kernels import sampling

        return sampling.sample_tokens(logits, temperatures, seeds, positions, _triton_config(logits.device).rows)
    return reference.sample_tokens(logits, temperatures, seeds, positions)


def gumbel_max(scaled: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The seeded draws from float64 rows [S, V] already divided by the temperature (and filtered),
    with the noise `sample_tokens` uses; [S] int64. For the sampler's per-row host path."""
    return reference.gumbel_max(scaled, seeds, positions)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [S, V] with -inf wherever bitmask [S, ceil(V / 32)] int32 has bit t % 32 of word t // 32
    clear (a structured output's disallowed tokens). Elementwise, so exact in both modes and devices."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).reshape(bitmask.shape[0], -1)[:, : logits.shape[-1]]
    return logits.masked_fill(allowed == 0, float("-inf"))


def rope(q: torch.Tensor, k: torch.Tensor, rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q [T, H, D] and k [T, Hkv, D]; exact per element, same bits in both modes."""
    if _use_triton(q):
        from detserve.kernels import elementwise

        return elementwise.rope(q, k, rotary.positions, rotary.cos_sin)
    return reference.rope(q, k, rotary)


def kv_store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V into the paged cache before attention reads it (both modes)."""
    reference.kv_store(k, v, k_cache, v_cache, slot_mapping)


def attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged cache; returns [T, H, D]."""
    if _use_triton(q):
        from detserve.kernels import paged_attention

        return paged_attention.paged_attention(q, k_cache, v_cache, meta, scale, _triton_config(q.device).attention)
    return (reference.attention_invariant if _invariant() else reference.attention_fast)(
        q, k_cache, v_cache, meta, scale
    )


def config_digest() -> str:
    """The pinned kernel configuration, for the system fingerprint.

    Where invariant mode can run Triton (a CUDA device and triton importable), the digest adds the
    triton version and the tile configs pinned for the current device's arch.
    """
    digest = f"torch-ref-v{reference.VERSION}:rows={ROWS_PER_CALL}:kvsplit={KV_SPLIT_SIZE}"
    if _triton_available() and torch.cuda.is_available():
        import triton

        digest += "|" + configs.digest(torch.cuda.get_device_capability(), triton.__version__)
    return digest


__all__ = [
    "AttentionMetadata",
    "KV_SPLIT_SIZE",
    "MODES",
    "Mode",
    "PackedWeight",
    "QuantizedWeight",
    "RotaryInputs",
    "add_rms_norm",
    "apply_token_bitmask",
    "attention",
    "cache_slots",
    "config_digest",
    "current_mode",
    "gumbel_max",
    "int4_fits",
    "kv_store",
    "linear",
    "log_softmax",
    "mode",
    "quantize",
    "rms_norm",
    "rope",
    "sample_tokens",
    "silu_mul",
]
