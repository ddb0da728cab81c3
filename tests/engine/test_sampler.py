"""Sampling rules, seeded noise, stop conditions and streaming text, on synthetic logits and the real model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detserve.engine.request import FinishReason, Request, SamplingParams
from detserve.engine.sampler import apply_penalties_and_bias, sample
from detserve.kernels.reference.noise import uniform_noise
from detserve.engine.tokenizer import StopChecker

VOCAB = 1000


def request_with(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None) -> Request:
    request = Request("r", prompt or [1, 2, 3], params, True, seed=params.seed or 0)
    request.output_token_ids = list(output or [])
    return request


def logits_row(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def pick(params: SamplingParams, logits: torch.Tensor, **kw) -> int:
    [(token, _)] = sample(logits[None], [request_with(params, **kw)], eos_token_ids=(0,))
    return token


def test_noise_is_uniform_and_a_pure_function_of_seed_and_position() -> None:
    def noise(seed: int, position: int) -> np.ndarray:
        return uniform_noise(np.array([seed]), np.array([position]), 200_000)[0]

    u = noise(seed=42, position=7)
    assert np.array_equal(u, noise(42, 7))
    assert not np.array_equal(u, noise(42, 8))
    assert not np.array_equal(u, noise(43, 7))
    rows = uniform_noise(np.array([43, 42, 42]), np.array([7, 8, 7]), 200_000)  # rows drawn together
    assert np.array_equal(rows[2], u) and np.array_equal(rows[1], noise(42, 8))
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002


def test_seeded_sampling_follows_the_softmax_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    expected = torch.softmax(logits / 0.7, -1)
    counts = torch.zeros(4)
    for position in range(4000):
        request = request_with(SamplingParams(temperature=0.7, seed=5))
        request.output_token_ids = [0] * position  # the draw depends on the token position
        [(token, _)] = sample(logits[None], [request], eos_token_ids=())
        counts[token] += 1
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_greedy_and_degenerate_filters_pick_the_argmax() -> None:
    logits = logits_row()
    best = int(logits.argmax())
    assert pick(SamplingParams(temperature=0), logits) == best
    assert pick(SamplingParams(temperature=1.0, top_k=1, seed=3), logits) == best
    assert pick(SamplingParams(temperature=1.0, top_p=1e-6, seed=3), logits) == best
    assert pick(SamplingParams(temperature=1.0, min_p=1.0, seed=3), logits) == best


def test_top_k_and_top_p_never_pick_outside_their_set() -> None:
    logits = logits_row(1)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[: int((torch.cumsum(probs[order], 0) < 0.5).sum()) + 1].tolist())
    for seed in range(60):
        assert pick(SamplingParams(temperature=1.5, top_k=5, seed=seed), logits) in top5
        assert pick(SamplingParams(temperature=1.0, top_p=0.5, seed=seed), logits) in nucleus


def test_logit_bias_and_min_tokens_and_penalties_shape_the_logits() -> None:
    logits = torch.zeros(VOCAB)
    assert pick(SamplingParams(temperature=0, logit_bias={17: 5.0}), logits) == 17
    eos_favoured = torch.zeros(VOCAB)
    eos_favoured[0] = 10.0
    assert pick(SamplingParams(temperature=0, min_tokens=2, max_tokens=4), eos_favoured) != 0
    assert pick(SamplingParams(temperature=0, min_tokens=2, max_tokens=4), eos_favoured, output=[5, 6]) == 0
    row = torch.full((VOCAB,), 2.0)
    request = request_with(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25), prompt=[9], output=[4, 4])
    out = apply_penalties_and_bias(row, request, eos_token_ids=())
    assert out[9] == 1.0  # repetition penalty on a prompt token
    assert out[4] == 1.0 - 0.5 - 0.5  # repetition, presence, and frequency x2
    assert out[5] == 2.0


def test_logprobs_report_the_chosen_token_and_the_top_alternatives() -> None:
    logits = logits_row(2)
    [(token, lp)] = sample(logits[None], [request_with(SamplingParams(temperature=0, logprobs=3))], eos_token_ids=())
    expected = torch.log_softmax(logits, -1)
    assert lp.token_id == token and math.isclose(lp.logprob, float(expected[token]), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == torch.topk(expected, 3).indices.tolist()


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0), ("min_p", 1.5),
     ("logprobs", 21), ("presence_penalty", 3.0), ("temperature", math.nan), ("seed", 2**63), ("seed", -(2**63) - 1),
     ("truncate_prompt_tokens", 0), ("truncation_side", "middle")],
)
def test_invalid_sampling_params_are_rejected_with_a_message(field: str, value) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_stop_strings_are_held_back_until_they_cannot_match() -> None:
    checker = StopChecker(["END"])
    assert checker.take_emittable("Hello E", finished=False) == "Hello"
    assert checker.find("Hello EN", 1) is None
    assert checker.find("Hello END", 1) == 6
    assert checker.take_emittable("Hello ", finished=True) == " "


def test_engine_truncates_at_stop_strings_and_stops_on_stop_token_ids(make_engine) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    [free] = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0))
    text = engine.tokenizer.decode(free.output_token_ids)
    assert "3" in text, text
    stop = "3"
    outputs = []
    engine.add_request("stopper", engine.admit(prompt, SamplingParams(max_tokens=20, temperature=0, stop=[stop])))
    while engine.has_unfinished_requests():
        outputs += engine.step()
    streamed = "".join(o.text_delta for o in outputs)
    assert streamed == text[: text.index(stop)]
    assert outputs[-1].finish_reason is FinishReason.STOP
    [by_id] = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[free.output_token_ids[2]]))
    assert by_id.output_token_ids == free.output_token_ids[:3] and by_id.finish_reason is FinishReason.STOP
    [short] = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0))
    assert short.finish_reason is FinishReason.LENGTH and short.num_output_tokens == 3


def test_of_stop_strings_completed_by_the_same_text_the_earliest_then_the_longest_ends_it() -> None:
    cut, kept = StopChecker(["ab", "abc", "c"]), StopChecker(["ab", "abc", "c"], include_stop=True)
    assert cut.find("xxabcx", 4) == 2 and kept.find("xxabcx", 4) == 5
