"""The determinism contract, end to end on the real default model.

A deterministic request's token ids and logprobs are compared bit for bit (exact float equality)
between a run alone and runs in every kind of company: other requests arriving at other times,
chunked prefill, preemption under a tiny KV cache, and prefix-cache hits.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import Request, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.8, seed=1234, logprobs=3, ignore_eos=True)
QUESTION = [{"role": "user", "content": "Name three prime numbers and explain why they are prime."}]


@dataclass(frozen=True)
class Result:
    token_ids: tuple[int, ...]
    logprobs: tuple

    @classmethod
    def of(cls, request: Request) -> "Result":
        assert request.finished
        return cls(
            tuple(request.output_token_ids),
            tuple((lp.token_id, lp.logprob, tuple(lp.top)) for lp in request.output_logprobs),
        )


def probe_ids(engine: LLMEngine) -> list[int]:
    return engine.tokenizer.apply_chat_template(QUESTION)


def run_alone(engine: LLMEngine, params: SamplingParams, prompt: list[int] | None = None) -> Result:
    [request] = engine.generate([prompt or probe_ids(engine)], params)
    return Result.of(request)


def random_request(engine: LLMEngine, rng: random.Random, name: str) -> Request:
    prompt = [rng.randrange(200, 40000) for _ in range(rng.randint(3, 60))]
    params = SamplingParams(
        max_tokens=rng.randint(1, 16),
        temperature=rng.choice([0.0, 0.7, 1.0]),
        seed=rng.choice([None, rng.randrange(1000)]),
        deterministic=rng.random() < 0.8,
        logprobs=rng.choice([None, 0, 2]),
    )
    return engine.add_request(name, engine.admit(prompt, params))


def run_under_load(engine: LLMEngine, rng: random.Random, run: int) -> tuple[Result, Result]:
    """Both probes (greedy and seeded) amid 0-15 random requests that arrive at random steps."""
    num_others = rng.randint(0, 15)
    arrivals = sorted(rng.randint(0, 8) for _ in range(num_others))
    probe_steps = [rng.randint(0, 4), rng.randint(0, 4)]
    probes: list[Request] = []
    others: list[Request] = []
    step = 0
    while len(probes) < 2 or any(not p.finished for p in probes):
        while arrivals and arrivals[0] <= step:
            arrivals.pop(0)
            others.append(random_request(engine, rng, f"bg-{run}-{len(others)}"))
        for i, params in enumerate((GREEDY, SEEDED)):
            if probe_steps[i] == step:
                probes.append(engine.add_request(f"probe-{run}-{i}", engine.admit(probe_ids(engine), params)))
        engine.step()
        step += 1
    for other in others:
        engine.abort_request(other.request_id)
    assert engine.stats().kv_cache_usage == 0
    by_params = {p.params.temperature: p for p in probes}
    return Result.of(by_params[0.0]), Result.of(by_params[0.8])


@pytest.mark.slow
def test_same_bits_alone_and_under_20_runs_of_random_concurrent_load(make_engine) -> None:
    engine = make_engine(enable_prefix_caching=False)
    greedy_alone, seeded_alone = run_alone(engine, GREEDY), run_alone(engine, SEEDED)
    assert greedy_alone != seeded_alone
    rng = random.Random(2024)
    for run in range(20):
        greedy, seeded = run_under_load(engine, rng, run)
        assert greedy == greedy_alone, f"greedy probe diverged in run {run}"
        assert seeded == seeded_alone, f"seeded probe diverged in run {run}"


@pytest.mark.parametrize("cpu_kernels", ["auto", "torch"])
def test_same_bits_with_prefill_chunked_into_7_token_pieces(make_engine, cpu_kernels: str) -> None:
    alone = run_alone(make_engine(enable_prefix_caching=False, cpu_kernels=cpu_kernels), GREEDY)
    chunked = make_engine(max_num_batched_tokens=7, enable_prefix_caching=False, cpu_kernels=cpu_kernels)
    assert run_alone(chunked, GREEDY) == alone


def test_engines_of_both_cpu_kernels_share_a_process_each_with_its_own_bits(make_engine) -> None:
    """The CPU ops an engine runs are its runner's, selected around each step: an engine on the torch
    ops beside one on the C ops changes neither's bits, and each fingerprint names its own."""
    native = make_engine(enable_prefix_caching=False, cpu_kernels="native")
    torch_ops = make_engine(enable_prefix_caching=False, cpu_kernels="torch")
    first = run_alone(native, GREEDY)
    on_torch = run_alone(torch_ops, GREEDY)
    assert run_alone(native, GREEDY) == first and run_alone(torch_ops, GREEDY) == on_torch
    assert first.logprobs != on_torch.logprobs  # other arithmetic: other bits
    assert native.info.fingerprint(True) != torch_ops.info.fingerprint(True)


