"""One real detserve server per test session: uvicorn in a thread on 127.0.0.1, serving the default model.

In-process so tests can look at the engine's KV blocks; every test leaves the engine idle.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

from fastapi import FastAPI

import httpx2
import openai
import pytest
import pytest_asyncio
import uvicorn

from detserve.engine.async_engine import AsyncEngine
from detserve.engine import weights
from detserve.engine.config import EngineConfig
from detserve.server.app import ServerConfig, create_app


@dataclass
class LiveServer:
    url: str
    engine: AsyncEngine

    @property
    def model(self) -> str:
        return self.engine.info.name

    @property
    def kv_cache_usage(self) -> float:
        return self.engine.stats().kv_cache_usage

    def wait_idle(self, timeout: float = 300.0) -> float:
        """Seconds until no request is running or waiting; `timeout` only catches a hang, not a slow machine."""
        start = time.monotonic()
        while True:
            stats = self.engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, f"the engine is still busy: {stats}"
            time.sleep(0.05)


@contextlib.contextmanager
def serve(engine: AsyncEngine, config: ServerConfig | None = None) -> Iterator[LiveServer]:
    """Serve `engine` (loading it unless another live app already runs it) until the block exits."""
    app: FastAPI = create_app(engine, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", engine)
    deadline = time.monotonic() + 180
    while not _healthy(live.url):
        assert thread.is_alive() and not engine.dead, f"the server failed to start: {engine.error!r}"
        assert time.monotonic() < deadline, "the model did not load in 180 s"
        time.sleep(0.2)
    try:
        yield live
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    with serve(AsyncEngine(EngineConfig())) as live:
        yield live


def _healthy(url: str) -> bool:
    try:
        return httpx2.get(url + "/health", timeout=5).status_code == 200
    except httpx2.TransportError:
        return False


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama config with the default model's tokenizer and chat template.

    Served with dummy weights it answers every route like the real model, in milliseconds per
    step, with a 128-token context: cheap enough to fuzz.
    """
    source = weights.resolve_model_dir(None)
    folder = tmp_path_factory.mktemp("tiny-model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    config = EngineConfig(model=str(tiny_model_dir), load_format="dummy", kv_cache_tokens=4096,
                          served_model_name="tiny")
    with serve(AsyncEngine(config)) as live:
        yield live


@pytest.fixture
def processes() -> Iterator[list]:
    """Server processes a test starts (each with a `process` Popen): killed at its end if still running."""
    started: list = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest_asyncio.fixture(loop_scope="function")  # the loop the async tests run in
async def aclient(server: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def http(server: LiveServer) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=server.url, timeout=120) as c:
        yield c


QWEN_STYLE_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content or '' }}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="session")
def qwen_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Random weights of a small Qwen3 shape, the default tokenizer and a Qwen-style template that
    renders `tools` itself: its text is noise, so every valid call or JSON answer comes from the grammar."""
    source = weights.resolve_model_dir(None)
    folder: Path = tmp_path_factory.mktemp("qwen3-tools")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    config = json.loads((source / "config.json").read_text())
    config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=1024)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(QWEN_STYLE_TEMPLATE)
    engine = AsyncEngine(EngineConfig(model=str(folder), load_format="dummy", kv_cache_tokens=8192,
                                      served_model_name="qwen3-tiny"))
    with serve(engine) as live:
        yield live
