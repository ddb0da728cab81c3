"""`POST /v1/completions`: one or several prompts (text or token ids), answered as `text_completion`.

With `echo` the prompt's text comes before each choice's output, and with `echo` and `logprobs`
its tokens' logprobs (the first null) before the output's, offsets counted across both.
"""

from __future__ import annotations

from typing import Callable

from starlette.requests import Request
from starlette.responses import Response

from detserve.engine.llm_engine import AdmittedRequest
from detserve.engine.request import RequestOutput, TokenLogprob
from detserve.server.protocol import CompletionRequest
from detserve.server.serving import Choice, ChunkedRenderer, Job, Serving, bad_request


class ServingCompletion(Serving):
    id_prefix = "cmpl-"

    async def create(self, body: CompletionRequest, request: Request) -> Response:
        info = self.model_info(body.model)
        with bad_request():
            body.check_supported()
            output, param = body.structured_output() or (None, None)
            params = body.sampling_params(info, body.max_tokens, body.logprobs, output)
            prompts = body.prompts()
            job = self.admit(body, info, prompts, params, "prompt", param)
            echoes = [self._shown(prompt, admitted) if body.echo else ""
                      for prompt, admitted in zip([p for p in prompts for _ in range(body.n)], job.requests)]
        renderer = CompletionRenderer(job, self.token_text(body.return_tokens_as_token_ids),
                                      body.prompt_logprobs is not None, body.return_token_ids, echoes,
                                      echo_logprobs=body.echo and body.logprobs is not None)
        return await self.respond(job, renderer, request, body.prompt)

    def _shown(self, prompt: str | list[int], admitted: AdmittedRequest) -> str:
        """The prompt's text as echo shows it: as sent, or decoded from the admitted ids (checked by
        admission) when they are ids or were truncated."""
        if isinstance(prompt, str) and admitted.params.truncate_prompt_tokens is None:
            return prompt
        return self.engine.require_tokenizer().decode(admitted.prompt_token_ids, skip_special_tokens=False)


class CompletionRenderer(ChunkedRenderer):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, job: Job, token_text: Callable[[int], str], show_prompt_logprobs: bool,
                 return_token_ids: bool, echoes: list[str], echo_logprobs: bool) -> None:
        super().__init__(job, token_text, show_prompt_logprobs, return_token_ids)
        self.echoes = echoes  # per choice: the prompt text shown before its output ("" without echo)
        self.echo_logprobs = echo_logprobs  # the logprobs start with the prompt's
        self._text_offsets = [len(echo) for echo in echoes]  # streamed: where the next token's text starts

    def response(self, choices: list[Choice]) -> dict:
        body = self.head(self.object_name) | {"choices": []}
        for c in choices:
            echo = self.echoes[c.index]
            logprobs = self._logprobs(c, c.logprobs, len(echo))[0]
            if self.echo_logprobs and logprobs is not None:
                prompt = self._prompt_logprobs(c)
                logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
            choice = self._choice(c, echo + c.text, logprobs, c.finish_reason)
            body["choices"].append(choice | self.token_fields(c.token_ids, whole=True) | self.prompt_fields(c))
        body["usage"] = self.job.usage(choices)
        return self.job.with_digest(body, choices)

    def chunks(self, c: Choice, out: RequestOutput, first: bool) -> list[dict]:
        logprobs, self._text_offsets[c.index] = self._logprobs(c, out.new_logprobs, self._text_offsets[c.index])
        if not self.carries(out, first, logprobs):
            return []
        text = (self.echoes[c.index] if first else "") + out.text_delta
        choice = self._choice(c, text, logprobs, c.finish_reason if out.finished else None)
        choice |= self.token_fields(out.new_token_ids, whole=False)
        if first and self.return_token_ids:
            choice["prompt_token_ids"] = self.job.prompt_ids(c.index)
        return [self.chunk(choice)]

    def _choice(self, c: Choice, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def _logprobs(self, c: Choice, logprobs: list[TokenLogprob], offset: int) -> tuple[dict | None, int]:
        """The choice's logprobs field (None unless requested), and the text offset after these tokens."""
        if not self.wants_logprobs(c):
            return None, offset
        return self._text_logprobs([lp.token_id for lp in logprobs], logprobs, offset)

    def _prompt_logprobs(self, c: Choice) -> dict:
        """The prompt's part of an echoed completion's logprobs: its first token has none (null)."""
        prompt = self.job.prompt_ids(c.index)
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
