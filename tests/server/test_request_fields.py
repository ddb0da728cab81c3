"""Every field a client can send is honoured or refused with a 400 that names it (issue 28).

The fields are the official SDK's own (its request TypedDicts), so a field a newer SDK adds is
checked too: unless it is listed as honoured here, it must be a 400 naming it. Each honoured
field is sent at a value that asks for something and must be taken; its effect is pinned by the
tests of that feature. The README's API section must name every field refused.
"""

from __future__ import annotations

import json
import logging
import re
import typing
from pathlib import Path

import httpx2
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from openai.types.responses import response_create_params

from detserve.server import tools
from detserve.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ResponsesRequest
from tests.server.conftest import LiveServer
from tests.server.test_operations import _log_lines

MODEL = "qwen3-tiny"  # random weights (fast), a context window that fits tools, a template that takes them
ASK = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# Per route: (the SDK's request fields, a minimal body, honoured field -> a value that asks for
# something, refused field -> a value that asks for what is not served). Fields refused by name
# without a declaration (unknown to detserve) need no entry: any value gets the 400.
ROUTES = {
    "/v1/chat/completions": (
        chat_create_params.CompletionCreateParamsBase,
        {"messages": ASK, "max_tokens": 1},
        {"messages": ASK, "model": MODEL, "frequency_penalty": 0.5, "presence_penalty": 0.5,
         "logit_bias": {"1": -1.0}, "logprobs": True, "top_logprobs": 2, "max_completion_tokens": 1,
         "max_tokens": 1, "n": 2, "response_format": {"type": "json_object"}, "seed": 7, "stop": ["x"],
         "stream_options": {"include_usage": True}, "temperature": 0.5, "top_p": 0.9, "tools": [TOOL],
         "tool_choice": "none", "functions": [TOOL["function"]], "function_call": "none",
         "parallel_tool_calls": False, "user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k"},
        {"audio": {"voice": "alloy", "format": "wav"}, "metadata": {"k": "v"}, "modalities": ["text", "audio"],
         "moderation": {"model": "omni"}, "prediction": {"type": "content", "content": "x"},
         "prompt_cache_options": {"mode": "explicit"}, "prompt_cache_retention": "24h",
         "reasoning_effort": "high", "service_tier": "flex", "store": True, "verbosity": "low",
         "web_search_options": {}},
    ),
    "/v1/completions": (
        completion_create_params.CompletionCreateParamsBase,
        {"prompt": "a", "max_tokens": 1},
        {"model": MODEL, "prompt": "b", "echo": True, "frequency_penalty": 0.5, "presence_penalty": 0.5,
         "logit_bias": {"1": -1.0}, "logprobs": 2, "max_tokens": 2, "n": 2, "seed": 7, "stop": ["x"],
         "stream_options": {"include_usage": True}, "temperature": 0.5, "top_p": 0.9, "user": "u-1"},
        {"best_of": 3, "suffix": "and then"},
    ),
    "/v1/responses": (
        response_create_params.ResponseCreateParamsBase,
        {"input": "hi", "max_output_tokens": 1},
        {"input": "hello", "model": MODEL, "instructions": "Be brief.", "max_output_tokens": 2,
         "temperature": 0.5, "top_p": 0.9, "include": ["message.output_text.logprobs"], "top_logprobs": 2,
         "text": {"format": {"type": "text"}}, "user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k",
         "parallel_tool_calls": False},
        {"tools": [TOOL], "tool_choice": "required", "max_tool_calls": 2, "store": True,
         "previous_response_id": "resp_1", "conversation": "conv_1", "context_management": [{"type": "x"}],
         "background": True, "background_options": {}, "metadata": {"k": "v"}, "moderation": {"model": "omni"},
         "prompt": {"id": "pmpt_1"}, "prompt_cache_options": {"mode": "explicit"}, "prompt_cache_retention": "24h",
         "reasoning": {"effort": "high"}, "service_tier": "flex", "stream_options": {"include_obfuscation": True},
         "truncation": "auto", "access_programs": {}, "image": {}},
    ),
}
STREAMED = {"stream_options"}  # sent with stream true
NEEDS = {  # what a field needs beside it to be valid
    ("/v1/chat/completions", "top_logprobs"): {"logprobs": True},
    ("/v1/chat/completions", "parallel_tool_calls"): {"tools": [TOOL]},
    ("/v1/chat/completions", "function_call"): {"functions": [TOOL["function"]]},
    ("/v1/responses", "top_logprobs"): {"include": ["message.output_text.logprobs"]},
}

CASES = [(route, name) for route, (params, _, _, _) in ROUTES.items() for name in typing.get_type_hints(params)]


@pytest.fixture(scope="module")
def http(qwen_server: LiveServer):
    with httpx2.Client(base_url=qwen_server.url, timeout=120) as client:
        yield client


def _body(route: str, name: str, value: object) -> dict:
    _, base, _, _ = ROUTES[route]
    streamed = {"stream": True} if name in STREAMED else {}
    return {"model": MODEL} | base | NEEDS.get((route, name), {}) | streamed | {name: value}


@pytest.mark.parametrize("route, name", CASES)
def test_each_sdk_field_is_honoured_or_a_400_naming_it(http, route: str, name: str) -> None:
    _, _, honoured, refused = ROUTES[route]
    if name in honoured:
        response = http.post(route, json=_body(route, name, honoured[name]))
        assert response.status_code == 200, f"{name} is listed as honoured: {response.text}"
    else:
        response = http.post(route, json=_body(route, name, refused.get(name, "something")))
        assert response.status_code == 400, f"{name} was taken, and it is not listed as honoured"
        assert response.json()["error"]["param"] == name, response.json()


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_field_no_api_defines_is_a_400_in_openais_words(http, route: str) -> None:
    response = http.post(route, json=_body(route, "future_field", 1))
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "Unrecognized request argument supplied: future_field",
                                         "type": "BadRequestError", "param": "future_field", "code": 400}


