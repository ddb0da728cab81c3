"""The Responses API (`POST /v1/responses`): the subset `client.responses.create` and `.stream` use.

A request becomes a chat completion (`ResponsesRequest.as_chat`: `instructions` as the system
message, `input` as the messages), runs as one, and is answered in the Responses shape: one
assistant message of `output_text` parts, `status` completed or incomplete (max_output_tokens), and
when streamed the event sequence the SDK's helpers expect, each event with its `sequence_number`.
Nothing is stored, so `store: true` and `previous_response_id` are refused (400) at the edge.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from detserve.engine.request import TokenLogprob
from detserve.server.chat import ServingChat
from detserve.server.protocol import ResponsesRequest
from detserve.server.serving import Choice, Job, Renderer, bad_request, collect
from detserve.server.stream import Outputs, sse_event


class ServingResponses(ServingChat):
    id_prefix = "resp_"

    async def create(self, body: ResponsesRequest, request: Request) -> Response:
        self.model_info(body.model)
        with bad_request():
            chat = body.as_chat()
        job, chat_renderer, messages = self.prepare(chat)
        entries = chat_renderer.logprob_entries if body.wants_logprobs else None
        return await self.respond(job, ResponsesRenderer(job, body.settings(), entries), request, messages)


def _status(choice: Choice) -> tuple[str, dict | None]:
    if choice.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


class ResponsesRenderer(Renderer):
    """The Responses objects of one job: the response, its message item and text part, and the
    stream's event sequence."""

    def __init__(self, job: Job, settings: dict,
                 logprob_entries: Callable[[list[TokenLogprob]], list[dict]] | None = None) -> None:
        super().__init__(job)
        self.settings = settings  # instructions, max_output_tokens, temperature, top_p as requested
        self.message_id = "msg_" + uuid.uuid4().hex
        self.logprob_entries = logprob_entries  # with include message.output_text.logprobs, else None

    def logprobs(self, logprobs: list[TokenLogprob]) -> list[dict]:
        """OpenAI's logprobs of output text ([] unless the request included them)."""
        return self.logprob_entries(logprobs) if self.logprob_entries is not None else []

    def part(self, text: str, logprobs: list[TokenLogprob] = ()) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs(list(logprobs))}

    def message(self, choice: Choice | None, status: str) -> dict:
        content = [] if choice is None else [self.part(choice.text, choice.logprobs)]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def response(self, choice: Choice | None, status: str, details: dict | None = None) -> dict:
        body = {
            "id": self.job.id, "object": "response", "created_at": self.job.created, "status": status,
            "error": None, "incomplete_details": details, "model": self.job.model,
            "output": [] if choice is None else [self.message(choice, status)],
            "parallel_tool_calls": True, "previous_response_id": None, "store": False, "tool_choice": "auto",
            "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
            "usage": None if choice is None else self.usage(choice), **self.settings,
        }
        if choice is not None:
            body = self.job.with_digest(body, [choice])
        return body

    def usage(self, choice: Choice) -> dict:
        usage = self.job.usage([choice])
        return {"input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"]}

    async def body(self, outputs: Outputs) -> dict:
        """Run the request to the end; the response object."""
        [choice] = await collect(self.job, outputs)
        return self.response(choice, *_status(choice))

    async def events(self, outputs: Outputs) -> AsyncIterator[str]:
        """SSE events: created, in_progress, the message item and its text part opening, a text delta
        per output, then everything closing and `response.completed` (or `response.incomplete`)."""
        [choice] = self.job.new_choices()
        sequence = iter(range(1 << 62))
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}

        def event(kind: str, **fields) -> str:
            return sse_event({"type": kind, "sequence_number": next(sequence), **fields}, event=kind)

        yield event("response.created", response=self.response(None, "in_progress"))
        yield event("response.in_progress", response=self.response(None, "in_progress"))
        yield event("response.output_item.added", output_index=0, item=self.message(None, "in_progress"))
        yield event("response.content_part.added", **where, part=self.part(""))
        try:
            async with contextlib.aclosing(outputs) as results:
                async for _, out in results:
                    choice.add(out)
                    if out.text_delta:
                        yield event("response.output_text.delta", **where, delta=out.text_delta,
                                    logprobs=self.logprobs(out.new_logprobs))
        except Exception as exc:
            error = self.job.failed(exc)
            yield event("error", code=str(error.status), message=error.message, param=error.param)
            return
        status, details = _status(choice)
        logprobs = self.logprobs(choice.logprobs)
        yield event("response.output_text.done", **where, text=choice.text, logprobs=logprobs)
        yield event("response.content_part.done", **where, part=self.part(choice.text, choice.logprobs))
        yield event("response.output_item.done", output_index=0, item=self.message(choice, status))
        yield event(f"response.{status}", response=self.response(choice, status, details))
