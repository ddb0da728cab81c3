"""Drive one probe request through hand-built engine steps amid company, and return its logits.

Shared by the whole-model invariance tests: the GPU one (a random-weight Llama-3-8B) and the
interpreter one (a tiny model on the Triton kernels).
"""

from __future__ import annotations

import random

import torch

from detserve import kernels
from detserve.engine.request import Request, SamplingParams
from detserve.engine.scheduler import ScheduledRequest, SchedulerOutput


def step_logits(engine, work: list[tuple[object, int, int]]) -> torch.Tensor:
    """One invariant forward over (request, start, num_tokens) chunks; the last row's logits of each."""
    for request, start, n in work:
        engine.block_manager.allocate(request, start + n)
    step = SchedulerOutput([ScheduledRequest(r, start, n, True) for r, start, n in work], True, [])
    batch = engine.runner.prepare(step)
    with kernels.mode("invariant"):
        logits = engine.runner.model.compute_logits(engine.runner.model(batch, engine.runner.kv_caches))
    for request, start, n in work:
        request.num_computed_tokens = start + n
    return logits


def _requests(prefix: str, prompts: list[list[int]]) -> list[Request]:
    return [Request(f"{prefix}{i}", p, SamplingParams(), True, seed=0) for i, p in enumerate(prompts)]


def probe_logits(engine, prompt: list[int], num_others: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the probe's prompt and of its first decode step, amid `num_others` other requests.

    With company, the probe's prompt goes in two chunks (the first beside the others' prefills,
    the second beside their decodes) and its decode step sits at a random row among their decodes.
    """
    rng = random.Random(seed)
    vocab = engine.runner.model_config.vocab_size
    [probe] = _requests(f"probe{seed}-", [prompt])
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(num_others)]
    others = _requests(f"other{seed}-", prompts)
    try:
        if num_others == 0:
            prefill = step_logits(engine, [(probe, 0, len(prompt))])[-1]
        else:
            cut = rng.randint(1, len(prompt) - 1)
            step_logits(engine, [(probe, 0, cut)] + [(o, 0, o.num_prompt_tokens) for o in others])
            for o in others:
                o.output_token_ids.append(rng.randrange(vocab))
            work = [(o, o.num_computed_tokens, 1) for o in others]
            position = rng.randint(0, len(work))
            work.insert(position, (probe, cut, len(prompt) - cut))
            prefill = step_logits(engine, work)[position]
        probe.output_token_ids.append(int(prefill.argmax()))
        for o in others:
            o.output_token_ids.append(rng.randrange(vocab))
        work = [(o, o.num_computed_tokens, 1) for o in others]
        position = rng.randint(0, len(work))
        work.insert(position, (probe, len(prompt), 1))
        decode = step_logits(engine, work)[position]
    finally:
        for request in [probe] + others:
            engine.block_manager.free(request)
    return prefill, decode
