"""Owns the model and its KV cache on the device; turns a scheduled step into sampled tokens."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from detserve import kernels
from detserve.engine import cpu_runtime, sampler, weights
from detserve.engine.config import EngineConfig, ModelConfig
from detserve.engine.forward_batch import ForwardBatch, PromptScore
from detserve.engine.models.llama import LlamaModel, dummy_state_dict
from detserve.engine.request import TokenLogprob
from detserve.engine.scheduler import SchedulerOutput
from detserve.kernels import PackedWeight

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
class _Rows:
    """A step's rows as host lists: every scheduled request's new tokens back to back."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)  # rows that sample
    scored_rows: list[int] = field(default_factory=list)  # rows whose logits score a prompt token
    scored: list[PromptScore] = field(default_factory=list)

    @classmethod
    def of(cls, step: SchedulerOutput) -> "_Rows":
        rows = cls()
        for s in step.scheduled:
            request, start, end = s.request, s.start, s.start + s.num_new_tokens
            first_row = len(rows.input_ids)
            rows.input_ids.extend(request.token_ids(start, end))
            rows.positions.extend(range(start, end))
            rows.query_start_loc.append(len(rows.input_ids))
            rows.seq_lens.append(end)
            if s.samples:
                rows.logits_indices.append(len(rows.input_ids) - 1)
            if request.scores_prompt:  # every prompt position but the last scores the token after it
                for p in range(start, min(end, request.num_prompt_tokens - 1)):
                    rows.scored_rows.append(first_row + p - start)
                    rows.scored.append(PromptScore(request, p, request.prompt_token_ids[p + 1],
                                                   request.params.prompt_logprobs))
        return rows


@contextlib.contextmanager
def _default_tensor_type(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def _weight_format(model: LlamaModel, dtype: torch.dtype) -> str:
    """What the matmuls read, for logs and the fingerprint: e.g. `int4-g32+int8` or `torch.float32`."""
    layer = model.layers[0]
    formats = []
    for weight in (layer.qkv_proj, layer.o_proj, *layer.mlp_weights(), model.lm_head):
        if isinstance(weight, PackedWeight):
            name = f"int{weight.bits}" + (f"-g{weight.group_size}" if weight.bits == 4 else "")
        else:
            name = str(dtype)
        if name not in formats:
            formats.append(name)
    return "+".join(formats)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path, max_model_len: int) -> None:
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.block_size = config.block_size
        if self.device.type == "cpu":
            cpu_runtime.keep_freed_memory_for_reuse()
        self.quantization = config.resolved_quantization()
        tie = model_config.tie_word_embeddings
        with _default_tensor_type(self.device, self.dtype):
            self.model = LlamaModel(model_config, max_positions=max_model_len)
            if config.load_format == "dummy":
                state = weights.convert_state(dummy_state_dict(model_config, config.seed), self.quantization, tie)
            else:
                state = weights.load_weights(model_dir, self.quantization, tie)
            self.model.load_weights(state)
        self.weight_format = _weight_format(self.model, self.dtype)
        mc = model_config
        # One block more than the block manager hands out: it stays zero, for reads past a sequence.
        self.zero_slot = config.kv_capacity_tokens
        cache_shape = (config.num_kv_blocks + 1, config.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [
            (
                torch.zeros(cache_shape, dtype=self.dtype, device=self.device),
                torch.zeros(cache_shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(mc.num_layers)
        ]
        kv_bytes = 2 * mc.num_layers * config.kv_capacity_tokens * mc.num_kv_heads * mc.head_dim
        logger.info("weights: %s", self.weight_format)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.0f MiB)",
            config.num_kv_blocks,
            config.block_size,
            kv_bytes * self.kv_caches[0][0].element_size() / 2**20,
        )

    def prepare(self, step: SchedulerOutput) -> ForwardBatch:
        """Flatten the step's requests into one batch of tokens with their positions and cache slots,
        and plan the step's attention once for every layer, in the step's kernel mode."""
        rows = _Rows.of(step)
        max_blocks = max(len(s.request.block_table) for s in step.scheduled)
        tables = [s.request.block_table + [0] * (max_blocks - len(s.request.block_table)) for s in step.scheduled]

        def tensor(values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        block_tables = tensor(tables, torch.int32)
        token_positions = tensor(rows.positions)
        token_seqs = torch.repeat_interleave(
            torch.arange(len(rows.seq_lens), device=self.device), tensor([s.num_new_tokens for s in step.scheduled]))
        attention = kernels.AttentionMetadata(
            query_start_loc=rows.query_start_loc,
            seq_lens=rows.seq_lens,
            block_tables=block_tables,
            block_size=self.block_size,
            zero_slot=self.zero_slot,
        )
        with kernels.mode(kernel_mode(step)):
            plan = kernels.plan_attention(attention, self.model_config.num_heads, self.model_config.num_kv_heads)
        return ForwardBatch(
            input_ids=tensor(rows.input_ids),
            positions=token_positions,
            slot_mapping=kernels.cache_slots(block_tables, token_seqs, token_positions, self.block_size),
            attention=attention,
            attention_plan=plan,
            logits_indices=tensor(rows.logits_indices + rows.scored_rows),
            scored=rows.scored,
        )

    def execute(self, step: SchedulerOutput, eos_token_ids: tuple[int, ...]) -> ModelRunnerOutput:
        """Run the forward pass, sample for the requests that sample, and score prompts."""
        batch = self.prepare(step)
        sampling = [s.request for s in step.scheduled if s.samples]
        with kernels.mode(kernel_mode(step)):
            hidden = self.model(batch, self.kv_caches)
            samples = sampler.sample(self.model.compute_logits(hidden[: len(sampling)]), sampling,
                                     eos_token_ids) if sampling else []
            scores = self._score(hidden[len(sampling) :], batch.scored)
        prompt_logprobs: dict[str, list[tuple[int, TokenLogprob]]] = {}
        for score, logprob in scores:  # the logits at a position score the prompt token after it
            prompt_logprobs.setdefault(score.request.request_id, []).append((score.position + 1, logprob))
        return ModelRunnerOutput({r.request_id: sample for r, sample in zip(sampling, samples, strict=True)},
                                 prompt_logprobs)

    def _score(self, hidden: torch.Tensor, scored: list[PromptScore]) -> list[tuple[PromptScore, TokenLogprob]]:
        """Prompt logprobs of the scored rows, SCORE_ROWS rows of logits at a time (a whole prompt's
        [tokens, vocab] logits would not fit in memory for long prompts). The logits and logprobs
        are the ops a sampled token's reported logprob comes from, row by row, so in invariant mode
        scoring a token gives the bits generating it reported."""
        results: list[tuple[PromptScore, TokenLogprob]] = []
        for i in range(0, len(scored), SCORE_ROWS):
            rows = scored[i : i + SCORE_ROWS]
            logits = self.model.compute_logits(hidden[i : i + SCORE_ROWS]).float()
            results += zip(rows, sampler.token_logprobs(logits, [r.token_id for r in rows], [r.top for r in rows]))
        return results
