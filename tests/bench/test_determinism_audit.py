"""`bench determinism` end to end against the fake server, whose divergence and drift the tests choose."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from detserve.server.bench import determinism
from tests.bench.fake_server import FINGERPRINT, MODEL, FakeServer

REPO = Path(__file__).resolve().parents[2]
SMALL_BACKGROUND = ["--background-input-len", "8", "--background-output-len", "20", "--background-range-ratio", "0"]


def audit(fake: FakeServer, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict[str, Any]]:
    parser = argparse.ArgumentParser()
    determinism.add_arguments(parser)
    args = parser.parse_args(["--base-url", fake.url, "--json", "--disable-tqdm", "--max-tokens", "5", *SMALL_BACKGROUND, *argv])
    code = determinism.run(args)
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("endpoint, stream", [("chat", False), ("completions", True)])
def test_divergent_completions_are_counted_with_their_divergence_index(fake, capsys, endpoint, stream):
    fake.reset(diverge_every=4, diverge_at=2, token_delay=0.002)
    code, report = audit(fake, capsys, "-n", "12", "--concurrency", "0,2", "--probe-concurrency", "3",
                         "--endpoint", endpoint, *(["--stream"] if stream else []))
    assert code == 1
    assert report["verdict"] == "DIVERGENT"
    assert (report["completed"], report["failed"]) == (12, 0)
    assert report["compared_by"] == "tokens"
    assert report["num_unique"] == 4  # every divergent probe got its own token
    assert report["mode_count"] == 9
    assert report["divergence_histogram"] == {"2": 3}
    assert report["max_logprob_drift"] == 0.0
    assert report["model"] == MODEL
    assert report["system_fingerprints"] == {FINGERPRINT: 12}
    assert [(lv["concurrency"], lv["probes"]) for lv in report["levels"]] == [(0, 6), (2, 6)]
    assert sum(lv["matching_mode"] for lv in report["levels"]) == 9
    assert all(s.body["model"] == MODEL for s in fake.seen)


def test_logprob_drift_on_identical_tokens_is_reported_and_fails_the_audit(fake, capsys):
    fake.reset(drift_every=3, drift_at=1, drift=0.25)
    code, report = audit(fake, capsys, "-n", "6", "--probe-concurrency", "2")
    assert code == 1
    assert report["num_unique"] == 1
    assert report["num_logprob_drift"] == 2
    assert report["num_unique_with_logprobs"] == 2
    assert report["max_logprob_drift"] == pytest.approx(0.25)
    assert report["divergence_histogram"] == {}


def test_identical_completions_pass_the_audit(fake, capsys):
    code, report = audit(fake, capsys, "-n", "4", "--concurrency", "0,1")
    assert code == 0
    assert report["identical"] is True
    assert (report["num_unique"], report["mode_count"], report["num_logprob_drift"]) == (1, 4, 0)
    assert report["variants"] == [{"count": 4, "divergence": None, "text": "Richard Feynman was a physicist"}]


def test_every_probe_runs_while_the_levels_background_requests_are_in_flight(fake, capsys):
    fake.reset(token_delay=0.02)  # a background request lasts 20 tokens x 20 ms; a probe 5 x 20 ms
    code, report = audit(fake, capsys, "-n", "4", "--concurrency", "0,2", "--probe-concurrency", "1")
    assert code == 0
    seen_by_probe = [s.background_in_flight for s in fake.probes]
    assert seen_by_probe[:2] == [0, 0]
    assert all(n >= 1 for n in seen_by_probe[2:]), seen_by_probe
    assert report["levels"][1]["background_failed"] == 0
    background = [s for s in fake.seen if not s.probe]
    assert background and all(s.body["stream"] and s.body["temperature"] == 0.0 for s in background)


def test_the_deterministic_field_goes_on_every_request_unless_no_extra_body(fake, capsys):
    def sent_by(run: int) -> list[dict]:
        """The bodies one audit run sent, told apart by their lengths: a request an earlier run gave
        up on may reach the server late, after a reset, on a busy machine."""
        return [s.body for s in fake.seen if s.body["max_tokens"] in (6 + run, 30 + run)]

    def lengths(run: int) -> list[str]:
        return ["--max-tokens", str(6 + run), "--background-output-len", str(30 + run)]

    audit(fake, capsys, "-n", "2", "--concurrency", "1", "--no-deterministic", *lengths(0))
    assert sent_by(0) and {body.get("deterministic") for body in sent_by(0)} == {False}
    _, report = audit(fake, capsys, "-n", "2", "--concurrency", "1", "--no-extra-body", *lengths(1))
    assert sent_by(1) and all("deterministic" not in body for body in sent_by(1))
    assert report["deterministic"] is None


def test_seeded_sampling_sends_the_temperature_and_seed_with_each_probe(fake, capsys):
    audit(fake, capsys, "-n", "2", "--temperature", "0.8", "--seed", "7")
    assert {(s.body["temperature"], s.body["seed"]) for s in fake.probes} == {(0.8, 7)}


def test_without_logprobs_completions_are_compared_by_text_character(fake, capsys):
    fake.reset(diverge_every=2, diverge_at=2)
    code, report = audit(fake, capsys, "-n", "4", "--no-logprobs")
    assert code == 1
    assert report["compared_by"] == "text"
    assert report["divergence_histogram"] == {"16": 2}  # "Richard Feynman w" vs "Richard Feynman a"
    assert report["max_logprob_drift"] is None
    assert all("logprobs" not in s.body for s in fake.probes)


def test_failed_probes_are_counted_and_exit_2(fake, capsys):
    fake.reset(fail_every=3)
    code, report = audit(fake, capsys, "-n", "6", "--probe-concurrency", "1")
    assert code == 2
    assert (report["completed"], report["failed"]) == (4, 2)
    assert report["errors"] == {"HTTP 500: injected failure": 2}
    assert report["num_unique"] == 1


def test_the_module_runs_as_a_script_and_writes_the_json_file(fake, tmp_path):
    fake.reset(diverge_every=2, diverge_at=0)
    output = tmp_path / "audit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "detserve.server.bench.determinism", "--base-url", fake.url.removesuffix("/v1"), "-n", "2",
         "--max-tokens", "3", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Unique completions:" in proc.stdout and "DIVERGENT" in proc.stdout
    assert json.loads(output.read_text())["divergence_histogram"] == {"0": 1}
