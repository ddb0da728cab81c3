"""`detserve serve ...`: command-line flags -> EngineConfig and ServerConfig -> the app under uvicorn.

The flags are derived from the two config dataclasses (`engine.config.option` declares each one).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
import types
import typing
from pathlib import Path
from types import FrameType
from typing import Literal

import uvicorn
from fastapi import FastAPI

from detserve.server.bench import determinism as bench_determinism
from detserve.server.bench import serve as bench_serve
from detserve.server.bench import soak as bench_soak
from detserve.engine.config import EngineConfig
from detserve.engine.workers import Rendezvous, serve_as_worker
from detserve.engine.async_engine import AsyncEngine
from detserve.server.app import ServerConfig, create_app
from detserve.server.metrics import InFlight

logger = logging.getLogger("detserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detserve", description="OpenAI-compatible LLM server with bitwise-reproducible temperature-0 answers"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    for config_class in (EngineConfig, ServerConfig):
        _add_config_options(serve, config_class)
    _defaults_from_environment(serve)
    bench = commands.add_parser("bench", help="benchmarks against any OpenAI-compatible server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    for name, module in (("determinism", bench_determinism), ("serve", bench_serve), ("soak", bench_soak)):
        sub = kinds.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One option per field of a config dataclass declared with `engine.config.option`: the flag is
    the field's name (or its `flag`), its type, default, choices and help come from the field."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if "help" not in f.metadata:
            continue
        meta, kind = f.metadata, _without_none(hints[f.name])
        flag = "--" + meta.get("flag", f.name).replace("_", "-")
        if "words" in meta:
            word = next(w for w, value in meta["words"].items() if value == f.default)
            parser.add_argument(flag, dest=f.name, default=word, choices=list(meta["words"]),
                                help=f"{meta['help']} (default: %(default)s)")
        elif kind is bool:
            parser.add_argument(flag, dest=f.name, default=f.default, action=argparse.BooleanOptionalAction,
                                help=f"{meta['help']} (default: {'on' if f.default else 'off'})")
        else:
            choices = meta.get("choices") or (typing.get_args(kind) if typing.get_origin(kind) is Literal else None)
            text = meta["help"] if f.default is None else f"{meta['help']} (default: %(default)s)"
            parser.add_argument(flag, dest=f.name, default=f.default, choices=choices, help=text,
                                type=str if choices or typing.get_origin(kind) is Literal else kind)


def _without_none(kind: object) -> object:
    """`int | None` -> int; other types as they are."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind


def _config_from_args(config_class: type, args: argparse.Namespace) -> object:
    """The config the parsed flags describe (mapping a flag's words back to field values)."""
    values = {}
    for f in dataclasses.fields(config_class):
        if "help" in f.metadata:
            value = getattr(args, f.name)
            values[f.name] = f.metadata["words"][value] if "words" in f.metadata else value
    return config_class(**values)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return _config_from_args(EngineConfig, args)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return _config_from_args(ServerConfig, args)


def _defaults_from_environment(parser: argparse.ArgumentParser) -> None:
    """Every `--some-flag` defaults to $DETSERVE_SOME_FLAG when set (containers configure by env)."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = "DETSERVE_" + action.option_strings[0].removeprefix("--").replace("-", "_").upper()
        value = os.environ.get(name)
        if value is None:
            continue
        if action.choices and value not in action.choices:
            parser.error(f"${name}={value!r}: expected one of {', '.join(action.choices)}")
        if isinstance(action, argparse.BooleanOptionalAction):
            if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                parser.error(f"${name}={value!r}: expected true or false")
            parser.set_defaults(**{action.dest: value.lower() in ("1", "true", "yes", "on")})
            continue
        try:
            parser.set_defaults(**{action.dest: action.type(value) if action.type else value})
        except ValueError:
            parser.error(f"${name}={value!r}: not a valid {action.type.__name__}")


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

    @property
    def load_error(self) -> BaseException | None:
        """Why the model never loaded (None while it loads, once it has, or if it failed later)."""
        return self.engine.error if self.engine.engine is None else None

    async def on_tick(self, counter: int) -> bool:
        """Stop when the model failed to load: the process exits non-zero (see `main`), so a shell
        user sees why at once and an orchestrator's restart policy takes over, as with vLLM."""
        return self.load_error is not None or await super().on_tick(counter)

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
    rendezvous = Rendezvous.from_environment()
    if config.tensor_parallel_size > 1 and rendezvous is not None and rendezvous.rank != 0:
        logger.info("rank %d of %d: a tensor-parallel worker of the server at rank 0 (%s:%d)",
                    rendezvous.rank, rendezvous.size, rendezvous.address, rendezvous.port)
        serve_as_worker(config, rendezvous)
        return
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
    server = DrainingServer(uv_config, app)
    server.run()
    if server.load_error is not None:
        print(f"detserve: the model failed to load: {server.load_error}", file=sys.stderr)
        sys.exit(1)
