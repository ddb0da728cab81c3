"""Structured outputs on the real default model: every constrained output matches its constraint,
and a constrained deterministic request keeps its bits in any company, as
`test_determinism.py` checks plain requests (exact equality of token ids and logprobs)."""

from __future__ import annotations

import json
import math
import random
import re

import jsonschema
import pytest

from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import FinishReason, SamplingParams
from detserve.engine.structured import GrammarError, StructuredOutput
from tests.engine.test_determinism import Result, random_request

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Tokyo", "Lima"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def constrained(kind: str, spec: object, **params) -> SamplingParams:
    defaults = dict(max_tokens=60, temperature=0.0, logprobs=2)
    return SamplingParams(structured=StructuredOutput.of(kind, spec), **(defaults | params))


def text_of(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[str, FinishReason]:
    [request] = engine.generate([prompt], params)
    return engine.tokenizer.decode(request.output_token_ids), request.finish_reason


def test_json_schema_outputs_parse_and_validate_greedy_and_seeded(make_engine) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.apply_chat_template(ASK)
    for params in [constrained("json", PERSON)] + [constrained("json", PERSON, temperature=1.0, seed=s) for s in range(4)]:
        text, reason = text_of(engine, prompt, params)
        assert reason is FinishReason.STOP, text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_choice_and_regex_outputs_match_their_constraint(make_engine) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Which city is the capital of Peru?"}])
    text, _ = text_of(engine, prompt, constrained("json", {"type": "object", "properties": {"a": {"type": "boolean"}},
                                                           "required": ["a"]}))
    assert isinstance(json.loads(text)["a"], bool)
    for seed in range(3):
        text, reason = text_of(engine, prompt, constrained("choice", ["Paris", "Tokyo", "Lima"], temperature=1.0, seed=seed))
        assert text in ("Paris", "Tokyo", "Lima") and reason is FinishReason.STOP
    text, reason = text_of(engine, prompt, constrained("regex", r"[A-Z][a-z]{2,6}-[0-9]{2}"))
    assert re.fullmatch(r"[A-Z][a-z]{2,6}-[0-9]{2}", text) and reason is FinishReason.STOP
    text, _ = text_of(engine, prompt, constrained("grammar", 'start: "yes" | "no" | "maybe " NUMBER\n%import common.NUMBER'))
    assert re.fullmatch(r"yes|no|maybe [0-9.eE+-]+", text)


def test_logprobs_are_those_of_the_masked_distribution(make_engine) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.apply_chat_template(ASK)
    [request] = engine.generate([prompt], constrained("json", PERSON, logprobs=5))
    first = request.output_logprobs[0]
    assert engine.tokenizer.decode([first.token_id]).startswith("{")
    assert first.logprob == 0.0 and first.top == [(first.token_id, 0.0)]  # the only token allowed: certain
    for lp in request.output_logprobs:
        assert lp.logprob <= 0.0 and all(math.isfinite(v) for _, v in lp.top)
        assert math.fsum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-5


def test_an_output_the_grammar_has_not_finished_at_max_tokens_ends_with_length(make_engine) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.apply_chat_template(ASK)
    text, reason = text_of(engine, prompt, constrained("json", PERSON, max_tokens=4))
    assert reason is FinishReason.LENGTH and text.startswith("{")


@pytest.mark.parametrize("kind, spec", [
    ("json", {"type": "objekt"}), ("json", "{not json"), ("json", {"type": "string", "format": "no-such-format"}),
    ("regex", "a(b"), ("grammar", "start: undefined_rule"), ("choice", [f"option {i}" for i in range(30000)]),
])
def test_invalid_constraints_are_refused_at_admission_and_leave_the_engine_clean(make_engine, kind, spec) -> None:
    engine = make_engine()
    with pytest.raises(GrammarError):
        engine.admit([1, 2, 3], constrained(kind, spec))
    assert not engine.has_unfinished_requests() and engine.stats().kv_cache_usage == 0


@pytest.mark.parametrize("kind, spec", [("choice", []), ("choice", ["a", 3]), ("regex", 5), ("json", 7)])
def test_malformed_constraint_values_are_refused_when_built(kind, spec) -> None:
    with pytest.raises(GrammarError):
        StructuredOutput.of(kind, spec)


@pytest.mark.slow
def test_a_constrained_request_keeps_its_bits_amid_load_chunking_preemption_and_cache_hits(make_engine) -> None:
    seeded = constrained("json", PERSON, temperature=0.9, seed=77, max_tokens=40)
    greedy = constrained("json", PERSON, max_tokens=40)
    reference = make_engine(enable_prefix_caching=False)
    prompt = reference.tokenizer.apply_chat_template(ASK)
    alone = {p.temperature: Result.of(reference.generate([prompt], p)[0]) for p in (greedy, seeded)}

    rng = random.Random(5)
    for run in range(6):  # amid 0-12 random requests arriving at random steps
        others = [random_request(reference, rng, f"bg-{run}-{i}") for i in range(rng.randint(0, 6))]
        probes = [reference.add_request(f"probe-{run}-{i}", reference.admit(prompt, p)) for i, p in enumerate((greedy, seeded))]
        for _ in range(rng.randint(0, 3)):
            reference.step()
        others += [random_request(reference, rng, f"late-{run}-{i}") for i in range(rng.randint(0, 6))]
        while any(not p.finished for p in probes):
            reference.step()
        for other in others:
            reference.abort_request(other.request_id)
        assert {p.params.temperature: Result.of(p) for p in probes} == alone, f"run {run}"

    chunked = make_engine(max_num_batched_tokens=7, enable_prefix_caching=False)
    assert {p.temperature: Result.of(chunked.generate([prompt], p)[0]) for p in (greedy, seeded)} == alone

    tiny = make_engine(kv_cache_tokens=160, enable_prefix_caching=False)
    crowded = tiny.generate([prompt] * 4, [greedy, seeded] * 2)
    assert tiny.stats().num_preemptions > 0
    assert [Result.of(r) for r in crowded] == [alone[0.0], alone[0.9]] * 2

    cached = make_engine()
    cached.generate([prompt], greedy)
    [hit] = cached.generate([prompt], greedy)
    assert hit.num_cached_prompt_tokens > 0 and Result.of(hit) == alone[0.0]
