"""Import before any kernels.* Triton module: without a GPU, Triton kernels run in its interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when kernels.matmul & co. are first
imported; only the Triton test modules import them on a CPU host, so the CPU reference tests are
untouched. The interpreter mis-loads bfloat16: interpreter tests use float16 and float32, and
bfloat16 is covered by the `gpu` tests.

The interpreter runs `tl.dot` as numpy's matmul, i.e. OpenBLAS, whose row results depend on the
row's position in the tile (seen with numpy 2.4.6 / OpenBLAS 0.3.31: row 10 of a 32-row product
differs from the same row at position 0). A GPU's MMA computes each output element on its own, so
on CPU we give `tl.dot` that property too: per element, products summed over K in order. The
kernels' invariance is then tested against the hardware guarantee they actually rely on.

The interpreter needs Triton 3.9: 3.6's (the GPU image's) cannot loop over a runtime bound and
fails inside numpy, so with an older Triton and no GPU these modules skip and say why.
"""

from __future__ import annotations

import os
from importlib import metadata

import numpy as np
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _row_invariant_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    from triton.runtime.interpreter import TensorHandle

    acc = d.data.dtype
    # Contiguous copies: numpy's summation order follows the memory layout, and a tile that is a
    # transposed view (a TMA tile's .T) must be summed like the same tile loaded directly.
    a_data, b_data = np.ascontiguousarray(a.data, dtype=acc), np.ascontiguousarray(b.data, dtype=acc)
    products = a_data[..., :, :, None] * b_data[..., None, :, :]
    return TensorHandle(products.sum(axis=-2, dtype=acc) + d.data, d.dtype.scalar)


INTERPRETER_MIN_TRITON = (3, 9)


def _interpreter_unusable() -> str | None:
    """Why these modules cannot run Triton's interpreter here, read without importing triton: it
    must not be imported before TRITON_INTERPRET is set."""
    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "triton is not installed"
    if tuple(int(part) for part in version.split(".")[:2]) < INTERPRETER_MIN_TRITON:
        return f"the Triton interpreter tests need triton>={'.'.join(map(str, INTERPRETER_MIN_TRITON))}, not {version}"
    return None


if DEVICE == "cpu":
    if reason := _interpreter_unusable():
        pytest.skip(reason, allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpreterBuilder

    InterpreterBuilder.create_dot = _row_invariant_dot
