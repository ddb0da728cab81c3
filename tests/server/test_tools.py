"""Tool calling through the official `openai` SDK: forced calls (required, named) whose arguments
validate, streamed calls the SDK's helpers accumulate, a tool result fed back, legacy functions,
reproducible call ids; and the same on a random-weight Qwen3-shaped model whose template renders
tools itself, where only the grammar can make a call valid."""

from __future__ import annotations

import json
from typing import Literal

import httpx2
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from detserve.engine.request import FinishReason, RequestOutput, SamplingParams
from detserve.engine.llm_engine import AdmittedRequest
from detserve.server import tools
from detserve.server.chat import ChatRenderer
from detserve.server.serving import Job
from detserve.server.protocol import ToolUse
from tests.server.conftest import LiveServer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class GetWeather(BaseModel):
    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


def _arguments_valid(call, tool: dict) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_required_returns_a_call_whose_arguments_validate(client: openai.OpenAI, server: LiveServer):
    resp = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER, TIME],
                                          tool_choice="required", max_tokens=80)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    _arguments_valid(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI, server: LiveServer):
    resp = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
                                          tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "get_time" and _arguments_valid(call, TIME)["zone"] in ("UTC", "CET")


def test_streamed_calls_accumulate_in_the_sdk_helper_with_the_ids_of_the_unstreamed_answer(
        client: openai.OpenAI, server: LiveServer):
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    kwargs = dict(model=server.model, messages=ASK, tools=[tool], tool_choice="required", max_tokens=80,
                  temperature=0.8, seed=11)
    with client.chat.completions.stream(**kwargs) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in events
    [call] = final.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather) and final.choices[0].finish_reason == "tool_calls"
    [unstreamed] = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert (unstreamed.id, unstreamed.function.arguments) == (call.id, call.function.arguments)


def test_a_tool_result_fed_back_gets_an_answer(client: openai.OpenAI, server: LiveServer, http: httpx2.Client):
    first = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    second = client.chat.completions.create(model=server.model, messages=history, tools=[WEATHER], max_tokens=24,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    def rendered(messages: list[dict]) -> str:
        tokens = http.post("/tokenize", json={"model": server.model, "messages": messages}).json()["tokens"]
        return http.post("/detokenize", json={"model": server.model, "tokens": tokens}).json()["prompt"]

    text = rendered(history)  # the default template takes no tools: calls and results are written out
    assert "<tool_response>" in text and f'"name": "{call.function.name}"' in text and "# Tools" not in text


def test_legacy_functions_answer_with_function_call(client: openai.OpenAI, server: LiveServer):
    resp = client.chat.completions.create(model=server.model, messages=ASK, functions=[WEATHER["function"]],
                                          function_call={"name": "get_weather"}, max_tokens=80)
    choice = resp.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), WEATHER["function"]["parameters"])


def test_a_deterministic_tool_answer_repeats_whole_ids_included(client: openai.OpenAI, server: LiveServer):
    def ask() -> dict:
        return client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required", temperature=1.0, seed=5,
                                              max_tokens=80).choices[0].model_dump()

    assert ask() == ask()


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests_get_a_400_naming_the_parameter(client: openai.OpenAI, server: LiveServer, body, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=server.model, messages=ASK, max_tokens=4, extra_body=body)
    assert error.value.body["param"] == param


def test_hermes_calls_are_parsed_out_of_text_and_malformed_ones_stay_text():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>{"name": "unknown", "arguments": {}}</tool_call><tool_call>{oops</tool_call>')
    content, calls = tools.parse(text, [WEATHER])
    assert calls == [tools.ToolCall("get_weather", '{"city": "Oslo", "unit": "celsius"}')]
    assert content.startswith("Let me check.") and "unknown" in content and "{oops" in content
    assert tools.parse('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', [WEATHER])[0] is None
    assert tools.holdback("text <tool") == 5 and tools.holdback("a <tool_call>{") == 12 and tools.holdback("abc") == 0


def test_a_random_weight_qwen3_model_makes_valid_calls_only_through_the_grammar(qwen_server: LiveServer):
    client = openai.OpenAI(base_url=qwen_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert client.chat.completions.create(model="qwen3-tiny", messages=ASK, tools=[WEATHER], max_tokens=16,
                                          temperature=0).choices[0].message.tool_calls is None
    for seed in range(3):
        resp = client.chat.completions.create(model="qwen3-tiny", messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required", temperature=1.0, seed=seed, max_tokens=120)
        [call] = resp.choices[0].message.tool_calls
        _arguments_valid(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    history = ASK + [resp.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    with httpx2.Client(base_url=qwen_server.url, timeout=60) as http:
        tokens = http.post("/tokenize", json={"model": "qwen3-tiny", "messages": history}).json()["tokens"]
        text = http.post("/detokenize", json={"model": "qwen3-tiny", "tokens": tokens}).json()["prompt"]
    assert "<tool_response>\nsunny\n</tool_response>" in text and f'"name": "{call.function.name}"' in text


def _streamed(deltas: list[str], finish: FinishReason = FinishReason.STOP) -> tuple[list[dict], dict]:
    """The chunks a tools job streams for these text deltas, and the unstreamed body of the same text."""
    job = Job(id="chatcmpl-x", model="m", fingerprint="fp", deterministic=True,
              requests=[AdmittedRequest([1, 2, 3], SamplingParams())], n=1)
    renderer = ChatRenderer(job, str, show_prompt_logprobs=False, return_token_ids=False,
                            tool_use=ToolUse([WEATHER], None, legacy=False))
    [choice] = job.new_choices()
    chunks = []
    for i, delta in enumerate(deltas):
        last = i == len(deltas) - 1
        out = RequestOutput("r", [i], [], delta, last, finish if last else None, 3, i + 1, 0)
        first = not choice.token_ids
        choice.add(out)
        chunks += renderer.chunks(choice, out, first)
    return [c["choices"][0] for c in chunks], renderer.response([choice])["choices"][0]


def test_auto_mode_streams_content_then_a_call_held_back_until_its_block_closes():
    text = ['Sure. <tool', '_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',
            "\n</tool_call>"]
    deltas, whole = _streamed(text)
    contents = [d["delta"].get("content") for d in deltas if d["delta"].get("content")]
    calls = [call for d in deltas for call in d["delta"].get("tool_calls", [])]
    assert contents == ["Sure. "]  # "<tool" was held back: it became a call, not content
    assert calls[0]["id"] == whole["message"]["tool_calls"][0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"]["arguments"] for c in calls) == whole["message"]["tool_calls"][0]["function"]["arguments"]
    assert all(c["index"] == 0 for c in calls) and len(calls) > 2  # the name, then argument fragments
    assert deltas[-1]["finish_reason"] == whole["finish_reason"] == "tool_calls"
    assert whole["message"]["content"] == "Sure."


def test_auto_mode_text_that_only_looked_like_a_call_is_streamed_as_content():
    deltas, whole = _streamed(["Use <tool", "s> wisely, or <tool_call>not json</tool_call> at all."])
    assert "".join(d["delta"].get("content") or "" for d in deltas) == whole["message"]["content"]
    assert whole["finish_reason"] == "stop" and "tool_calls" not in whole["message"]
