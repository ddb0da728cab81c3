"""Weight-only quantized linear layers for the CPU: 4-bit and 8-bit weights that are never dequantized.

Decode on a CPU is bound by the bytes of weights streamed per step, so a 4-bit weight is read
about 8x faster than a float32 one. torch ships two CPU kernels that multiply bfloat16
activations by integer weights directly: `_weight_int4pack_mm_for_cpu` (4-bit, one scale and
zero per group of `group_size` inputs) and `_weight_int8pack_mm` (8-bit, one scale per output).
Both compute every output row with the same code in the same order whatever the number of rows,
and the same bits at 1 or 2 threads (tests/kernels/test_cpu_invariance.py proves it over the
supported models' weight shapes), so they serve both kernel modes: no fixed-shape padding.
Their float16/float32-activation paths are slow scalar code, hence bfloat16 activations.

Where the CPU's C ops run (`cpu_native`), a weight in groups of 32 (4-bit, or a GGUF's Q8_0) is
packed for the C matmuls instead (`cpu_matmul.c`): 16-bit activations and float16 scales, about
5x more accurate than torch's kernels and faster on the machines measured; row-invariant the same way.

`QuantizedWeight` is the portable form (what a checkpoint or the disk cache holds); `pack()`
turns it into the layout the running CPU's kernel reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from detserve.kernels import cpu_native
from detserve.kernels.reference import as_dtype

INT4_GROUP_SIZE = 32
"""Inputs per 4-bit scale/zero group: the block size of GGUF's Q4_0/Q4_1, so they convert exactly."""

_INT4_OFFSET = 8  # the 4-bit kernel computes (q - 8) * scale + zero


def int4_fits(shape: tuple[int, int], group_size: int = INT4_GROUP_SIZE) -> bool:
    """Whether the 4-bit kernel takes an [N, K] weight: it packs outputs 16 at a time, inputs by group."""
    return shape[0] % 16 == 0 and shape[1] % group_size == 0


