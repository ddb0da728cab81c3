"""Servers for the benchmark tests: the controllable fake (in-process) and a real `detserve serve` (subprocess)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx2
import pytest
import uvicorn

from tests.bench.fake_server import FakeServer

REPO = Path(__file__).resolve().parents[2]


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("detserve") / "server.log"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", timeout=300, alive=lambda: proc.poll() is None, log=log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(url: str, timeout: float, alive: Callable[[], bool], log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx2.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        tail = log.read_text()[-3000:] if log else ""
        assert alive(), f"the server at {url} exited before it was healthy:\n{tail}"
        assert time.monotonic() < deadline, f"{url}/health not 200 after {timeout} s:\n{tail}"
        time.sleep(0.3)
