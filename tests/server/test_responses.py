"""The Responses API through the official SDK: `responses.create` and `responses.stream`, as text."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import LiveServer


def test_create_returns_output_text_usage_and_repeats_at_temperature_0(client: openai.OpenAI, server: LiveServer):
    first = client.responses.create(model=server.model, input="Say hello.", max_output_tokens=12, temperature=0)
    assert first.id.startswith("resp_") and first.object == "response" and first.model == server.model
    assert first.output_text and first.output[0].type == "message" and first.output[0].role == "assistant"
    assert first.usage.output_tokens <= 12 and first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    again = client.responses.create(model=server.model, input="Say hello.", max_output_tokens=12, temperature=0)
    assert again.output_text == first.output_text and again.model_extra["output_digest"] == first.model_extra["output_digest"]


def test_message_items_and_instructions_and_a_cut_short_answer_is_incomplete(client: openai.OpenAI, server: LiveServer):
    resp = client.responses.create(model=server.model, instructions="Answer in French.", max_output_tokens=3,
                                   input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
                                          {"role": "assistant", "content": "Bonjour"},
                                          {"role": "user", "content": "Tell me a long story."}])
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3 and resp.instructions == "Answer in French."


def test_stream_yields_the_event_sequence_and_the_final_response(client: openai.OpenAI, server: LiveServer):
    kwargs = dict(model=server.model, input="Name a color.", max_output_tokens=120, temperature=0)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"] and final.status == "completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == client.responses.create(**kwargs).output_text


@pytest.mark.parametrize("extra, param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"text": {"format": {"type": "json_object"}}}, "text"),
])
def test_what_is_not_served_gets_a_400_naming_it(client: openai.OpenAI, server: LiveServer, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**({"model": server.model, "input": "hi"} | extra))
    assert error.value.body["param"] == param
