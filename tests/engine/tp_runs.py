"""One tensor-parallel engine's answers to a fixed set of requests, printed as JSON (the test runs it
once per TP size, each in a process of its own, and compares the bits).

    python -m tests.engine.tp_runs --tp 2 --splits 4 [--model DIR --load-format dummy --quantization int4]

The requests: greedy and seeded probes alone; the same probes again amid other requests arriving
step after step (continuous batching, chunked prefill through a small token budget, prefix-cache
hits on the repeated probe prompt, preemption in a KV cache of 10 blocks); a prompt scored with
prompt logprobs; and a fast-mode request, whose answer is compared within a tolerance, not bit
for bit.
"""

from __future__ import annotations

import argparse
import json

import torch

from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import Request, SamplingParams

PROBE = [(7 * i + 3) % 97 + 1 for i in range(40)]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, seed=77, logprobs=2, ignore_eos=True)
SCORED = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2, ignore_eos=True)
FAST = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True, deterministic=False)


def bits(request: Request) -> dict:
    """Token ids and every logprob as exact hex floats (equal strings = equal bits)."""
    return {
        "ids": request.output_token_ids,
        "logprobs": [[lp.token_id, float(lp.logprob).hex(), [[t, float(v).hex()] for t, v in lp.top]]
                     for lp in request.output_logprobs],
        "prompt_logprobs": [None if lp is None else [lp.token_id, float(lp.logprob).hex()]
                            for lp in request.prompt_logprobs or []],
    }


def amid_load(engine: LLMEngine) -> list[Request]:
    """The probes submitted among five other requests that arrive one step apart."""
    others = [[(13 * i + j) % 89 + 2 for i in range(5 + 9 * j)] for j in range(5)]
    probes = [engine.add_request(f"probe-{i}", engine.admit(PROBE, params)) for i, params in
              enumerate((GREEDY, SEEDED))]
    for j, ids in enumerate(others):
        engine.add_request(f"other-{j}", engine.admit(ids, SamplingParams(max_tokens=6 + j, temperature=0.5,
                                                                          seed=j, ignore_eos=True)))
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    return probes


def run(config: EngineConfig) -> dict:
    engine = LLMEngine(config)
    try:
        alone = [bits(engine.generate([PROBE], params)[0]) for params in (GREEDY, SEEDED)]
        loaded = [bits(r) for r in amid_load(engine)]
        scored = bits(engine.generate([PROBE[:30]], SCORED)[0])
        fast = engine.generate([PROBE], FAST)[0]
        return {"alone": alone, "amid_load": loaded, "scored": scored,
                "fast_ids": fast.output_token_ids, "fast_logprobs": [lp.logprob for lp in fast.output_logprobs],
                "fingerprint": engine.info.fingerprint(True),
                "prefix_cache_hits": engine.stats().prefix_cache_hits,
                "preemptions": engine.stats().num_preemptions}
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--splits", type=int, required=True)
    parser.add_argument("--model")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--quantization", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)  # every rank alike, on a small machine
    config = EngineConfig(model=args.model, load_format=args.load_format, quantization=args.quantization,
                          tensor_parallel_size=args.tp, tp_invariant_splits=args.splits, kv_cache_tokens=160,
                          max_num_batched_tokens=24)
    print("RESULT " + json.dumps(run(config)))


if __name__ == "__main__":
    main()
