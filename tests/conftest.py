"""Shared test setup: skip `gpu` tests without CUDA; one engine per distinct config, loaded once."""

from __future__ import annotations

import functools
import os
import threading

import pytest
import torch
from hypothesis import settings

# CI explores the same examples every run, so a red build always points at a real regression.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@functools.lru_cache(maxsize=4)
def cached_engine(config: EngineConfig) -> LLMEngine:
    return LLMEngine(config)


@pytest.fixture(scope="session")
def make_engine():
    """An engine on the default model; equal configs share one instance, which must be left idle."""

    def make(**overrides) -> LLMEngine:
        engine = cached_engine(EngineConfig(**overrides))
        assert not engine.has_unfinished_requests(), "a previous test left requests in this engine"
        return engine

    return make


def record_admission_calls(llm: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record (call, thread name) of every admission, tokenizer encode and grammar compile of `llm`."""
    calls: list[tuple[str, str]] = []
    for owner, name in ((llm, "admit"), (llm.tokenizer, "encode"), (llm.grammars, "matcher")):
        def counted(*args, _original=getattr(owner, name), _name=name, **kwargs):
            calls.append((_name, threading.current_thread().name))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls
