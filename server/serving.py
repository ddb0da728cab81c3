"""What every generation API shares: the served model, admission (once, with `n` fanned out), the
capacity check, and running an admitted job into a streamed or a whole response.

One serving object per API surface (`ServingChat` in chat.py, `ServingCompletion` in
completions.py, `ServingResponses` in responses.py) turns its body into prompts and
`SamplingParams` and calls `Serving.admit`. Admission is the engine's (`AsyncEngine.admit`:
tokenize, check the lengths, compile the grammar); what comes back is a `Job` whose engine requests
are already admitted, which the engine thread then only queues. Each API renders its own shapes
through its `Renderer`; `ChunkedRenderer` holds what chat and text completions share.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from detserve.engine.async_engine import AsyncEngine, EngineUnavailableError
from detserve.engine.llm_engine import AdmittedRequest, ModelInfo
from detserve.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from detserve.engine.structured import GrammarError
from detserve.server import stream
from detserve.server.config import ServerConfig
from detserve.server.metrics import RequestTrace
from detserve.server.protocol import APIError, GenerationRequest
from detserve.server.stream import Outputs, sse_event

DIGEST_HEADER = "x-detserve-output-digest"


@contextlib.contextmanager
def bad_request() -> Iterator[None]:
    """Turn the ValueErrors that validation raises (engine and protocol alike) into 400s, naming the
    parameter when the error does (`ParamError`)."""
    try:
        yield
    except ValueError as exc:
        raise APIError.of(exc) from exc


@dataclass
class Choice:
    """One choice's output so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, when the engine scored it

    def add(self, out: RequestOutput) -> None:
        if out.finish_reason is FinishReason.ABORT:  # the server gave up on it: never a completed answer
            raise APIError(500, "the server aborted the request")
        self.text += out.text_delta
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason.value


def output_digest(choices: list[Choice]) -> str:
    """sha256 hex of `json.dumps([[token ids of choice 0], [choice 1], ...])`: equal digests, equal outputs."""
    return hashlib.sha256(json.dumps([c.token_ids for c in choices]).encode()).hexdigest()


@dataclass
class Job:
    """One HTTP request's engine work, admitted (an engine request per choice), and what every
    response to it says."""

    id: str
    model: str
    fingerprint: str
    deterministic: bool
    requests: list[AdmittedRequest]  # per choice
    n: int  # choices per prompt: usage counts each prompt once
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    end_user: str | None = None  # the request's `user`, for the request log
    created: int = field(default_factory=lambda: int(time.time()))
    trace: RequestTrace | None = None  # told of every output, for the metrics and the request log

    def prompt_ids(self, choice: int) -> list[int]:
        return self.requests[choice].prompt_token_ids

    def new_choices(self) -> list[Choice]:
        return [Choice(i) for i in range(len(self.requests))]

    def usage(self, choices: list[Choice]) -> dict:
        firsts = choices[:: self.n]
        prompt = sum(c.num_prompt_tokens for c in firsts)
        completion = sum(len(c.token_ids) for c in choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.num_cached_tokens for c in firsts)},
        }

    def with_digest(self, body: dict, choices: list[Choice]) -> dict:
        """`body` with the output digest when the request was deterministic (then the digest is a promise)."""
        if self.deterministic:
            body["output_digest"] = output_digest(choices)
        return body

    def failed(self, exc: Exception) -> APIError:
        """The client-facing form of a failure after the response began, recorded in the trace."""
        error = APIError.of(exc)
        if self.trace is not None:
            self.trace.failed(error.status, error.message)
        return error


async def collect(job: Job, outputs: Outputs) -> list[Choice]:
    """Every choice run to its end."""
    choices = job.new_choices()
    async with contextlib.aclosing(outputs) as results:
        async for i, out in results:
            choices[i].add(out)
    return choices


class Renderer(abc.ABC):
    """One API's shapes for a job: the events of its stream, and its whole body."""

    def __init__(self, job: Job) -> None:
        self.job = job

    @abc.abstractmethod
    def events(self, outputs: Outputs) -> AsyncIterator[str]:
        """The SSE events of the response, ending however the API ends a stream."""

    @abc.abstractmethod
    async def body(self, outputs: Outputs) -> dict:
        """The non-streamed response body."""


