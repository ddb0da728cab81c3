"""Engine output streams -> OpenAI responses: SSE chunks as tokens arrive, or one aggregated body.

Each choice is its own engine request. Several choices' streams are merged by one task per choice
(a single choice is read directly); closing the merged stream (finished, failed, or the client went
away) closes each engine stream and so aborts its request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Literal, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from detserve.engine.async_engine import AsyncEngine
from detserve.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from detserve.server import tools
from detserve.server.metrics import RequestTrace
from detserve.server.protocol import APIError, ToolUse

T = TypeVar("T")


@dataclass
class Choice:
    """One choice's output so far."""

    index: int
    echo: str  # prompt text shown before the output (completions with echo)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    text_offset: int = 0  # where the next logprob token starts in the text (completions)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, when the engine scored it
    streamed: int = 0  # with tools: characters of text already sent, as content or as calls
    num_calls_sent: int = 0  # with tools: calls already sent

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
    """One HTTP request's engine work (a prompt and params per choice) and the shape of its responses."""

    kind: Literal["chat", "completion"]
    id: str
    model: str
    fingerprint: str
    deterministic: bool
    prompts: list[list[int]]  # per choice
    params: list[SamplingParams]  # per choice
    echoes: list[str]  # per choice
    n: int  # choices per prompt: usage counts each prompt once
    include_usage: bool
    token_text: Callable[[int], str]
    tool_use: ToolUse | None = None  # chat with tools: calls are parsed out of the text
    echo_logprobs: bool = False  # completions with echo and logprobs: the logprobs start with the prompt's
    show_prompt_logprobs: bool = False  # vLLM's prompt_logprobs field
    return_token_ids: bool = False  # vLLM's prompt_token_ids and token_ids fields
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    created: int = field(default_factory=lambda: int(time.time()))
    trace: RequestTrace | None = None  # told of every output, for the metrics and the request log

    def new_choices(self) -> list[Choice]:
        return [Choice(i, echo, text_offset=len(echo)) for i, echo in enumerate(self.echoes)]

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

    def response(self, choices: list[Choice]) -> dict:
        """The non-streamed body."""
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        for c in choices:
            logprobs = self._logprobs(c, c.logprobs, len(c.echo))[0]
            if self.echo_logprobs and logprobs is not None:
                prompt = self._prompt_logprobs_body(c)
                logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
            if self.tool_use is None:
                choice = self._choice(c, c.echo + c.text, logprobs, c.finish_reason)
            else:
                content, calls = tools.parse(c.text, self.tool_use.tools)
                finish = self._calls_finish(c) if calls else c.finish_reason
                choice = self._choice(c, content, logprobs, finish, calls=self._openai_calls(c, calls))
            body["choices"].append(choice | self._token_fields(c.token_ids))
        if self.kind == "chat":  # one prompt: vLLM puts its fields beside the choices
            body |= self._prompt_fields(choices[0])
        else:
            for c, choice in zip(choices, body["choices"]):
                choice |= self._prompt_fields(c)
        body["usage"] = self.usage(choices)
        return self.with_digest(body, choices)

    def chunks(self, c: Choice, out: RequestOutput, first: bool) -> list[dict]:
        """The chunks for one output of choice `c` (already added): none when it carries nothing."""
        logprobs, c.text_offset = self._logprobs(c, out.new_logprobs, c.text_offset)
        if self.tool_use is not None:
            return self._tool_chunks(c, out, first, logprobs)
        if not (first or out.text_delta or out.finished or (logprobs and out.new_logprobs)):
            return []
        text = (c.echo if first else "") + out.text_delta
        choice = self._choice(c, text, logprobs, c.finish_reason if out.finished else None, delta=True, role=first)
        choice |= self._token_fields(out.new_token_ids)
        if first and self.return_token_ids:
            if self.kind == "chat":
                return [self._chunk(choice) | {"prompt_token_ids": self.prompts[c.index]}]
            choice["prompt_token_ids"] = self.prompts[c.index]
        return [self._chunk(choice)]

    def _tool_chunks(self, c: Choice, out: RequestOutput, first: bool, logprobs: dict | None) -> list[dict]:
        """Content as it comes, except text that is (or may become) a call block, which waits until
        the block closes; then the call: its id and name first, its arguments in fragments after."""
        deltas = [self._choice(c, "", None, None, delta=True)] if first else []
        pending = c.text[c.streamed :]
        while (match := tools.CALL_BLOCK.search(pending)) is not None:
            _, calls = tools.parse(match.group(0), self.tool_use.tools)
            deltas += self._content_delta(c, pending[: match.start() if calls else match.end()])
            for call in calls:
                deltas += self._call_deltas(c, call)
            c.streamed += match.end()
            pending = pending[match.end() :]
        ready = len(pending) if out.finished else len(pending) - tools.holdback(pending)
        deltas += self._content_delta(c, pending[:ready])
        c.streamed += ready
        if logprobs and out.new_logprobs:
            deltas.append(self._choice(c, "", logprobs, None, delta=True, role=False))
        if out.finished:
            finish = self._calls_finish(c) if c.num_calls_sent else c.finish_reason
            deltas.append(self._choice(c, None, None, finish, delta=True, role=False))
        return [self._chunk(delta) for delta in deltas]

    def _content_delta(self, c: Choice, text: str) -> list[dict]:
        """Text between calls is content; the whitespace around calls is not (as `tools.parse` strips it)."""
        if not text or (c.num_calls_sent and not text.strip()):
            return []
        return [self._choice(c, text, None, None, delta=True, role=False)]

    def _call_deltas(self, c: Choice, call: tools.ToolCall) -> list[dict]:
        [head] = self._openai_calls(c, [call], start=c.num_calls_sent)
        deltas = [self._choice(c, None, None, None, delta=True, role=False,
                               calls=[head | {"function": {"name": call.name, "arguments": ""}}])]
        for fragment in _fragments(call.arguments):
            deltas.append(self._choice(c, None, None, None, delta=True, role=False,
                                       calls=[{"index": c.num_calls_sent, "function": {"arguments": fragment}}]))
        c.num_calls_sent += 1
        return deltas

    def _calls_finish(self, c: Choice) -> str | None:
        """A choice that called tools finishes with "tool_calls" ("function_call", legacy), unless cut short."""
        if c.finish_reason != "stop":
            return c.finish_reason
        return "function_call" if self.tool_use.legacy else "tool_calls"

    def _openai_calls(self, c: Choice, calls: list[tools.ToolCall], start: int = 0) -> list[dict]:
        prompt = self.prompts[c.index]
        return [{"index": start + i} | call.to_openai(tools.call_id(prompt, c.index, start + i, call))
                for i, call in enumerate(calls)]

    def _chunk(self, choice: dict) -> dict:
        return self._chunk_head() | {"choices": [choice]}

    def usage_chunk(self, choices: list[Choice]) -> dict:
        return self._chunk_head() | {"choices": [], "usage": self.usage(choices)}

    def _chunk_head(self) -> dict:
        return self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")

    def with_digest(self, body: dict, choices: list[Choice]) -> dict:
        """`body` with the output digest when the request was deterministic (then the digest is a promise)."""
        if self.deterministic:
            body["output_digest"] = output_digest(choices)
        return body

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _choice(self, c: Choice, text: str | None, logprobs: dict | None, finish_reason: str | None,
                delta: bool = False, role: bool = True, calls: list[dict] | None = None) -> dict:
        if self.kind == "completion":
            return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        message: dict = {"role": "assistant"} if role else {}
        if text is not None or not delta:
            message["content"] = text
        if calls and self.tool_use is not None and self.tool_use.legacy:
            message["function_call"] = calls[0]["function"]  # legacy clients read one function_call
        elif calls:
            message["tool_calls"] = calls if delta else [{k: v for k, v in call.items() if k != "index"}
                                                         for call in calls]
        return {"index": c.index, "delta" if delta else "message": message, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def _logprobs(self, c: Choice, logprobs: list[TokenLogprob], offset: int) -> tuple[dict | None, int]:
        """The choice's logprobs field (None unless requested), and the text offset after these tokens."""
        if self.params[c.index].logprobs is None:
            return None, offset
        if self.kind == "chat":
            return {"content": [self._chat_logprob(lp) for lp in logprobs]}, offset
        return self._text_logprobs([lp.token_id for lp in logprobs], logprobs, offset)

    def _prompt_logprobs_body(self, c: Choice) -> dict:
        """The prompt's part of an echoed completion's logprobs: its first token has none (null)."""
        prompt = self.prompts[c.index]
        return self._text_logprobs(prompt, c.prompt_logprobs or [None] * len(prompt), 0)[0]

    def _text_logprobs(self, token_ids: list[int], entries: list[TokenLogprob | None],
                       offset: int) -> tuple[dict, int]:
        """A completions `logprobs` object for these tokens (an entry None: a null logprob, as the
        prompt's first token has), and the text offset after them."""
        tokens, offsets, tops = [], [], []
        for token_id, lp in zip(token_ids, entries):
            tokens.append(self.token_text(token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
            tops.append(None if lp is None else {**{self.token_text(t): v for t, v in lp.top}, tokens[-1]: lp.logprob})
        body = {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for lp in entries],
                "top_logprobs": tops, "text_offset": offsets}
        return body, offset

    def _prompt_fields(self, c: Choice) -> dict:
        """vLLM's `prompt_logprobs` ({token id: {logprob, rank, decoded_token}} per prompt token, the
        first null) and `prompt_token_ids`, when asked for."""
        fields = {}
        if self.show_prompt_logprobs:
            fields["prompt_logprobs"] = [None if lp is None else self._ranked(lp) for lp in c.prompt_logprobs or []]
        if self.return_token_ids:
            fields["prompt_token_ids"] = self.prompts[c.index]
        return fields

    def _ranked(self, lp: TokenLogprob) -> dict:
        entry = {str(t): {"logprob": v, "rank": rank, "decoded_token": self.token_text(t)}
                 for rank, (t, v) in enumerate(lp.top, start=1)}
        entry[str(lp.token_id)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.token_text(lp.token_id)}
        return entry

    def _token_fields(self, token_ids: list[int]) -> dict:
        return {"token_ids": token_ids} if self.return_token_ids else {}

    def _chat_logprob(self, lp: TokenLogprob) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            token = self.token_text(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


async def outputs(engine: AsyncEngine, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from every choice's engine stream, as they come, until all finish."""
    streams = _one_stream(engine, job) if len(job.prompts) == 1 else _merged_streams(engine, job)
    async with contextlib.aclosing(streams) as results:
        async for i, out in results:
            if job.trace is not None:
                job.trace.output(i, out)
            yield i, out


async def _one_stream(engine: AsyncEngine, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The usual request, one choice, read straight from its engine stream: the pump task and queue
    of `_merged_streams` would cost the event loop a task switch per token, CPU that a small
    machine takes out of the engine's step."""
    async with contextlib.aclosing(engine.generate(f"{job.id}-0", job.prompts[0], job.params[0])) as stream:
        async for out in stream:
            yield 0, out


async def _merged_streams(engine: AsyncEngine, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Several choices' engine streams, merged as their outputs come by one pump task per choice."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            stream = engine.generate(f"{job.id}-{i}", job.prompts[i], job.params[i])
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(job.prompts))]
    try:
        unfinished = len(tasks)
        while unfinished:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            unfinished -= item.finished
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def complete(engine: AsyncEngine, job: Job) -> dict:
    """Run every choice to the end; the non-streamed body."""
    choices = job.new_choices()
    async with contextlib.aclosing(outputs(engine, job)) as results:
        async for i, out in results:
            choices[i].add(out)
    return job.response(choices)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, or cancel it (aborting its engine requests) and return None if the client leaves first.

    Starlette never cancels a non-streaming handler whose client went away, so we watch for it.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def stream(engine: AsyncEngine, job: Job) -> AsyncIterator[str]:
    """SSE events: a chunk per output, the usage chunk if asked for, then `[DONE]`.

    The last chunk before `[DONE]` carries the output digest. A failure after the stream began is
    one more event holding the error object.
    """
    choices = job.new_choices()
    unfinished = len(choices)
    try:
        async with contextlib.aclosing(outputs(engine, job)) as results:  # closed even when we are
            async for i, out in results:
                first = not choices[i].token_ids
                choices[i].add(out)
                unfinished -= out.finished
                chunks = job.chunks(choices[i], out, first)
                if job.continuous_usage:
                    chunks = [chunk | {"usage": job.usage(choices)} for chunk in chunks]
                for k, chunk in enumerate(chunks):
                    last = not unfinished and not job.include_usage and k == len(chunks) - 1
                    yield _event(job.with_digest(chunk, choices) if last else chunk)
        if job.include_usage:
            yield _event(job.with_digest(job.usage_chunk(choices), choices))
    except GeneratorExit:
        if job.trace is not None and unfinished:
            job.trace.failed(499, "the client disconnected")
        raise
    except Exception as exc:
        error = APIError.of(exc)
        if job.trace is not None:
            job.trace.failed(error.status, error.message)
        yield _event(error.body())
    yield "data: [DONE]\n\n"


def _fragments(arguments: str, size: int = 24) -> list[str]:
    """A call's arguments in pieces, as OpenAI streams them (clients concatenate by call index)."""
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class SSEResponse(StreamingResponse):
    """Closes its event stream however the response ends, so a client that leaves aborts at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
