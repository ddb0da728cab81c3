"""Chat and text completions through the real `openai` SDK: the fields honoured and the shapes returned."""

from __future__ import annotations

import json

import httpx2
import openai

from tests.server.conftest import LiveServer

CHAT = [{"role": "user", "content": "Name three colors."}]


def _chat(client: openai.OpenAI, model: str, **kwargs):
    return client.chat.completions.create(model=model, messages=kwargs.pop("messages", CHAT), **kwargs)


def _sse_payloads(response: httpx2.Response) -> list[dict | str]:
    """Every `data:` event of a finished SSE response, parsed; `[DONE]` stays a string."""
    events = response.text.split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events[:-1]]


def test_chat_completion_has_openai_shape_usage_fingerprint_and_digest(client, server: LiveServer):
    raw = client.chat.completions.with_raw_response.create(model=server.model, messages=CHAT, max_tokens=8,
                                                           temperature=0)
    resp = raw.parse()
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == server.model
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    usage = resp.usage
    assert usage.completion_tokens <= 8 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens
    assert resp.system_fingerprint == server.engine.info.fingerprint(True)
    digest = resp.model_extra["output_digest"]
    assert len(digest) == 64 and raw.headers["x-detserve-output-digest"] == digest


def test_valid_openai_fields_at_values_that_ask_for_nothing_are_accepted(client, server: LiveServer):
    resp = _chat(client, server.model, max_tokens=1, user="u-1", store=False, metadata={},
                 service_tier="auto", parallel_tool_calls=False, tool_choice="none",
                 tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                 response_format={"type": "text"}, modalities=["text"], reasoning_effort="none")
    assert resp.usage.completion_tokens == 1


def test_non_deterministic_request_is_served_with_fast_fingerprint_and_no_digest(client, server: LiveServer):
    raw = client.chat.completions.with_raw_response.create(
        model=server.model, messages=CHAT, max_tokens=4, temperature=0, extra_body={"deterministic": False}
    )
    resp = raw.parse()
    assert resp.choices[0].message.content and resp.usage.completion_tokens >= 1
    assert resp.system_fingerprint == server.engine.info.fingerprint(False)
    assert resp.system_fingerprint != server.engine.info.fingerprint(True)
    assert "output_digest" not in (resp.model_extra or {}) and "x-detserve-output-digest" not in raw.headers


def test_text_and_token_id_prompts_give_the_same_completion(client, server: LiveServer, http):
    prompt = "Once upon a time"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    by_text = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0)
    assert by_text.id.startswith("cmpl-") and by_text.object == "text_completion"
    assert by_text.choices[0].text and by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)


