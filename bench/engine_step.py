"""What determinism costs end to end: the engine's decode-step time, invariant kernels vs fast.

Builds an engine on a random-weight model of a real shape (Llama-3-8B's config by default: a
config.json in a temporary folder, `load_format="dummy"`, nothing to download) and, for each
batch size, admits that many requests with distinct random prompts, runs their prefill, and then
times whole `engine.step()` calls while every request decodes: scheduling, input preparation,
the forward pass, sampling and detokenization, synchronized with the device. The same engine
serves both modes, since determinism is per request. Decode steps replay CUDA graphs on a GPU
(captured when the engine starts) unless `--enforce-eager`; each batch's first decode step is
untimed (one-time costs such as kernel compiles stay out). Prints the median step time and the
decode throughput of each mode and their ratio, a short table last; on a GPU also the weight-read
floor (the bytes a decode step must read, over the bandwidth a 1 GiB device-to-device copy
reaches) and each step time as a multiple of it.

Run from the repo root: `python -m bench.engine_step` (on a GPU; `--device cpu --config ...` for
a small model on CPU, or `--device cpu --model default` for the default model's real weights).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the repo's packages
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import SamplingParams
from detserve.engine.structured import StructuredOutput

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


@dataclass
class StepTiming:
    batch: int
    deterministic: bool
    step_ms: float  # median over the timed decode steps

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.step_ms * 1e3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode_steps(engine: LLMEngine, batch: int, prompt_tokens: int, steps: int, deterministic: bool,
                      seed: int = 0, structured: StructuredOutput | None = None) -> StepTiming:
    """Median time of `steps` engine steps in which `batch` greedy requests each decode one token
    (held to `structured`, when given, which must not end within the steps)."""
    rng = random.Random(seed)
    vocab = engine.info.vocab_size
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True, deterministic=deterministic,
                            structured=structured)
    requests = [
        engine.add_request(f"bench-{deterministic}-{batch}-{i}",
                           engine.admit([rng.randrange(vocab) for _ in range(prompt_tokens)], params))
        for i in range(batch)
    ]
    while any(r.num_output_tokens == 0 for r in requests):  # prefill, untimed
        engine.step()
    engine.step()  # the first decode step, untimed: one-time costs (kernel compiles) stay out of the timings
    device = engine.runner.device
    times = []
    for _ in range(steps):
        _synchronize(device)
        started = time.perf_counter()
        engine.step()
        _synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    for r in requests:
        engine.abort_request(r.request_id)
    return StepTiming(batch, deterministic, statistics.median(times))


def table(timings: list[StepTiming], floor_ms: float | None = None) -> str:
    """One line per batch: both modes' step times, their ratio, tokens/s, and with `floor_ms` each
    step time as a multiple of the weight-read floor."""
    floors = f" {'invariant/floor':>15} {'fast/floor':>10}" if floor_ms else ""
    lines = [f"{'batch':>5} {'invariant ms':>12} {'fast ms':>8} {'ratio':>6} {'invariant tok/s':>15} {'fast tok/s':>10}"
             + floors]
    by_key = {(t.batch, t.deterministic): t for t in timings}
    for batch in dict.fromkeys(t.batch for t in timings):
        inv, fast = by_key[(batch, True)], by_key[(batch, False)]
        line = (f"{batch:>5} {inv.step_ms:12.2f} {fast.step_ms:8.2f} {inv.step_ms / fast.step_ms:6.2f}"
                f" {inv.tokens_per_second:15.0f} {fast.tokens_per_second:10.0f}")
        if floor_ms:
            line += f" {inv.step_ms / floor_ms:15.2f} {fast.step_ms / floor_ms:10.2f}"
        lines.append(line)
    return "\n".join(lines)


def weight_bytes(engine: LLMEngine) -> int:
    """Bytes every decode step reads whatever its batch: the layers' weights and norms, the final
    norm and the LM head (the embedding gives only the batch's rows)."""
    model, tensors = engine.runner.model, {}

    def add(value: object) -> None:
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, torch.Tensor):
                tensors[t.data_ptr()] = t.numel() * t.element_size()

    for holder in (*model.layers, model):
        for name, value in vars(holder).items():
            if name not in ("embed_tokens", "cos_sin"):
                add(value)
        for name, param in holder.named_parameters(recurse=holder is not model):
            add(param)
    add(model.lm_head)
    return sum(tensors.values())


