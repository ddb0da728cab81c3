"""Owns the model and its KV cache on the device; turns a scheduled step into sampled tokens."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
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
class StepResults:
    samples: list[tuple[int, TokenLogprob | None]]  # (token, logprob) per request that samples, in order
    scores: list[tuple[PromptScore, TokenLogprob]]  # each scored prompt position and its next token's logprob


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
    for weight in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj, model.lm_head):
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
        """Flatten the step's requests into one batch of tokens with their positions and cache slots."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        scored_rows: list[int] = []
        scored: list[PromptScore] = []
        bs = self.block_size
        for s in step.scheduled:
            request, start, end = s.request, s.start, s.start + s.num_new_tokens
            first_row = len(input_ids)
            input_ids.extend(request.token_ids(start, end))
            positions.extend(range(start, end))
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            if s.samples:
                logits_indices.append(len(input_ids) - 1)
            if request.scores_prompt:  # every prompt position but the last scores the token after it
                for p in range(start, min(end, request.num_prompt_tokens - 1)):
                    scored_rows.append(first_row + p - start)
                    scored.append(PromptScore(request, p, request.prompt_token_ids[p + 1],
                                              request.params.prompt_logprobs))
        max_blocks = max(len(s.request.block_table) for s in step.scheduled)
        tables = [s.request.block_table + [0] * (max_blocks - len(s.request.block_table)) for s in step.scheduled]

        def tensor(values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        block_tables = tensor(tables, torch.int32)
        token_positions = tensor(positions)
        token_seqs = torch.repeat_interleave(
            torch.arange(len(seq_lens), device=self.device), tensor([s.num_new_tokens for s in step.scheduled]))
        return ForwardBatch(
            input_ids=tensor(input_ids),
            positions=token_positions,
            slot_mapping=kernels.cache_slots(block_tables, token_seqs, token_positions, bs),
            attention=kernels.AttentionMetadata(
                query_start_loc=query_start_loc,
                seq_lens=seq_lens,
                block_tables=block_tables,
                block_size=bs,
                zero_slot=self.zero_slot,
            ),
            logits_indices=tensor(logits_indices + scored_rows),
            scored=scored,
        )

    def execute(self, step: SchedulerOutput, eos_token_ids: tuple[int, ...]) -> StepResults:
        """Run the forward pass, sample for the requests that sample (in order), and score prompts."""
        batch = self.prepare(step)
        sampling = [s.request for s in step.scheduled if s.samples]
        with kernels.mode("invariant" if step.invariant else "fast"):
            hidden = self.model(batch, self.kv_caches)
            samples = sampler.sample(self.model.compute_logits(hidden[: len(sampling)]), sampling,
                                     eos_token_ids) if sampling else []
            scores = self._score(hidden[len(sampling) :], batch.scored)
        return StepResults(samples, scores)

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
