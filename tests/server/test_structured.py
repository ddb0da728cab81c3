"""Structured outputs through the official `openai` SDK, unchanged: `parse` with a Pydantic model,
`json_schema` and `json_object` response formats, the streaming helper, and vLLM's
`structured_outputs` field on chat and text completions."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
from pydantic import BaseModel, Field

from tests.server.conftest import LiveServer

ASK = [{"role": "user", "content": "Name a big city and describe it."}]


class City(BaseModel):  # bounded fields: the 135M default model would otherwise write digits forever
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=100)
    capital: bool
    climate: Literal["hot", "mild", "cold"]


def test_parse_with_a_pydantic_model_returns_the_parsed_object(client: openai.OpenAI, server: LiveServer):
    completion = client.chat.completions.parse(model=server.model, messages=ASK, response_format=City,
                                               temperature=0, max_tokens=80)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_content_validates_against_the_schema_at_any_temperature(client: openai.OpenAI,
                                                                            server: LiveServer):
    schema = City.model_json_schema() | {"additionalProperties": False}  # as strict schemas must say
    for seed in range(3):
        resp = client.chat.completions.create(
            model=server.model, messages=ASK, temperature=1.0, seed=seed, max_tokens=80,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(resp.choices[0].message.content), schema)


def test_json_object_mode_streams_a_json_object(client: openai.OpenAI, server: LiveServer):
    stream = client.chat.completions.create(model=server.model, messages=ASK, response_format={"type": "json_object"},
                                            stream=True, temperature=0, max_tokens=12)
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("{")
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_the_sdk_streaming_helper_parses_the_final_completion(client: openai.OpenAI, server: LiveServer):
    with client.chat.completions.stream(model=server.model, messages=ASK, response_format=City, temperature=0,
                                        max_tokens=80) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1 and isinstance(final.choices[0].message.parsed, City)


def test_structured_outputs_choice_and_regex_on_chat_and_completions(client: openai.OpenAI, server: LiveServer):
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Capital of France?"}],
                                          extra_body={"structured_outputs": {"choice": ["Paris", "Lyon", "Nice"]}})
    assert chat.choices[0].message.content in ("Paris", "Lyon", "Nice")
    text = client.completions.create(model=server.model, prompt="Call me at ", max_tokens=20, temperature=0,
                                     extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text.choices[0].text) and text.choices[0].finish_reason == "stop"


def test_a_constrained_deterministic_answer_repeats_bit_for_bit(client: openai.OpenAI, server: LiveServer):
    def ask() -> tuple:
        resp = client.chat.completions.create(model=server.model, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}},
            temperature=0.7, seed=3, max_tokens=80, logprobs=True, top_logprobs=2)
        lps = [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in resp.choices[0].logprobs.content]
        return resp.choices[0].message.content, lps, resp.model_extra["output_digest"]

    assert ask() == ask()


def test_a_random_weight_qwen3_model_gives_valid_json_only_through_the_grammar(qwen_server: LiveServer):
    client = openai.OpenAI(base_url=qwen_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    schema = City.model_json_schema() | {"additionalProperties": False}
    for seed in range(2):
        parsed = client.chat.completions.parse(model="qwen3-tiny", messages=ASK, response_format=City,
                                               temperature=1.0, seed=seed, max_tokens=200)
        assert isinstance(parsed.choices[0].message.parsed, City)
        resp = client.chat.completions.create(
            model="qwen3-tiny", messages=ASK, temperature=1.0, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
