"""Owns the model and its KV cache on the device; turns a scheduled step into sampled tokens.

Under tensor parallelism every rank holds a `ModelRunner` of its shard. Rank 0's `execute` sends
the step's `StepInputs` (host lists, nothing of the requests) to the others, whose `follow` runs
the same forward pass and the same LM-head calls; rank 0 alone samples and scores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from detserve import kernels
from detserve.engine import cpu_runtime, sampler, weights
from detserve.engine.config import EngineConfig, ModelConfig
from detserve.engine.cuda_graphs import DecodeGraphs, GraphCaptureError
from detserve.engine.forward_batch import ForwardBatch, PromptScore
from detserve.engine.models.llama import LlamaModel, dummy_state_dict
from detserve.engine.parallel import Layout, TensorParallel
from detserve.engine.request import TokenLogprob
from detserve.engine.scheduler import SchedulerOutput
from detserve.kernels import PackedWeight, cpu_native

logger = logging.getLogger(__name__)

SCORE_ROWS = 64
"""Prompt positions scored per lm_head call: bounds the logits held at once to 64 x vocab floats."""


@dataclass
class ModelRunnerOutput:
    """What one forward pass computed, keyed by request id (never by place in the batch)."""

    sampled: dict[str, tuple[int, TokenLogprob | None]]  # request id -> (next token, its logprob if asked)
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprob]]]  # request id -> (prompt position, its logprob)


def kernel_mode(step: SchedulerOutput) -> kernels.Mode:
    """Invariant kernels when any request of the step asked for determinism, else fast ones."""
    return "invariant" if step.invariant else "fast"


@dataclass
class StepInputs:
    """What every rank needs for a step's forward pass, as host lists: every scheduled request's
    new tokens back to back, and where they go. Nothing of the requests themselves, so it crosses
    to the other ranks of a tensor-parallel group in one small message."""

    mode: kernels.Mode
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)  # rows that sample
    scored_rows: list[int] = field(default_factory=list)  # rows whose logits score a prompt token

    @classmethod
    def of(cls, step: SchedulerOutput) -> tuple["StepInputs", list[PromptScore]]:
        """The step's inputs, and the prompt positions its scored rows score (rank 0's alone)."""
        rows, scored = cls(kernel_mode(step)), []
        for s in step.scheduled:
            request, start, end = s.request, s.start, s.start + s.num_new_tokens
            first_row = len(rows.input_ids)
            rows.input_ids.extend(request.token_ids(start, end))
            rows.positions.extend(range(start, end))
            rows.query_start_loc.append(len(rows.input_ids))
            rows.seq_lens.append(end)
            rows.num_new_tokens.append(s.num_new_tokens)
            rows.block_tables.append(request.block_table)
            if s.samples:
                rows.logits_indices.append(len(rows.input_ids) - 1)
            if request.scores_prompt:  # every prompt position but the last scores the token after it
                for p in range(start, min(end, request.num_prompt_tokens - 1)):
                    rows.scored_rows.append(first_row + p - start)
                    scored.append(PromptScore(request, p, request.prompt_token_ids[p + 1],
                                              request.params.prompt_logprobs))
        return rows, scored

    def padded(self, batch: int, pad_block: int) -> "StepInputs":
        """These inputs of a decode step with pad rows added up to `batch` rows (a CUDA graph's
        bucket): each a one-token sequence, token 0 at position 0 of `pad_block`, which no request
        owns, sampling like the real rows. The kernels are batch-invariant, so a pad row changes no
        real row's bits; the caller drops its logits."""
        pads, rows = batch - len(self.seq_lens), len(self.input_ids)
        return StepInputs(
            self.mode, self.input_ids + [0] * pads, self.positions + [0] * pads,
            self.query_start_loc + list(range(rows + 1, rows + pads + 1)), self.seq_lens + [1] * pads,
            self.num_new_tokens + [1] * pads, self.block_tables + [[pad_block]] * pads,
            self.logits_indices + list(range(rows, rows + pads)), list(self.scored_rows),
        )

    def cache_slots(self, block_size: int) -> list[int]:
        """Each token's KV cache slot (block * block_size + offset), from its sequence's block table:
        a host loop over the step's tokens, cheaper than the torch ops that would gather it (a
        decode step has a few tokens; a prefill's loop is small beside its forward pass)."""
        slots = []
        for b, table in enumerate(self.block_tables):
            for p in self.positions[self.query_start_loc[b] : self.query_start_loc[b + 1]]:
                slots.append(table[p // block_size] * block_size + p % block_size)
        return slots

    def logits_row_ranges(self) -> list[tuple[int, int]]:
        """The LM-head calls of the step, as ranges of its hidden rows: the sampling rows in one
        call, then the scored rows SCORE_ROWS at a time (every rank makes the same calls)."""
        num_sampling = len(self.logits_indices)
        ranges = [(0, num_sampling)] if num_sampling else []
        total = num_sampling + len(self.scored_rows)
        return ranges + [(i, min(i + SCORE_ROWS, total)) for i in range(num_sampling, total, SCORE_ROWS)]


@contextlib.contextmanager
def _default_tensor_type(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def model_facts(config: EngineConfig) -> tuple[Path, ModelConfig, int]:
    """(model folder, its shape, the context window) that a runner of `config` loads: what the
    engine and every worker rank read alike."""
    model_dir = weights.resolve_model_dir(config.model, dummy=config.load_format == "dummy")
    mc = ModelConfig.from_hf(weights.load_config(model_dir))
    # A sliding window as long as the context is plain causal attention, which is what runs here.
    max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings,
                        mc.sliding_window or mc.max_position_embeddings)
    return model_dir, mc, max_model_len


def _weight_format(model: LlamaModel, dtype: torch.dtype) -> str:
    """What the matmuls read, for logs and the fingerprint: e.g. `int4-g32-c+int8-g32-c` (`-c`: the C
    matmuls' layout), `int4-g32+int8` (torch's kernels) or `torch.float32`."""
    layer = model.layers[0]
    formats = []
    for weight in (layer.qkv_proj, layer.o_proj[0], *layer.mlp_weights(), model.lm_head):
        if isinstance(weight, PackedWeight):
            native = weight.layout == "native"
            name = f"int{weight.bits}" + (f"-g{weight.group_size}" if weight.bits == 4 or native else "")
            name += "-c" if native else ""
        else:
            name = str(dtype)
        if name not in formats:
            formats.append(name)
    return "+".join(formats)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path, max_model_len: int,
                 tp: TensorParallel | None = None) -> None:
        """`tp`: the tensor-parallel group whose shard this runner holds (default: alone, all of it)."""
        self.config = config
        self.model_config = model_config
        self.tp = tp or TensorParallel(Layout(splits=config.invariant_splits))
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.block_size = config.block_size
        self.cpu_kernels: cpu_native.Backend = "torch"  # the CPU row ops its steps run (`kernel_mode`); a GPU's none
        if self.device.type == "cpu":
            self.cpu_kernels = cpu_runtime.cpu_kernels_for(config.cpu_kernels, self.dtype)
            cpu_runtime.keep_freed_memory_for_reuse()
        self.quantization = config.resolved_quantization()
        tie = model_config.tie_word_embeddings
        # packs each 4-bit weight for the matmul these CPU kernels run (`QuantizedWeight.pack`)
        with _default_tensor_type(self.device, self.dtype), cpu_native.selected(self.cpu_kernels):
            self.model = LlamaModel(model_config, max_positions=max_model_len, tp=self.tp)
            if config.load_format == "dummy":
                state = weights.convert_state(dummy_state_dict(model_config, config.seed), self.quantization, tie)
            else:
                state = weights.load_weights(model_dir, self.quantization, tie)
            self.model.load_weights(state)
        self.weight_format = _weight_format(self.model, self.dtype)
        if self.tp.layout.size > 1 and self.device.type == "cpu" and str(self.dtype) in self.weight_format:
            raise ValueError("tensor parallelism on CPU runs the integer kernels, whose output columns are proven "
                             "the same in any shard (float matmuls are not): use --quantization int4 or int8")
        self.num_heads, self.num_kv_heads = self.model.layers[0].num_heads, self.model.layers[0].num_kv_heads
        mc = model_config
        # Two blocks more than the block manager hands out: one stays zero, for reads past a sequence;
        # the other holds the K/V of a CUDA graph's pad rows (`StepInputs.padded`).
        self.zero_slot = config.kv_capacity_tokens
        self.pad_block = config.num_kv_blocks + 1
        cache_shape = (config.num_kv_blocks + 2, config.block_size, self.num_kv_heads, mc.head_dim)
        self.kv_caches = [
            (
                torch.zeros(cache_shape, dtype=self.dtype, device=self.device),
                torch.zeros(cache_shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(mc.num_layers)
        ]
        self.graphs = self._decode_graphs(max_model_len)
        kv_bytes = 2 * mc.num_layers * config.kv_capacity_tokens * self.num_kv_heads * mc.head_dim
        logger.info("weights: %s", self.weight_format)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.0f MiB)",
            config.num_kv_blocks,
            config.block_size,
            kv_bytes * self.kv_caches[0][0].element_size() / 2**20,
        )

    def _decode_graphs(self, max_model_len: int) -> DecodeGraphs | None:
        """CUDA graphs for decode steps where they can run, all captured now: a CUDA device with
        triton, no --enforce-eager, one rank (collectives stay eager), and a dense model (a mixture
        of experts sizes its expert matmuls on the host from each step's routing). A capture that
        fails is logged and leaves every step eager: the server still serves."""
        config = self.config
        if (config.enforce_eager or not kernels.can_capture_decodes(self.device) or self.tp.layout.size > 1
                or self.model_config.moe is not None):
            return None
        started, graphs = time.monotonic(), DecodeGraphs(self, config.max_num_seqs, max_model_len)
        try:
            graphs.capture_all(StepInputs("invariant"))
        except GraphCaptureError:
            logger.exception("CUDA graphs are off: every step runs eagerly")
            return None
        logger.info("CUDA graphs: %d captured in %.1f s (decode steps of up to %d sequences, both kernel modes)",
                    len(graphs.graphs), time.monotonic() - started, graphs.buckets[-1])
        return graphs

    @contextlib.contextmanager
    def kernel_mode(self, mode: kernels.Mode) -> Iterator[None]:
        """The kernel mode of a step, and this runner's CPU row ops (`cpu_native.selected`): both are
        context-local, so engines of other selections can share a process."""
        with kernels.mode(mode), cpu_native.selected(self.cpu_kernels):
            yield

    def prepare(self, step: SchedulerOutput) -> ForwardBatch:
        """The step's forward batch (tests and benchmarks run the model on it themselves)."""
        return self._batch(*StepInputs.of(step))

    def _batch(self, inputs: StepInputs, scored: list[PromptScore]) -> ForwardBatch:
        """Flatten the step's requests into one batch of tokens with their positions and cache slots,
        and plan the step's attention once for every layer, in the step's kernel mode."""
        max_blocks = max(len(table) for table in inputs.block_tables)
        tables = [table + [0] * (max_blocks - len(table)) for table in inputs.block_tables]

        def tensor(values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        block_tables = tensor(tables, torch.int32)
        attention = kernels.AttentionMetadata(
            query_start_loc=inputs.query_start_loc,
            seq_lens=inputs.seq_lens,
            block_tables=block_tables,
            block_size=self.block_size,
            zero_slot=self.zero_slot,
        )
        with self.kernel_mode(inputs.mode):
            plan = kernels.plan_attention(attention, self.num_heads, self.num_kv_heads)
        return ForwardBatch(
            input_ids=tensor(inputs.input_ids),
            positions=tensor(inputs.positions),
            slot_mapping=tensor(inputs.cache_slots(self.block_size)),
            attention=attention,
            attention_plan=plan,
            logits_indices=tensor(inputs.logits_indices + inputs.scored_rows),
            scored=scored,
        )

    def execute(self, step: SchedulerOutput, eos_token_ids: tuple[int, ...]) -> ModelRunnerOutput:
        """Run the forward pass (on every rank), sample for the requests that sample, and score prompts."""
        inputs, scored = StepInputs.of(step)
        self.tp.broadcast(inputs)
        sampling = [s.request for s in step.scheduled if s.samples]
        try:
            logits = self._forward(inputs, scored)
            with self.kernel_mode(inputs.mode):
                samples = sampler.sample(next(logits), sampling, eos_token_ids) if sampling else []
                scores = self._score(logits, scored)
        except BaseException:
            self.tp.broken = True  # the other ranks may be waiting in this step's collectives
            raise
        prompt_logprobs: dict[str, list[tuple[int, TokenLogprob]]] = {}
        for score, logprob in scores:  # the logits at a position score the prompt token after it
            prompt_logprobs.setdefault(score.request.request_id, []).append((score.position + 1, logprob))
        return ModelRunnerOutput({r.request_id: sample for r, sample in zip(sampling, samples, strict=True)},
                                 prompt_logprobs)

    def follow(self, inputs: StepInputs) -> None:
        """A worker rank's part of a step rank 0 executes: the same forward pass and LM-head calls."""
        for _ in self._logits(self._hidden(inputs, []), inputs):
            pass

    def _forward(self, inputs: StepInputs, scored: list[PromptScore]) -> Iterator[torch.Tensor | None]:
        """The step's logits blocks (`_logits`): a decode step a CUDA graph holds is replayed, any
        other step runs eagerly."""
        bucket = self.graphs.bucket(inputs) if self.graphs is not None else None
        if bucket is not None:
            return iter([self.graphs.logits(inputs, bucket)])
        return self._logits(self._hidden(inputs, scored), inputs)

    def _hidden(self, inputs: StepInputs, scored: list[PromptScore]) -> torch.Tensor:
        """The forward pass: final hidden states of the rows that sample, then of those scored."""
        batch = self._batch(inputs, scored)
        with self.kernel_mode(inputs.mode):
            return self.model(batch, self.kv_caches)

    def _logits(self, hidden: torch.Tensor, inputs: StepInputs) -> Iterator[torch.Tensor | None]:
        """One float32 logits block per `logits_row_ranges` range, lazily (rank 0 samples from the
        first before the scoring blocks are computed; None on the other ranks)."""
        for start, end in inputs.logits_row_ranges():
            with self.kernel_mode(inputs.mode):
                yield self.model.compute_logits(hidden[start:end])

    def _score(self, logits: Iterator[torch.Tensor | None], scored: list[PromptScore]
               ) -> list[tuple[PromptScore, TokenLogprob]]:
        """Prompt logprobs of the scored rows, from their logits blocks (SCORE_ROWS rows at a time: a
        whole prompt's [tokens, vocab] logits would not fit in memory for long prompts). The logits
        and logprobs are the ops a sampled token's reported logprob comes from, row by row, so in
        invariant mode scoring a token gives the bits generating it reported."""
        results: list[tuple[PromptScore, TokenLogprob]] = []
        for i, block in zip(range(0, len(scored), SCORE_ROWS), logits, strict=True):
            rows = scored[i : i + SCORE_ROWS]
            results += zip(rows, sampler.token_logprobs(block, [r.token_id for r in rows], [r.top for r in rows]))
        return results
