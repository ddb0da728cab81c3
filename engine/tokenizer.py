"""Text <-> token ids: the model's own tokenizer and chat template, and streaming detokenization."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path

from detserve.engine.request import ParamError

_CONTEXT_TOKENS = 6  # prompt tokens decoded along with the output so leading spaces come out right


class Tokenizer:
    """A thin wrapper over the Hugging Face fast tokenizer stored beside the weights."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id

    @classmethod
    def load(cls, model_dir: Path) -> "Tokenizer | None":
        """The folder's tokenizer, or None when it has none (dummy weights from a bare config.json)."""
        if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    def info(self) -> dict:
        """The tokenizer's configuration in vLLM's `/tokenizer_info` shape: its init arguments as JSON,
        its class, its special tokens and chat template (lm-eval's remote tokenizer reads these)."""
        hf = self.hf
        info = {key: _jsonable(value) for key, value in hf.init_kwargs.items()}
        return info | {"tokenizer_class": type(hf).__name__, "eos_token": hf.eos_token, "bos_token": hf.bos_token,
                       "pad_token": hf.pad_token, "chat_template": getattr(hf, "chat_template", None)}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def _template_arguments(self) -> frozenset[str]:
        """The names a template variable may not take: the template call's own arguments (read from
        its signature, so a new transformers argument is covered too) and `messages`, the variable
        the conversation is rendered as."""
        names = inspect.signature(self.hf.apply_chat_template).parameters
        return frozenset(n for n, p in names.items() if p.kind is not inspect.Parameter.VAR_KEYWORD) | {"messages"}

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` argument itself (Qwen's, Llama 3.1's do)."""
        template = getattr(self.hf, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a chat rendered by the model's template (the template adds the special tokens);
        `template_kwargs` are more variables for the template (vLLM's chat_template_kwargs, such as
        Qwen3's enable_thinking)."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        if add_generation_prompt and continue_final_message:
            raise ParamError("continue_final_message", "continue_final_message needs add_generation_prompt false: "
                                                       "the last message is continued, no new turn opened")
        taken = sorted(set(template_kwargs or {}) & self._template_arguments)
        if taken:
            raise ParamError("chat_template_kwargs", f"chat_template_kwargs cannot set {taken}: they are "
                                                     "arguments of the template call, not template variables")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                           tools=tools, continue_final_message=continue_final_message,
                                           **(template_kwargs or {}))
        return self.encode(text, add_special_tokens=False)


def _jsonable(value: object) -> object:
    """`value` as JSON can hold it: containers walked, special-token objects as their text, others as str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value.content if hasattr(value, "content") else str(value)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas, never splitting a multi-byte character.

    It decodes a sliding window (a few tokens already shown + the new ones) and emits only text
    past what the shown tokens decode to, holding back while the tail is an incomplete character.
    """

    tokenizer: Tokenizer
    token_ids: list[int]  # the last few prompt tokens, then the output tokens
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    skip_special_tokens: bool = True

    @classmethod
    def for_prompt(cls, tokenizer: Tokenizer, prompt_token_ids: list[int],
                   skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        return cls(tokenizer, context, prefix_offset=0, read_offset=len(context),
                   skip_special_tokens=skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one output token; return the new text it completes (maybe empty)."""
        self.token_ids.append(token_id)
        shown = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(shown) or full.endswith("\ufffd"):
            return ""
        delta = full[len(shown) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta


@dataclass
class StopChecker:
    """Finds stop strings in the output text and decides how much text is safe to stream.

    Text that could still be the start of a stop string is held back until it cannot be.
    """

    stop: list[str] = field(default_factory=list)
    include_stop: bool = False  # the text ends after the stop string, not before it
    num_emitted: int = 0

    def find(self, text: str, num_new_chars: int) -> int | None:
        """Where the text ends if a stop string now occurs in it (the earliest to begin, looking only
        where new text could complete one): before that string, or after it with `include_stop`."""
        if not self.stop:
            return None
        window_start = max(0, len(text) - num_new_chars - max(len(s) for s in self.stop) + 1)
        hits = [(i, -len(s)) for s in self.stop if (i := text.find(s, window_start)) != -1]
        if not hits:
            return None
        start, minus_length = min(hits)  # the earliest; of those starting there, the longest
        return start - minus_length if self.include_stop else start

    def take_emittable(self, text: str, finished: bool) -> str:
        """The next piece of text that may be sent to the client."""
        hold = 0 if finished or not self.stop else max(len(s) for s in self.stop) - 1
        end = max(self.num_emitted, len(text) - hold)
        piece = text[self.num_emitted : end]
        self.num_emitted = end
        return piece