class ChunkedRenderer(Renderer):
    """Chat and text completions: a chunk per output, the usage chunk if asked for, then `[DONE]`;
    vLLM's prompt_logprobs and token-id fields. Subclasses say what a body and a chunk hold."""

    object_name: str  # of the whole body
    chunk_object_name: str  # of each streamed chunk

    def __init__(self, job: Job, token_text: Callable[[int], str], show_prompt_logprobs: bool,
                 return_token_ids: bool) -> None:
        super().__init__(job)
        self.token_text = token_text  # a token's text in logprobs ("token_id:N" if asked for)
        self.show_prompt_logprobs = show_prompt_logprobs  # vLLM's prompt_logprobs field
        self.return_token_ids = return_token_ids  # vLLM's prompt_token_ids and token_ids fields

    @abc.abstractmethod
    def response(self, choices: list[Choice]) -> dict:
        """The non-streamed body of finished choices."""

    @abc.abstractmethod
    def chunks(self, c: Choice, out: RequestOutput, first: bool) -> list[dict]:
        """The chunks for one output of choice `c` (already added): none when it carries nothing."""

    async def body(self, outputs: Outputs) -> dict:
        return self.response(await collect(self.job, outputs))

    async def events(self, outputs: Outputs) -> AsyncIterator[str]:
        """The last chunk before `[DONE]` carries the output digest. A failure after the stream
        began is one more event holding the error object."""
        job = self.job
        choices = job.new_choices()
        unfinished = len(choices)
        try:
            async with contextlib.aclosing(outputs) as results:  # closed even when we are
                async for i, out in results:
                    first = not choices[i].token_ids
                    choices[i].add(out)
                    unfinished -= out.finished
                    chunks = self.chunks(choices[i], out, first)
                    if job.continuous_usage:
                        chunks = [chunk | {"usage": job.usage(choices)} for chunk in chunks]
                    for k, chunk in enumerate(chunks):
                        last = not unfinished and not job.include_usage and k == len(chunks) - 1
                        yield sse_event(job.with_digest(chunk, choices) if last else chunk)
            if job.include_usage:
                yield sse_event(job.with_digest(self.head(self.chunk_object_name) | {
                    "choices": [], "usage": job.usage(choices)}, choices))
        except GeneratorExit:
            if job.trace is not None and unfinished:
                job.trace.failed(499, "the client disconnected")
            raise
        except Exception as exc:
            yield sse_event(job.failed(exc).body())
        yield stream.SSE_DONE

    def head(self, obj: str) -> dict:
        job = self.job
        return {"id": job.id, "object": obj, "created": job.created, "model": job.model,
                "system_fingerprint": job.fingerprint}

    def chunk(self, choice: dict) -> dict:
        return self.head(self.chunk_object_name) | {"choices": [choice]}

    def prompt_fields(self, c: Choice) -> dict:
        """vLLM's `prompt_logprobs` ({token id: {logprob, rank, decoded_token}} per prompt token, the
        first null) and `prompt_token_ids` of a whole body: null unless asked for, as vLLM sends
        them (clients written against vLLM read them as attributes)."""
        logprobs = None
        if self.show_prompt_logprobs:
            logprobs = [None if lp is None else self._ranked(lp) for lp in c.prompt_logprobs or []]
        return {"prompt_logprobs": logprobs,
                "prompt_token_ids": self.job.prompt_ids(c.index) if self.return_token_ids else None}

    def token_fields(self, token_ids: list[int], whole: bool) -> dict:
        """vLLM's `token_ids` of a choice: in a whole body null unless asked for; in a chunk only if asked."""
        if self.return_token_ids:
            return {"token_ids": token_ids}
        return {"token_ids": None} if whole else {}

    def carries(self, out: RequestOutput, first: bool, logprobs: dict | None) -> bool:
        """Whether an output makes a chunk: the choice's first, new text, the finish, logprobs asked
        for, or token ids asked for (a token whose text the detokenizer holds back, or a model with
        no tokenizer, still streams its id, so the chunks' ids add up to the whole output's)."""
        return bool(first or out.text_delta or out.finished or (logprobs and out.new_logprobs)
                    or (self.return_token_ids and out.new_token_ids))

    def wants_logprobs(self, c: Choice) -> bool:
        return self.job.requests[c.index].params.logprobs is not None

    def _ranked(self, lp: TokenLogprob) -> dict:
        entry = {str(t): {"logprob": v, "rank": rank, "decoded_token": self.token_text(t)}
                 for rank, (t, v) in enumerate(lp.top, start=1)}
        entry[str(lp.token_id)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.token_text(lp.token_id)}
        return entry


