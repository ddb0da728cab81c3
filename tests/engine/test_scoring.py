"""Prompt logprobs equal generation logprobs, bit for bit (deterministic mode).

Generate a completion with logprobs; score prompt + completion as a prompt (max_tokens 0, prompt
logprobs); the completion tokens' scored logprobs must equal the reported ones exactly: alone,
amid concurrent load, under small prefill chunks, with prefix-cache hits, after preemption, for
seeded sampling, and on a random-weight Qwen3 shape.
"""

from __future__ import annotations

import json
import random

import pytest

from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import Request, SamplingParams
from tests.engine.test_determinism import QUESTION, random_request

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, seed=21, logprobs=2, ignore_eos=True)
SCORE = SamplingParams(max_tokens=0, prompt_logprobs=2)


def reported(request: Request) -> list[tuple[int, float, int]]:
    return [(lp.token_id, lp.logprob, lp.rank) for lp in request.output_logprobs]


def scored(engine: LLMEngine, prompt: list[int], generated: Request) -> list[tuple[int, float, int]]:
    [score] = engine.generate([prompt + generated.output_token_ids], SCORE)
    assert score.num_output_tokens == 0 and score.finish_reason.value == "length"
    assert score.prompt_logprobs[0] is None and len(score.prompt_logprobs) == len(prompt) + generated.num_output_tokens
    return [(lp.token_id, lp.logprob, lp.rank) for lp in score.prompt_logprobs[len(prompt):]]


def test_scored_completion_equals_its_generation_greedy_and_seeded(make_engine) -> None:
    engine = make_engine(enable_prefix_caching=False)
    prompt = engine.tokenizer.apply_chat_template(QUESTION)
    for params in (GREEDY, SEEDED):
        [generated] = engine.generate([prompt], params)
        assert scored(engine, prompt, generated) == reported(generated)


def test_scored_logprobs_keep_their_bits_in_small_chunks_with_cache_hits_and_after_preemption(make_engine) -> None:
    reference = make_engine(enable_prefix_caching=False)
    prompt = reference.tokenizer.apply_chat_template(QUESTION)
    [generated] = reference.generate([prompt], SEEDED)
    expected = reported(generated)

    assert scored(make_engine(max_num_batched_tokens=7, enable_prefix_caching=False), prompt, generated) == expected
    cached = make_engine()  # the scorer skips cache reads: a cached prefix has no logits to score
    cached.generate([prompt + generated.output_token_ids], SamplingParams(max_tokens=1, temperature=0))
    [score] = cached.generate([prompt + generated.output_token_ids], SCORE)
    assert score.num_cached_prompt_tokens == 0
    assert [(lp.token_id, lp.logprob, lp.rank) for lp in score.prompt_logprobs[len(prompt):]] == expected
    [hit] = cached.generate([prompt], SEEDED)  # a generation that reads the cache reports the same bits
    assert hit.num_cached_prompt_tokens > 0 and reported(hit) == expected

    tiny = make_engine(kv_cache_tokens=160, enable_prefix_caching=False)
    full = prompt + generated.output_token_ids
    crowd = tiny.generate([prompt, full] * 3, [SEEDED, SCORE] * 3)
    assert tiny.stats().num_preemptions > 0 and any(r.num_preemptions for r in crowd)
    for generation, score in zip(crowd[::2], crowd[1::2]):
        assert [(lp.token_id, lp.logprob, lp.rank) for lp in score.prompt_logprobs[len(prompt):]] == expected
        assert reported(generation) == expected


@pytest.mark.slow
def test_scored_logprobs_keep_their_bits_amid_concurrent_load(make_engine) -> None:
    engine = make_engine(enable_prefix_caching=False)
    prompt = engine.tokenizer.apply_chat_template(QUESTION)
    [generated] = engine.generate([prompt], GREEDY)
    expected = reported(generated)
    rng = random.Random(8)
    for run in range(6):
        others = [random_request(engine, rng, f"load-{run}-{i}") for i in range(rng.randint(1, 10))]
        for _ in range(rng.randint(0, 3)):
            engine.step()
        score = engine.add_request(f"score-{run}", engine.admit(prompt + generated.output_token_ids, SCORE))
        while not score.finished:
            engine.step()
        for other in others:
            engine.abort_request(other.request_id)
        assert [(lp.token_id, lp.logprob, lp.rank) for lp in score.prompt_logprobs[len(prompt):]] == expected


def test_a_random_weight_qwen3_shape_scores_its_own_generation_bit_for_bit(make_engine, tmp_path) -> None:
    config = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "eos_token_id": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    engine = make_engine(model=str(tmp_path), load_format="dummy", enable_prefix_caching=False,
                         max_num_batched_tokens=64)
    prompt = list(range(3, 150))  # longer than one scoring batch of lm_head rows, in several prefill chunks
    for params in (GREEDY, SEEDED):
        [generated] = engine.generate([prompt], params)
        assert scored(engine, prompt, generated) == reported(generated)


def test_max_tokens_zero_is_only_for_scoring() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
