"""How close the 4/8-bit served model stays to its float32 dequantization.

For each prompt, the float32 engine (`--quantization none`: the same GGUF dequantized) generates
64 greedy tokens. The quantized engine (`auto`: Q4_1 blocks on the C 4-bit matmul with 16-bit
activations, or torch's int4 kernel with bfloat16 activations under `--cpu-kernels torch`; the Q8_0
head on torch's int8 kernel) then reads that same sequence (teacher forcing),
and the table reports, per prompt: how many of its 64 greedy choices agree with float32's, the
mean absolute difference of the chosen token's logprob, and how many tokens its own free-running
greedy output shares with float32's before they part. The float32 side runs the torch row ops; the
quantized side runs `--cpu-kernels` (default: the C ops where they build), so the table shows what
the served arithmetic as a whole costs. Run: `python -m bench.quantization_quality`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import torch

from detserve.kernels import cpu_native
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import Request, SamplingParams
from detserve.engine.scheduler import ScheduledRequest, SchedulerOutput

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that reverses a string.",
]


def sequence_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """float32 logits at every position of `token_ids` (one prefill), in invariant mode: [T, V]."""
    request = Request("quality-probe", token_ids, SamplingParams(), True, seed=0)
    engine.block_manager.allocate(request, len(token_ids))
    try:
        step = SchedulerOutput([ScheduledRequest(request, 0, len(token_ids), True)], True, [])
        batch = engine.runner.prepare(step)
        batch.logits_indices = torch.arange(len(token_ids))
        with engine.runner.kernel_mode("invariant"):
            return engine.runner.model.compute_logits(engine.runner.model(batch, engine.runner.kv_caches))
    finally:
        engine.block_manager.free(request)


@dataclass
class PromptQuality:
    greedy_agreement: int  # of the float path's tokens, how many the quantized model also picks (teacher forced)
    mean_logprob_diff: float  # mean |logprob_quantized - logprob_float| of the float path's tokens
    common_prefix: int  # tokens the two free-running greedy outputs share before they differ
    num_tokens: int


def compare(float_engine: LLMEngine, quant_engine: LLMEngine, prompt: list[int], num_tokens: int) -> PromptQuality:
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    [ref] = float_engine.generate([prompt], params)
    [ours] = quant_engine.generate([prompt], params)
    full = prompt + ref.output_token_ids
    rows = slice(len(prompt) - 1, len(full) - 1)  # the positions that predict each generated token
    chosen = torch.tensor(ref.output_token_ids)[:, None]
    lp_float = torch.log_softmax(sequence_logits(float_engine, full)[rows].double(), -1)
    lp_quant = torch.log_softmax(sequence_logits(quant_engine, full)[rows].double(), -1)
    agreement = int((lp_quant.argmax(-1) == chosen[:, 0]).sum())
    diff = float((lp_quant.gather(1, chosen) - lp_float.gather(1, chosen)).abs().mean())
    prefix = next((i for i, (a, b) in enumerate(zip(ref.output_token_ids, ours.output_token_ids)) if a != b), num_tokens)
    return PromptQuality(agreement, diff, prefix, num_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantization_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF file or folder (default: the default model)")
    parser.add_argument("--quantization", default="auto", help="the quantized side (default: auto)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt (default: %(default)s)")
    parser.add_argument("--tp-invariant-splits", type=int, default=1,
                        help="K-splits S of the quantized side's row-parallel matmuls, each partial rounded to "
                             "the kernel's bfloat16 output (default: %(default)s, one call over all inputs)")
    parser.add_argument("--cpu-kernels", default="auto", choices=("auto", "native", "torch"),
                        help="the quantized side's row ops and attention (default: %(default)s)")
    args = parser.parse_args(argv)
    float_engine = LLMEngine(EngineConfig(model=args.model, quantization="none", kv_cache_tokens=4096,
                                          cpu_kernels="torch"))
    quant_engine = LLMEngine(EngineConfig(model=args.model, quantization=args.quantization, kv_cache_tokens=4096,
                                          tp_invariant_splits=args.tp_invariant_splits, cpu_kernels=args.cpu_kernels))
    with quant_engine.runner.kernel_mode("invariant"):
        served = cpu_native.backend_digest()
    print(f"== {quant_engine.info.name}: {quant_engine.runner.weight_format} (S = {args.tp_invariant_splits}, {served})"
          f" vs {float_engine.runner.weight_format} (cpu-torch), {args.tokens} greedy tokens per prompt ==")
    print(f"{'prompt':52} {'agree':>7} {'|dlogprob|':>10} {'same prefix':>11}")
    results = []
    for text in PROMPTS:
        prompt = quant_engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])
        r = compare(float_engine, quant_engine, prompt, args.tokens)
        results.append(r)
        print(f"{text[:50]:52} {r.greedy_agreement:>4}/{r.num_tokens:<2} {r.mean_logprob_diff:10.4f} {r.common_prefix:>11}")
    total = sum(r.num_tokens for r in results)
    print(f"{'all':52} {sum(r.greedy_agreement for r in results) / total:7.1%}"
          f" {statistics.mean(r.mean_logprob_diff for r in results):10.4f}"
          f" {statistics.mean(r.common_prefix for r in results):11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
