"""Hostile input: schemathesis over our own OpenAPI schema, and hypothesis over the request validators.

Both run against a tiny dummy-weight model with the real tokenizer (`tiny_server`), so a
generated request that happens to be valid costs milliseconds. The bar: never a 5xx, every
error in the OpenAI shape, responses that match the schema, and a healthy server afterwards.
"""

from __future__ import annotations

import json
import math

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from detserve.engine.config import EngineConfig
from detserve.server.app import create_app
from tests.server.conftest import LiveServer

pytestmark = pytest.mark.slow
# Derandomized: few schema-valid completions get past the semantic checks the published schema
# does not state (an empty prompt, ids outside the vocabulary, logprobs over 20), so with fresh
# draws each run the check that fuzzing reached generation failed now and then (no 200 in 30
# draws); these draws do.
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
# The schema the server publishes at /openapi.json; building the app loads no model.
SCHEMA = schemathesis.openapi.from_dict(create_app(EngineConfig()).openapi())
OPERATIONS = {f"{op.method.upper()} {op.path}": op for op in (result.ok() for result in SCHEMA.get_all_operations())}
STATUSES: dict[str, list[int]] = {}  # per operation, what the fuzzing got back
# Schema-violating (negative) inputs exist only where there is input: the POST bodies.
CASES = [(name, mode) for name in sorted(OPERATIONS) for mode in schemathesis.GenerationMode
         if mode is schemathesis.GenerationMode.POSITIVE or name.startswith("POST")]


@pytest.mark.parametrize("operation, mode", CASES, ids=[f"{name}-{mode.value}" for name, mode in CASES])
@given(data=st.data())
@FUZZ
def test_every_route_answers_schemathesis_without_a_5xx_and_as_documented(
    tiny_server: LiveServer, operation: str, mode: schemathesis.GenerationMode, data: st.DataObject
):
    case = data.draw(OPERATIONS[operation].as_strategy(generation_mode=mode))
    if mode is schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = tiny_server.model  # past the 404, into validation and generation
    response = case.call(base_url=tiny_server.url, timeout=60)
    case.validate_response(response, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
        negative_data_rejection,
    ])
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    STATUSES.setdefault(operation, []).append(response.status_code)


def assert_served_normally_and_idle(live: LiveServer) -> None:
    response = httpx2.post(live.url + "/v1/chat/completions", timeout=60, json={
        "model": live.model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    live.wait_idle()
    stats = live.engine.stats()
    assert stats.kv_cache_usage == 0 and stats.num_running == stats.num_waiting == 0


def test_the_server_still_serves_after_the_schema_fuzzing(tiny_server: LiveServer):
    assert_served_normally_and_idle(tiny_server)
    if len(STATUSES) == len(OPERATIONS):  # the fuzzing ran in this session: it must have reached generation
        for operation in ("POST /v1/chat/completions", "POST /v1/completions"):
            assert 200 in STATUSES[operation], f"no fuzzed {operation} got past validation: {STATUSES[operation]}"


# -- hypothesis over the validators ---------------------------------------------------------------------

ODD_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 1e308, -1e308, 1e-320,
                               math.nan, math.inf, -math.inf, 0.5, True, False])
ODD_STRINGS = st.one_of(
    st.text(max_size=50),
    st.sampled_from(["", "\x00", "\ud800", "💥" * 1000, "a" * 2**20, "{{ raise('x') }}", "<|im_end|>", "\u202e"]),
)
JSON = st.recursive(
    st.none() | st.booleans() | ODD_NUMBERS | st.integers() | st.floats() | ODD_STRINGS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
FIELDS = {
    "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p",
                             "top_k", "min_p", "seed", "stop", "stop_token_ids", "logit_bias", "logprobs",
                             "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "stream",
                             "stream_options", "deterministic", "min_tokens", "ignore_eos", "tools", "response_format",
                             "structured_outputs"],
    "/v1/completions": ["model", "prompt", "max_tokens", "n", "temperature", "seed", "stop", "logprobs", "echo",
                        "suffix", "best_of", "logit_bias", "stream", "min_tokens", "deterministic",
                        "structured_outputs"],
    "/tokenize": ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"],
    "/detokenize": ["model", "tokens"],
}


def valid_body(path: str, model: str) -> dict:
    return {
        "/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        "/v1/completions": {"model": model, "prompt": "hi", "max_tokens": 3},
        "/tokenize": {"model": model, "prompt": "hi"},
        "/detokenize": {"model": model, "tokens": [1, 2, 3]},
    }[path]


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A route and a body: random JSON, or a valid body with one to three fields replaced by junk."""
    path = draw(st.sampled_from(sorted(FIELDS)))
    if draw(st.booleans()):
        body = draw(JSON)
    else:
        body = valid_body(path, "tiny")
        for name in draw(st.lists(st.sampled_from(FIELDS[path]), min_size=1, max_size=3)):
            body[name] = draw(JSON)
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:  # now and then, not JSON at all
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    return path, raw


@given(request=hostile_bodies())
@settings(FUZZ, max_examples=200)
def test_hostile_bodies_get_200_or_an_openai_shaped_4xx(tiny_server: LiveServer, request: tuple[str, bytes]):
    path, raw = request
    response = httpx2.post(tiny_server.url + path, content=raw, timeout=60,
                           headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
        assert error["code"] == response.status_code and "param" in error


def test_the_server_still_serves_after_the_validator_fuzzing(tiny_server: LiveServer):
    assert_served_normally_and_idle(tiny_server)
