"""The numbers the bits depend on: every kernel, torch or Triton, imports them from here.

Change one and the bits change with it, so each is part of the system fingerprint
(`kernels.config_digest`), and `VERSION` is bumped whenever the ops' arithmetic changes.
"""

from __future__ import annotations

ROWS_PER_CALL = 16
"""Rows per call of an invariant float matmul on the CPU (16 measured fastest among invariant sizes
on 2 cores): a call whose shape never changes computes each row alike."""

KV_SPLIT_SIZE = 256
"""Keys per attention split: a fixed split *size*, so splits sit at the same absolute positions."""

VERSION = 3
"""The torch ops' arithmetic (2: SiLU via exp, attention as batched items; 3: the attention scale
and mask applied inside the score matmul), so the fingerprint stops promising the old bits."""

EXP_FLOOR = -80.0
"""Exponents in the attention split merge are clamped to [EXP_FLOOR, 0]: torch's CPU exp takes a
slow path (2.3x here for a tensor where every third result underflows), and below e^-80 (~1.8e-35)
a split's weight is nothing next to the maximum's weight of 1. The clamp is elementwise, hence
invariant. Within a split the scores are not clamped: masked keys must come out of exp(-inf) as 0."""

# Seeded sampling's noise: splitmix64 over (seed, token position, vocab index), the same 64-bit
# stream on the host (numpy) and on the GPU (Triton), so a seeded draw is the same on both.
GOLDEN = 0x9E3779B97F4A7C15  # vocab index stride
MIX1 = 0xBF58476D1CE4E5B9  # splitmix64's multipliers
MIX2 = 0x94D049BB133111EB
POSITION_STRIDE = 0xD1B54A32D192ED03  # token position stride, xored into the seed
