"""Servers for the benchmark tests: the controllable fake (in-process) and a real `detserve serve` (subprocess)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Callable, Iterator

import httpx2
import pytest
import uvicorn

from detserve.server.bench.common import free_port, launched
from tests.bench.fake_server import FakeServer

@pytest.fixture(scope="session")
def _fake_server() -> Iterator[FakeServer]:
    fake = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    _wait_healthy(fake.url.removesuffix("/v1"), timeout=120, alive=thread.is_alive)
    yield fake
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def fake(_fake_server: FakeServer) -> FakeServer:
    """The fake with default behaviour, after the last test's aborted requests have left it."""
    deadline = time.monotonic() + 120
    while _fake_server.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    return _fake_server.reset()


@pytest.fixture(scope="session")
def detserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `detserve serve` on the default model, as users start it; its /v1 base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("detserve") / "server.log"
    with launched([sys.executable, "-m", "detserve.server", "serve", "--host", "127.0.0.1", "--port", str(port)], port, log,
                  timeout=300):
        yield f"http://127.0.0.1:{port}/v1"


def _wait_healthy(url: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Until the in-process fake answers /health (its thread must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx2.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        assert alive(), f"the server at {url} exited before it was healthy"
        assert time.monotonic() < deadline, f"{url}/health not 200 after {timeout} s"
        time.sleep(0.3)
