"""What a structured output costs per engine step: decode steps with every request held to a JSON
schema (the grammar mask computed, copied and applied each step) against the same steps unconstrained.

In-process, on the default model (or `--model`), deterministic requests, batch 1 and 8 by default;
the schema is an array of small objects, long enough that no request finishes inside the timed
steps. Prints ms per step and tokens/s side by side, and their ratio.

Run from the repo root: `python -m bench.structured_outputs`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the repo's packages
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench.engine_step import time_decode_steps
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.structured import StructuredOutput

ITEMS = {  # an array of records: every step is inside some string, number or enum of the grammar
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "score": {"type": "integer", "minimum": 0, "maximum": 1000},
            "kind": {"enum": ["alpha", "beta", "gamma"]},
        },
        "required": ["name", "score", "kind"],
        "additionalProperties": False,
    },
    "minItems": 200,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.structured_outputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a folder or .gguf (default: the default model)")
    parser.add_argument("--batch-sizes", default="1,8", help="(default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per cell (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table shows the median")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    engine = LLMEngine(EngineConfig(model=args.model, enable_prefix_caching=False, max_num_seqs=max(batches)))
    schema = StructuredOutput.of("json", ITEMS)
    runs: dict[tuple[int, bool], list[float]] = {}
    for round_ in range(args.rounds):
        for batch in batches:
            for constrained in (False, True):
                timing = time_decode_steps(engine, batch, args.prompt_tokens, args.steps, deterministic=True,
                                           seed=round_, structured=schema if constrained else None)
                runs.setdefault((batch, constrained), []).append(timing.step_ms)
    print(f"\n== structured outputs, {engine.info.name}, deterministic, {args.prompt_tokens}-token prompts,"
          f" cpu {torch.get_num_threads()} threads, median of {args.rounds} rounds ==")
    print(f"{'batch':>5} {'plain ms':>9} {'json ms':>8} {'plain tok/s':>11} {'json tok/s':>10} {'json / plain':>12}")
    for batch in batches:
        plain, json_ = (sorted(runs[(batch, c)])[len(runs[(batch, c)]) // 2] for c in (False, True))
        print(f"{batch:>5} {plain:9.2f} {json_:8.2f} {batch / plain * 1e3:11.1f} {batch / json_ * 1e3:10.1f}"
              f" {plain / json_:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
