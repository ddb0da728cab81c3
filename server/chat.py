"""`POST /v1/chat/completions`: messages (and tools) into one prompt, the answer in the chat shape.

`ServingChat` renders the chat template (with the tools described, `tools.prompt_messages`), turns
a forced tool call into a grammar, and admits the prompt. `ChatRenderer` answers with
`chat.completion` bodies and `chat.completion.chunk` chunks; with tools it parses calls out of the
text, and when streaming holds back text that is (or may become) a call block until it closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from starlette.requests import Request
from starlette.responses import Response

from detserve.engine.request import RequestOutput, TokenLogprob
from detserve.engine.structured import StructuredOutput
from detserve.server import tools
from detserve.server.protocol import APIError, ChatCompletionRequest, ToolUse
from detserve.server.serving import Choice, ChunkedRenderer, Job, Serving, bad_request


class ServingChat(Serving):
    id_prefix = "chatcmpl-"

    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        job, renderer, messages = self.prepare(body)
        return await self.respond(job, renderer, request, messages)

    def prepare(self, body: ChatCompletionRequest) -> tuple[Job, "ChatRenderer", list[dict]]:
        """The admitted job of a chat request, its renderer, and its messages as the template saw them."""
        info = self.model_info(body.model)
        with bad_request():
            body.check_supported()
            tool_use, structured = body.tool_use(), body.structured_output()
            messages = [m.template_dict() for m in body.messages]
            prompt = self._prompt(body, messages, tool_use)
            if tool_use is not None:
                structured = self._calls_held(tool_use, structured)
            output, param = structured or (None, None)
            params = body.sampling_params(info, body.requested_max_tokens, body.num_logprobs, output)
            job = self.admit(body, info, [prompt], params, "messages", param)
        renderer = ChatRenderer(job, self.token_text(body.return_tokens_as_token_ids),
                                body.prompt_logprobs is not None, body.return_token_ids, tool_use)
        return job, renderer, messages

    @staticmethod
    def _calls_held(tool_use: ToolUse, structured: tuple[StructuredOutput, str] | None
                    ) -> tuple[StructuredOutput, str] | None:
        """The grammar of the answer with tools: a forced call's, or one that holds unforced calls
        (strict tools, parallel_tool_calls false); a response_format's, when the calls are free (the
        output is then the format's and holds no call, strict or not)."""
        if tool_use.forced:
            if structured is not None:
                raise APIError(400, "a forced tool call cannot also follow a response_format or "
                                    "structured_outputs", "tool_choice")
            return tools.forced_call(tool_use.forced), "tool_choice"
        if structured is not None:
            return structured
        held = tools.held_calls(tool_use.tools, tool_use.strict, tool_use.parallel)
        return (held, "tools") if held is not None else None

    def _prompt(self, body: ChatCompletionRequest, messages: list[dict], tool_use: ToolUse | None) -> list[int]:
        """The chat template's tokens: tools passed to a template that takes them, described otherwise."""
        tokenizer = self.engine.require_tokenizer()
        offered = tool_use.tools if tool_use is not None else []
        takes_tools = tokenizer.template_takes_tools
        return tokenizer.apply_chat_template(tools.prompt_messages(messages, offered, takes_tools),
                                             add_generation_prompt=body.add_generation_prompt,
                                             tools=offered if takes_tools and offered else None,
                                             continue_final_message=body.continue_final_message,
                                             template_kwargs=body.chat_template_kwargs)


@dataclass
class _ToolStream:
    """Where a streamed choice with tools stands."""

    streamed: int = 0  # characters of text already sent, as content or as calls
    num_calls_sent: int = 0


