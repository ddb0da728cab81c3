"""The ops the model runs on, in two modes: `invariant` (batch-invariant bits) and `fast`.

The model calls these functions and never knows the mode: determinism is a kernel mode, not a
different model. `with kernels.mode("invariant"): ...` selects the mode for the forward pass in
the current context and restores the previous one afterwards, even on error.

Where each op runs is declared once, in `DISPATCH`: on a CUDA tensor (with triton importable) the
Triton kernel of `gpu.py` in the modes that run it, otherwise the pure-PyTorch op of the mode from
`reference/`. Reductions (matmul, RMSNorm, attention, log-softmax) are where the batch leaks in,
hence their Triton kernels in invariant mode, while fast mode on a GPU is plain torch (cuBLAS,
SDPA). On CPU only float matmuls and attention differ between the modes; RMSNorm, SiLU-mul and
log-softmax reduce each row on its own (tests prove it). Elementwise ops compute each output
element by the same formula whatever the shape: RoPE and SiLU-mul run in Triton for fusion, the
cache write and the token mask stay torch. Token sampling has one implementation per device,
used in both modes: on CUDA its Triton kernel keeps the logits on the GPU. One op is dispatched
by its weight instead: `linear` with a packed 4/8-bit weight runs the CPU's integer kernels
(`quantized.py`) in both modes, since they are row-invariant as they are (and so does
`grouped_linear`, a mixture of experts' matmuls, with packed expert weights). `route_experts` is
composed of the row-wise log-softmax and elementwise ops, so it needs no entry of its own; so are
`linear_partials` (one `linear` per K-split of a tensor-parallel row-parallel weight) and
`fold_partials` (their sum in split order). `attention` follows its plan: a Triton plan (invariant
mode's on CUDA, or a CUDA graph's decode plan in either mode, `graph_attention_plan`) runs the
Triton kernel, a C plan the C attention.

On the CPU the row ops and attention run as compiled C (`cpu_native.py`) in both modes wherever
the C library builds (`native` in DISPATCH): invariant by construction, and one call where torch
takes several to dozens of ops. `cpu_native.selected("torch")` runs the torch ops instead (a model
runner selects its engine's `--cpu-kernels` around each step). With them, a 4-bit weight is packed
for the C matmul (`PackedWeight.layout`), and a dense model runs its decoder layers as one C call
of those same functions (`DenseLayers`, given a step's C attention plan, `NativePlan`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Union

import torch

from detserve.kernels import configs, contract, cpu_native, quantized
from detserve.kernels.contract import KV_SPLIT_SIZE, ROWS_PER_CALL
from detserve.kernels.cpu_native import DenseLayer, DenseLayers, NativePlan
from detserve.kernels.graph_plan import capacity_items as graph_decode_items
from detserve.kernels.graph_plan import splits_for, table_length as graph_table_length
from detserve.kernels.inputs import AttentionMetadata, RotaryInputs, cache_slots
from detserve.kernels.quantized import PackedWeight, QuantizedWeight, int4_fits, quantize
from detserve.kernels.reference import as_dtype
from detserve.kernels.reference import attention as torch_attention
from detserve.kernels.reference import noise, rows

if TYPE_CHECKING:
    from detserve.kernels import paged_attention

Mode = Literal["invariant", "fast"]
MODES: tuple[Mode, ...] = ("invariant", "fast")

AttentionPlan = Union[torch_attention.InvariantPlan, torch_attention.FastPlan, "paged_attention.Plan"]
"""One step's attention work as the backend of its mode and device lays it out (`plan_attention`)."""


@dataclass(frozen=True)
class Kernels:
    """Where one op runs: `triton` (a function of gpu.py) on a CUDA tensor in `triton_modes`, where
    triton imports; `native` (a function of cpu_native.py) on a CPU tensor in both modes, where the
    C library is enabled; otherwise the torch op of the mode."""

    invariant: Callable
    fast: Callable
    triton: str | None = None
    triton_modes: tuple[Mode, ...] = ("invariant",)
    native: str | None = None


