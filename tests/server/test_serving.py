"""The serving layer: a request is admitted once (tokenized, checked, its grammar compiled), its `n`
choices fanned out from that admission, and `--max-n` is the one bound on `n`."""

from __future__ import annotations

import httpx2
import pytest

from detserve.server.config import ServerConfig
from tests.conftest import record_admission_calls
from tests.server.conftest import LiveServer, serve

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "Name a colour."}]


def test_max_n_200_lets_150_choices_through(tiny_server: LiveServer) -> None:
    with serve(tiny_server.engine, ServerConfig(max_n=200)) as live, \
            httpx2.Client(base_url=live.url, timeout=300) as http:
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "n": 150, "max_tokens": 1,
                                                      "seed": 3, "temperature": 1.0})
    assert response.status_code == 200, response.text
    assert sorted(c["index"] for c in response.json()["choices"]) == list(range(150))
    tiny_server.wait_idle()


@pytest.mark.parametrize("n", [5, 0])
def test_max_n_4_refuses_n_outside_1_to_4_with_a_400_naming_n(tiny_server: LiveServer, n: int) -> None:
    with serve(tiny_server.engine, ServerConfig(max_n=4)) as live, httpx2.Client(base_url=live.url, timeout=60) as http:
        response = http.post(CHAT, json={"model": "tiny", "messages": ASK, "n": n, "max_tokens": 1})
        allowed = http.post(CHAT, json={"model": "tiny", "messages": ASK, "n": 4, "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert "[1, 4]" in response.json()["error"]["message"]
    assert allowed.status_code == 200 and len(allowed.json()["choices"]) == 4


def test_n_choices_are_tokenized_and_their_grammar_compiled_once_on_the_event_loop(
        tiny_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = tiny_server.engine.engine
    calls = record_admission_calls(llm, monkeypatch)
    with httpx2.Client(base_url=tiny_server.url, timeout=60) as http:
        response = http.post(CHAT, json={"model": "tiny", "messages": ASK, "n": 3, "max_tokens": 8, "seed": 1,
                                         "temperature": 1.0, "structured_outputs": {"regex": "[a-z]{2,6}"}})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3
    assert sorted(name for name, _ in calls) == ["admit", "encode", "matcher"]
    assert "detserve-engine" not in {thread for _, thread in calls}
    tiny_server.wait_idle()
