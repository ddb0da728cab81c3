"""Structured outputs: a request's output held to a JSON schema, a regex, a list of choices or a grammar.

llguidance compiles the constraint into a matcher over the model's tokenizer. Each step the
matcher gives the tokens that may come next as a bitmask; `kernels.apply_token_bitmask` sets every
other token's logit to -inf before penalties and sampling (so reported logprobs are those of the
masked distribution), and the sampled token advances the matcher. The mask is a pure function of
the grammar, the tokenizer and the request's own output tokens, so a constrained deterministic
request keeps its bits under any load, chunking or preemption. Work is bounded by llguidance's own
fuel limits, never by a clock (whose outcome would depend on load): a grammar that exceeds them
is refused at admission.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    import llguidance

    from detserve.engine.tokenizer import Tokenizer

Kind = Literal["json", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json", "regex", "choice", "grammar")

# Compact JSON (", " and ": ", no free whitespace): a small model cannot pad its answer with
# endless newlines until max_tokens, and the text reads as OpenAI's JSON mode writes it.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


MAX_GRAMMAR_BYTES = 256 * 1024
"""The largest grammar text compiled. Compile time grows faster than the text (a 100,000-way choice
took 4 s, 300,000 took 63 s here) and runs while the request is admitted, so size is bounded first."""


class GrammarError(ValueError):
    """The constraint is invalid or exceeds the work limits (the client's fault: a 400)."""


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: a JSON schema (`json`, as JSON text), a regex, choices (a tuple
    of strings) or a Lark grammar. `of` builds one from request values (a schema dict, a list)."""

    kind: Kind
    spec: str | tuple[str, ...]

    @classmethod
    def of(cls, kind: str, value: object) -> "StructuredOutput":
        if kind not in KINDS:
            raise GrammarError(f"structured output kind must be one of {KINDS}, not {kind!r}")
        if kind == "json":
            if isinstance(value, dict):
                return cls("json", json.dumps(value, sort_keys=True))
            if not isinstance(value, str):
                raise GrammarError("a JSON schema must be an object (or its JSON text)")
        elif kind == "choice":
            if not (isinstance(value, (list, tuple)) and value and all(isinstance(c, str) and c for c in value)):
                raise GrammarError("choice must be a non-empty list of non-empty strings")
            return cls("choice", tuple(value))
        elif not isinstance(value, str):
            raise GrammarError(f"a {kind} must be a string")
        return cls(kind, value)  # type: ignore[arg-type]

    def grammar_text(self) -> str:
        """The llguidance grammar for this constraint (not yet checked: see `Grammars.compile`)."""
        llguidance = _llguidance()
        if self.kind == "json":
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=_JSON_OPTIONS)
            except ValueError as exc:
                raise GrammarError(f"invalid JSON schema: {exc}") from exc
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.spec))
        return llguidance.LLMatcher.grammar_from_lark(self.spec)


def _llguidance():
    """llguidance, imported on first use: engines that never see a constraint do not need it."""
    import llguidance
    import llguidance.hf

    return llguidance


class Grammars:
    """The engine's grammar compiler: the tokenizer in llguidance's form (built once, on the first
    constrained request), and compiled grammars cached by their text."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._hf = tokenizer.hf
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)

    @functools.cached_property
    def _limits(self) -> "llguidance.LLParserLimits":
        return _llguidance().LLParserLimits(verbose_errors=False)

    @functools.cached_property
    def tokenizer(self) -> "llguidance.LLTokenizer":
        return _llguidance().hf.from_tokenizer(self._hf, n_vocab=self._vocab_size, eos_token=self._eos or None)

    def matcher(self, output: StructuredOutput) -> "GrammarState":
        """A fresh matcher for `output`, its grammar compiled once, here; GrammarError saying what is
        wrong with it. Admission calls this; the engine thread only advances the matcher."""
        grammar = output.grammar_text()
        if len(grammar) > MAX_GRAMMAR_BYTES:
            raise GrammarError(f"the {output.kind} constraint is {len(grammar)} bytes as a grammar; "
                               f"at most {MAX_GRAMMAR_BYTES} are accepted")
        matcher = _llguidance().LLMatcher(self.tokenizer, grammar, limits=self._limits, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return GrammarState(matcher, self._vocab_size)


class GrammarState:
    """One request's place in its grammar."""

    def __init__(self, matcher: "llguidance.LLMatcher", vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32

    def copy(self) -> "GrammarState":
        """An independent matcher at the same place (another choice of the same request)."""
        return GrammarState(self._matcher.deep_copy(), self._vocab_size)

    def bitmask(self) -> torch.Tensor:
        """int32 [ceil(V / 32)]: bit t % 32 of word t // 32 is set where token t may come next."""
        return torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)[: self._words]

    def advance(self, token: int) -> None:
        """Take the sampled token (one the mask allowed); RuntimeError if the matcher fails."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"structured output: {self._matcher.get_error() or 'token not allowed'}")

    @property
    def done(self) -> bool:
        """Whether the output is complete: the grammar can take no more tokens."""
        return self._matcher.is_stopped()