DISPATCH: dict[str, Kernels] = {
    "linear": Kernels(rows.linear_invariant, rows.linear_fast, "linear"),
    "grouped_linear": Kernels(rows.grouped_linear_invariant, rows.grouped_linear_fast, "grouped_linear"),
    "rms_norm": Kernels(rows.rms_norm, rows.rms_norm, "rms_norm", native="rms_norm"),
    "add_rms_norm": Kernels(rows.add_rms_norm, rows.add_rms_norm, "add_rms_norm", native="add_rms_norm"),
    "silu_mul": Kernels(rows.silu_mul, rows.silu_mul, "silu_mul", native="silu_mul"),
    "log_softmax": Kernels(rows.log_softmax, rows.log_softmax, "log_softmax", native="log_softmax"),
    "rope": Kernels(rows.rope, rows.rope, "rope", native="rope"),
    "apply_token_bitmask": Kernels(rows.apply_token_bitmask, rows.apply_token_bitmask),
    "kv_store": Kernels(torch_attention.kv_store, torch_attention.kv_store, native="kv_store"),
    "plan_attention": Kernels(torch_attention.plan_invariant, torch_attention.plan_fast, "plan_attention",
                              native="plan"),
    "attention": Kernels(torch_attention.attention_invariant, torch_attention.attention_fast, "attention",
                         native="attention"),
    "sample_tokens": Kernels(noise.sample_tokens, noise.sample_tokens, "sample_tokens", MODES, native="sample_tokens"),
    "gumbel_max": Kernels(noise.gumbel_max, noise.gumbel_max),
}

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


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _gpu():
    from detserve.kernels import gpu

    return gpu


