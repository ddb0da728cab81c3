"""`detserve serve ...`: command-line flags -> EngineConfig -> the app under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from bench import determinism as bench_determinism
from bench import serve as bench_serve
from engine.config import EngineConfig
from server.app import create_app

logger = logging.getLogger("detserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detserve", description="OpenAI-compatible LLM server with bitwise-reproducible temperature-0 answers"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over HTTP")
    serve.add_argument("--model", help="Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--device", default=EngineConfig.device, help="auto | cpu | cuda[:N] (default: %(default)s)")
    serve.add_argument("--dtype", default=EngineConfig.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto = float32 on CPU, bfloat16 on GPU (default: %(default)s)")
    serve.add_argument("--determinism", default="on", choices=["on", "off"],
                       help="whether requests that do not say otherwise get bitwise-reproducible answers (default: on)")
    serve.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                       help="most requests running at once (default: %(default)s)")
    serve.add_argument("--kv-cache-tokens", type=int, default=EngineConfig.kv_cache_tokens,
                       help="KV cache size in tokens (default: %(default)s)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                       help="token budget of one step (default: %(default)s)")
    serve.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    serve.add_argument("--served-model-name", help="the model id clients send (default: from the model's file name)")
    serve.add_argument("--load-format", default=EngineConfig.load_format, choices=["auto", "dummy"],
                       help="dummy = random weights, for testing (default: %(default)s)")
    serve.add_argument("--api-key", help="require `Authorization: Bearer <key>` on /v1 (default: $DETSERVE_API_KEY)")
    _defaults_from_environment(serve)
    bench = commands.add_parser("bench", help="benchmarks against any OpenAI-compatible server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    for name, module in (("determinism", bench_determinism), ("serve", bench_serve)):
        sub = kinds.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _defaults_from_environment(parser: argparse.ArgumentParser) -> None:
    """Every `--some-flag` defaults to $DETSERVE_SOME_FLAG when set (containers configure by env)."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = "DETSERVE_" + action.dest.upper()
        value = os.environ.get(name)
        if value is None:
            continue
        if action.choices and value not in action.choices:
            parser.error(f"${name}={value!r}: expected one of {', '.join(action.choices)}")
        parser.set_defaults(**{action.dest: action.type(value) if action.type else value})


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        device=args.device,
        dtype=args.dtype,
        kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        default_deterministic=args.determinism == "on",
        served_model_name=args.served_model_name,
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        sys.exit(args.run(args))
    api_key = args.api_key
    if args.model and not Path(args.model).exists():  # fail now, not as a 503 after startup
        parser.error(f"--model {args.model}: no such file or folder")
    try:
        config = engine_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info(
        "loading %s on %s (%s), %s kernels by default%s",
        config.model or "the default model",
        config.torch_device(),
        str(config.torch_dtype()).removeprefix("torch."),
        "invariant" if config.default_deterministic else "fast",
        "; API key required on /v1" if api_key else "",
    )
    logger.info("serving at http://%s:%d/v1 (GET /health turns 200 once the model is loaded)", args.host, args.port)
    uvicorn.run(create_app(config, api_key=api_key), host=args.host, port=args.port, log_level="info")
