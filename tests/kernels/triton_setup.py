"""Import before any kernels.* Triton module: without a GPU, Triton kernels run in its interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when kernels.matmul & co. are first
imported; only the Triton test modules import them on a CPU host, so the CPU reference tests are
untouched. The interpreter mis-loads bfloat16: interpreter tests use float16 and float32, and
bfloat16 is covered by the `gpu` tests.
"""

from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
