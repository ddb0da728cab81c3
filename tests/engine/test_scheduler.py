"""Block manager and scheduler, pure CPU: budgets, chunked prefill, preemption, prefix reuse, no leaks."""

from __future__ import annotations

import itertools
import random

from detserve.engine.block_manager import BlockManager
from detserve.engine.request import Request, RequestStatus, SamplingParams, TokenLogprob
from detserve.engine.scheduler import Scheduler, SchedulerOutput

_ids = itertools.count()


def make_request(num_prompt_tokens: int, deterministic: bool = True, tokens: list[int] | None = None) -> Request:
    i = next(_ids)
    prompt = tokens if tokens is not None else [(i * 7 + t) % 1000 for t in range(num_prompt_tokens)]
    return Request(f"r{i}", prompt, SamplingParams(max_tokens=64), deterministic, seed=0)


def run_step(scheduler: Scheduler, token: int = 5) -> SchedulerOutput:
    """One step as the engine takes it, `token` sampled by every request the step samples for."""
    out = scheduler.schedule()
    scheduler.update_from_output(out, {s.request.request_id: (token, None) for s in out.scheduled if s.samples}, {})
    return out


def test_chunked_prefill_respects_the_token_budget_and_packs_decodes_first() -> None:
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    first, second = make_request(7), make_request(25)
    sched.add(first)
    sched.add(second)
    out = run_step(sched)
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(first, 7), (second, 3)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    out = run_step(sched)
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(first, 1), (second, 9)]
    assert all(s.num_new_tokens <= 10 for s in out.scheduled)
    run_step(sched)  # 1 + 9
    run_step(sched)  # 1 + the last 4, which sample
    assert second.num_computed_tokens == 25 and second.num_output_tokens == 1


def test_max_num_seqs_caps_running_requests() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for _ in range(3):
        sched.add(make_request(3))
    run_step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_youngest_request_is_preempted_when_blocks_run_out_and_resumes_later() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    old, young = make_request(8), make_request(8)
    sched.add(old)
    sched.add(young)
    run_step(sched)  # 2 blocks each: the cache is full
    assert bm.num_free_blocks == 0
    out = run_step(sched)  # old's 9th token needs a third block: young is preempted
    assert out.preempted == [young]
    assert young.status is RequestStatus.WAITING and young.num_computed_tokens == 0 and not young.block_table
    assert young.num_output_tokens == 1, "generated tokens survive preemption and are recomputed"
    sched.finish(old)
    out = run_step(sched)
    (resumed,) = out.scheduled
    assert resumed.request is young and resumed.samples
    assert resumed.start == 4, "its first block comes back from the prefix cache (the second was evicted)"
    assert resumed.start + resumed.num_new_tokens == 9


def test_finished_and_aborted_requests_leak_no_blocks() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=32)
    rng = random.Random(0)
    live: list[Request] = []
    for _ in range(100):
        request = make_request(rng.randint(1, 30))
        sched.add(request)
        live.append(request)
        run_step(sched)
        if rng.random() < 0.7:
            sched.finish(live.pop(rng.randrange(len(live))))
    for request in live:
        sched.finish(request)
    assert bm.num_free_blocks == 64 and all(c == 0 for c in bm.ref_counts)
    assert not sched.running and not sched.waiting


def test_prefix_cache_reuses_full_blocks_and_always_leaves_a_token_to_compute() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = list(range(100, 112))  # exactly 3 blocks
    first = make_request(0, tokens=prompt)
    sched.add(first)
    run_step(sched)
    sched.finish(first)
    second = make_request(0, tokens=prompt)
    sched.add(second)
    out = run_step(sched)
    assert second.num_cached_prompt_tokens == 8, "the last block is recomputed to get logits"
    assert out.scheduled[0].num_new_tokens == 4
    assert bm.prefix_cache_hits == 2


def test_deterministic_requests_never_reuse_blocks_written_by_fast_kernels() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = list(range(200, 213))
    fast = make_request(0, deterministic=False, tokens=prompt)
    sched.add(fast)
    assert not run_step(sched).invariant
    sched.finish(fast)
    det = make_request(0, deterministic=True, tokens=prompt)
    sched.add(det)
    run_step(sched)
    assert det.num_cached_prompt_tokens == 0
    sched.finish(det)
    # the invariant blocks det wrote are fine for a later fast request
    fast_again = make_request(0, deterministic=False, tokens=prompt)
    sched.add(fast_again)
    run_step(sched)
    assert fast_again.num_cached_prompt_tokens == 12


def test_a_block_written_partly_in_fast_mode_is_not_invariant() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=3)
    mixed_fast = make_request(0, deterministic=False, tokens=list(range(300, 308)))
    det = make_request(0, deterministic=True, tokens=list(range(400, 402)))
    sched.add(det)
    sched.add(mixed_fast)
    assert run_step(sched).invariant  # det + 1 token of mixed_fast, invariant kernels
    sched.finish(det)
    while mixed_fast.num_computed_tokens < 8:
        assert not run_step(sched).invariant
    assert not mixed_fast.invariant_blocks
    probe = make_request(0, deterministic=True, tokens=list(range(300, 309)))
    sched.finish(mixed_fast)
    sched.add(probe)
    run_step(sched)
    assert probe.num_cached_prompt_tokens == 0


def test_evicted_cached_block_is_forgotten_before_reuse() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_request(0, tokens=[1, 2, 3, 4, 5])
    sched.add(a)
    run_step(sched)
    sched.finish(a)
    b = make_request(0, tokens=[9, 9, 9, 9, 9, 9, 9, 9])  # needs both blocks: evicts a's cached block
    sched.add(b)
    run_step(sched)
    sched.finish(b)
    c = make_request(0, tokens=[1, 2, 3, 4, 6])
    sched.add(c)
    run_step(sched)
    assert c.num_cached_prompt_tokens == 0


def test_a_steps_update_pairs_sampled_tokens_and_prompt_logprobs_by_request_id() -> None:
    sched = Scheduler(BlockManager(num_blocks=100, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    first, second = make_request(3), make_request(5)
    second.prompt_logprobs = [None] * 5
    for request in (first, second):
        sched.add(request)
    out = sched.schedule()
    scored = TokenLogprob(token_id=9, logprob=-1.5, top=[])
    updated = sched.update_from_output(out, {second.request_id: (11, None), first.request_id: (10, None)},
                                       {second.request_id: [(2, scored)]})
    assert updated == [first, second]  # in the step's order, whatever order the output lists them in
    assert (first.output_token_ids, second.output_token_ids) == ([10], [11])
    assert second.prompt_logprobs[2] is scored and first.num_computed_tokens == 3
