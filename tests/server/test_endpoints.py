"""The routes around generation: health, version, the model list, tokenize and detokenize."""

from __future__ import annotations

import openai
import pytest

from detserve import engine
from tests.server.conftest import LiveServer


def test_health_is_200_once_loaded_and_version_reports_the_engine_version(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json() == {"version": engine.__version__}


def test_models_retrieve_returns_the_card_or_an_openai_404(client, server: LiveServer, http):
    card = client.models.retrieve(server.model)
    assert card.id == server.model and card.object == "model"
    assert http.get(f"/v1/models/{server.model}").json() == http.get("/v1/models").json()["data"][0]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/no-such-model")


def test_models_lists_the_served_model_with_root_and_context_length(client, server: LiveServer, http):
    assert [m.id for m in client.models.list()] == [server.model]
    card = http.get("/v1/models").json()["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "detserve" and card["parent"] is None
    assert card["root"] and card["max_model_len"] == server.engine.info.max_model_len and card["permission"] == []
    assert isinstance(card["created"], int)


def test_tokenize_then_detokenize_round_trips(http, server: LiveServer):
    out = http.post("/tokenize", json={"prompt": "Hello, world", "model": server.model}).json()
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == server.engine.info.max_model_len
    assert http.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": "Hello, world"}


def test_tokenize_messages_counts_the_prompt_a_chat_request_uses(http, client, server: LiveServer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    counted = http.post("/tokenize", json={"messages": messages}).json()["count"]
    resp = client.chat.completions.create(model=server.model, messages=messages, max_tokens=1)
    assert resp.usage.prompt_tokens == counted
    without_prompt = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["count"]
    assert without_prompt < counted


def test_head_on_the_read_only_endpoints_answers_as_get_without_a_body(http, server: LiveServer):
    for path in ("/health", "/live", "/metrics", "/v1/models"):
        head, get = http.head(path), http.get(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client, server: LiveServer):
    stream = client.completions.create(model=server.model, prompt="Once", max_tokens=5, temperature=0, stream=True,
                                       stream_options={"include_usage": True, "continuous_usage_stats": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    with_text = [c for c in chunks if c.choices]
    assert [c.usage.completion_tokens for c in with_text] == list(range(1, 6))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens > 0