def weight_read_floor_ms(engine: LLMEngine) -> float:
    """The fastest a decode step could be on this GPU: its weight bytes read once at the bandwidth
    a 1 GiB device-to-device copy reaches (`bench.kernels.measured_bandwidth_gbs`)."""
    from bench.kernels import measured_bandwidth_gbs

    bandwidth, read = measured_bandwidth_gbs(), weight_bytes(engine)
    floor = read / bandwidth / 1e6
    print(f"weights read per decode step: {read / 2**30:.2f} GiB; copy bandwidth {bandwidth:.0f} GB/s;"
          f" floor {floor:.2f} ms", flush=True)
    return floor


def run(config_json: dict | None, device: str, dtype: str, batch_sizes: list[int], prompt_tokens: int, steps: int,
        model: str | None = None, quantization: str = "auto", enforce_eager: bool = False
        ) -> tuple[list[StepTiming], float | None]:
    """Time each batch size in both modes, on `config_json` with random weights, or else on `model`;
    with the weight-read floor in ms on a GPU (None on CPU)."""
    with tempfile.TemporaryDirectory() as folder:
        if config_json is not None:
            (Path(folder) / "config.json").write_text(json.dumps(config_json))
        engine = LLMEngine(EngineConfig(
            model=folder if config_json is not None else model, load_format="dummy" if config_json else "auto",
            device=device, dtype=dtype, quantization=quantization,
            kv_cache_tokens=max(batch_sizes) * (prompt_tokens + steps + 16), max_num_seqs=max(batch_sizes),
            max_num_batched_tokens=max(2048, max(batch_sizes)), enable_prefix_caching=False,
            enforce_eager=enforce_eager,
        ))
        floor_ms = weight_read_floor_ms(engine) if engine.runner.device.type == "cuda" else None
        timings = []
        for batch in batch_sizes:
            for deterministic in (True, False):
                timings.append(time_decode_steps(engine, batch, prompt_tokens, steps, deterministic))
                print(f"batch {batch:>4} {'invariant' if deterministic else 'fast':>9}: {timings[-1].step_ms:.2f} ms/step",
                      flush=True)
        assert not engine.has_unfinished_requests()
        if engine.runner.device.type == "cuda":
            graphs = engine.runner.graphs
            print(f"CUDA graphs: {len(graphs.graphs)} captured, batch buckets {graphs.buckets}" if graphs is not None
                  else "CUDA graphs: none, every step eager")
    return timings, floor_ms


def where_and_how(device: str, enforce_eager: bool) -> str:
    """The device a number came from, and whether its decode steps replayed CUDA graphs."""
    if not device.startswith("cuda"):
        return f"cpu, {torch.get_num_threads()} threads, eager steps"
    return f"{torch.cuda.get_device_name()}, {'eager steps' if enforce_eager else 'CUDA graphs'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="a model config.json, random weights (default: Llama-3-8B's)")
    parser.add_argument("--model", help="real weights instead: a folder or .gguf, or `default` for the default model")
    parser.add_argument("--quantization", default="auto", help="as `detserve serve --quantization` (default: auto)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,16,64,256", help="(default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch and mode (default: %(default)s)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every step eager")
    args = parser.parse_args(argv)
    config_json = json.loads(args.config.read_text()) if args.config else None if args.model else LLAMA3_8B
    model = None if args.model in (None, "default") else args.model
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench.engine_step: no CUDA device (use --device cpu with a small --config)")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    timings, floor_ms = run(config_json, args.device, args.dtype, batch_sizes, args.prompt_tokens, args.steps, model,
                            args.quantization, args.enforce_eager)
    what = (f"{config_json['hidden_size']}-wide x {config_json['num_hidden_layers']} layers" if config_json
            else args.model)
    print(f"\n== engine decode step, {what}, {args.dtype}, quantization {args.quantization},"
          f" {args.prompt_tokens}-token prompts, {where_and_how(args.device, args.enforce_eager)} ==")
    print(table(timings, floor_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