def _triton_device(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x: a CUDA tensor, with triton importable (the device is
    asked first: the CPU answers at once)."""
    return x.is_cuda and _triton_available()


def _kernel(op: str, on: torch.Tensor) -> Callable:
    """The function that runs `op` on tensors like `on` in the current mode, as DISPATCH declares."""
    kernels, current = DISPATCH[op], _current_mode.get()
    if kernels.triton is not None and current in kernels.triton_modes and _triton_device(on):
        return getattr(_gpu(), kernels.triton)
    if kernels.native is not None and on.is_cpu and cpu_native.enabled():
        return getattr(cpu_native, kernels.native)
    return kernels.invariant if current == "invariant" else kernels.fast


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, K] @ weight[N, K].T (+ bias) -> [T, N] in `out_dtype` (default x's); a packed 4/8-bit
    weight runs its CPU kernel in both modes."""
    if isinstance(weight, PackedWeight):
        return quantized.linear(x, weight, bias, out_dtype)
    return as_dtype(_kernel("linear", x)(x, weight, bias), out_dtype or x.dtype)


def matmul_input_dtype(weight: "torch.Tensor | PackedWeight") -> torch.dtype | None:
    """The dtype an op feeding `linear(x, weight)` should write, where the CPU's C ops can write it
    at no cost (bfloat16 for a weight of torch's integer kernels, which read nothing else): the cast
    then never runs as an op of its own. None elsewhere (the C matmul reads float32 as it is): the
    producer keeps its dtype. Rounding a result to the dtype the matmul reads anyway changes no bit."""
    if isinstance(weight, PackedWeight) and weight.layout == "torch" and cpu_native.enabled():
        return torch.bfloat16
    return None


def linear_partials(x: torch.Tensor, splits: list, counts: list[int] | None = None) -> list[torch.Tensor]:
    """x [T, K] times one weight given as K-splits (splits[j] reads the K_j inputs after those of
    splits[:j]) -> the float32 partial products [T, N], split by split.

    A split is a weight [N, K_j] (`linear`) or, with `counts`, a mixture of experts' weights
    (`grouped_linear`: stacked [E, N, K_j] or a list of packed ones). Each partial is one call of
    that op, row-invariant as it is; `fold_partials` sums them."""
    planes, start = [], 0
    for weight in splits:
        width = _inputs_of(weight)
        rows = x[:, start : start + width]
        planes.append((linear(rows, weight) if counts is None else grouped_linear(rows, weight, counts)).float())
        start += width
    if start != x.shape[1]:
        raise ValueError(f"K-splits read {start} inputs of {x.shape[1]}")
    return planes


def _inputs_of(weight: "torch.Tensor | PackedWeight | list[PackedWeight]") -> int:
    """K of a weight [N, K], a stacked expert weight [E, N, K], or a list of packed expert weights."""
    if isinstance(weight, list):
        weight = weight[0]
    return weight.in_features if isinstance(weight, PackedWeight) else weight.shape[-1]


def column_shard(weight: torch.Tensor, whole_columns: int) -> torch.Tensor:
    """Mark a float weight [N, K] (or stacked experts [E, N, K]) as a column shard of one with
    `whole_columns` outputs, and return it. The GPU matmul then picks the tiling and K-splits of the
    whole weight, which depend on N, so each column gets the whole weight's bits at any TP size. The
    CPU ops need no mark: the integer kernels are column-invariant as they are."""
    weight.whole_columns = whole_columns
    return weight


def fold_partials(partials: "list[torch.Tensor] | torch.Tensor") -> torch.Tensor:
    """S float32 partials [T, N] (a list, or planes of one [S, T, N]) -> their sum [T, N], added in
    split order 0..S-1 from the first.

    Elementwise adds in a fixed order: the same bits at any shape and device, and whichever rank
    computed which partial."""
    total = partials[0].clone()
    for plane in partials[1:]:
        total += plane
    return total


def grouped_linear(x: torch.Tensor, weights: torch.Tensor | list[PackedWeight], counts: list[int]) -> torch.Tensor:
    """A mixture of experts' matmuls: x [M, K], rows sorted by expert with `counts[e]` rows of expert
    e, times weights[e].T -> [M, N]. `weights` is a stacked float [E, N, K] (one Triton launch on the
    GPU in invariant mode, one matmul per expert elsewhere) or a list of packed 4/8-bit weights (the
    CPU's integer kernels). A row's bits never depend on how many rows its expert has."""
    return _kernel("grouped_linear", x)(x, weights, counts)


def _is_native(op: str, kernel: Callable) -> bool:
    """Whether `kernel`, as `_kernel` chose it for `op`, is the C op (which writes `out_dtype` itself)."""
    return kernel is getattr(cpu_native, DISPATCH[op].native or "", None)


def _run(op: str, on: torch.Tensor, out_dtype: torch.dtype | None, *args: object) -> torch.Tensor:
    """`op`'s kernel on args, its result in `out_dtype` (default: as the kernel returns it): the C ops
    write it directly, the others' result is cast."""
    kernel = _kernel(op, on)
    if out_dtype is None:
        return kernel(*args)
    if _is_native(op, kernel):
        return kernel(*args, out_dtype=out_dtype)
    return as_dtype(kernel(*args), out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Root-mean-square norm over the last dim; x [T, D] (or [T, H, D] for per-head q/k norms); the
    result in `out_dtype` (default x's)."""
    return _run("rms_norm", x, out_dtype, x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [T, D]; fused into one pass on the GPU
    and the CPU's C ops; the norm in `out_dtype` (default: the sum's dtype).

    Same bits as the two ops apart: the add rounds to the input dtype before the norm either way.
    """
    kernel = _kernel("add_rms_norm", x)
    if _is_native("add_rms_norm", kernel):
        return kernel(x, residual, weight, eps, out_dtype=out_dtype)
    normed, total = kernel(x, residual, weight, eps)
    return as_dtype(normed, out_dtype or normed.dtype), total


def silu_mul(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up for x = [gate | up], [T, 2I] -> [T, I] in `out_dtype`
    (default x's)."""
    return _run("silu_mul", x, out_dtype, x)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float32: [S, V] -> [S, V]."""
    return _kernel("log_softmax", logits)(logits)


def route_experts(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture of experts' routing, row by row: router logits [T, E] -> (weights float32 [T, top_k],
    expert ids int64 [T, top_k]), the experts by descending probability.

    Every step is row-local, so a token's route never depends on its company: probabilities from the
    row-wise log-softmax kernel, a stable sort (equal probabilities keep the lower expert first: ties
    go by expert index), and when `normalize` the chosen weights divided by their sum, added in
    rank order by elementwise ops (no reduction whose order could vary)."""
    probs = log_softmax(logits).exp()
    top, ids = probs.sort(dim=-1, descending=True, stable=True)
    top, ids = top[:, :top_k], ids[:, :top_k]
    if normalize:
        total = top[:, 0]
        for j in range(1, top_k):
            total = total + top[:, j]
        top = top / total[:, None]
    return top, ids


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Next token per row of logits [S, V]: Gumbel-max over (seed, position)-hashed noise, greedy at T = 0.

    temperatures [S] float64, seeds and positions [S] int64, on the logits' device; returns [S]
    int64 there. One implementation per device in both modes: it is row-wise by construction and
    cheap, and on the GPU it keeps the [S, V] logits off the host (only S token ids cross).
    """
    return _kernel("sample_tokens", logits)(logits, temperatures, seeds, positions)


def gumbel_max(scaled: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The seeded draws from float64 rows [S, V] already divided by the temperature (and filtered),
    with the noise `sample_tokens` uses; [S] int64. For the sampler's per-row host path."""
    return _kernel("gumbel_max", scaled)(scaled, seeds, positions)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [S, V] with -inf wherever bitmask [S, ceil(V / 32)] int32 has bit t % 32 of word t // 32
    clear (a structured output's disallowed tokens). Elementwise, so exact in both modes and devices."""
    return _kernel("apply_token_bitmask", logits)(logits, bitmask)


def rope(q: torch.Tensor, k: torch.Tensor, rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q [T, H, D] and k [T, Hkv, D]; exact per element, same bits in both modes."""
    return _kernel("rope", q)(q, k, rotary)


def kv_store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V [T, Hkv, D] into the paged cache before attention reads it (both modes)."""
    _kernel("kv_store", k)(k, v, k_cache, v_cache, slot_mapping)


def rope_store_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: RotaryInputs, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor, plan: AttentionPlan, scale: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A layer's attention: `rope` of q [T, H, D] and k [T, Hkv, D], `kv_store` of k and v, then
    `attention` over the cache; [T, H, D] in `out_dtype` (default q's). One call of the C ops on the
    CPU (a C plan), the three ops elsewhere: the same arithmetic either way."""
    if isinstance(plan, cpu_native.NativePlan):
        return cpu_native.rope_store_attention(q, k, v, rotary, k_cache, v_cache, slot_mapping, plan, scale,
                                               out_dtype or q.dtype)
    q, k = rope(q, k, rotary)
    kv_store(k, v, k_cache, v_cache, slot_mapping)
    return attention(q, k_cache, v_cache, plan, scale, out_dtype)


def plan_attention(meta: AttentionMetadata, num_heads: int, num_kv_heads: int) -> AttentionPlan:
    """The step's attention work for the current mode and the device of `meta`'s block tables: built
    once per step by the model runner (its cost shows there), read by every layer's `attention`."""
    return _kernel("plan_attention", meta.block_tables)(meta, num_heads, num_kv_heads, meta.block_tables.device)


def can_capture_decodes(device: torch.device) -> bool:
    """Whether decode steps on `device` can run in CUDA graphs: a CUDA device with triton importable,
    since a graph's attention is the Triton kernel's (`graph_attention_plan`)."""
    return device.type == "cuda" and _triton_available()


def graph_attention_plan(meta: AttentionMetadata, num_heads: int, num_kv_heads: int, table: torch.Tensor,
                         max_splits: int) -> AttentionPlan:
    """A CUDA graph's decode-step plan, its work items read from the static int32 `table` that
    `graph_decode_items` fills each step: the same launches whatever the sequences' lengths, so a
    captured graph replays any step of its batch size. It is the Triton kernel's plan in both modes
    (fast mode's torch attention plans from host lists, which a graph cannot replay); in invariant
    mode its bits are those of `plan_attention`'s."""
    if not _triton_device(table):
        raise RuntimeError("a CUDA graph's attention plan needs a CUDA device and triton")
    return _gpu().capacity_attention_plan(meta, num_heads, num_kv_heads, table, max_splits)


def attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan, scale: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged cache as `plan` lays it out; returns [T, H, D]
    in `out_dtype` (default q's). The plan names the backend: a Triton plan (`plan_attention` in
    invariant mode on CUDA, or a graph's `graph_attention_plan`) runs the Triton kernel in either
    mode, a C plan (`plan_attention` on the CPU with the C ops) the C attention; any other plan must
    come from `plan_attention` in the current mode (a backend refuses another's plan)."""
    if isinstance(plan, cpu_native.NativePlan):
        return cpu_native.attention(q, k_cache, v_cache, plan, scale, out_dtype=out_dtype)
    if _triton_device(q) and isinstance(plan, _gpu().paged_attention.Plan):
        result = _gpu().attention(q, k_cache, v_cache, plan, scale)
    else:
        result = _kernel("attention", q)(q, k_cache, v_cache, plan, scale)
    return as_dtype(result, out_dtype or result.dtype)


def config_digest() -> str:
    """The pinned kernel configuration, for the system fingerprint.

    It names the CPU's row ops (C or torch: `cpu_native.backend_digest`). Where invariant mode can
    run Triton (a CUDA device and triton importable), the digest adds the triton version and the
    tile configs pinned for the current device's arch.
    """
    digest = f"torch-ref-v{contract.VERSION}:rows={ROWS_PER_CALL}:kvsplit={KV_SPLIT_SIZE}:{cpu_native.backend_digest()}"
    if _triton_available() and torch.cuda.is_available():
        import triton

        digest += "|" + configs.digest(torch.cuda.get_device_capability(), triton.__version__)
    return digest


__all__ = [
    "DISPATCH",
    "AttentionMetadata",
    "AttentionPlan",
    "DenseLayer",
    "DenseLayers",
    "KV_SPLIT_SIZE",
    "Kernels",
    "MODES",
    "Mode",
    "NativePlan",
    "PackedWeight",
    "QuantizedWeight",
    "ROWS_PER_CALL",
    "RotaryInputs",
    "add_rms_norm",
    "apply_token_bitmask",
    "attention",
    "cache_slots",
    "can_capture_decodes",
    "column_shard",
    "config_digest",
    "fold_partials",
    "graph_attention_plan",
    "graph_decode_items",
    "graph_table_length",
    "current_mode",
    "grouped_linear",
    "gumbel_max",
    "int4_fits",
    "kv_store",
    "linear",
    "linear_partials",
    "log_softmax",
    "matmul_input_dtype",
    "mode",
    "plan_attention",
    "quantize",
    "rms_norm",
    "rope",
    "rope_store_attention",
    "route_experts",
    "sample_tokens",
    "silu_mul",
    "splits_for",
]
