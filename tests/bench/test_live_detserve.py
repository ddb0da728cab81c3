"""Both benchmarks against a real `detserve serve` on the default model, at tiny sizes (the CPU model is slow)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from detserve.server.bench import determinism, serve

pytestmark = pytest.mark.slow


def run(module, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict[str, Any]]:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    code = module.run(parser.parse_args(["--json", "--disable-tqdm", *argv]))
    return code, json.loads(capsys.readouterr().out)


def test_detserve_answers_identically_with_and_without_background_load(detserve, capsys):
    code, report = run(determinism, capsys, "--base-url", detserve, "-n", "6", "--concurrency", "0,2",
                       "--probe-concurrency", "3", "--max-tokens", "4",
                       "--background-input-len", "16", "--background-output-len", "8")
    assert code == 0, report
    assert (report["completed"], report["num_unique"], report["mode_count"]) == (6, 1, 6)
    assert report["compared_by"] == "tokens"
    assert report["num_logprob_drift"] == 0
    assert report["num_output_digests"] == 1
    assert len(report["system_fingerprints"]) == 1
    assert report["levels"][1]["background_failed"] == 0


def test_detserve_serves_the_benchmark_load(detserve, capsys):
    code, report = run(serve, capsys, "--base-url", detserve, "--num-prompts", "4", "--input-len", "16",
                       "--output-len", "4", "--ignore-eos")
    assert code == 0, report["errors"]
    assert (report["completed"], report["failed"]) == (4, 0)
    assert report["total_output_tokens"] == 16
    assert report["total_input_tokens"] > 0
    assert report["mean_ttft_ms"] > 0 and report["mean_tpot_ms"] > 0
