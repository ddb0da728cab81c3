"""Continuous batching: which requests compute how many tokens in the next step. Pure CPU logic.

Each step packs every running request (a decode needs one token, a partly prefilled prompt its
next chunk) and then admits waiting requests, all under a per-step token budget (chunked prefill).
When the KV cache runs out of blocks, the youngest running request is preempted: its blocks are
freed and it is recomputed later from its tokens (its prefix may come back from the cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from detserve.engine.block_manager import BlockManager
from detserve.engine.request import Request, RequestStatus, TokenLogprob


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # the request's num_computed_tokens when scheduled
    num_new_tokens: int  # tokens to compute this step
    samples: bool  # the step reaches the request's last known token, so its logits pick the next

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> "ScheduledRequest":
        start = request.num_computed_tokens
        reaches_end = start + num_new_tokens == request.num_tokens
        return cls(request, start, num_new_tokens, reaches_end and request.params.max_tokens > 0)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    invariant: bool  # run invariant kernels: some request in the step asked for determinism
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admission first
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            target = request.num_computed_tokens + num_new
            while not self.block_manager.can_allocate(request, target):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break
            self.block_manager.allocate(request, target)
            scheduled.append(ScheduledRequest.of(request, num_new))
            budget -= num_new
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            cached = self.block_manager.claim_cached_prefix(request)
            if request.num_preemptions == 0:
                request.num_cached_prompt_tokens = cached
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            target = request.num_computed_tokens + num_new
            if not self.block_manager.can_allocate(request, target):
                # Hold nothing while waiting: the claimed prefix stays cached and is claimed again.
                self.block_manager.free(request)
                request.num_computed_tokens = 0
                break
            self.block_manager.allocate(request, target)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            scheduled.append(ScheduledRequest.of(request, num_new))
            budget -= num_new

        invariant = any(s.request.deterministic for s in scheduled)
        return SchedulerOutput(scheduled, invariant, preempted)

    def update_from_output(self, step: SchedulerOutput, sampled: dict[str, tuple[int, TokenLogprob | None]],
                           prompt_logprobs: dict[str, list[tuple[int, TokenLogprob]]]) -> list[Request]:
        """Advance every request of `step` by what the step computed, paired by request id: its
        progress, the KV blocks it filled (published to the prefix cache, marked fast-written when
        the step ran fast kernels), its prompt logprobs, and the token it sampled. Returns the
        requests with something to report: a new token, or (max_tokens 0) a prompt fully scored."""
        updated = []
        for s in step.scheduled:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            if not step.invariant:
                request.invariant_blocks = False
            self.block_manager.register_full_blocks(request)
            for position, logprob in prompt_logprobs.get(request.request_id, ()):
                request.prompt_logprobs[position] = logprob
            if request.request_id in sampled:
                request.append_output(*sampled[request.request_id])
                updated.append(request)
            elif request.params.max_tokens == 0 and request.num_computed_tokens == request.num_tokens:
                updated.append(request)
        return updated

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it first among the waiting, to recompute later."""
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request from the queues and free its blocks."""
        request.status = RequestStatus.FINISHED
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
