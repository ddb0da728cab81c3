"""Arrival counters for kernels whose last program to finish a piece of work folds its partials.

A split-K matmul tile or a split attention item is computed by several programs; with a counter
per piece, the program that arrives last (an acquire-release atomic at GPU scope) folds every
partial in a fixed order and writes the result, so no second kernel is launched. Which program
arrives last varies from run to run; the fold it runs does not, so neither do the bits.
"""

from __future__ import annotations

import torch

_counters: dict[torch.device, torch.Tensor] = {}


def arrival_counts(pieces: int, device: torch.device) -> torch.Tensor:
    """At least `pieces` zeroed int32 counters on `device`.

    Allocated once per device and kept zero by the folding programs (each resets its counter), so
    a launch costs no memset. Launches that share them must not overlap, which holds on one stream
    (the engine uses one). Not one set per stream: CUDA graph capture runs on its own stream, after
    a warm-up on another, and must find the counters the warm-up allocated (zeroing captured in a
    graph runs only on replay).
    """
    counts = _counters.get(device)
    if counts is None or counts.numel() < pieces:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("arrival counters: run each shape once before CUDA graph capture")
        counts = torch.zeros(max(pieces, 1024), dtype=torch.int32, device=device)
        _counters[device] = counts
    return counts
