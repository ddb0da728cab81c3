"""The OpenAI wire format at the HTTP edge: request models, their SamplingParams, and the error shape."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.responses import Response

from detserve.engine.async_engine import EngineUnavailableError, RequestFailedError
from detserve.engine.llm_engine import ModelInfo
from detserve.engine.request import SamplingParams
from detserve.engine.structured import KINDS, GrammarError, StructuredOutput

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# Request fields that map one to one onto SamplingParams; absent (None) ones keep its defaults.
_PASSTHROUGH = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "deterministic",
    "truncate_prompt_tokens", "truncation_side", "include_stop_str_in_output", "skip_special_tokens",
)


class APIError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers  # e.g. Retry-After on 429 and 503

    def body(self) -> dict:
        kind = _ERROR_TYPES.get(self.status, "BadRequestError" if self.status < 500 else "InternalServerError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}

    def response(self) -> Response:
        """ASCII-escaped JSON: a message quoting the client's input stays encodable even when that
        input held a lone surrogate (a model name "\ud800" once made the error itself a 500)."""
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")

    @classmethod
    def of(cls, exc: BaseException) -> "APIError":
        """The client-facing form of anything a request can raise: its fault 4xx, the server's 5xx."""
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, ValueError):  # a ParamError names the field
            return cls(400, str(exc), getattr(exc, "param", None))
        if isinstance(exc, RequestFailedError):
            return cls(500, f"the request failed in the engine: {exc}")
        if isinstance(exc, EngineUnavailableError):
            return cls(503, str(exc))
        logger.error("request failed", exc_info=exc)
        return cls(500, f"internal error: {type(exc).__name__}")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """The OpenAI error body, declared in the OpenAPI schema for every error status we answer with."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": kind} for status, kind in _ERROR_TYPES.items()
}
SSE_RESPONSE: dict[int | str, dict] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "A body, or an event stream"}
}


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param)


@dataclass(frozen=True)
class NotServed:
    """A valid OpenAI field with nothing behind it here: taken at the values that ask for nothing
    (`accepts`: absent, false, empty), refused with a 400 naming it at any other, never ignored."""

    why: str
    accepts: tuple = (None,)

    def check(self, name: str, value: object) -> None:
        if not any(value is accepted or (value == accepted and type(value) is type(accepted))
                   for accepted in self.accepts):
            raise unsupported(name, f"{name} {json.dumps(value, default=str)[:80]} is not supported: {self.why}")


_STORE = NotServed("nothing is stored (send store false, or leave it out)", (None, False))
_METADATA = NotServed("metadata is kept with stored objects, and detserve stores nothing", (None, {}))
_SERVICE_TIER = NotServed("one tier serves every request (auto and default are taken)", (None, "auto", "default"))
_CACHE_RETENTION = NotServed("the prefix cache keeps KV blocks in memory while they fit, never for a set time",
                             (None, "in_memory"))
_CACHE_OPTIONS = NotServed("the prefix cache is automatic: every prompt's full blocks are cached and reused")
_MODERATION = NotServed("moderation is not offered")


class _OpenAIModel(BaseModel):
    """A request object. A field it does not declare is refused (OpenAI's own 400, "Unrecognized
    request argument supplied"); a declared field in `not_served` is refused unless it asks for
    nothing; every other declared field is honoured."""

    model_config = ConfigDict(extra="forbid")
    not_served: ClassVar[dict[str, NotServed]] = {}

    def refuse_not_served(self, where: str = "") -> None:
        """400 for a `not_served` field that asks for something, here or in any request object this
        one holds (a message, its content parts, stream_options); `where` is this object's path."""
        for name, rule in self.not_served.items():
            rule.check(where + name, getattr(self, name))
        for name in type(self).model_fields:
            value = getattr(self, name)
            for path, item in (((f"{name}.{i}.", v) for i, v in enumerate(value)) if isinstance(value, list)
                               else [(f"{name}.", value)]):
                if isinstance(item, _OpenAIModel):
                    item.refuse_not_served(where + path)


class StreamOptions(_OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk
    include_obfuscation: bool | None = None

    not_served = {"include_obfuscation": NotServed("streamed events are never padded with random characters",
                                                   (None, False))}


class GenerationRequest(_OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str
    n: int = 1  # its range is the server's (--max-n), checked where choices are fanned out
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None  # strict: JSON true is not token 1
    include_stop_str_in_output: bool | None = None  # vLLM's: the stop string kept at the end of the text
    skip_special_tokens: bool | None = None  # vLLM's: false shows special tokens in the text
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    user: str | None = None  # the end user, written to the request log (OpenAI's abuse-monitoring id)
    deterministic: bool | None = None  # detserve's extension: None = the server's default
    structured_outputs: dict | None = None  # vLLM's extension: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and this many alternatives
    return_token_ids: bool = False  # vLLM's: prompt_token_ids and each choice's token_ids in the answer
    return_tokens_as_token_ids: bool = False  # vLLM's: logprob tokens as "token_id:N"
    stream: bool = False
    stream_options: StreamOptions | None = None
    use_beam_search: bool = False  # vLLM's: refused with a 400, never ignored
    truncate_prompt_tokens: int | None = None  # vLLM's: keep this many prompt tokens (-1: the context window)
    truncation_side: str | None = None  # vLLM's: "left" (the default: keep the last tokens) or "right"

    not_served = {"use_beam_search": NotServed("each of the n choices is sampled on its own (use a seed for "
                                               "reproducible choices)", (False,))}

    def check_supported(self) -> None:
        """400 for what the request asks and the server does not do (checked before admission)."""
        self.refuse_not_served()
        if self.stream_options is not None and not self.stream:
            raise unsupported("stream_options", "stream_options is only allowed when stream is true")
        if self.stream and self.engine_prompt_logprobs() is not None:
            raise unsupported("stream", "prompt logprobs are not streamed: send stream false to get them")

    @property
    def end_user(self) -> str | None:
        """Who the request is for, as the request log records it."""
        return self.user

    def engine_prompt_logprobs(self) -> int | None:
        """The prompt logprobs the engine computes: top-k alternatives per position, or None."""
        return self.prompt_logprobs

    def structured_output(self) -> tuple[StructuredOutput, str] | None:
        """The constraint on the output, and the parameter that asked for it (to name it in errors)."""
        if self.structured_outputs is None:
            return None
        param = "structured_outputs"
        given = {k: v for k, v in self.structured_outputs.items() if v is not None and v is not False}
        if len(given) != 1 or not set(given) <= {*KINDS, "json_object"}:
            raise unsupported(param, f"{param} takes exactly one of {', '.join(KINDS)} or json_object, "
                                     f"not {sorted(given) or 'none'}")
        (key, value), = given.items()
        kind, value = ("json", {"type": "object"}) if key == "json_object" else (key, value)
        return _structured(kind, value, param), param

    def sampling_params(self, model: ModelInfo, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutput | None = None) -> SamplingParams:
        """The request's params (its first choice's: `serving.fan_out` gives the others theirs);
        their ranges are SamplingParams' own checks."""
        fields = {name: getattr(self, name) for name in _PASSTHROUGH if getattr(self, name) is not None}
        return SamplingParams(
            max_tokens=max_tokens,
            seed=self.seed,
            logit_bias=_logit_bias(self.logit_bias or {}, model),
            logprobs=logprobs,
            prompt_logprobs=self.engine_prompt_logprobs(),
            structured=structured,
            **fields,
        )


def _structured(kind: str, value: object, param: str) -> StructuredOutput:
    try:
        return StructuredOutput.of(kind, value)
    except GrammarError as exc:
        raise unsupported(param, f"{param}: {exc}") from exc


def _logit_bias(bias: dict[str, float], model: ModelInfo) -> dict[int, float]:
    if not all(key.lstrip("-").isdigit() for key in bias):
        raise unsupported("logit_bias", f"logit_bias keys must be token ids, not {sorted(bias)!r}")
    out = {int(key): value for key, value in bias.items()}
    try:
        model.check_token_ids(list(out), "logit_bias keys")
    except ValueError as exc:
        raise unsupported("logit_bias", str(exc)) from exc
    return out


class ContentPart(_OpenAIModel):
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant's earlier refusal, read as its text
    image_url: Any = None  # the other part types are declared so that the 400 can name their type
    input_audio: Any = None
    file: Any = None

    def as_text(self) -> str:
        text = self.text if self.type == "text" else self.refusal if self.type == "refusal" else None
        if text is None:
            raise unsupported("messages", f"content parts of type {self.type!r} are not supported; only text")
        return text


class ToolCallFunction(_OpenAIModel):
    name: str
    arguments: str | dict = "{}"


class MessageToolCall(_OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name, given to the template; a legacy `function` result's function
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    function_call: ToolCallFunction | None = None  # an assistant's earlier legacy call
    refusal: str | None = None  # an assistant's earlier refusal: its text, when there is no content
    tool_call_id: str | None = None  # a tool result: the call it answers
    audio: Any = None

    not_served = {"audio": NotServed("audio in messages is not supported; only text")}

    def template_dict(self) -> dict:
        """The message as chat templates expect it: a role and plain text, an assistant's calls
        (arguments as objects), a tool result's call id, a participant's name."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message = {"role": role, "content": self._text()}
        calls = self.tool_calls or ([MessageToolCall(function=self.function_call)] if self.function_call else [])
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in calls]
        if role == "tool":
            message["tool_call_id"] = self.tool_call_id or self.name or ""
        elif self.name is not None:
            message["name"] = self.name
        return message

    def _text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.as_text() for part in self.content)
        return self.content or self.refusal or ""


def _arguments(arguments: str | dict) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise unsupported("messages", f"a tool call's arguments must be a JSON object: {exc}") from exc
    if not isinstance(parsed, dict):
        raise unsupported("messages", "a tool call's arguments must be a JSON object")
    return parsed


class FunctionDefinition(_OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition

    def template_dict(self) -> dict:
        function = {"name": self.function.name, "parameters": self.function.parameters or {"type": "object",
                                                                                           "properties": {}}}
        if self.function.description:
            function["description"] = self.function.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools as the server runs them: what the prompt shows, which call is forced,
    and what holds the calls of an unforced choice."""

    tools: list[dict]  # OpenAI tool objects, for the template
    forced: list[dict] | None  # required: all tools; a named function: that one; auto: None
    legacy: bool  # asked with functions/function_call: answer with message.function_call
    strict: frozenset[str] = frozenset()  # tools whose calls must match their parameters, forced or not
    parallel: bool = True  # false: at most one call (legacy function calling never has more)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call (held so by the grammar)
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | dict | None = None
    response_format: dict | None = None
    safety_identifier: str | None = None  # as `user`: written to the request log
    add_generation_prompt: bool = True  # vLLM's: end the prompt with the assistant's turn opening
    continue_final_message: bool = False  # vLLM's: leave the last (assistant) message open, to be continued
    chat_template_kwargs: dict | None = None  # vLLM's: more template variables (e.g. enable_thinking)
    prompt_cache_key: str | None = None  # a cache-routing hint: every prompt's prefix is cached here anyway
    echo: Any = None
    audio: Any = None
    modalities: Any = None
    metadata: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    not_served = GenerationRequest.not_served | {
        "echo": NotServed("echo is a /v1/completions parameter; use prompt_logprobs to score a chat", (None, False)),
        "audio": NotServed("only text output is supported"),
        "modalities": NotServed("only text output is supported", (None, ["text"])),
        "metadata": _METADATA,
        "moderation": _MODERATION,
        "prediction": NotServed("predicted outputs are not supported"),
        "prompt_cache_options": _CACHE_OPTIONS,
        "prompt_cache_retention": _CACHE_RETENTION,
        "reasoning_effort": NotServed("the model does not reason before it answers", (None, "none")),
        "service_tier": _SERVICE_TIER,
        "store": _STORE,
        "verbosity": NotServed("the model's answer length is set by max_completion_tokens alone"),
        "web_search_options": NotServed("web search is not offered"),
    }

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format is not None and self.response_format.get("type") not in ("text", "json_object",
                                                                                          "json_schema"):
            raise unsupported("response_format", "response_format type must be text, json_object or json_schema")
        if self.top_logprobs is not None and not self.logprobs:
            raise unsupported("top_logprobs", "top_logprobs needs logprobs set to true")

    @property
    def end_user(self) -> str | None:
        return self.user if self.user is not None else self.safety_identifier

    def tool_use(self) -> ToolUse | None:
        """The tools and the choice among them; None when no tool may be called (none given, or "none")."""
        if self.functions is not None and self.tools is not None:
            raise unsupported("functions", "send tools or the legacy functions, not both")
        legacy = self.functions is not None
        tools = ([Tool(type="function", function=f) for f in self.functions] if legacy else self.tools) or []
        choice = self.function_call if legacy else self.tool_choice
        param = "function_call" if legacy else "tool_choice"
        if choice is None:
            choice = "auto" if tools else "none"
        if choice == "none":
            return None
        if not tools:
            raise unsupported(param, f"{param} {choice!r} needs tools")
        dicts = [t.template_dict() for t in tools]
        strict = frozenset(t.function.name for t in tools if t.function.strict)
        parallel = self.parallel_tool_calls is not False and not legacy
        if choice == "auto":
            return ToolUse(dicts, None, legacy, strict, parallel)
        if choice == "required":
            return ToolUse(dicts, dicts, legacy, strict, parallel)
        name = (choice.get("function") or {}).get("name") if not legacy else choice.get("name")
        if not legacy and choice.get("type") != "function":
            raise unsupported(param, 'a named tool_choice is {"type": "function", "function": {"name": ...}}')
        named = [t for t in dicts if t["function"]["name"] == name]
        if not named:
            raise unsupported(param, f"{param} names {name!r}, which is not among the tools")
        return ToolUse(dicts, named, legacy, strict, parallel)

    def structured_output(self) -> tuple[StructuredOutput, str] | None:
        """OpenAI's response_format (json_object, json_schema), or else vLLM's structured_outputs."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return super().structured_output()
        if self.structured_outputs is not None:
            raise unsupported("response_format", "send response_format or structured_outputs, not both")
        if kind == "json_object":
            return _structured("json", {"type": "object"}, "response_format"), "response_format"
        spec = self.response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise unsupported("response_format", "response_format json_schema needs a json_schema object with a "
                                                 "schema object")
        # No schema: any JSON object. `strict` changes nothing: the grammar always holds the output to it.
        return _structured("json", spec.get("schema", {"type": "object"}), "response_format"), "response_format"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16  # OpenAI's documented default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    not_served = GenerationRequest.not_served | {"suffix": NotServed("insertion after a suffix is not supported",
                                                                     (None, ""))}

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1, self.n):
            raise unsupported("best_of", "best_of must equal n: every choice generated is returned")

    def engine_prompt_logprobs(self) -> int | None:
        """Echo with logprobs shows the prompt's logprobs first; echo with max_tokens 0 scores the prompt."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        if self.echo and self.max_tokens == 0 and not wanted:
            wanted = [0]
        return max(wanted) if wanted else None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string, several strings, one token list, or several token lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt) or [[]]


class TokenizeRequest(_OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for a prompt; a chat template adds its own
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # as on chat
    chat_template_kwargs: dict | None = None  # as on chat
    return_token_strs: bool = False  # vLLM's: each token's text beside its id


class DetokenizeRequest(_OpenAIModel):
    model: str | None = None
    tokens: list[StrictInt]


_NO_TOOLS = "tools are not served on /v1/responses; use /v1/chat/completions"
_STATELESS = "detserve keeps no state between requests; send the whole conversation as input"


class ResponsesRequest(_OpenAIModel):
    """The Responses API subset served: text in, one text message out (see server/responses.py)."""

    model: str
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None  # detserve's extension, as on chat
    deterministic: bool | None = None  # detserve's extension
    stream: bool = False
    include: list[str] | None = None  # of the extra outputs, only "message.output_text.logprobs" is served
    top_logprobs: int | None = None  # with that include: alternatives per token
    text: dict | None = None  # only {"format": {"type": "text"}}
    user: str | None = None  # as on chat: written to the request log
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # as on chat: every prompt's prefix is cached anyway
    parallel_tool_calls: bool | None = None  # no tools are served here, so no call is ever made
    tool_choice: Any = None
    tools: Any = None
    max_tool_calls: Any = None
    store: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    background_options: Any = None
    context_management: Any = None
    metadata: Any = None
    moderation: Any = None
    prompt: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning: Any = None
    service_tier: Any = None
    stream_options: Any = None
    truncation: Any = None
    access_programs: Any = None
    image: Any = None

    not_served = {
        "tools": NotServed(_NO_TOOLS, (None, [])),
        "tool_choice": NotServed(_NO_TOOLS, (None, "none", "auto")),
        "max_tool_calls": NotServed(_NO_TOOLS),
        "store": _STORE,
        "previous_response_id": NotServed(_STATELESS),
        "conversation": NotServed(_STATELESS),
        "context_management": NotServed(_STATELESS),
        "background": NotServed("responses are answered while the request waits", (None, False)),
        "background_options": NotServed("responses are answered while the request waits"),
        "metadata": _METADATA,
        "moderation": _MODERATION,
        "prompt": NotServed("stored prompt templates are not kept; send the prompt as input"),
        "prompt_cache_options": _CACHE_OPTIONS,
        "prompt_cache_retention": _CACHE_RETENTION,
        "reasoning": NotServed("the model does not reason before it answers", (None, {})),
        "service_tier": _SERVICE_TIER,
        "stream_options": NotServed("streamed events are never padded with random characters",
                                    (None, {}, {"include_obfuscation": False})),
        "truncation": NotServed("a prompt over the context window is refused, never cut", (None, "disabled")),
        "access_programs": NotServed("access programs are not offered"),
        "image": NotServed("only text output is supported"),
    }

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])

    def as_chat(self) -> ChatCompletionRequest:
        """The chat completion this request runs as; 400 for what is not served."""
        self.refuse_not_served()
        text = dict(self.text or {})
        if (text.pop("format", None) or {}).get("type", "text") != "text" or text.pop("verbosity", None) is not None:
            raise unsupported("text", "only plain text output is supported on /v1/responses (no format, no verbosity)")
        if text:
            raise unsupported("text", f"Unrecognized request argument supplied: text.{sorted(text)[0]}")
        others = sorted(set(self.include or []) - {"message.output_text.logprobs"})
        if others:
            raise unsupported("include", f"include {others} is not supported; only message.output_text.logprobs")
        if self.top_logprobs is not None and not self.wants_logprobs:
            raise unsupported("top_logprobs", 'top_logprobs needs include ["message.output_text.logprobs"]')
        return ChatCompletionRequest(
            model=self.model, messages=self._messages(), max_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, deterministic=self.deterministic,
            stream=self.stream, user=self.user, safety_identifier=self.safety_identifier,
            prompt_cache_key=self.prompt_cache_key, logprobs=self.wants_logprobs,
            top_logprobs=self.top_logprobs if self.wants_logprobs else None)

    def _messages(self) -> list[dict]:
        """`instructions` as the system message, then `input`'s messages as chat messages."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for item in items:
            kind = item.get("type", "message")
            if kind != "message" or item.get("role") not in ("user", "system", "developer", "assistant"):
                raise unsupported("input", f"input items of type {kind!r} (role {item.get('role')!r}) are not "
                                           "supported; send messages with role user, system, developer or assistant")
            content = item.get("content")
            if isinstance(content, list):
                unsupported_parts = {p.get("type") for p in content} - {"input_text", "output_text"}
                if unsupported_parts:
                    raise unsupported("input", f"content parts of type {sorted(map(str, unsupported_parts))} are "
                                               "not supported; only input_text and output_text")
                content = "\n".join(str(p.get("text", "")) for p in content)
            messages.append({"role": item["role"], "content": content or ""})
        return messages

    def settings(self) -> dict:
        """What the response object echoes back of the request."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": self.temperature if self.temperature is not None else 1.0,
                "top_p": self.top_p if self.top_p is not None else 1.0}
