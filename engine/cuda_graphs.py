"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, kernel mode), all captured
when the runner starts.

A decode step launches a few hundred kernels from Python; on a GPU that host time, not the
weights' read, bounds the step. A graph replays the step's launches in one call. Three things make
a decode step replayable:
- **Fixed shapes.** The batch is padded to its bucket (1, 2, 4, 8, then every multiple of 8) with
  pad rows: one-token sequences at position 0 of a KV block no request owns (`ModelRunner.pad_block`).
  The kernels are batch-invariant, so a pad row never changes a real row's bits; its logits are
  dropped.
- **Static inputs.** Token ids, positions, block tables and the attention work items
  live in one int32 device buffer the graph reads; each step fills its host twin (pinned memory)
  and copies it in one transfer.
- **Launches that ignore the lengths.** Attention runs the Triton kernel over a fixed-capacity
  plan (`kernels.graph_attention_plan`): a program for every split a decode could have, those past
  its own doing nothing. In invariant mode each item's arithmetic is the eager plan's, so replayed
  and eager steps give the same bits; fast mode's attention is the Triton kernel too in a graph.

Prefill chunks, steps that score prompts, and batches beyond the largest bucket run eagerly.
Sampling runs after the replay, eagerly, on the graph's logits (one `kernels.sample_tokens` launch
for the plain rows; only the sampled ids cross to the host).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from detserve import kernels
from detserve.engine.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from detserve.engine.model_runner import ModelRunner, StepInputs


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured: the runner runs every step eagerly instead."""


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes with a graph of their own: 1, 2, 4, 8, then multiples of 8, through the first that
    holds `max_num_seqs` (vLLM's and SGLang's choice: padding costs at most 7 rows past 8)."""
    buckets = [1]
    while buckets[-1] < max_num_seqs:
        buckets.append(buckets[-1] * 2 if buckets[-1] < 8 else buckets[-1] + 8)
    return tuple(buckets)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `batch` rows, or None past the largest."""
    return next((b for b in buckets if b >= batch), None)


@dataclass(frozen=True)
class StaticInputs:
    """One bucket's views of the static buffer: what its graph reads (int32, on the device)."""

    input_ids: torch.Tensor  # [b]
    positions: torch.Tensor  # [b]
    block_tables: torch.Tensor  # [b, max_blocks], rows max_blocks apart (the buffer's row stride)
    items: torch.Tensor  # [kernels.graph_table_length(b, max_splits)]: the attention plan's table