def test_the_decoder_layers_in_one_c_call_give_the_bits_of_the_layers_op_by_op(make_engine, monkeypatch) -> None:
    engine = make_engine(enable_prefix_caching=False, cpu_kernels="native")
    assert engine.runner.model.c_layers is not None  # the default model runs its layers as one C call
    whole = run_alone(engine, GREEDY), run_alone(engine, SEEDED)
    monkeypatch.setattr(engine.runner.model, "c_layers", None)
    assert (run_alone(engine, GREEDY), run_alone(engine, SEEDED)) == whole


_PROBE_IN_A_SUBPROCESS = """
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from tests.engine.test_determinism import GREEDY, SEEDED, run_alone
engine = LLMEngine(EngineConfig(enable_prefix_caching=False, cpu_kernels="native"))
print(repr((run_alone(engine, GREEDY), run_alone(engine, SEEDED))))
"""


def test_the_c_paths_bits_do_not_depend_on_torchs_vector_width(make_engine) -> None:
    """torch picks its CPU kernels' vector width (AVX-512, AVX2, none) by the CPU, and with it the
    order its reductions sum in: its log-softmax gave an AVX2 and an AVX-512 machine different
    logprob bits (measured). The C path does every reduction itself, so the same tokens and logprob
    bits whatever width torch runs at (`ATEN_CPU_CAPABILITY=default`: no vectors): a CPU fleet of
    mixed machines agrees."""
    engine = make_engine(enable_prefix_caching=False, cpu_kernels="native")
    here = repr((run_alone(engine, GREEDY), run_alone(engine, SEEDED)))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    scalar = subprocess.run([sys.executable, "-c", _PROBE_IN_A_SUBPROCESS], env=env, capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert scalar.stdout.strip() == here


@pytest.mark.slow
def test_same_bits_when_preempted_by_a_tiny_kv_cache(make_engine) -> None:
    reference = make_engine(enable_prefix_caching=False)
    tiny = make_engine(kv_cache_tokens=160, enable_prefix_caching=False)
    rng = random.Random(7)
    prompts = [[rng.randrange(200, 40000) for _ in range(rng.randint(20, 50))] for _ in range(6)]
    params = [GREEDY, SEEDED] * 3
    expected = [run_alone(reference, p, prompt) for prompt, p in zip(prompts, params)]
    crowded = tiny.generate(prompts, params)
    assert tiny.stats().num_preemptions > 0
    assert any(r.num_preemptions > 0 for r in crowded)
    assert [Result.of(r) for r in crowded] == expected
    assert tiny.stats().kv_cache_usage == 0


def test_same_bits_with_and_without_a_prefix_cache_hit(make_engine) -> None:
    rng = random.Random(99)  # prompts no other test sends, so the shared engine's cache starts cold
    ids = [rng.randrange(200, 40000) for _ in range(50)]
    ids_sharing_two_blocks = ids[:32] + [rng.randrange(200, 40000) for _ in range(9)]
    no_cache = make_engine(enable_prefix_caching=False)
    cold, cold_sharing = run_alone(no_cache, GREEDY, ids), run_alone(no_cache, GREEDY, ids_sharing_two_blocks)
    engine = make_engine()
    # a fast request with the same prompt fills the cache first: its blocks must not be reused
    engine.generate([ids], SamplingParams(max_tokens=2, temperature=0, deterministic=False))
    [first] = engine.generate([ids], GREEDY)
    assert first.num_cached_prompt_tokens == 0
    assert Result.of(first) == cold
    [hit] = engine.generate([ids], GREEDY)
    assert hit.num_cached_prompt_tokens == 48
    assert Result.of(hit) == cold
    [partial] = engine.generate([ids_sharing_two_blocks], GREEDY)
    assert partial.num_cached_prompt_tokens == 32
    assert Result.of(partial) == cold_sharing


def test_fast_mode_requests_still_work_and_leave_deterministic_ones_alone(make_engine) -> None:
    engine = make_engine(enable_prefix_caching=False)
    alone = run_alone(engine, GREEDY)
    fast = SamplingParams(max_tokens=10, temperature=0.0, deterministic=False)
    requests = engine.generate([probe_ids(engine), probe_ids(engine), [500, 600, 700]], [fast, GREEDY, fast])
    assert all(r.num_output_tokens == 10 or r.finish_reason.value == "stop" for r in requests)
    assert Result.of(requests[1]) == alone


def test_100_aborted_requests_leak_no_blocks(make_engine) -> None:
    engine = make_engine()
    rng = random.Random(3)
    names = []
    for i in range(100):
        request = random_request(engine, rng, f"abort-{i}")
        names.append(request.request_id)
        if i % 10 == 0:
            engine.step()
    engine.step()
    for name in names:
        engine.abort_request(name)
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_cache_usage == 0
    assert all(count == 0 for count in engine.block_manager.ref_counts)
    assert engine.abort_request(names[0]) is None
