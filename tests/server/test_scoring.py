"""Scoring through the official SDK: echo with logprobs and max_tokens 0, vLLM's prompt_logprobs,
return_token_ids and return_tokens_as_token_ids; a completion scored back gives the logprobs its
generation reported, exactly; and the 400s."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import LiveServer

PROMPT = "The capital of France is"


def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt(client: openai.OpenAI, server: LiveServer):
    resp = client.completions.create(model=server.model, prompt=PROMPT, echo=True, logprobs=5, max_tokens=0)
    choice = resp.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length" and resp.usage.completion_tokens == 0
    lp = choice.logprobs
    assert "".join(lp.tokens) == PROMPT and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(top) >= 5 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    again = client.completions.create(model=server.model, prompt=PROMPT, echo=True, logprobs=5, max_tokens=0)
    assert again.choices[0].logprobs == lp


def test_a_completion_scored_back_gives_the_logprobs_its_generation_reported(client: openai.OpenAI,
                                                                           server: LiveServer):
    for extra in ({"temperature": 0}, {"temperature": 0.9, "seed": 4}):
        generated = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, logprobs=1,
                                              extra_body={"return_token_ids": True, "ignore_eos": True}, **extra)
        choice = generated.choices[0]
        ids = choice.model_extra["prompt_token_ids"] + choice.model_extra["token_ids"]
        scored = client.completions.create(model=server.model, prompt=ids, echo=True, logprobs=1, max_tokens=0)
        assert scored.choices[0].logprobs.token_logprobs[-8:] == choice.logprobs.token_logprobs


def test_prompt_logprobs_and_token_id_fields_have_vllms_shapes(client: openai.OpenAI, server: LiveServer):
    resp = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1,
                                     extra_body={"prompt_logprobs": 2, "return_token_ids": True,
                                                 "return_tokens_as_token_ids": True})
    choice = resp.choices[0].model_extra
    prompt_ids = choice["prompt_token_ids"]
    assert len(choice["token_ids"]) == 2 and choice["prompt_logprobs"][0] is None
    for token_id, entry in zip(prompt_ids[1:], choice["prompt_logprobs"][1:]):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
        assert entry[str(token_id)]["decoded_token"] == f"token_id:{token_id}"
        assert {1, 2} <= {v["rank"] for v in entry.values()}
    assert resp.choices[0].logprobs.tokens == [f"token_id:{t}" for t in choice["token_ids"]]
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    assert len(chat.model_extra["prompt_logprobs"]) == len(chat.model_extra["prompt_token_ids"])
    assert len(chat.choices[0].model_extra["token_ids"]) == chat.usage.completion_tokens


def test_streamed_token_ids_arrive_with_their_chunks(client: openai.OpenAI, server: LiveServer):
    stream = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    chunks = [c.choices[0].model_extra for c in stream if c.choices]
    assert chunks[0]["prompt_token_ids"] and sum(len(c["token_ids"]) for c in chunks) == 6


@pytest.mark.parametrize("route, body, param", [
    ("completions", {"prompt": PROMPT, "extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
    ("completions", {"prompt": PROMPT, "echo": True, "logprobs": 1, "stream": True}, "stream"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "extra_body": {"echo": True}}, "echo"),
    ("completions", {"prompt": [7] * 10000, "echo": True, "max_tokens": 0}, None),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
])
def test_bad_scoring_requests_get_a_400(client: openai.OpenAI, server: LiveServer, route, body, param):
    create = client.completions.create if route == "completions" else client.chat.completions.create
    with pytest.raises(openai.BadRequestError) as error:
        create(model=server.model, **body)
    assert error.value.body["param"] == param
