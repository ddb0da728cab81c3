"""Every bad request gets its documented status in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from detserve.engine.async_engine import RequestFailedError
from detserve.engine.request import FinishReason, RequestOutput, SamplingParams
from detserve.engine.llm_engine import AdmittedRequest
from detserve.server.chat import ChatRenderer
from detserve.server.completions import CompletionRenderer
from detserve.server.serving import Job
from tests.server.conftest import LiveServer

MODEL = "{model}"  # replaced by the served model's name
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (id, method, path, JSON body or raw bytes, status, param the error names)
    ("malformed-json", "POST", CHAT, b'{"model": ', 400, None),
    ("body-not-an-object", "POST", CHAT, [1, 2], 400, "body"),
    ("missing-model", "POST", CHAT, {"messages": MSGS}, 400, "model"),
    ("unknown-model", "POST", CHAT, {"model": "gpt-9", "messages": MSGS}, 404, "model"),
    ("empty-messages", "POST", CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    ("unknown-role", "POST", CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("wrong-type", "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": "lots"}, 400, "max_tokens"),
    ("negative-temperature", "POST", CHAT, {"model": MODEL, "messages": MSGS, "temperature": -1}, 400, "temperature"),
    ("zero-top-p", "POST", CHAT, {"model": MODEL, "messages": MSGS, "top_p": 0}, 400, "top_p"),
    ("zero-max-tokens", "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 0}, 400, "max_tokens"),
    ("n-below-one", "POST", CHAT, {"model": MODEL, "messages": MSGS, "n": 0}, 400, "n"),
    ("over-context", "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 10**6}, 400, None),
    ("stream-options-without-stream", "POST", CHAT,
     {"model": MODEL, "messages": MSGS, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("top-logprobs-without-logprobs", "POST", CHAT, {"model": MODEL, "messages": MSGS, "top_logprobs": 2},
     400, "top_logprobs"),
    ("too-many-logprobs", "POST", CHAT, {"model": MODEL, "messages": MSGS, "logprobs": True, "top_logprobs": 50},
     400, "logprobs"),
    ("tools", "POST", CHAT, {"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {}}]},
     400, "tools"),
    ("function-call-of-an-unknown-function", "POST", CHAT, {"model": MODEL, "messages": MSGS, "functions": [
        {"name": "f"}], "function_call": {"name": "g"}}, 400, "function_call"),
    ("tool-choice-without-tools", "POST", CHAT, {"model": MODEL, "messages": MSGS, "tool_choice": "required"},
     400, "tool_choice"),
    ("unknown-response-format", "POST", CHAT,
     {"model": MODEL, "messages": MSGS, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("invalid-json-schema", "POST", CHAT, {"model": MODEL, "messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}, 400, "response_format"),
    ("json-schema-not-an-object", "POST", CHAT, {"model": MODEL, "messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}}, 400, "response_format"),
    ("response-format-and-structured-outputs", "POST", CHAT, {"model": MODEL, "messages": MSGS, "response_format": {
        "type": "json_object"}, "structured_outputs": {"regex": "a"}}, 400, "response_format"),
    ("uncompilable-regex", "POST", COMP, {"model": MODEL, "prompt": "a", "structured_outputs": {"regex": "a(b"}},
     400, "structured_outputs"),
    ("two-structured-kinds", "POST", COMP, {"model": MODEL, "prompt": "a", "structured_outputs": {
        "regex": "a", "choice": ["b"]}}, 400, "structured_outputs"),
    ("oversized-choice", "POST", CHAT, {"model": MODEL, "messages": MSGS, "structured_outputs": {
        "choice": [f"option {i}" for i in range(30000)]}}, 400, "structured_outputs"),
    ("empty-choice", "POST", CHAT, {"model": MODEL, "messages": MSGS, "structured_outputs": {"choice": []}},
     400, "structured_outputs"),
    ("undefined-grammar-rule", "POST", CHAT, {"model": MODEL, "messages": MSGS, "structured_outputs": {
        "grammar": "start: nothing_defined"}}, 400, "structured_outputs"),
    ("audio-modality", "POST", CHAT, {"model": MODEL, "messages": MSGS, "modalities": ["text", "audio"]},
     400, "modalities"),
    ("image-content", "POST", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages"),
    ("bad-logit-bias-key", "POST", CHAT, {"model": MODEL, "messages": MSGS, "logit_bias": {"abc": 1}},
     400, "logit_bias"),
    ("seed-out-of-range", "POST", CHAT, {"model": MODEL, "messages": MSGS, "seed": 2**63}, 400, "seed"),
    ("missing-prompt", "POST", COMP, {"model": MODEL}, 400, "prompt"),
    ("empty-prompt", "POST", COMP, {"model": MODEL, "prompt": ""}, 400, None),
    ("token-id-out-of-vocab", "POST", COMP, {"model": MODEL, "prompt": [1, 10**9]}, 400, None),
    ("suffix", "POST", COMP, {"model": MODEL, "prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("best-of-above-n", "POST", COMP, {"model": MODEL, "prompt": "a", "best_of": 3}, 400, "best_of"),
    ("streamed-echo-with-logprobs", "POST", COMP, {"model": MODEL, "prompt": "a", "echo": True, "logprobs": 1,
                                                   "stream": True}, 400, "stream"),
    ("prompt-logprobs-out-of-range", "POST", COMP, {"model": MODEL, "prompt": "a", "prompt_logprobs": -1},
     400, "prompt_logprobs"),
    ("echo-on-chat", "POST", CHAT, {"model": MODEL, "messages": MSGS, "echo": True}, 400, "echo"),
    ("tokenize-neither", "POST", "/tokenize", {}, 400, "prompt"),
    ("detokenize-out-of-vocab", "POST", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("unknown-route", "GET", "/v1/engines", None, 404, None),
    ("wrong-method", "GET", COMP, None, 405, None),
    ("huge-body", "POST", COMP, {"model": MODEL, "prompt": "a" * (9 * 2**20)}, 413, None),
]


def _send(http, method: str, path: str, body, model: str):
    if isinstance(body, bytes):
        return http.request(method, path, content=body, headers={"content-type": "application/json"})
    if body is None:
        return http.request(method, path)
    return http.request(method, path, json=json.loads(json.dumps(body).replace(MODEL, model)))


@pytest.mark.parametrize("method, path, body, status, param", [r[1:] for r in BAD_REQUESTS],
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_gets_its_status_in_openai_error_shape(http, server: LiveServer, method, path, body, status, param):
    response = _send(http, method, path, body, server.model)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["code"] == status and error["param"] == param
    assert error["type"].endswith("Error")


def test_chunked_body_over_the_cap_is_413_too(http):
    chunks = (b" " * 2**20 for _ in range(9))  # no Content-Length: the cap is found while reading
    response = http.post(COMP, content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == 413


def test_unknown_model_message_names_the_model(http):
    error = http.post(CHAT, json={"model": "gpt-9", "messages": MSGS}).json()["error"]
    assert error == {"message": "The model `gpt-9` does not exist.", "type": "NotFoundError", "param": "model",
                     "code": 404}


def test_validation_error_is_400_not_fastapis_422_and_names_the_field(http, server: LiveServer):
    response = http.post(CHAT, json={"model": server.model, "messages": MSGS, "temperature": "hot"})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("temperature:")


def test_sdk_raises_the_matching_exception_types(client, server: LiveServer):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=MSGS, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSGS)


async def test_server_keeps_serving_during_and_after_a_burst_of_bad_requests(aclient, server: LiveServer):
    async def bad() -> None:
        with pytest.raises(openai.BadRequestError):
            await aclient.completions.create(model=server.model, prompt="x", max_tokens=10**6)

    good = aclient.completions.create(model=server.model, prompt="The sky is", max_tokens=3, temperature=0)
    results = await asyncio.gather(good, *(bad() for _ in range(20)))
    assert results[0].usage.completion_tokens >= 1
    after = await aclient.chat.completions.create(model=server.model, messages=MSGS, max_tokens=2)
    assert after.choices[0].message.content is not None
    server.wait_idle()


def _job(requests: int = 1) -> Job:
    return Job(id="x", model="m", fingerprint="fp", deterministic=True,
               requests=[AdmittedRequest([1], SamplingParams())] * requests, n=1)


async def _outputs(*items: RequestOutput | Exception):
    """Stands in for a job's engine streams: these outputs of choice 0, or a failure."""
    for item in items:
        if isinstance(item, Exception):
            raise item
        yield 0, item


