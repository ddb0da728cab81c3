"""`detserve serve --tensor-parallel-size 2` as a user runs it: it answers, it shuts down with its
worker, a worker that dies makes it unhealthy (503s, a stream that ends) instead of hanging, and
torchrun can place the ranks instead."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import psutil
import pytest

from tests.engine.test_tensor_parallel import LLAMA
from tests.server.test_shutdown import REPO, ServerProcess, StreamInBackground, start_server, wait_until_healthy

pytestmark = pytest.mark.slow


def start_tp_server(tmp_path: Path) -> ServerProcess:
    model = tmp_path / "llama-tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA))
    return start_server(tmp_path, "--model", str(model), "--load-format", "dummy", "--quantization", "int4",
                        "--tensor-parallel-size", "2", "--served-model-name", "tiny")


def workers_of(server: ServerProcess) -> list[psutil.Process]:
    """The spawned rank processes (not multiprocessing's resource tracker)."""
    children = psutil.Process(server.process.pid).children()
    return [c for c in children if "--multiprocessing-fork" in c.cmdline()]


def completion(server: ServerProcess, **extra) -> httpx2.Response:
    body = {"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 8, "temperature": 0} | extra
    return httpx2.post(server.url + "/v1/completions", json=body, timeout=120)


def test_a_tensor_parallel_server_answers_and_stops_with_its_worker(tmp_path: Path, processes) -> None:
    server = start_tp_server(tmp_path)
    processes.append(server)
    [worker] = workers_of(server)
    answers = [completion(server).json() for _ in range(2)]
    assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
    assert answers[0]["usage"]["completion_tokens"] == 8
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_code(timeout=120) == 0
    worker.wait(timeout=30)  # gone with the server, not orphaned


def test_a_dead_worker_makes_the_server_unhealthy_and_ends_its_requests(tmp_path: Path, processes) -> None:
    server = start_tp_server(tmp_path)
    processes.append(server)
    [worker] = workers_of(server)
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    stream = StreamInBackground(server.url, body)
    worker.kill()
    events = stream.events(timeout=120)  # ends: neither hangs nor runs on
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503
    live, health = httpx2.get(server.url + "/live", timeout=30), httpx2.get(server.url + "/health", timeout=30)
    refused = completion(server)
    for response in (live, health, refused):
        assert response.status_code == 503, response.text
        assert "tensor-parallel worker" in response.json()["error"]["message"]
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_code(timeout=120) == 0


def test_a_worker_dying_while_the_server_idles_turns_it_unhealthy_at_once(tmp_path: Path, processes) -> None:
    server = start_tp_server(tmp_path)
    processes.append(server)
    [worker] = workers_of(server)
    worker.kill()
    worker.wait(timeout=30)
    deadline = time.monotonic() + 10  # the watcher's, well before any keepalive
    while (live := httpx2.get(server.url + "/live", timeout=30)).status_code == 200:
        assert time.monotonic() < deadline, "/live still 200 after a worker died"
        time.sleep(0.1)
    assert live.status_code == 503 and "exited with status -9" in live.json()["error"]["message"]


def test_workers_do_not_outlive_a_killed_server(tmp_path: Path, processes) -> None:
    server = start_tp_server(tmp_path)
    processes.append(server)
    [worker] = workers_of(server)
    server.process.kill()
    worker.wait(timeout=60)  # its next collective fails: rank 0 is gone


def test_ranks_placed_by_torchrun_serve_as_one_server(tmp_path: Path) -> None:
    """The launcher path (torchrun, a LeaderWorkerSet): each rank a `detserve serve` of its own, rank 0
    the HTTP server, the group met through the launcher's variables and store."""
    model = tmp_path / "llama-tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "detserve.server", "serve",
         "--port", str(port), "--model", str(model), "--load-format", "dummy", "--quantization", "int4",
         "--tensor-parallel-size", "2", "--served-model-name", "tiny"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr.log").open("w"))
    try:
        server = wait_until_healthy(ServerProcess(launcher, f"http://127.0.0.1:{port}", tmp_path / "stdout.log",
                                                  tmp_path / "stderr.log"))
        answer = completion(server).json()
        assert answer["usage"]["completion_tokens"] == 8
        assert "rank 1 of 2: a tensor-parallel worker" in (tmp_path / "stderr.log").read_text()
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
