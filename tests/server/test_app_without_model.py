"""What the app does before a model is loaded, API-key auth, and the CLI: no model load needed.

The app runs in process through httpx's ASGI transport, which skips the lifespan, so the engine
stays unloaded: routes past the auth check answer 503.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx2
import openai
import pytest

from detserve import engine as detserve_engine
from detserve.engine.async_engine import AsyncEngine
from detserve.engine.config import EngineConfig
from detserve.server import cli
from detserve.server.app import ServerConfig, create_app

KEY = "sk-test-key"


def _client(app) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://detserve")


@pytest.mark.parametrize("state", ["loading", "dead"])
async def test_health_and_generation_answer_503_while_loading_or_dead(state):
    engine = AsyncEngine(EngineConfig())
    if state == "dead":
        engine.error = RuntimeError("the GPU fell off")
    async with _client(create_app(engine)) as http:
        health = await http.get("/health")
        chat = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        version = await http.get("/version")
    for response in (health, chat):
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "ServiceUnavailableError"
    assert ("GPU fell off" in health.json()["error"]["message"]) == (state == "dead")
    assert version.json() == {"version": detserve_engine.__version__}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", KEY])
async def test_v1_routes_need_the_bearer_api_key(authorization):
    headers = {"authorization": authorization} if authorization else {}
    async with _client(create_app(AsyncEngine(EngineConfig()), ServerConfig(api_key=KEY))) as http:
        response = await http.get("/v1/models", headers=headers)
        unknown = await http.get("/v1/nothing", headers=headers)
    for r in (response, unknown):
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "AuthenticationError" and r.json()["error"]["code"] == 401


async def test_the_right_api_key_passes_and_health_stays_open():
    async with _client(create_app(AsyncEngine(EngineConfig()), ServerConfig(api_key=KEY))) as http:
        authorized = await http.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        health = await http.get("/health")
    assert authorized.status_code == 503 and health.status_code == 503  # past auth; the model is not loaded


async def test_sdk_with_a_wrong_key_gets_an_authentication_error():
    app = create_app(AsyncEngine(EngineConfig()), ServerConfig(api_key=KEY))
    async with _client(app) as http:
        sdk = openai.AsyncOpenAI(base_url="http://detserve/v1", api_key="nope", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()


def test_cli_flags_map_onto_the_engine_config():
    args = cli.build_parser().parse_args([
        "serve", "--model", "/m.gguf", "--device", "cpu", "--dtype", "bfloat16", "--determinism", "off",
        "--max-num-seqs", "8", "--kv-cache-tokens", "4096", "--max-num-batched-tokens", "256",
        "--max-model-len", "2048", "--served-model-name", "tiny", "--load-format", "dummy",
    ])
    assert cli.engine_config(args) == EngineConfig(
        model="/m.gguf", device="cpu", dtype="bfloat16", default_deterministic=False, max_num_seqs=8,
        kv_cache_tokens=4096, max_num_batched_tokens=256, max_model_len=2048, served_model_name="tiny",
        load_format="dummy",
    )
    assert cli.engine_config(cli.build_parser().parse_args(["serve"])) == EngineConfig()


async def test_serve_takes_the_api_key_from_the_environment(monkeypatch):
    served = {}
    monkeypatch.setenv("DETSERVE_API_KEY", KEY)
    monkeypatch.setattr(cli.DrainingServer, "run", lambda self: served.update(
        app=self.config.app, host=self.config.host, port=self.config.port))
    cli.main(["serve", "--port", "9123"])
    assert served["port"] == 9123 and served["host"] == "127.0.0.1"
    async with _client(served["app"]) as http:
        assert (await http.get("/v1/models")).status_code == 401


@pytest.mark.parametrize("flags", [["--max-num-seqs", "0"], ["--model", "/no/such/model.gguf"], ["--max-n", "0"],
                                   ["--drain-timeout", "-1"]])
def test_invalid_flags_exit_with_a_usage_error(flags, monkeypatch):
    monkeypatch.setattr(cli.DrainingServer, "run", lambda self: pytest.fail("served despite bad flags"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *flags])
    assert exit_info.value.code == 2


def test_python_m_server_runs_the_cli():
    repo = Path(__file__).parents[2]
    result = subprocess.run([sys.executable, "-m", "detserve.server", "serve", "--help"], cwd=repo, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--determinism" in result.stdout and "--api-key" in result.stdout


def test_cli_flags_map_onto_the_server_config():
    args = cli.build_parser().parse_args([
        "serve", "--api-key", KEY, "--protect-metrics", "--max-body-bytes", "1000", "--max-n", "4",
        "--max-prompt-tokens", "512", "--max-waiting-requests", "32", "--drain-timeout", "7.5", "--log-prompts",
    ])
    assert cli.server_config(args) == ServerConfig(
        api_key=KEY, protect_metrics=True, max_body_bytes=1000, max_n=4, max_prompt_tokens=512,
        max_waiting_requests=32, drain_timeout=7.5, log_prompts=True,
    )
    assert cli.server_config(cli.build_parser().parse_args(["serve"])) == ServerConfig()


def test_switches_and_numbers_from_the_environment_are_parsed_or_refused(monkeypatch):
    monkeypatch.setenv("DETSERVE_LOG_PROMPTS", "true")
    monkeypatch.setenv("DETSERVE_DRAIN_TIMEOUT", "12")
    args = cli.build_parser().parse_args(["serve"])
    assert args.log_prompts is True and args.drain_timeout == 12.0
    monkeypatch.setenv("DETSERVE_LOG_PROMPTS", "sometimes")
    with pytest.raises(SystemExit):
        cli.build_parser()
    monkeypatch.setenv("DETSERVE_LOG_PROMPTS", "0")
    monkeypatch.setenv("DETSERVE_DRAIN_TIMEOUT", "soon")
    with pytest.raises(SystemExit):
        cli.build_parser()


def test_every_serve_flag_defaults_from_its_environment_variable(monkeypatch):
    monkeypatch.setenv("DETSERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("DETSERVE_DETERMINISM", "off")
    monkeypatch.setenv("DETSERVE_SERVED_MODEL_NAME", "from-env")
    config = cli.engine_config(cli.build_parser().parse_args(["serve"]))
    assert (config.max_num_seqs, config.default_deterministic, config.served_model_name) == (7, False, "from-env")
    assert cli.build_parser().parse_args(["serve", "--max-num-seqs", "3"]).max_num_seqs == 3, "flags win"
    monkeypatch.setenv("DETSERVE_DETERMINISM", "maybe")
    with pytest.raises(SystemExit):
        cli.build_parser()


def test_bench_subcommands_are_wired_into_the_cli():
    for kind in ("determinism", "serve", "soak"):
        args = cli.build_parser().parse_args(["bench", kind, "--base-url", "http://127.0.0.1:9/v1"])
        assert args.command == "bench" and args.bench_command == kind and callable(args.run)
