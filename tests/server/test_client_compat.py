"""What real clients trip on (issue 28): each test pins one point a peer's test suite or
lm-evaluation-harness found, against the tiny server (dummy weights, the default tokenizer)."""

from __future__ import annotations

import json
import logging

import httpx2
import jinja2
import openai
import pytest
from pydantic import BaseModel, Field

from detserve.server.config import ServerConfig
from tests.server.conftest import LiveServer, serve
from tests.server.test_operations import _log_lines

COMP = "/v1/completions"
CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(tiny_server: LiveServer):
    with httpx2.Client(base_url=tiny_server.url, timeout=120) as client:
        yield client


def _events(response: httpx2.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_continuous_usage_stats_adds_usage_only_when_include_usage_is_true(http) -> None:
    body = {"model": "tiny", "prompt": "a", "max_tokens": 4, "temperature": 0, "stream": True}
    without = _events(http.post(COMP, json=body | {"stream_options": {"include_usage": False,
                                                                     "continuous_usage_stats": True}}))
    assert without and all("usage" not in e for e in without)
    with_usage = _events(http.post(COMP, json=body | {"stream_options": {"include_usage": True,
                                                                        "continuous_usage_stats": True}}))
    assert all(e["usage"]["completion_tokens"] >= 1 for e in with_usage)


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1])
def test_any_int64_seed_is_taken_and_reproduces(http, seed: int) -> None:
    body = {"model": "tiny", "prompt": "a", "max_tokens": 6, "temperature": 1.0, "seed": seed, "n": 2,
            "return_token_ids": True}
    first, again = (http.post(COMP, json=body) for _ in range(2))
    assert first.status_code == 200, first.text
    ids = [c["token_ids"] for c in first.json()["choices"]]
    assert ids == [c["token_ids"] for c in again.json()["choices"]]


def test_a_seed_outside_int64_is_a_400_naming_seed(http) -> None:
    response = http.post(COMP, json={"model": "tiny", "prompt": "a", "seed": 2**63})
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"


def test_vllm_fields_not_asked_for_are_null_not_missing(http) -> None:
    chat = http.post(CHAT, json={"model": "tiny", "messages": ASK, "max_tokens": 2}).json()
    assert chat["prompt_logprobs"] is None and chat["prompt_token_ids"] is None
    assert chat["choices"][0]["token_ids"] is None
    [choice] = http.post(COMP, json={"model": "tiny", "prompt": "a", "max_tokens": 2}).json()["choices"]
    assert choice["prompt_logprobs"] is None and choice["prompt_token_ids"] is None and choice["token_ids"] is None


def test_the_request_log_counts_a_scored_prompt_as_its_response_does(http, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="detserve.requests"):
        scored = http.post(COMP, json={"model": "tiny", "prompt": "one two three", "echo": True, "logprobs": 1,
                                       "max_tokens": 0})
        [line] = _log_lines(caplog, scored.json()["id"])
        several = http.post(COMP, json={"model": "tiny", "prompt": "one two three", "n": 3, "max_tokens": 2})
        [line_of_several] = _log_lines(caplog, several.json()["id"])
    assert line["prompt_tokens"] == scored.json()["usage"]["prompt_tokens"] > 0
    assert line_of_several["prompt_tokens"] == several.json()["usage"]["prompt_tokens"]


def test_use_beam_search_is_refused_by_name_not_ignored(http) -> None:
    response = http.post(COMP, json={"model": "tiny", "prompt": "a", "n": 2, "use_beam_search": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "use_beam_search"


class Address(BaseModel):
    city: str = Field(max_length=12)
    zip_code: int = Field(ge=0, le=99999)


class Shipment(BaseModel):
    """Nests a model, and uses it twice ($defs plus two $refs to one definition)."""

    sender: Address
    receiver: Address
    express: bool


class Part(BaseModel):
    """Recurses: a part may hold one sub-part (a $ref to itself)."""

    name: str = Field(max_length=8)
    sub: Part | None = None


@pytest.mark.parametrize("model", [Shipment, Part])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_of_tools_whose_schemas_hold_defs_and_refs_match_those_schemas(
        qwen_server: LiveServer, model: type[BaseModel], choice: str) -> None:
    tool = openai.pydantic_function_tool(model)
    assert "$defs" in tool["function"]["parameters"]  # what pydantic writes for nested models
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": model.__name__}}
    client = openai.OpenAI(base_url=qwen_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for seed in range(3):
        answer = client.chat.completions.create(model="qwen3-tiny", messages=ASK, tools=[tool],
                                                tool_choice=tool_choice, temperature=1.0, seed=seed, max_tokens=400)
        [call] = answer.choices[0].message.tool_calls
        assert call.function.name == model.__name__ and answer.choices[0].finish_reason == "tool_calls"
        model.model_validate_json(call.function.arguments)  # the arguments hold to the schema


def test_a_forced_call_cut_short_by_max_tokens_is_answered_as_a_call_streamed_or_not(qwen_server: LiveServer) -> None:
    tool = {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["tags"]}}}
    body = {"model": "qwen3-tiny", "messages": ASK, "tools": [tool], "tool_choice": "required", "max_tokens": 30,
            "temperature": 0}
    with httpx2.Client(base_url=qwen_server.url, timeout=120) as http:
        whole = http.post(CHAT, json=body).json()["choices"][0]
        chunks = _events(http.post(CHAT, json=body | {"stream": True}))
    assert whole["finish_reason"] == "length" and not whole["message"]["content"]
    [call] = whole["message"]["tool_calls"]
    assert call["function"]["name"] == "tag" and call["function"]["arguments"].startswith('{"tags": [')
    deltas = [c["choices"][0] for c in chunks]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == ""  # no wrapper leaks as content
    streamed = [t for d in deltas for t in d["delta"].get("tool_calls", [])]
    assert streamed[0]["id"] == call["id"] and deltas[-1]["finish_reason"] == "length"
    assert "".join(t["function"]["arguments"] for t in streamed) == call["function"]["arguments"]


def test_lm_evals_remote_tokenizer_needs_nothing_but_the_server(tiny_server: LiveServer, http) -> None:
    """The calls lm-eval's `tokenizer_backend=remote` makes (`RemoteTokenizer`), in its shapes: no model
    field, special tokens found by encoding their text, the chat template rendered client-side."""
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] and info["tokenizer_class"] and info["chat_template"]
    tokenizer = tiny_server.engine.tokenizer

    def encode(text: str) -> list[int]:
        return http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    assert encode(info["eos_token"])[0] == tokenizer.eos_token_id
    ids = encode("The capital of France is Paris")
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "The capital of France is Paris"
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(messages=ASK, add_generation_prompt=True)
    assert encode(rendered) == tokenizer.apply_chat_template(ASK)
    scored = http.post(COMP, json={"model": "tiny", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0}).json()
    assert scored["choices"][0]["logprobs"]["token_logprobs"][0] is None  # a loglikelihood request, as lm-eval sends