@pytest.mark.parametrize("fields, param", [
    ({"bad_words": ["x"]}, "bad_words"),  # vLLM extensions not implemented
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": True}},
     "stream_options.include_obfuscation"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "audio": {"id": "a"}}]},
     "messages.1.audio"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "messages.0.weight"),
    ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"padding": True}}, "chat_template_kwargs"),  # the template call's, by its signature
])
def test_nested_and_vllm_fields_not_served_are_400s_naming_them(http, fields: dict, param: str) -> None:
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 1} | fields)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("fields, param", [
    ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt defaults to true
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "audio": {"id": "a"}}]},
     "messages.1.audio"),
])
def test_tokenize_refuses_what_chat_refuses_by_the_same_names(http, fields: dict, param: str) -> None:
    response = http.post("/tokenize", json={"messages": ASK} | fields)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_each_refused_field_is_named_in_the_readme() -> None:
    api = Path(__file__).parents[2].joinpath("README.md").read_text().split("## API", 1)[1].split("\n## ", 1)[0]
    refused = {name for model in (ChatCompletionRequest, CompletionRequest, ResponsesRequest, ChatMessage)
               for name in model.not_served}
    missing = sorted(name for name in refused if not re.search(rf"`{name}[`: ]", api))
    assert not missing, f"README's API section does not name {missing}"


def test_message_names_legacy_calls_and_refusals_reach_the_template() -> None:
    assert ChatMessage(role="user", content="hi", name="ann").template_dict()["name"] == "ann"
    legacy = ChatMessage(role="assistant", function_call={"name": "f", "arguments": '{"x": 1}'}).template_dict()
    assert legacy["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert ChatMessage(role="assistant", refusal="I cannot.").template_dict()["content"] == "I cannot."
    parts = [{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "b"}]
    assert ChatMessage(role="assistant", content=parts).template_dict()["content"] == "a\nb"


def test_continue_final_message_and_template_kwargs_shape_the_prompt(http) -> None:
    partial = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "One, two,"}]
    opened = http.post("/tokenize", json={"messages": partial, "add_generation_prompt": False,
                                          "continue_final_message": True, "return_token_strs": True}).json()
    closed = http.post("/tokenize", json={"messages": partial, "add_generation_prompt": False}).json()
    assert closed["tokens"][: opened["count"]] == opened["tokens"] and closed["count"] > opened["count"]
    assert len(opened["token_strs"]) == opened["count"] and closed["token_strs"] is None
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": partial, "max_tokens": 1,
                                                   "add_generation_prompt": False, "continue_final_message": True,
                                                   "return_token_ids": True})
    assert chat.json()["prompt_token_ids"] == opened["tokens"]


def test_user_is_written_to_the_request_log(http, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="detserve.requests"):
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 1,
                                                           "safety_identifier": "s-42"})
        [line] = _log_lines(caplog, response.json()["id"])
    assert line["user"] == "s-42"


# -- unforced tool calls held by a grammar: strict tools, parallel_tool_calls false -----------------

STRICT = {"type": "function", "function": {"name": "move", "strict": True, "parameters": {
    "type": "object", "properties": {"steps": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["steps"], "additionalProperties": False}}}
LOOSE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}


def _call(name: str, arguments: dict) -> str:
    return f'{tools.CALL_OPEN}\n{json.dumps({"name": name, "arguments": arguments})}\n{tools.CALL_CLOSE}'


def _accepts(engine, grammar, text: str) -> bool:
    matcher = engine.grammars.matcher(grammar)._matcher
    return all(matcher.consume_token(t) for t in engine.tokenizer.encode(text, add_special_tokens=False)) \
        and matcher.is_accepting()


def test_strict_tools_hold_unforced_calls_to_their_parameters_and_others_to_any_object(qwen_server) -> None:
    engine = qwen_server.engine.engine
    grammar = tools.held_calls([STRICT, LOOSE], frozenset({"move"}), parallel=True)
    assert _accepts(engine, grammar, "Sure, no tool needed. <tool_ maybe")
    assert _accepts(engine, grammar, "Going. " + _call("move", {"steps": 3}) + "\n" + _call("note", {"n": 1}))
    assert not _accepts(engine, grammar, _call("move", {"steps": 12}))  # over its maximum
    assert not _accepts(engine, grammar, _call("move", {"steps": 1, "far": True}))
    assert not _accepts(engine, grammar, _call("jump", {}))  # no such tool


def test_parallel_tool_calls_false_holds_an_unforced_answer_to_one_call(qwen_server) -> None:
    engine = qwen_server.engine.engine
    grammar = tools.held_calls([LOOSE], frozenset(), parallel=False)
    assert _accepts(engine, grammar, _call("note", {"text": "a"}) + " done")
    assert not _accepts(engine, grammar, _call("note", {"text": "a"}) + _call("note", {"text": "b"}))
    assert tools.held_calls([LOOSE], frozenset(), parallel=True) is None  # nothing to hold


def test_an_unforced_strict_tool_compiles_its_schema_at_admission(http) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, "tools": [STRICT], "tool_choice": "auto"}
    broken = json.loads(json.dumps(STRICT))
    broken["function"]["parameters"]["properties"]["steps"]["$ref"] = "#/$defs/Missing"
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    refused = http.post("/v1/chat/completions", json=body | {"tools": [broken]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools", refused.text
    broken["function"]["strict"] = False  # a loose tool's parameters are not compiled in auto
    assert http.post("/v1/chat/completions", json=body | {"tools": [broken]}).status_code == 200