@dataclass
class QuantizedWeight:
    """A weight matrix [N, K] as integers plus scales, in a layout every CPU can read.

    4-bit: `qweight` uint8 [N, K] holding 0..15, `scales` and `zeros` [N, K / group_size], and
    weight = (q - 8) * scale + zero. 8-bit: `qweight` int8 [N, K], `scales` [N, K / group_size],
    weight = q * scale (GGUF's Q8_0 has groups of 32; the 8-bit kernel reads one group per row).
    """

    bits: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int = INT4_GROUP_SIZE

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the float32 weight (an embedding lookup), without dequantizing the rest."""
        return QuantizedWeight(self.bits, self.qweight[ids], self.scales[ids],
                               None if self.zeros is None else self.zeros[ids], self.group_size).dequantize()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] these integers stand for (tests, the float path, embedding rows):
        each group's integers times its scale (plus its zero), broadcast over the group."""
        n, k = self.shape
        q = self.qweight.float().view(n, k // self.group_size, self.group_size)
        scales = self.scales.float()[:, :, None]
        if self.bits == 8:
            return (q * scales).view(n, k)
        return ((q - _INT4_OFFSET) * scales + self.zeros.float()[:, :, None]).view(n, k)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack weights along N (fusing q|k|v or gate|up): rows, scales and zeros are per output."""
        first = parts[0]
        if any(p.bits != first.bits or p.group_size != first.group_size for p in parts):
            raise ValueError("cannot fuse weights quantized differently")
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        return QuantizedWeight(first.bits, torch.cat([p.qweight for p in parts]),
                               torch.cat([p.scales for p in parts]), zeros, first.group_size)

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Named tensors for a safetensors file (4-bit values two to a byte)."""
        if self.bits == 8:
            return {f"{name}.qweight": self.qweight, f"{name}.scales": self.scales}
        low, high = self.qweight[:, 0::2], self.qweight[:, 1::2]
        return {f"{name}.qweight4": low | (high << 4), f"{name}.scales": self.scales, f"{name}.zeros": self.zeros}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], name: str) -> "QuantizedWeight | None":
        """The inverse of `to_tensors`, or None if no quantized weight `name` is there."""
        scales = tensors.get(f"{name}.scales")
        if f"{name}.qweight" in tensors:
            qweight = tensors[f"{name}.qweight"]
            return QuantizedWeight(8, qweight, scales, None, qweight.shape[1] // scales.shape[1])
        if f"{name}.qweight4" not in tensors:
            return None
        packed = tensors[f"{name}.qweight4"]
        qweight = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        return QuantizedWeight(4, qweight, scales, tensors[f"{name}.zeros"], qweight.shape[1] // scales.shape[1])

    def kernel_form(self, native: bool | None = None) -> "QuantizedWeight":
        """This weight as a CPU kernel takes it: shapes the 4-bit kernel does not take (e.g. a
        vocabulary that is no multiple of 16), and 8-bit weights with several scales per row, are
        requantized to 8 bits with one scale per row (what torch's 8-bit kernel reads); if `native`
        (default: where the C ops run now) an 8-bit weight in groups of 32 (GGUF's Q8_0) that the C
        matmul takes stays as it is. A sharded model takes this form of the whole weight before
        slicing it, so every shard size reads the same integers and scales."""
        if native is None:
            native = cpu_native.enabled()
        if self.bits == 4:
            return self if int4_fits(self.shape, self.group_size) else quantize_int8(self.dequantize())
        if self.group_size == self.shape[1] or (native and self._fits_c_matmul()):
            return self
        return quantize_int8(self.dequantize())

    def _fits_c_matmul(self) -> bool:
        return self.group_size == cpu_native.GROUP and cpu_native.fits(self.shape)

    def outputs(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows start..end-1 (a column-parallel shard); rows past N are zeros (padding)."""
        def rows(t: torch.Tensor) -> torch.Tensor:
            part = t[start:end]
            missing = end - start - part.shape[0]
            return torch.cat([part, part.new_zeros((missing, *part.shape[1:]))]) if missing else part

        return QuantizedWeight(self.bits, rows(self.qweight), rows(self.scales),
                               None if self.zeros is None else rows(self.zeros), self.group_size)

    def inputs(self, start: int, end: int) -> "QuantizedWeight":
        """Inputs start..end-1 of every row (one K-split of a row-parallel matmul), on group
        boundaries; an 8-bit weight's one scale per row stays that row's scale."""
        if self.bits == 8 and self.group_size == self.shape[1]:
            return QuantizedWeight(8, self.qweight[:, start:end], self.scales, None, end - start)
        g = self.group_size
        if start % g or end % g:
            raise ValueError(f"inputs {start}..{end} cut a {self.bits}-bit group of {g}")
        zeros = None if self.zeros is None else self.zeros[:, start // g : end // g]
        return QuantizedWeight(self.bits, self.qweight[:, start:end], self.scales[:, start // g : end // g], zeros, g)

    def pack(self, native: bool | None = None) -> "PackedWeight":
        """The layout this CPU's kernel reads, of `kernel_form`: a weight in groups of 32 packed for
        the C matmuls if `native` (default: where the C ops run now, `cpu_native.enabled`), else for
        torch's kernels (the int4 packing is the kernel's own)."""
        if native is None:
            native = cpu_native.enabled()
        form = self.kernel_form(native)
        if form is not self:
            return form.pack(native)
        if native and self._fits_c_matmul():
            if self.bits == 4:
                data, halves = cpu_native.pack_int4(self.qweight, self.scales, self.zeros - _INT4_OFFSET * self.scales)
            else:
                data, halves = cpu_native.pack_int8(self.qweight, self.scales)
            return PackedWeight(self.bits, data, halves, self.group_size, self.shape[0], "native")
        if self.bits == 8:
            # A fresh copy, not a view: a safetensors file's tensors sit at any offset of one buffer,
            # and the 8-bit kernel crashed (SIGSEGV) reading a weight at an unaligned one.
            return PackedWeight(8, self.qweight.clone(memory_format=torch.contiguous_format),
                                self.scales[:, 0].to(torch.bfloat16).contiguous(), self.shape[1], self.shape[0])
        data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.qweight.to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        return PackedWeight(4, data, scales_and_zeros, self.group_size, self.shape[0])


@dataclass
class PackedWeight:
    """A quantized weight in the running CPU kernel's layout; `linear` multiplies by it."""

    bits: int
    data: torch.Tensor  # torch's 4-bit: the int4pack layout; torch's 8-bit: int8 [N, K]; native: the C matmul's
    scales: torch.Tensor  # torch's 4-bit: [K / group, N, 2] bfloat16 scales and zeros; 8-bit: [N] bfloat16
    group_size: int  # inputs per group (torch's 8-bit: K)
    out_features: int
    layout: Literal["torch", "native"] = "torch"  # whose kernel reads it: torch's, or the C matmuls'

    @property
    def in_features(self) -> int:
        if self.layout == "native":
            return self.data.shape[1] * self.group_size
        return self.scales.shape[0] * self.group_size if self.bits == 4 else self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, K] @ W.T (+ bias) -> [T, N] in `out_dtype` (default x's): torch's integer kernels with
    bfloat16 activations (so a bfloat16 result is the kernel's own, not a cast), or the C matmul,
    which reads x as it is and writes float32.

    The casts and the bias add are elementwise, hence exact at any shape; the kernels are row-invariant.
    """
    if weight.layout == "native":
        kernel = cpu_native.int4_linear if weight.bits == 4 else cpu_native.int8_linear
        out = as_dtype(kernel(x, weight.data, weight.scales), out_dtype or x.dtype)
        return out if bias is None else out + bias
    xb = as_dtype(x, torch.bfloat16).contiguous()  # a K-split's columns are a strided view; the kernels read rows whole
    if weight.bits == 4:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, weight.data, weight.group_size, weight.scales)
    else:
        out = torch.ops.aten._weight_int8pack_mm(xb, weight.data, weight.scales)
    out = as_dtype(out, out_dtype or x.dtype)
    return out if bias is None else out + bias


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> QuantizedWeight:
    """Asymmetric 4-bit quantization per group of inputs (GGUF Q4_1's scheme): min..max over 15 steps."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"cannot quantize a weight with {k} inputs to 4 bits in groups of {group_size}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight(4, q.reshape(n, k), scales, low + _INT4_OFFSET * scales, group_size)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric 8-bit quantization with one scale per output row (what `_weight_int8pack_mm` reads)."""
    w = weight.float()
    scales = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight(8, q, scales[:, None], None, w.shape[1])


def quantize(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    return quantize_int4(weight) if bits == 4 else quantize_int8(weight)
