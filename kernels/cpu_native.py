"""The CPU's row ops as compiled C (`cpu_rows.c`): RMSNorm, SiLU-mul, RoPE and paged attention, and
the logits' greedy argmax and log-softmax; its 4-bit and 8-bit matmuls (`cpu_matmul.c`: plain C,
AVX2 or AVX-512 code by the CPU, the same bits); and a dense model's decoder layers as one call of
those (`cpu_layers.c`).

Why: a batch-1 decode step of the default model spent about 7 of its 15 ms in some 1,800 small
torch ops around the integer matmuls (2-5 us each, caches cold from the weights streamed between
them). Here each op is one call over its rows. The C code's bits depend on a row's own inputs only
and not on the ISA the compiler targets (see the file's header), so both kernel modes run it.

The library is compiled with the system's C compiler on first use into the cache folder
(`$DETSERVE_CACHE_DIR/native`, keyed by the source and the flags) and loaded with ctypes; no torch
headers, so a build takes about a second. Without a compiler (or with
`--cpu-kernels torch`) the CPU runs the torch ops of `reference/` instead, whose bits differ: the
fingerprint names which one ran (`backend_digest`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from detserve.kernels.inputs import AttentionMetadata, RotaryInputs
from detserve.kernels.reference import as_dtype, noise
from detserve.kernels.reference.attention import expect_plan

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_rows.c", "cpu_matmul.c", "cpu_layers.c"))
VERSION = 4
"""The C ops' arithmetic: bump it with any change to what they compute (it is in the fingerprint)."""

Backend = Literal["auto", "native", "torch"]

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rms_norm": [_P, ctypes.c_int, _I, _P, _I, _I, _F, _P, ctypes.c_int],
    "add_rms_norm": [_P, ctypes.c_int, _I, _P, _I, _P, _I, _I, _F, _P, _P, ctypes.c_int],
    "silu_mul": [_P, ctypes.c_int, _I, _I, _I, _P, ctypes.c_int],
    "rope": [_P, ctypes.c_int, _I, _I, _I, _I, _P, _P, _P],
    "kv_store": [_P, _I, _P, ctypes.c_int, _I, _I, _I, _P, _P, _P],
    "attention": [_P, _P, _P, _I, _I, _I, _I, _I, _P, _I, _P, _P, _I, _F, _P, ctypes.c_int],
    "rope_store_attention": [_P, _P, _P, ctypes.c_int, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _P, _I,
                             _P, _P, _I, _F, _P, ctypes.c_int],
    "int4_linear": [_P, ctypes.c_int, _I, _I, _I, _P, _P, _I, _P, ctypes.c_int],
    "int8_linear": [_P, ctypes.c_int, _I, _I, _I, _P, _P, _I, _P, ctypes.c_int],
    "dense_layers": [_P, _I, _P, _P, _I, _P, _P, _P, _I, _P],
    "matmul_isa": [],
    "argmax_rows": [_P, _I, _I, _P],
    "log_softmax": [_P, _I, _I, _P],
}
_RETURNS = {"int4_linear": ctypes.c_int, "int8_linear": ctypes.c_int, "dense_layers": ctypes.c_int,
            "matmul_isa": ctypes.c_int}
MATMUL_ISAS = ("plain", "avx2", "avx512")
"""The C matmuls' code paths, narrowest first (`matmul_isa` levels 0, 1, 2): all give the same bits."""


class NativeBuildError(RuntimeError):
    """The C library could not be compiled or loaded here."""


def compile_flags() -> list[str]:
    """Optimization and ISA flags: x86-64-v3 (AVX2) where the CPU has it. Never -ffast-math and
    never contracted multiply-adds: the bits must not depend on these flags."""
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and _has_avx2():
        flags.append("-march=x86-64-v3")
    return flags


def _has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {name}" in flags for name in ("avx2", "fma", "bmi2", "f16c"))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    root = os.environ.get("DETSERVE_CACHE_DIR") or Path.home() / ".cache" / "detserve"
    return Path(root) / "native"


