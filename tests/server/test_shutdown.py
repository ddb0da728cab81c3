"""SIGTERM on a real `detserve serve` process: drain in-flight work, turn new work away, exit 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest


REPO = Path(__file__).parents[2]
pytestmark = pytest.mark.slow


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    stdout: Path
    stderr: Path

    def exit_code(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.read_text().splitlines() if line.startswith("{")]


def start_server(tmp_path: Path, *flags: str) -> ServerProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "detserve.server", "serve", "--port", str(port), *flags],
        cwd=REPO, stdout=stdout.open("w"), stderr=stderr.open("w"),
    )
    return wait_until_healthy(ServerProcess(process, f"http://127.0.0.1:{port}", stdout, stderr))


def wait_until_healthy(server: ServerProcess) -> ServerProcess:
    deadline = time.monotonic() + 180
    while True:
        assert server.process.poll() is None, f"the server exited: {server.stderr.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the server did not become healthy in 180 s"
        try:
            if httpx2.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx2.TransportError:
            pass
        time.sleep(0.2)


@dataclass
class StreamInBackground:
    """A streamed completion read on a thread; `started` is set at the first event."""

    url: str
    body: dict
    lines: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.started.wait(300), "the stream never started"

    def _read(self) -> None:
        with httpx2.stream("POST", self.url + "/v1/completions", json=self.body, timeout=300) as response:
            for line in response.iter_lines():
                if line:
                    self.lines.append(line)
                    self.started.set()

    def events(self, timeout: float) -> list[dict | str]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in self.lines]


def health_once_draining(server: ServerProcess, timeout: float = 120.0) -> httpx2.Response:
    """/health once the server has acted on SIGTERM, however long that takes; `timeout` only catches a hang."""
    deadline = time.monotonic() + timeout
    while (health := httpx2.get(server.url + "/health", timeout=60)).status_code == 200:
        assert time.monotonic() < deadline, f"/health still 200 {timeout} s after SIGTERM"
        time.sleep(0.05)
    return health


def test_sigterm_finishes_in_flight_streams_refuses_new_work_and_exits_0(tmp_path, processes):
    server = start_server(tmp_path, "--drain-timeout", "300")
    processes.append(server)
    # long enough to be still in flight while the checks below run (24 tokens drained in about 0.15 s
    # on a 6 ms step, and the server was gone before /live was asked)
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 256, "temperature": 0,
            "ignore_eos": True, "stream": True}
    stream = StreamInBackground(server.url, body)
    server.process.send_signal(signal.SIGTERM)
    health = health_once_draining(server)
    refused = httpx2.post(server.url + "/v1/completions", json=body | {"stream": False})
    live = httpx2.get(server.url + "/live")
    events = stream.events(timeout=300)
    assert server.exit_code(timeout=120) == 0

    for response in (health, refused):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "ServiceUnavailableError"
    assert live.status_code == 200
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1]) > 1
    [line] = [line for line in server.log_lines() if line["request_id"] == events[0]["id"]]
    assert line["status"] == 200 and line["completion_tokens"] == 256
    assert "draining 1 in-flight" in server.stderr.read_text()


def test_after_the_drain_timeout_leftover_requests_end_with_an_error_and_the_exit_is_0(tmp_path, processes):
    server = start_server(tmp_path, "--drain-timeout", "1")
    processes.append(server)
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Write a very long story.", "max_tokens": 4000,
            "ignore_eos": True, "stream": True, "deterministic": False}
    stream = StreamInBackground(server.url, body)
    server.process.send_signal(signal.SIGTERM)
    events = stream.events(timeout=300)
    assert server.exit_code(timeout=120) == 0
    assert "drain timeout: aborting 1 requests" in server.stderr.read_text()  # cut short, not waited out
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert events[-2]["error"]["code"] >= 500


def test_a_model_that_cannot_load_makes_serve_exit_non_zero_with_the_error_on_stderr(tmp_path: Path) -> None:
    model = tmp_path / "gpt2-like"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                   "vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 2}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "detserve.server", "serve", "--port", str(port), "--model", str(model),
                             "--load-format", "dummy"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert "the model failed to load" in result.stderr and "unsupported architecture" in result.stderr
