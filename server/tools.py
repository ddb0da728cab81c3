"""Tool calling in the Hermes format: tools into the prompt, calls out of the text, forced calls by grammar.

The model is asked to answer a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
the form Qwen2.5/Qwen3 templates use. A template that takes `tools` renders them itself; for one
that does not (the default SmolLM2 template), `prompt_messages` describes them in a system message
and rewrites earlier calls and tool results as text in that same format.

`tool_choice`: "none" leaves the tools out; "auto" generates text in which `parse` finds the calls,
held by a grammar when a tool is `strict` (its calls' arguments match its parameters) or
`parallel_tool_calls` is false (one call at most); "required" or a named function force exactly
one call through a grammar (a JSON schema per tool, so even a random-weight model returns a call
whose arguments match the tool's parameters). Call ids are derived from the request's tokens and
the call's place, never drawn at random, so a deterministic request's whole answer repeats.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from detserve.engine.structured import StructuredOutput

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

FALLBACK_INSTRUCTIONS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object

    def to_openai(self, call_id: str) -> dict:
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_id(prompt_ids: list[int], choice: int, index: int, call: ToolCall) -> str:
    """A call's id: a hash of the prompt, the choice, the call's place and the call itself, so it is
    reproducible like the answer, and the same streamed or not."""
    digest = hashlib.sha256(json.dumps([prompt_ids, choice, index, call.name, call.arguments]).encode()).hexdigest()
    return "call_" + digest[:24]


def prompt_messages(messages: list[dict], tools: list[dict], template_takes_tools: bool) -> list[dict]:
    """The messages to render. With a template that takes `tools`, as they are (it renders calls and
    results itself); otherwise with the tools described in the system message and calls and tool
    results written out in the Hermes format."""
    if template_takes_tools:
        return messages
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"{CALL_OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                             "arguments": c["function"]["arguments"]},
                                                            ensure_ascii=False)
                              + f"\n{CALL_CLOSE}" for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content"), calls]))})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"})
        else:
            out.append(m)
    if tools:
        described = FALLBACK_INSTRUCTIONS.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def forced_call(tools: list[dict]) -> StructuredOutput:
    """Exactly one call of one of `tools`, its arguments matching that tool's parameters."""
    return _call_grammar(f'start: "{CALL_OPEN}\\n" call "\\n{CALL_CLOSE}"', tools, strict=None)


def held_calls(tools: list[dict], strict: frozenset[str], parallel: bool) -> StructuredOutput | None:
    """What holds an unforced choice ("auto"): text with calls anywhere in it (at most one unless
    `parallel`), each call of a known tool and, for a `strict` tool, with arguments matching its
    parameters; None when nothing need be held (no strict tool, parallel calls allowed).

    Text is one lexeme that never contains the opening tag, and the opening tag ends the lexeme
    before a call: llguidance's lexer does not backtrack, so a separate tag after free text would
    be swallowed by the text and leave no way into the call."""
    if parallel and not strict:
        return None
    text = '/(.|\\n)*/ & ~/(.|\\n)*' + re.escape(CALL_OPEN).replace("/", "\\/") + '(.|\\n)*/'
    calls = "*" if parallel else "?"
    return _call_grammar(f'start: (OPEN call "\\n{CALL_CLOSE}"){calls} TEXT\n'
                         f'TEXT: {text}\n'
                         f'OPEN: TEXT "{CALL_OPEN}\\n"', tools, strict)


def _call_grammar(start: str, tools: list[dict], strict: frozenset[str] | None) -> StructuredOutput:
    """`start` (a Lark rule using `call`) with `call` one JSON object naming one of `tools`, its
    arguments held to the tool's parameters (every tool's when `strict` is None, else only those
    named in it; any object for the others).

    Each tool's parameters become a definition of the call's schema (`#/$defs/tool<i>`), with every
    local `$ref` of theirs ("#/$defs/X", "#/definitions/X", "#" for recursion, any pointer) moved
    under it: nested under the call, the pointers would no longer resolve (pydantic writes `$defs`
    and `$ref` for every nested model)."""
    def parameters(tool: dict) -> dict:
        held = strict is None or tool["function"]["name"] in strict
        return (tool["function"].get("parameters") if held else None) or {"type": "object"}

    definitions = {f"tool{i}": _rebased(parameters(t), f"#/$defs/tool{i}") for i, t in enumerate(tools)}
    options = [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for i, t in enumerate(tools)]
    schema = {"$defs": definitions, "anyOf": options, "x-guidance": _COMPACT}
    return StructuredOutput.of("grammar", f"{start}\ncall: %json {json.dumps(schema)}")


def _rebased(schema: object, root: str) -> object:
    """`schema` with each local `$ref` ("#...") pointing into `root` instead of the document's root."""
    if isinstance(schema, list):
        return [_rebased(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: root + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else _rebased(value, root) for key, value in schema.items()}


def parse(text: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) from a generated text: every well-formed call of a known tool becomes a call,
    and the text outside them (None if nothing is left) the content. A malformed block stays text."""
    names = {t["function"]["name"] for t in tools}
    calls, kept, last = [], [], 0
    for match in CALL_BLOCK.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not (isinstance(body, dict) and body.get("name") in names and isinstance(body.get("arguments", {}), dict)):
            continue
        calls.append(ToolCall(body["name"], json.dumps(body.get("arguments", {}), ensure_ascii=False)))
        kept.append(text[last : match.start()])
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


_CALL_HEAD = re.compile(re.escape(CALL_OPEN) + r'\s*\{"name": "(?P<name>[^"]+)", "arguments": (?P<arguments>.*)',
                        re.DOTALL)


def truncated_calls(text: str) -> list[ToolCall]:
    """The call a forced call's text had begun when the output was cut short (max_tokens): its name
    and its arguments so far, as OpenAI and vLLM answer such a call; none if the name was not done."""
    match = _CALL_HEAD.match(text.strip())
    return [ToolCall(match["name"], match["arguments"])] if match else []


def holdback(text: str) -> int:
    """How many characters at the end of streamed `text` must wait: an unfinished call block, or a
    tail that could be the start of one."""
    start = text.rfind(CALL_OPEN)
    if start != -1 and text.find(CALL_CLOSE, start) == -1:
        return len(text) - start
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
