"""The shared vocabulary: what a request asks for, the state it carries, and what it reports back."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from detserve.engine.structured import GrammarState, StructuredOutput


class ParamError(ValueError):
    """A ValueError that names the request field at fault (the HTTP edge's 400 names it as `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick tokens for one request. Validated here so the HTTP edge and Python callers agree."""

    max_tokens: int | None = 16  # None: the rest of the context (settled at admission)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # vLLM's: the text ends with the stop string that ended it
    stop_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True  # vLLM's: special tokens left out of the text (as vLLM and HF decode)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None = no logprobs; k >= 0 = chosen token plus top-k
    prompt_logprobs: int | None = None  # None = none; k >= 0 = each prompt token's logprob plus top-k
    deterministic: bool | None = None  # None = the engine's default
    structured: StructuredOutput | None = None  # the output must match this (JSON schema, regex, ...)
    truncate_prompt_tokens: int | None = None  # vLLM's: keep this many prompt tokens (-1: the context window)
    truncation_side: str = "left"  # which end truncation drops: "left" keeps the last tokens (vLLM's default)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [  # (holds, the field at fault, what must hold): each range written here only
            (self.max_tokens is None or self.max_tokens >= (0 if self.prompt_logprobs is not None else 1),
             "max_tokens", "max_tokens must be at least 1 (0 only to score a prompt, with prompt logprobs)"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
             "temperature must be a finite number >= 0"),
            (0 < self.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= 0 or self.top_k == -1, "top_k", "top_k must be 0 or -1 (off) or a positive integer"),
            (0 <= self.min_p <= 1, "min_p", "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
            (0 < self.repetition_penalty <= 2 and math.isfinite(self.repetition_penalty), "repetition_penalty",
             "repetition_penalty must be in (0, 2]"),
            (0 <= self.min_tokens <= (self.min_tokens if self.max_tokens is None else self.max_tokens),
             "min_tokens", "min_tokens must be in [0, max_tokens]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
             "prompt_logprobs must be in [0, 20]"),
            (all(math.isfinite(b) and -100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias",
             "logit_bias values must be in [-100, 100]"),
            (all(s for s in self.stop), "stop", "stop strings must be non-empty"),
            (self.truncate_prompt_tokens is None or self.truncate_prompt_tokens >= 1
             or self.truncate_prompt_tokens == -1,
             "truncate_prompt_tokens", "truncate_prompt_tokens must be -1 (the context window) or at least 1"),
            (self.truncation_side in ("left", "right"), "truncation_side", "truncation_side must be left or right"),
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed",
             "seed must be a 64-bit signed integer, in [-2**63, 2**63)"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise ParamError(param, message)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # the client went away or the server gave up on it


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int = 1  # 1 + how many tokens are more likely


@dataclass
class Request:
    """Everything the engine knows about one request: its tokens, progress, and KV blocks."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    deterministic: bool
    seed: int  # the params' seed, or one drawn at admission: draws depend on (seed, position) only
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash of each full, hashed block
    invariant_blocks: bool = True  # every K/V so far was written by invariant kernels
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # when it first got a place in a step
    grammar: GrammarState | None = None  # where a structured output stands (None: unconstrained)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (the first None), when asked
    prompt_logprobs_sent: bool = False  # already in an output

    @property
    def scores_prompt(self) -> bool:
        """Whether every prompt position's logits are needed (prompt logprobs asked for)."""
        return self.params.prompt_logprobs is not None

    @property
    def queue_seconds(self) -> float | None:
        """How long it waited for its first step (None while it still waits)."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """A new list of every token: for prefix lookups and penalties, never once per step."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output, copying only those (a step needs a few of many)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:end] + self.output_token_ids[: max(0, end - num_prompt)]

    def append_output(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """A sampled token (and its logprob, when the request asked for logprobs)."""
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What one step produced for one request: new tokens and text, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    queue_seconds: float | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, in the request's first output
