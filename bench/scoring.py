"""What scoring a prompt costs: a 1,000-token prompt's prompt logprobs against its plain prefill.

In-process on the default model (or `--model`), deterministic, prefix caching off: the time to
prefill the prompt and sample one token (what any request pays), to score it (`max_tokens` 0,
`prompt_logprobs` 0: logits and log-softmax at every position, 64 rows at a time), and to score
it with 5 alternatives per position. Median of `--rounds` alternating rounds.

Run from the repo root: `python -m bench.scoring`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the repo's packages
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import SamplingParams

CASES = {
    "prefill + 1 token": SamplingParams(max_tokens=1, temperature=0.0),
    "score (prompt_logprobs 0)": SamplingParams(max_tokens=0, prompt_logprobs=0),
    "score (prompt_logprobs 5)": SamplingParams(max_tokens=0, prompt_logprobs=5),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a folder or .gguf (default: the default model)")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    engine = LLMEngine(EngineConfig(model=args.model, enable_prefix_caching=False))
    rng = random.Random(0)
    prompt = [rng.randrange(200, min(40000, engine.info.vocab_size)) for _ in range(args.prompt_tokens)]
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, params in CASES.items():
            started = time.perf_counter()
            [request] = engine.generate([prompt], params)
            times[name].append(time.perf_counter() - started)
            assert request.prompt_logprobs is None or len(request.prompt_logprobs) == len(prompt)
    base = statistics.median(times["prefill + 1 token"])
    print(f"\n== scoring a {args.prompt_tokens}-token prompt, {engine.info.name}, deterministic, "
          f"cpu {torch.get_num_threads()} threads, median of {args.rounds} rounds ==")
    print(f"{'case':<27} {'seconds':>8} {'prompt tok/s':>12} {'/ prefill':>9}")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"{name:<27} {seconds:8.3f} {args.prompt_tokens / seconds:12.0f} {seconds / base:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