class Serving:
    """The served model and the admission every API shares; a subclass per API surface."""

    id_prefix = ""  # of the ids of this API's responses

    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config

    def model_info(self, model: str | None) -> ModelInfo:
        """The served model's facts, if `model` (when given) is the one we serve; else 503 or 404."""
        try:
            info = self.engine.serving_info()
        except EngineUnavailableError as exc:
            raise APIError.of(exc) from exc
        if model is not None and model != info.name:
            raise APIError(404, f"The model `{model}` does not exist.", "model")
        return info

    def token_text(self, as_token_ids: bool = False) -> Callable[[int], str]:
        """A token's text as logprobs show it: decoded, or "token_id:N" (asked for, or no tokenizer)."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or as_token_ids:
            return "token_id:{}".format
        return lambda t: tokenizer.decode([t], skip_special_tokens=False)

    def admit(self, body: GenerationRequest, info: ModelInfo, prompts: list[str | list[int]], params: SamplingParams,
              prompt_param: str, structured_param: str | None = None) -> Job:
        """Admit each prompt once (the engine tokenizes, checks and compiles its grammar) and fan it
        out to `body.n` choices. 400s name `prompt_param` for a prompt over the server's limit and
        `structured_param` for a grammar that does not compile."""
        self._check_n(body.n)
        requests: list[AdmittedRequest] = []
        for prompt in prompts:
            try:
                first = self.engine.admit(prompt, params)
            except GrammarError as exc:
                raise APIError(400, f"{structured_param}: {exc}", structured_param) from exc
            self._check_prompt_length(first, prompt_param)
            requests += fan_out(first, body.n)
        options = body.stream_options
        deterministic = requests[0].params.deterministic
        return Job(id=self.id_prefix + uuid.uuid4().hex, model=info.name, fingerprint=info.fingerprint(deterministic),
                   deterministic=deterministic, requests=requests, n=body.n, stream=body.stream,
                   include_usage=options is not None and options.include_usage,
                   continuous_usage=options is not None and options.include_usage and options.continuous_usage_stats,
                   end_user=body.end_user)

    async def respond(self, job: Job, renderer: Renderer, request: Request, logged_prompt: object) -> Response:
        """Queue the job (or 429 when the queue is full), then stream it or answer with the whole body."""
        self._check_capacity(len(job.requests))
        trace: RequestTrace = request.state.trace
        trace.admitted(job.id, job.deterministic, job.stream, job.n, len(job.requests))
        trace.user = job.end_user
        if self.config.log_prompts:
            trace.prompt = logged_prompt if isinstance(logged_prompt, str) else json.dumps(logged_prompt,
                                                                                          ensure_ascii=False)
        job.trace = trace
        outputs = stream.outputs(self.engine, job.id, job.requests, trace)
        if job.stream:
            return stream.SSEResponse(renderer.events(outputs))
        try:
            body = await stream.until_disconnected(request, renderer.body(outputs))
        except Exception as exc:
            raise APIError.of(exc) from exc
        if body is None:
            trace.failed(499, "the client disconnected")
            return Response(status_code=499)  # the client is gone; nobody reads this
        digest = body.get("output_digest")
        return JSONResponse(body, headers={DIGEST_HEADER: digest} if digest else None)

    def _check_n(self, n: int) -> None:
        if not 1 <= n <= self.config.max_n:
            raise APIError(400, f"n must be in [1, {self.config.max_n}] on this server", "n")

    def _check_prompt_length(self, admitted: AdmittedRequest, param: str) -> None:
        limit, length = self.config.max_prompt_tokens, len(admitted.prompt_token_ids)
        if limit is not None and length > limit:
            raise APIError(400, f"the prompt has {length} tokens; this server accepts at most {limit}", param)

    def _check_capacity(self, num_requests: int) -> None:
        waiting = self.engine.stats().num_waiting
        if waiting + num_requests > self.config.max_waiting_requests:
            raise APIError(429, f"the server is at capacity ({waiting} requests waiting); retry shortly",
                           headers={"Retry-After": str(self.config.retry_after_seconds)})


def fan_out(first: AdmittedRequest, n: int) -> list[AdmittedRequest]:
    """`n` choices of one admitted prompt: a seeded request gives choice i the seed + i (wrapping
    within int64), so choices differ reproducibly; each has its own grammar state."""
    seed = first.params.seed
    return [first] + [first.with_seed(None if seed is None else (seed + i + 2**63) % 2**64 - 2**63)
                      for i in range(1, n)]