def test_several_prompts_with_n_give_n_choices_per_prompt_in_order(client, server: LiveServer, http):
    prompts = ["The sky is", "Water is"]
    resp = client.completions.create(model=server.model, prompt=prompts, n=2, max_tokens=4, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    texts = [c.text for c in resp.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    alone = client.completions.create(model=server.model, prompt="Water is", max_tokens=4, temperature=0)
    assert texts[2] == alone.choices[0].text
    num_prompt_tokens = sum(http.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts)
    assert resp.usage.prompt_tokens == num_prompt_tokens  # each prompt counted once, not once per choice


def test_seeded_choices_differ_and_choice_i_uses_seed_plus_i(client, server: LiveServer):
    kwargs = dict(max_tokens=8, temperature=1.0, top_p=1.0)
    pair = _chat(client, server.model, n=2, seed=7, **kwargs)
    again = _chat(client, server.model, n=2, seed=7, **kwargs)
    next_seed = _chat(client, server.model, n=1, seed=8, **kwargs)
    first, second = (c.message.content for c in pair.choices)
    assert first != second
    assert [c.message.content for c in again.choices] == [first, second]
    assert next_seed.choices[0].message.content == second


def test_stop_string_ends_the_choice_just_before_it(client, server: LiveServer):
    kwargs = dict(model=server.model, prompt="1, 2, 3,", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    text = full.choices[0].text
    stop = text.strip()[2:5]  # something in the middle of the output
    assert stop and stop in text
    cut = client.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_include_stop_str_in_output_keeps_the_stop_string_at_the_end(client, server: LiveServer):
    kwargs = dict(model=server.model, prompt="1, 2, 3,", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    stop = text.strip()[2:5]
    kept = client.completions.create(**kwargs | {"extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
                                     stop=[stop])
    assert kept.choices[0].text == text[: text.index(stop) + len(stop)]
    assert kept.choices[0].finish_reason == "stop"


def test_skip_special_tokens_false_shows_the_special_tokens_in_the_text(client, server: LiveServer, http):
    end = http.get("/tokenizer_info").json()["eos_token"]
    eos = http.post("/tokenize", json={"prompt": end, "add_special_tokens": False}).json()["tokens"]
    kwargs = dict(model=server.model, prompt="Hi", max_tokens=2, temperature=0, logit_bias={str(eos[0]): 100})
    hidden = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    shown = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert len(eos) == 1 and hidden.choices[0].text == "" and shown.choices[0].text == end * 2


def test_max_tokens_and_max_completion_tokens_bound_the_output(client, server: LiveServer):
    comp = client.completions.create(model=server.model, prompt="Hello", max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.usage.completion_tokens == 3 and comp.choices[0].finish_reason == "length"
    chat = _chat(client, server.model, max_tokens=9, max_completion_tokens=2, temperature=0)
    assert chat.usage.completion_tokens == 2 and chat.choices[0].finish_reason == "length"


def test_logit_bias_stop_token_ids_and_min_tokens_are_honoured(client, server: LiveServer, http):
    bang = http.post("/tokenize", json={"prompt": "!"}).json()["tokens"][-1]
    kwargs = dict(model=server.model, prompt="Hi", max_tokens=3, temperature=0, logit_bias={str(bang): 100})
    forced = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == "!!!"
    stopped = client.completions.create(**kwargs, extra_body={"stop_token_ids": [bang]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = client.completions.create(**kwargs, extra_body={"stop_token_ids": [bang], "min_tokens": 2})
    # two tokens that cannot be the stop token, then the stop token
    assert held.usage.completion_tokens == 3 and held.choices[0].finish_reason == "stop"
    assert not held.choices[0].text.startswith("!")


def test_chat_logprobs_report_each_token_with_its_top_alternatives(client, server: LiveServer):
    resp = _chat(client, server.model, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and tops[0] == entry.logprob  # greedy picks the best


def test_completion_logprobs_use_the_legacy_shape_with_text_offsets(client, server: LiveServer):
    resp = client.completions.create(model=server.model, prompt="The sky is", max_tokens=5, temperature=0, logprobs=2)
    choice = resp.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and 1 <= len(top) <= 3


def test_echo_prepends_the_prompt(client, server: LiveServer):
    plain = client.completions.create(model=server.model, prompt="Roses are", max_tokens=4, temperature=0)
    echoed = client.completions.create(model=server.model, prompt="Roses are", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Roses are" + plain.choices[0].text


def test_chat_stream_joins_to_the_non_streamed_answer_with_one_finish_per_choice(client, server: LiveServer):
    kwargs = dict(max_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=2)
    whole = _chat(client, server.model, **kwargs)
    chunks = list(_chat(client, server.model, stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == [whole.choices[i].finish_reason]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        streamed_logprobs = [t for c in mine if c.logprobs for t in c.logprobs.content]
        assert streamed_logprobs == whole.choices[i].logprobs.content
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage_chunk.model_extra["output_digest"] == whole.model_extra["output_digest"]
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)


def test_completion_stream_ends_with_done_and_matches_the_non_streamed_answer(http, server: LiveServer):
    body = {"model": server.model, "prompt": "The sky is", "max_tokens": 5, "temperature": 0, "logprobs": 1}
    whole = http.post("/v1/completions", json=body).json()
    events = _sse_payloads(http.post("/v1/completions", json=body | {"stream": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks].count(whole["choices"][0]["finish_reason"]) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in c["choices"][0]["logprobs"][key]] == whole["choices"][0]["logprobs"][key]
    assert "usage" not in chunks[-1]  # no include_usage: the digest rides on the finishing chunk
    assert chunks[-1]["output_digest"] == whole["output_digest"]
