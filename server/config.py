"""The HTTP side's options (flags and environment variables come from the fields, as the engine's do)."""

from __future__ import annotations

from dataclasses import dataclass

from detserve.engine.config import option


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side's options: access, limits that protect the engine, and operations."""

    api_key: str | None = option(
        None, "require `Authorization: Bearer <key>` on /v1 and the tokenizer routes (default: $DETSERVE_API_KEY)")
    protect_metrics: bool = option(False, "require the API key on /metrics too")
    max_body_bytes: int = option(8 * 2**20, "largest request body accepted; more is a 413")
    max_n: int = option(128, "most choices (n) per request")  # OpenAI's own cap
    max_prompt_tokens: int | None = option(
        None, "longest prompt accepted, in tokens (default: whatever fits the context window)")
    max_waiting_requests: int = option(1024, "requests queued behind the running batch before new ones get 429")
    retry_after_seconds: int = option(1, "the Retry-After of a 429")
    drain_timeout: float = option(30.0, "seconds in-flight requests get to finish after SIGTERM")
    log_prompts: bool = option(False, "put prompt text in the request log lines")

    def __post_init__(self) -> None:
        if self.api_key == "":  # an empty $DETSERVE_API_KEY means no key
            object.__setattr__(self, "api_key", None)
        for name in ("max_body_bytes", "max_n", "max_waiting_requests", "retry_after_seconds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be at least 1")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