class ChatRenderer(ChunkedRenderer):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, job: Job, token_text: Callable[[int], str], show_prompt_logprobs: bool,
                 return_token_ids: bool, tool_use: ToolUse | None) -> None:
        super().__init__(job, token_text, show_prompt_logprobs, return_token_ids)
        self.tool_use = tool_use  # with tools, calls are parsed out of the text
        self._tool_streams = [_ToolStream() for _ in job.requests]

    def response(self, choices: list[Choice]) -> dict:
        body = self.head(self.object_name) | {"choices": []}
        for c in choices:
            logprobs = self._logprobs(c, c.logprobs)
            if self.tool_use is None:
                choice = self._choice(c, c.text, logprobs, c.finish_reason)
            else:
                content, calls = tools.parse(c.text, self.tool_use.tools)
                if self._cut_short_forced(c, len(calls)):
                    content, calls = None, tools.truncated_calls(c.text)
                finish = self._calls_finish(c) if calls else c.finish_reason
                choice = self._choice(c, content, logprobs, finish, calls=self._openai_calls(c, calls))
            body["choices"].append(choice | self.token_fields(c.token_ids, whole=True))
        body |= self.prompt_fields(choices[0])  # one prompt: vLLM puts its fields beside the choices
        body["usage"] = self.job.usage(choices)
        return self.job.with_digest(body, choices)

    def chunks(self, c: Choice, out: RequestOutput, first: bool) -> list[dict]:
        logprobs = self._logprobs(c, out.new_logprobs)
        if self.tool_use is not None:
            return self._tool_chunks(c, out, first, logprobs)
        if not self.carries(out, first, logprobs):
            return []
        choice = self._choice(c, out.text_delta, logprobs, c.finish_reason if out.finished else None,
                              delta=True, role=first)
        chunk = self.chunk(choice | self.token_fields(out.new_token_ids, whole=False))
        if first and self.return_token_ids:
            chunk["prompt_token_ids"] = self.job.prompt_ids(c.index)
        return [chunk]

    def _tool_chunks(self, c: Choice, out: RequestOutput, first: bool, logprobs: dict | None) -> list[dict]:
        """Content as it comes, except text that is (or may become) a call block, which waits until
        the block closes; then the call: its id and name first, its arguments in fragments after."""
        state = self._tool_streams[c.index]
        deltas = [self._choice(c, "", None, None, delta=True)] if first else []
        pending = c.text[state.streamed :]
        while (match := tools.CALL_BLOCK.search(pending)) is not None:
            _, calls = tools.parse(match.group(0), self.tool_use.tools)
            deltas += self._content_delta(c, pending[: match.start() if calls else match.end()])
            for call in calls:
                deltas += self._call_deltas(c, call)
            state.streamed += match.end()
            pending = pending[match.end() :]
        if out.finished and self._cut_short_forced(c, state.num_calls_sent):
            for call in tools.truncated_calls(pending):  # the call so far, never the wrapper as content
                deltas += self._call_deltas(c, call)
            state.streamed += len(pending)
            pending = ""
        ready = len(pending) if out.finished else len(pending) - tools.holdback(pending)
        deltas += self._content_delta(c, pending[:ready])
        state.streamed += ready
        if logprobs and out.new_logprobs:
            deltas.append(self._choice(c, "", logprobs, None, delta=True, role=False))
        if out.finished:
            finish = self._calls_finish(c) if state.num_calls_sent else c.finish_reason
            deltas.append(self._choice(c, None, None, finish, delta=True, role=False))
        return [self.chunk(delta) for delta in deltas]

    def _content_delta(self, c: Choice, text: str) -> list[dict]:
        """Text between calls is content; the whitespace around calls is not (as `tools.parse` strips it)."""
        if not text or (self._tool_streams[c.index].num_calls_sent and not text.strip()):
            return []
        return [self._choice(c, text, None, None, delta=True, role=False)]

    def _call_deltas(self, c: Choice, call: tools.ToolCall) -> list[dict]:
        state = self._tool_streams[c.index]
        [head] = self._openai_calls(c, [call], start=state.num_calls_sent)
        deltas = [self._choice(c, None, None, None, delta=True, role=False,
                               calls=[head | {"function": {"name": call.name, "arguments": ""}}])]
        for fragment in _fragments(call.arguments):
            deltas.append(self._choice(c, None, None, None, delta=True, role=False,
                                       calls=[{"index": state.num_calls_sent, "function": {"arguments": fragment}}]))
        state.num_calls_sent += 1
        return deltas

    def _cut_short_forced(self, c: Choice, num_calls: int) -> bool:
        """A forced call that max_tokens cut off before its block closed (so no call parsed)."""
        return bool(self.tool_use.forced) and not num_calls and c.finish_reason == "length"

    def _calls_finish(self, c: Choice) -> str | None:
        """A choice that called tools finishes with "tool_calls" ("function_call", legacy), unless cut short."""
        if c.finish_reason != "stop":
            return c.finish_reason
        return "function_call" if self.tool_use.legacy else "tool_calls"

    def _openai_calls(self, c: Choice, calls: list[tools.ToolCall], start: int = 0) -> list[dict]:
        prompt = self.job.prompt_ids(c.index)
        return [{"index": start + i} | call.to_openai(tools.call_id(prompt, c.index, start + i, call))
                for i, call in enumerate(calls)]

    def _choice(self, c: Choice, text: str | None, logprobs: dict | None, finish_reason: str | None,
                delta: bool = False, role: bool = True, calls: list[dict] | None = None) -> dict:
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

    def _logprobs(self, c: Choice, logprobs: list[TokenLogprob]) -> dict | None:
        """The choice's logprobs field (None unless requested)."""
        if not self.wants_logprobs(c):
            return None
        return {"content": self.logprob_entries(logprobs)}

    def logprob_entries(self, logprobs: list[TokenLogprob]) -> list[dict]:
        """OpenAI's logprob objects (token, logprob, bytes, top_logprobs), as chat and Responses show them."""
        return [self._entry(lp) for lp in logprobs]

    def _entry(self, lp: TokenLogprob) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            token = self.token_text(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def _fragments(arguments: str, size: int = 24) -> list[str]:
    """A call's arguments in pieces, as OpenAI streams them (clients concatenate by call index)."""
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]
