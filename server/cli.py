"""`detserve serve ...`: command-line flags -> EngineConfig -> the app under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from bench import determinism as bench_determinism
from bench import serve as bench_serve
from bench import soak as bench_soak
from engine.config import QUANTIZATIONS, EngineConfig
from engine.async_engine import AsyncEngine
from server.app import ServerConfig, create_app
from server.metrics import InFlight

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
    serve.add_argument("--quantization", default=EngineConfig.quantization, choices=list(QUANTIZATIONS),
                       help="auto = as stored (a GGUF's Q4_0/Q4_1/Q8_0 blocks run on the CPU's 4/8-bit kernels; "
                            "float on a GPU); none = float weights; int8/int4 = quantize a float checkpoint's "
                            "linear weights at load, once, cached on disk (CPU only) (default: %(default)s)")
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
    serve.add_argument("--protect-metrics", action="store_true", help="require the API key on /metrics too")
    serve.add_argument("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes,
                       help="largest request body accepted; more is a 413 (default: %(default)s)")
    serve.add_argument("--max-n", type=int, default=ServerConfig.max_n,
                       help="most choices (n) per request (default: %(default)s)")
    serve.add_argument("--max-prompt-tokens", type=int,
                       help="longest prompt accepted, in tokens (default: whatever fits the context window)")
    serve.add_argument("--max-waiting-requests", type=int, default=ServerConfig.max_waiting_requests,
                       help="requests queued behind the running batch before new ones get 429 (default: %(default)s)")
    serve.add_argument("--drain-timeout", type=float, default=ServerConfig.drain_timeout,
                       help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    serve.add_argument("--log-prompts", action="store_true", help="put prompt text in the request log lines")
    _defaults_from_environment(serve)
    bench = commands.add_parser("bench", help="benchmarks against any OpenAI-compatible server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    for name, module in (("determinism", bench_determinism), ("serve", bench_serve), ("soak", bench_soak)):
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
        if isinstance(action, argparse._StoreTrueAction):
            if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                parser.error(f"${name}={value!r}: expected true or false")
            parser.set_defaults(**{action.dest: value.lower() in ("1", "true", "yes", "on")})
            continue
        try:
            parser.set_defaults(**{action.dest: action.type(value) if action.type else value})
        except ValueError:
            parser.error(f"${name}={value!r}: not a valid {action.type.__name__}")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        default_deterministic=args.determinism == "on",
        served_model_name=args.served_model_name,
    )


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        api_key=args.api_key or None,
        protect_metrics=args.protect_metrics,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        max_prompt_tokens=args.max_prompt_tokens,
        max_waiting_requests=args.max_waiting_requests,
        drain_timeout=args.drain_timeout,
        log_prompts=args.log_prompts,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM (or Ctrl-C) drains before it stops: see `drain`. A second signal stops at once.

    uvicorn's own handler closes the listening socket at once and re-raises the signal after
    shutdown (so the exit status would be 143); this one keeps answering, with 503s for new work,
    until in-flight requests are done, then shuts down and returns normally (exit status 0).
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.engine: AsyncEngine = app.state.engine
        self.in_flight: InFlight = app.state.in_flight
        self.drain_timeout: float = app.state.config.drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.in_flight.draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self.in_flight.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, reason: str) -> None:
        self._drain_task = asyncio.create_task(self.drain(reason))

    async def drain(self, reason: str) -> None:
        """Wait for in-flight requests up to the drain timeout, abort what is left, then shut down."""
        started = time.monotonic()
        logger.info("%s: draining %d in-flight requests (up to %.0f s); new requests get 503",
                    reason, self.in_flight.count, self.drain_timeout)
        if not await self._wait_idle(self.drain_timeout):
            logger.warning("drain timeout: aborting %d requests still in flight", self.in_flight.count)
            self.engine.abort_all()
            await self._wait_idle(5.0)
        logger.info("drained in %.1f s; shutting down", time.monotonic() - started)
        self.should_exit = True

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.in_flight.count > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def configure_logging() -> None:
    """Operational messages on stderr; request log lines on stdout as bare JSON, one per line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    requests = logging.getLogger("detserve.requests")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    requests.addHandler(handler)
    requests.propagate = False


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        sys.exit(args.run(args))
    if args.model and not Path(args.model).exists():  # fail now, not as a 503 after startup
        parser.error(f"--model {args.model}: no such file or folder")
    try:
        config = engine_config(args)
        options = server_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging()
    logger.info(
        "loading %s on %s (%s), %s kernels by default%s",
        config.model or "the default model",
        config.torch_device(),
        str(config.torch_dtype()).removeprefix("torch."),
        "invariant" if config.default_deterministic else "fast",
        "; API key required on /v1" if options.api_key else "",
    )
    logger.info("serving at http://%s:%d/v1 (GET /health turns 200 once the model is loaded)", args.host, args.port)
    app = create_app(config, options)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                               timeout_graceful_shutdown=5)
    DrainingServer(uv_config, app).run()