async def test_error_mid_stream_is_one_more_event_with_the_error_object_then_done():
    job = _job()
    job.include_usage = True
    renderer = ChatRenderer(job, str, show_prompt_logprobs=False, return_token_ids=False, tool_use=None)
    failing = _outputs(RequestOutput("x-0", [5], [], "Hi", False, None, 1, 1, 0),
                       RequestFailedError("the engine gave up on this request"))
    events = [e async for e in renderer.events(failing)]
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    assert json.loads(events[1][6:]) == {"error": {
        "message": "the request failed in the engine: the engine gave up on this request",
        "type": "InternalServerError", "param": None, "code": 500}}
    assert events[2:] == ["data: [DONE]\n\n"]


async def test_stream_ended_by_an_abort_reports_an_error_not_a_finish_reason():
    job = _job()
    renderer = CompletionRenderer(job, str, show_prompt_logprobs=False, return_token_ids=False, echoes=[""],
                                  echo_logprobs=False)
    aborted = _outputs(RequestOutput("x-0", [], [], "", True, FinishReason.ABORT, 1, 0, 0))
    events = [e async for e in renderer.events(aborted)]
    assert "error" in json.loads(events[0][6:]) and events[1:] == ["data: [DONE]\n\n"]


def test_echo_of_out_of_range_token_ids_is_a_400_not_a_500(http, server: LiveServer) -> None:
    """Found by the schemathesis run: echo decoded the ids before they were checked."""
    response = http.post(COMP, json={"model": server.model, "prompt": [[-1611, -56245495507]], "echo": True,
                                     "max_tokens": 2})
    assert response.status_code == 400 and "token ids" in response.json()["error"]["message"]