class StaticBuffer:
    """The int32 buffer every graph reads its inputs from, laid out for the largest bucket, and its
    host twin: `load` fills the host side for one step and copies it over in one transfer."""

    def __init__(self, capacity: int, max_blocks: int, max_splits: int, device: torch.device) -> None:
        self.capacity, self.max_blocks, self.max_splits = capacity, max_blocks, max_splits
        sizes = {"input_ids": capacity, "positions": capacity, "block_tables": capacity * max_blocks,
                 "items": kernels.graph_table_length(capacity, max_splits)}
        self.spans = dict(zip(sizes, itertools.pairwise([0, *itertools.accumulate(sizes.values())])))
        total = self.spans["items"][1]
        self.device_buffer = torch.zeros(total, dtype=torch.int32, device=device)
        self.host_buffer = torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._copied = torch.cuda.Event() if device.type == "cuda" else None  # the last copy's end

    def _field(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        start, end = self.spans[name]
        field = buffer[start:end]
        return field.view(self.capacity, self.max_blocks) if name == "block_tables" else field

    def views(self, batch: int) -> StaticInputs:
        """The device views a graph of `batch` rows reads."""
        ids, positions, tables, items = (self._field(self.device_buffer, name) for name in self.spans)
        return StaticInputs(ids[:batch], positions[:batch], tables[:batch],
                            items[: kernels.graph_table_length(batch, self.max_splits)])

    def load(self, inputs: "StepInputs") -> None:
        """Write a padded decode step's inputs into the host buffer, then copy it to the device in one
        transfer, asynchronous from pinned memory (the stream orders it before the replay). The host
        buffer is written only once the last copy has read it. Entries past a block table's own
        blocks keep stale values, which attention never reads."""
        if self._copied is not None:
            self._copied.synchronize()
        ids, positions, tables, items = (self._field(self.host_buffer, name).numpy() for name in self.spans)
        batch = len(inputs.seq_lens)
        ids[:batch], positions[:batch] = inputs.input_ids, inputs.positions
        for row, table in zip(tables, inputs.block_tables):
            row[: len(table)] = table
        table = kernels.graph_decode_items(inputs.seq_lens, self.max_splits)
        items[: len(table)] = table
        self.device_buffer.copy_(self.host_buffer, non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class DecodeGraphs:
    """The runner's decode steps in CUDA graphs, one per (bucket, mode), captured by `capture_all`."""

    def __init__(self, runner: "ModelRunner", max_num_seqs: int, max_model_len: int) -> None:
        self.runner = runner
        self.buckets = decode_buckets(max_num_seqs)
        self.max_splits = kernels.splits_for(max_model_len)
        max_blocks = math.ceil(max_model_len / runner.block_size)
        self.buffer = StaticBuffer(self.buckets[-1], max_blocks, self.max_splits, runner.device)
        self.rows = torch.arange(self.buckets[-1], device=runner.device)  # logits_indices: every row samples
        # Every graph writes its logits here (graphs never run at once): one [capacity, vocab] buffer,
        # not one per graph (at 35 buckets of a 128k vocabulary those would hold gigabytes).
        head = runner.model.lm_head
        vocab = head.out_features if isinstance(head, kernels.PackedWeight) else head.shape[0]
        self.logits_buffer = torch.empty((self.buckets[-1], vocab), dtype=torch.float32, device=runner.device)
        self.graphs: dict[tuple[int, kernels.Mode], torch.cuda.CUDAGraph] = {}
        self.pool: tuple | None = None  # one memory pool for every graph, made at the first capture

    def bucket(self, inputs: "StepInputs") -> int | None:
        """The bucket of a step a graph can run: decodes only (one new token each, every one
        sampling, no prompt scored), at most the largest bucket; else None."""
        n = len(inputs.seq_lens)
        if inputs.scored_rows or len(inputs.input_ids) != n or len(inputs.logits_indices) != n:
            return None
        return bucket_for(n, self.buckets)

    def logits(self, inputs: "StepInputs", bucket: int) -> torch.Tensor:
        """float32 logits [n, vocab] of the step's n decodes, from its bucket's graph replayed."""
        self.buffer.load(inputs.padded(bucket, self.runner.pad_block))
        self.graphs[(bucket, inputs.mode)].replay()
        return self.logits_buffer[: len(inputs.seq_lens)]

    def capture_all(self, no_rows: "StepInputs") -> None:
        """Capture every (bucket, mode) now, largest bucket first (the shared pool then holds the
        largest temporaries from the start), each on `no_rows` padded: pad rows alone, whose K/V
        go to the pad block. Then serving never stalls on a capture, and a benchmark's timed steps
        never hold one."""
        for mode in kernels.MODES:
            for bucket in reversed(self.buckets):
                self.buffer.load(no_rows.padded(bucket, self.runner.pad_block))
                self.graphs[(bucket, mode)] = self._capture(bucket, mode)

    def forward(self, bucket: int, mode: kernels.Mode) -> None:
        """The captured work: the model's forward pass and LM head over the static inputs of a
        bucket, its float32 logits written to `logits_buffer[:bucket]`. Every tensor it reads is
        static: the buffer's views, the weights and the KV cache."""
        runner, static = self.runner, self.buffer.views(bucket)
        # Only the block tables and block size are read through a capacity plan: no per-step lists.
        meta = kernels.AttentionMetadata(query_start_loc=list(range(bucket + 1)), seq_lens=[1] * bucket,
                                         block_tables=static.block_tables, block_size=runner.block_size,
                                         zero_slot=runner.zero_slot)
        plan = kernels.graph_attention_plan(meta, runner.num_heads, runner.num_kv_heads, static.items,
                                            self.max_splits)
        rows, positions = self.rows[:bucket], static.positions.long()
        batch = ForwardBatch(input_ids=static.input_ids.long(), positions=positions,
                             slot_mapping=kernels.cache_slots(static.block_tables, rows, positions, runner.block_size),
                             attention=meta, attention_plan=plan, logits_indices=rows)
        with kernels.mode(mode):
            self.logits_buffer[:bucket].copy_(runner.model.compute_logits(runner.model(batch, runner.kv_caches)))

    def _capture(self, bucket: int, mode: kernels.Mode) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (Triton compiles, the arrival counters and cuBLAS workspaces are
        allocated, as torch's graph docs ask), then capture the staged step."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(bucket, mode)
            torch.cuda.current_stream().wait_stream(side)
            # One pool: a graph's temporaries are dead once its replay ends and graphs never run at
            # once, so the next capture may reuse them.
            # Thread-local capture: the server's other threads (admission, metrics) may call into
            # CUDA meanwhile without invalidating it; none of them touches this stream.
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.forward(bucket, mode)
        except Exception as exc:
            raise GraphCaptureError(f"capturing the {mode} decode step of {bucket} rows failed: {exc!r}") from exc
        return graph
