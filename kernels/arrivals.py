"""Arrival counters for kernels whose last program to finish a piece of work folds its partials.

A split-K matmul tile or a split attention item is computed by several programs; with a counter
per piece, the program that arrives last (an acquire-release atomic at GPU scope) folds every
partial in a fixed order and writes the result, so no second kernel is launched. Which program
arrives last varies from run to run; the fold it runs does not, so neither do the bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_counters: dict[torch.device, torch.Tensor] = {}
_outgrown: list[torch.Tensor] = []  # counters a captured CUDA graph may still point at


def arrival_counts(pieces: int, device: torch.device) -> torch.Tensor:
    """At least `pieces` zeroed int32 counters on `device`.

    Allocated once per device and kept zero by the folding programs (each resets its counter), so
    a launch costs no memset. Launches that share them must not overlap, which holds on one stream
    (the engine uses one). Not one set per stream: CUDA graph capture runs on its own stream, after
    a warm-up on another, and must find the counters the warm-up allocated (zeroing captured in a
    graph runs only on replay). Counters outgrown by a larger launch stay allocated, zero: a graph
    captured earlier replays on them, and freed memory would be another tensor's.
    """
    counts = _counters.get(device)
    if counts is None or counts.numel() < pieces:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("arrival counters: run each shape once before CUDA graph capture")
        if counts is not None:
            _outgrown.append(counts)
        counts = torch.zeros(max(pieces, 1024), dtype=torch.int32, device=device)
        _counters[device] = counts
    return counts


@triton.jit
def last_to_arrive(counter_ptr, arrivals):
    """Count this program in at `counter_ptr`; true for the last of `arrivals` programs, which then
    resets the counter for the next launch (the stream orders that launch after this one).

    Call it after the program's partial stores: the barrier puts every thread's stores before the
    arrival, whose GPU-scope release publishes them; the last arrival's acquire makes every other
    program's stores visible to it. Read the partials back through L2 (`cache_modifier=".cg"`).
    """
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    if last:
        tl.store(counter_ptr, 0)
    return last