def test_the_tokenizer_routes_are_behind_the_api_key(tiny_server: LiveServer) -> None:
    with serve(tiny_server.engine, ServerConfig(api_key="k3y")) as live, httpx2.Client(base_url=live.url) as client:
        assert client.get("/tokenizer_info").status_code == 401
        assert client.post("/tokenize", json={"prompt": "a"}).status_code == 401
        assert client.get("/tokenizer_info", headers={"Authorization": "Bearer k3y"}).status_code == 200


@pytest.mark.parametrize("side, kept", [("left", slice(-5, None)), ("right", slice(0, 5))])
def test_truncate_prompt_tokens_keeps_that_many_prompt_tokens(http, tiny_server: LiveServer, side: str,
                                                              kept: slice) -> None:
    ids = list(range(100, 120))
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "return_token_ids": True, "echo": True,
            "truncate_prompt_tokens": 5, "truncation_side": side}
    answer = http.post(COMP, json=body).json()
    assert answer["usage"]["prompt_tokens"] == 5 and answer["choices"][0]["prompt_token_ids"] == ids[kept]
    echoed = tiny_server.engine.tokenizer.decode(ids[kept], skip_special_tokens=False)
    assert answer["choices"][0]["text"].startswith(echoed)
    chat = http.post(CHAT, json={"model": "tiny", "messages": ASK, "max_tokens": 1, "truncate_prompt_tokens": 3})
    assert chat.json()["usage"]["prompt_tokens"] == 3


def test_a_bad_truncate_prompt_tokens_is_a_400_naming_it(http) -> None:
    response = http.post(COMP, json={"model": "tiny", "prompt": "a", "truncate_prompt_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "truncate_prompt_tokens"


def test_responses_include_output_text_logprobs_returns_them_streamed_or_not(tiny_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    asked = dict(model="tiny", input="Say hi.", max_output_tokens=5, temperature=0,
                 include=["message.output_text.logprobs"], top_logprobs=2)
    response = client.responses.create(**asked)
    [part] = response.output[0].content
    assert len(part.logprobs) == response.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi."}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert [lp.logprob for lp in part.logprobs] == [lp.logprob for lp in chat.choices[0].logprobs.content]
    with client.responses.stream(**asked) as stream:
        deltas = [lp.logprob for e in stream if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert deltas == [lp.logprob for lp in part.logprobs]
    plain = client.responses.create(model="tiny", input="Say hi.", max_output_tokens=5)
    assert plain.output[0].content[0].logprobs == []


def test_responses_include_of_anything_else_is_a_400_naming_include(http) -> None:
    response = http.post("/v1/responses", json={"model": "tiny", "input": "hi",
                                                "include": ["reasoning.encrypted_content"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "include"


def test_streamed_token_ids_add_up_to_the_whole_output_even_with_no_text(tmp_path) -> None:
    """A model with no tokenizer streams no text (a random-weight model served for a benchmark);
    each token's id still arrives in a chunk when asked for, as vLLM sends them."""
    from detserve.engine.async_engine import AsyncEngine
    from detserve.engine.config import EngineConfig

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}))
    engine = AsyncEngine(EngineConfig(model=str(tmp_path), load_format="dummy", kv_cache_tokens=1024,
                                      served_model_name="bare"))
    body = {"model": "bare", "prompt": [5, 6, 7], "max_tokens": 6, "ignore_eos": True, "return_token_ids": True,
            "temperature": 0}
    with serve(engine) as live, httpx2.Client(base_url=live.url, timeout=120) as client:
        whole = client.post(COMP, json=body).json()["choices"][0]
        chunks = _events(client.post(COMP, json=body | {"stream": True}))
    streamed = [t for chunk in chunks for choice in chunk["choices"] for t in choice["token_ids"]]
    assert whole["text"] == "" and len(whole["token_ids"]) == 6 and streamed == whole["token_ids"]
