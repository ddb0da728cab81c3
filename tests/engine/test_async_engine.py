"""The asyncio engine: streaming, concurrency, aborts on early close, bad input, and a dead engine."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from detserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from detserve.engine.request import FinishReason, RequestOutput, SamplingParams
from detserve.engine.structured import StructuredOutput
from tests.conftest import record_admission_calls


@pytest.fixture
async def async_engine(make_engine):
    llm = make_engine()
    engine = AsyncEngine(llm.config, engine=llm)
    await engine.start()
    yield engine
    await engine.stop()
    assert not llm.has_unfinished_requests()


async def collect(engine: AsyncEngine, request_id: str, prompt, params: SamplingParams):
    return [out async for out in engine.generate(request_id, engine.admit(prompt, params))]


async def test_stream_yields_each_token_once_and_finishes_once(async_engine: AsyncEngine) -> None:
    prompt = async_engine.engine.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    outputs = await collect(async_engine, "stream", prompt, SamplingParams(max_tokens=6, temperature=0))
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    token_ids = [t for o in outputs for t in o.new_token_ids]
    assert len(token_ids) == outputs[-1].num_output_tokens <= 6
    text = "".join(o.text_delta for o in outputs)
    assert text == async_engine.engine.tokenizer.decode(token_ids)
    assert outputs[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


async def test_concurrent_requests_match_their_solo_runs(async_engine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts = [[300 + i, 400 + i, 500 + i] for i in range(6)]
    solo = [await collect(async_engine, f"solo-{i}", p, params) for i, p in enumerate(prompts[:2])]
    together = await asyncio.gather(*(collect(async_engine, f"together-{i}", p, params) for i, p in enumerate(prompts)))
    for alone, crowd in zip(solo, together):
        assert [o.new_token_ids for o in alone] == [o.new_token_ids for o in crowd]


async def test_closing_a_stream_early_aborts_and_frees_its_blocks(async_engine: AsyncEngine, monkeypatch) -> None:
    llm = async_engine.engine
    real_abort, aborted = llm.abort_request, []

    def abort_request(request_id: str) -> RequestOutput | None:
        aborted.append(real_abort(request_id))
        return aborted[-1]

    monkeypatch.setattr(llm, "abort_request", abort_request)
    stream = async_engine.generate("early", async_engine.admit([7, 8, 9], SamplingParams(max_tokens=200, temperature=0,
                                                                                       ignore_eos=True)))
    first = await stream.__anext__()
    assert not first.finished
    await stream.aclose()
    deadline = time.monotonic() + 300  # only a hang: the abort, not the clock, shows it was cut short
    while llm.has_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [out.finish_reason for out in aborted] == [FinishReason.ABORT]
    assert llm.stats().kv_cache_usage == 0


async def test_the_engine_thread_steps_on_while_the_event_loop_is_busy(async_engine: AsyncEngine) -> None:
    """Steps do not wait for the event loop: a request runs to its end while the loop is blocked,
    and its stream then yields every token once."""
    llm = async_engine.engine
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    stream = async_engine.generate("unattended", async_engine.admit([7, 8, 9], params))
    outputs = [await stream.__anext__()]
    deadline = time.monotonic() + 300  # only a hang
    while llm.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)  # holds the event loop: no callback of it runs meanwhile
    assert not llm.has_unfinished_requests()
    outputs += [out async for out in stream]
    assert sum(len(out.new_token_ids) for out in outputs) == outputs[-1].num_output_tokens == 8
    assert [out.finished for out in outputs] == [False] * (len(outputs) - 1) + [True]


async def test_bad_requests_fail_alone_and_the_engine_keeps_serving(async_engine: AsyncEngine) -> None:
    too_long = list(range(10, 10 + async_engine.info.max_model_len))
    with pytest.raises(ValueError, match="maximum context length"):
        await collect(async_engine, "long", too_long, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        await collect(async_engine, "empty", [], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="token ids"):
        await collect(async_engine, "vocab", [10**9], SamplingParams(max_tokens=1))
    outputs = await collect(async_engine, "fine", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    assert outputs[-1].finished


async def test_a_failing_step_kills_the_engine_and_fails_its_requests(make_engine, monkeypatch) -> None:
    llm = make_engine()
    engine = AsyncEngine(llm.config, engine=llm)
    await engine.start()

    def broken_step():
        raise RuntimeError("injected fault")

    monkeypatch.setattr(llm, "step", broken_step)
    with pytest.raises(EngineDeadError, match="injected fault"):
        await collect(engine, "doomed", [1, 2, 3], SamplingParams(max_tokens=2))
    assert engine.dead and not engine.ready
    with pytest.raises(EngineDeadError):
        await collect(engine, "after", [1, 2, 3], SamplingParams(max_tokens=2))
    await engine.stop()
    monkeypatch.undo()
    for request_id in list(llm.requests):
        llm.abort_request(request_id)


async def test_a_fault_in_one_request_fails_it_alone(async_engine: AsyncEngine, monkeypatch) -> None:
    from detserve.engine.tokenizer import IncrementalDetokenizer

    real_add = IncrementalDetokenizer.add
    poison = 4242

    def add(self, token_id: int) -> str:
        if self.token_ids and self.token_ids[0] == poison:
            raise RuntimeError("injected detokenizer fault")
        return real_add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    results = await asyncio.gather(
        collect(async_engine, "poisoned", [poison, 5, 6], params),
        collect(async_engine, "healthy", [7, 5, 6], params),
        return_exceptions=True,
    )
    assert isinstance(results[0], RequestFailedError) and "injected" in str(results[0])
    assert results[1][-1].finished and results[1][-1].num_output_tokens == 4
    assert async_engine.ready


async def test_the_engine_thread_queues_an_admitted_request_without_admitting_it_again(
        async_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = async_engine.engine
    calls = record_admission_calls(llm, monkeypatch)
    params = SamplingParams(max_tokens=4, temperature=0, structured=StructuredOutput.of("regex", "[a-z]{3}"))
    outputs = await collect(async_engine, "admitted-once", "Spell a word:", params)
    assert outputs[-1].finished and re.fullmatch("[a-z]{3}", "".join(o.text_delta for o in outputs))
    here = threading.current_thread().name
    assert sorted(calls) == [("admit", here), ("encode", here), ("matcher", here)]  # none on the engine thread