def build(compiler: str | None = None) -> Path:
    """The compiled library: the cached one for this source and these flags, else built now with
    the system's C compiler (an image may ship it prebuilt and no compiler: the bits do not depend
    on the compiler, see cpu_rows.c); raises NativeBuildError."""
    flags = compile_flags()
    key = hashlib.sha256("\0".join([*(source.read_text() for source in SOURCES), *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_rows-{key}.so"
    if target.exists():
        return target
    compiler = compiler or _compiler()
    if compiler is None:
        raise NativeBuildError("no C compiler found (set $CC or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        try:
            result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built), "-lm"],
                                    capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise NativeBuildError(f"the C compiler {compiler!r} does not run: {error}") from error
        if result.returncode != 0:
            raise NativeBuildError(f"compiling {' and '.join(s.name for s in SOURCES)} failed:\n{result.stderr}")
        os.replace(built, target)  # atomic: a concurrent build's rename wins or this one does, whole
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded library (built on first use), its functions typed."""
    lib = ctypes.CDLL(str(build()))
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = _RETURNS.get(name)
    return lib


_selected: contextvars.ContextVar[Backend] = contextvars.ContextVar("detserve_cpu_kernels", default="auto")


def check(backend: Backend) -> None:
    """Refuse an unknown backend, and `native` where the library cannot be built (NativeBuildError)."""
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"unknown CPU kernels {backend!r}; expected auto, native or torch")
    if backend == "native":
        library()


@contextlib.contextmanager
def selected(backend: Backend) -> Iterator[None]:
    """Which CPU ops run in the block, in this context (like `kernels.mode`): `native` (this module),
    `torch` (the reference ops), or `auto` (native where it builds, else torch with a warning; the
    default). Each model runner selects its engine's around its own work, so engines of other
    selections can share a process (tests do)."""
    check(backend)
    token = _selected.set(backend)
    try:
        yield
    finally:
        _selected.reset(token)


def enabled() -> bool:
    """Whether the CPU runs the C ops now."""
    backend = _selected.get()
    if backend == "auto":
        return _available()
    return backend == "native"


@functools.cache
def _available() -> bool:
    try:
        library()
    except (NativeBuildError, OSError) as error:
        logger.warning("CPU row ops run in torch (slower, other bits): %s", error)
        return False
    return True


def backend_digest() -> str:
    """What the CPU ops' bits depend on: the C ops' version, or the torch reference."""
    return f"cpu-native-v{VERSION}" if enabled() else "cpu-torch"


# The ops. Each checks what the C code assumes (dtypes, unit strides within a row) and passes raw
# pointers; a view is read in place where its rows are contiguous inside.


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _is_bf16(t: torch.Tensor) -> int:
    if t.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the CPU row ops take float32 or bfloat16, not {t.dtype}")
    return int(t.dtype == torch.bfloat16)


def _int64s(t: torch.Tensor, what: str) -> int:
    """The pointer of a contiguous int64 tensor (cache slots, positions, rows: what the fused C ops read)."""
    if t.dtype != torch.int64 or not t.is_contiguous():
        raise TypeError(f"the C ops take {what} as a contiguous int64 tensor")
    return _ptr(t)


def _float_cache(cache: torch.Tensor) -> torch.Tensor:
    if cache.dtype != torch.float32 or not cache.is_contiguous():
        raise TypeError("the C ops read and write a contiguous float32 KV cache")
    return cache


def _rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as [T, n] rows with unit stride inside a row, and its row stride."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, rows.stride(0)


def _heads_of(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with each row's heads contiguous (a view of a fused projection is, as it is)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    rows, stride = _rows_of(x)
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype)
    library().rms_norm(_ptr(rows), _is_bf16(rows), stride, _ptr(as_dtype(weight, torch.float32)), rows.shape[0],
                       rows.shape[1], eps, _ptr(out), _is_bf16(out))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): x float32 or bfloat16 (a matmul's result), the sum in
    float32 (the residual stream's dtype on the CPU)."""
    rows, stride = _rows_of(x)
    res, res_stride = _rows_of(as_dtype(residual, torch.float32))
    total = torch.empty(x.shape, dtype=torch.float32)
    out = torch.empty(x.shape, dtype=out_dtype or torch.float32)
    library().add_rms_norm(_ptr(rows), _is_bf16(rows), stride, _ptr(res), res_stride,
                           _ptr(as_dtype(weight, torch.float32)), rows.shape[0], rows.shape[1], eps, _ptr(total),
                           _ptr(out), _is_bf16(out))
    return out, total


def silu_mul(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    rows, stride = _rows_of(x)
    n = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype)
    library().silu_mul(_ptr(rows), _is_bf16(rows), stride, rows.shape[0], n, _ptr(out), _is_bf16(out))
    return out


def rope(q: torch.Tensor, k: torch.Tensor, rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D] and k [T, Hkv, D] rotated, as float32."""
    return _rope_heads(_heads_of(q), rotary), _rope_heads(_heads_of(k), rotary)


def _rope_heads(x: torch.Tensor, rotary: RotaryInputs) -> torch.Tensor:
    num_tokens, heads, d = x.shape
    out = torch.empty(x.shape, dtype=torch.float32)
    library().rope(_ptr(x), _is_bf16(x), x.stride(0), num_tokens, heads, d, _ptr(rotary.cos_cos),
                   _ptr(rotary.minus_sin_sin), _ptr(out))
    return out


def kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k and v [T, Hkv, D] into the float32 caches' slots (k float32, v float32 or bfloat16)."""
    k, v = _heads_of(as_dtype(k, torch.float32)), _heads_of(v)
    library().kv_store(_ptr(k), k.stride(0), _ptr(v), _is_bf16(v), v.stride(0), k.shape[0], k.shape[1] * k.shape[2],
                       _ptr(slot_mapping.long().contiguous()), _ptr(_float_cache(k_cache)), _ptr(_float_cache(v_cache)))


@dataclass
class NativePlan:
    """Each query row's sequence and position, for `attention`: built once per step, with the C
    arguments they make (read by every layer)."""

    seqs: torch.Tensor  # [T] int32: the query's row of the block tables
    positions: torch.Tensor  # [T] int64: the query's position; it attends to keys 0..position
    block_tables: torch.Tensor  # [B, max_blocks] int32, contiguous
    max_keys: int  # the most keys any query attends to

    def __post_init__(self) -> None:
        # (block tables, their row stride, seqs, positions, max keys): the attention's plan arguments
        self.args = (_ptr(self.block_tables), self.block_tables.stride(0), _ptr(self.seqs), _ptr(self.positions),
                     self.max_keys)


def plan(meta: AttentionMetadata, num_heads: int, num_kv_heads: int, device: torch.device) -> NativePlan:
    """A sequence's query rows are its last tokens: positions seq_len - count .. seq_len - 1."""
    seqs, positions = [], []
    for b in range(meta.num_seqs):
        count = meta.query_start_loc[b + 1] - meta.query_start_loc[b]
        seqs += [b] * count
        positions += range(meta.seq_lens[b] - count, meta.seq_lens[b])
    return NativePlan(torch.tensor(seqs, dtype=torch.int32), torch.tensor(positions, dtype=torch.int64),
                      meta.block_tables.to(torch.int32).contiguous(), max(meta.seq_lens, default=0))


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: NativePlan, scale: float,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged float32 cache [blocks, block_size, Hkv, D];
    [T, H, D] in `out_dtype` (default float32)."""
    expect_plan(plan, NativePlan)
    q = as_dtype(q, torch.float32).contiguous()
    out = torch.empty(q.shape, dtype=out_dtype or torch.float32)
    library().attention(_ptr(q), _ptr(_float_cache(k_cache)), _ptr(_float_cache(v_cache)), k_cache.shape[1],
                        k_cache.shape[2], q.shape[1], q.shape[2], q.shape[0], *plan.args, scale, _ptr(out),
                        _is_bf16(out))
    return out


def rope_store_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: RotaryInputs,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, plan: NativePlan,
                         scale: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`rope`, `kv_store` and `attention` in one call, the same arithmetic: q [T, H, D], k and v
    [T, Hkv, D] of one dtype (views of the fused projection are read in place); [T, H, D] in
    `out_dtype` (default float32); `slot_mapping` int64 [T]."""
    expect_plan(plan, NativePlan)
    if not q.dtype == k.dtype == v.dtype:
        q, k, v = as_dtype(q, torch.float32), as_dtype(k, torch.float32), as_dtype(v, torch.float32)
    q, k, v = _heads_of(q), _heads_of(k), _heads_of(v)
    num_tokens, heads, d = q.shape
    out = torch.empty(q.shape, dtype=out_dtype or torch.float32)
    library().rope_store_attention(
        _ptr(q), _ptr(k), _ptr(v), _is_bf16(q), q.stride(0), k.stride(0), v.stride(0), num_tokens, heads, k.shape[1],
        d, _ptr(rotary.cos_cos), _ptr(rotary.minus_sin_sin), _int64s(slot_mapping, "the cache slots"),
        _ptr(_float_cache(k_cache)), _ptr(_float_cache(v_cache)), k_cache.shape[1], *plan.args, scale, _ptr(out),
        _is_bf16(out))
    return out


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax of each row of logits [R, V] -> float32 [R, V], the same bits on any CPU (torch's
    sums in an order its vector width picks: see `log_softmax` in cpu_rows.c)."""
    logits = as_dtype(logits, torch.float32).contiguous()
    out = torch.empty_like(logits)
    library().log_softmax(_ptr(logits), logits.shape[0], logits.shape[-1], _ptr(out))
    return out


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """`noise.sample_tokens` with the greedy rows' argmax in C (`argmax_rows`: the same tokens, a
    tenth of torch's time); the seeded rows are drawn by `noise.sample_tokens` itself."""
    logits = as_dtype(logits, torch.float32).contiguous()
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    library().argmax_rows(_ptr(logits), logits.shape[0], logits.shape[1], _ptr(tokens))
    if temperatures.any():  # one op where every row is greedy (a step's ops cost 5-10 us each on a CPU)
        sampled = temperatures.nonzero()[:, 0]
        tokens[sampled] = noise.sample_tokens(logits[sampled], temperatures[sampled], seeds[sampled], positions[sampled])
    return tokens


GROUP = 32
"""Inputs per scale of the C matmuls (GGUF's Q4_0/Q4_1/Q8_0 block)."""


def fits(shape: tuple[int, int]) -> bool:
    """Whether the C matmuls take an [N, K] weight: outputs in tiles of 16, inputs in groups of 32."""
    return shape[0] % 16 == 0 and shape[1] % GROUP == 0


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-bit weight [N, K] (q in 0..15, weight = scale * q + min per group of 32 inputs) in the C
    matmul's layout (cpu_matmul.c's header): the nibbles uint8 [N / 16, K / 32, 256], the scales and
    minimums float16 [N / 16, K / 32, 2, 16]. The shape must `fit`."""
    n, k = qweight.shape
    groups = k // GROUP
    # [tile, output, group, nibble, pair, e] -> [tile, group, pair, output, e, nibble]
    q = qweight.to(torch.uint8).reshape(n // 16, 16, groups, 2, 8, 2).permute(0, 2, 4, 1, 5, 3)
    nibbles = (q[..., 0] | (q[..., 1] << 4)).reshape(n // 16, groups, 256).contiguous()
    halves = torch.stack([scales, mins]).to(torch.float16).reshape(2, n // 16, 16, groups).permute(1, 3, 0, 2)
    return nibbles, halves.contiguous()


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8-bit weight [N, K] (weight = scale * q per group of 32 inputs: GGUF's Q8_0) in the C
    matmul's layout: int8 [N / 16, K / 32, 512], the scales float16 [N / 16, K / 32, 16]."""
    n, k = qweight.shape
    groups = k // GROUP
    # [tile, output, group, pair, e] -> [tile, group, pair, output, e]
    q = qweight.to(torch.int8).reshape(n // 16, 16, groups, 16, 2).permute(0, 2, 3, 1, 4)
    halves = scales.to(torch.float16).reshape(n // 16, 16, groups).permute(0, 2, 1)
    return q.reshape(n // 16, groups, 512).contiguous(), halves.contiguous()


def matmul_isas() -> tuple[str, ...]:
    """The C matmuls' code paths this CPU runs (`MATMUL_ISAS` up to its widest)."""
    return MATMUL_ISAS[: library().matmul_isa() + 1]


def int4_linear(x: torch.Tensor, nibbles: torch.Tensor, halves: torch.Tensor, isa: str = MATMUL_ISAS[-1]) -> torch.Tensor:
    """x [T, K] (float32 or bfloat16, rows read in place) times a weight packed by `pack_int4` ->
    float32 [T, N]. `isa` caps the code path (`MATMUL_ISAS`; the widest the CPU runs up to it): the
    same bits whichever runs (tests)."""
    return _matmul("int4_linear", x, nibbles, halves, isa)


def int8_linear(x: torch.Tensor, data: torch.Tensor, halves: torch.Tensor, isa: str = MATMUL_ISAS[-1]) -> torch.Tensor:
    """`int4_linear` for a weight packed by `pack_int8`."""
    return _matmul("int8_linear", x, data, halves, isa)


def _matmul(kernel: str, x: torch.Tensor, data: torch.Tensor, halves: torch.Tensor, isa: str) -> torch.Tensor:
    rows, stride = _rows_of(x)
    k, n = data.shape[1] * GROUP, data.shape[0] * 16
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {k}")
    out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    if getattr(library(), kernel)(_ptr(rows), _is_bf16(rows), stride, rows.shape[0], k, _ptr(data), _ptr(halves), n,
                                  _ptr(out), MATMUL_ISAS.index(isa)):
        raise MemoryError("the C matmul could not allocate its quantized activations")
    return out


class _Int4(ctypes.Structure):
    _fields_ = [("nibbles", _P), ("scales", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_attention_norm", _P), ("qkv_bias", _P), ("qkv", _Int4), ("o", _Int4),
                ("gate_up", _Int4), ("down", _Int4), ("k_cache", _P), ("v_cache", _P)]


class _Shape(ctypes.Structure):
    _fields_ = [("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("intermediate", _I),
                ("block_size", _I), ("eps", _F), ("scale", _F)]


class _Step(ctypes.Structure):
    _fields_ = [("cos_sin", _P), ("rope_positions", _P), ("slots", _P), ("block_tables", _P), ("seqs", _P),
                ("table_stride", _I), ("positions", _P), ("max_keys", _I)]


@dataclass
class DenseLayer:
    """One dense decoder layer's weights as `DenseLayers` reads them: float32 norms (and q|k|v bias),
    and the four projections packed by `pack_int4`, each as (nibbles, halves)."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv: tuple[torch.Tensor, torch.Tensor]
    o: tuple[torch.Tensor, torch.Tensor]
    gate_up: tuple[torch.Tensor, torch.Tensor]
    down: tuple[torch.Tensor, torch.Tensor]


class DenseLayers:
    """A dense model's decoder layers and final norm as one C call a step (`cpu_layers.c`): the
    per-op path's C functions in its order, so the same bits without the Python between them. Built
    once when the model loads; holds its weights' pointers (and the weights, which must not move)."""

    def __init__(self, layers: list[DenseLayer], heads: int, kv_heads: int, head_dim: int, eps: float,
                 final_norm: torch.Tensor, cos_sin: torch.Tensor) -> None:
        """`final_norm` [hidden] float32; `cos_sin` [max_positions, head_dim] float32, each
        position's cos | sin halves (the model's rotary table)."""
        def check(t: torch.Tensor) -> int:
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise TypeError("the C decoder layers read contiguous float32 norms, biases and rotary tables")
            return _ptr(t)

        self.layers, self.final_norm, self.cos_sin = layers, final_norm, cos_sin
        self.table = (_Layer * len(layers))()
        for entry, layer in zip(self.table, layers):
            entry.input_norm, entry.post_attention_norm = check(layer.input_norm), check(layer.post_attention_norm)
            entry.qkv_bias = None if layer.qkv_bias is None else check(layer.qkv_bias)
            for name in ("qkv", "o", "gate_up", "down"):
                nibbles, halves = getattr(layer, name)
                setattr(entry, name, _Int4(_ptr(nibbles), _ptr(halves)))
        self._final_norm, self._cos_sin = check(final_norm), check(cos_sin)
        hidden, intermediate = layers[0].input_norm.shape[0], layers[0].down[0].shape[1] * GROUP
        self.shape = _Shape(hidden, heads, kv_heads, head_dim, intermediate, 0, eps, head_dim**-0.5)
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, x: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor,
                 slot_mapping: torch.Tensor, plan: NativePlan, out_rows: torch.Tensor) -> torch.Tensor:
        """Embeddings x [T, hidden] and each token's position [T] -> the final norm of rows
        `out_rows` (int64 [S]) of the last layer's output plus the residual stream, [S, hidden]
        float32; every layer's K/V written to its cache (float32, contiguous)."""
        expect_plan(plan, NativePlan)
        if kv_caches is not self._caches:
            for entry, (k_cache, v_cache) in zip(self.table, kv_caches, strict=True):
                entry.k_cache, entry.v_cache = _ptr(_float_cache(k_cache)), _ptr(_float_cache(v_cache))
            self.shape.block_size = kv_caches[0][0].shape[1]
            self._caches = kv_caches
        x = as_dtype(x, torch.float32).contiguous().clone()  # overwritten by the call
        out = torch.empty((out_rows.shape[0], x.shape[1]), dtype=torch.float32)
        tables, table_stride, seqs, plan_positions, max_keys = plan.args
        step = _Step(self._cos_sin, _int64s(positions, "positions"), _int64s(slot_mapping, "the cache slots"), tables,
                     seqs, table_stride, plan_positions, max_keys)
        if library().dense_layers(self.table, len(self.layers), ctypes.byref(self.shape), ctypes.byref(step),
                                  x.shape[0], _ptr(x), self._final_norm, _int64s(out_rows, "rows"), out_rows.shape[0],
                                  _ptr(out)):
            raise MemoryError("the C decoder layers could not allocate their activations")
        return out
