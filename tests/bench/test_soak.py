"""`detserve bench soak`: a short soak against a launched server passes, and the verdict catches each failure."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from detserve.server.bench import soak
from detserve.server.cli import build_parser

pytestmark = pytest.mark.slow


def test_a_short_soak_serves_faults_and_bad_inputs_with_no_5xx_and_stable_bits(tmp_path):
    report = tmp_path / "soak.json"
    args = build_parser().parse_args([
        "bench", "soak", "--launch", "--duration", "0", "--min-requests", "20", "--min-probes", "2",
        "--concurrency", "4", "--probe-interval", "2", "--max-tokens", "8", "--output", str(report),
    ])  # bounded by work, so a slow machine runs longer rather than checking less
    assert args.run(args) == 0
    figures = json.loads(report.read_text())
    assert sum(figures["served"].values()) > 0
    assert sum(figures["faults"].values()) >= 4 and figures["bad_inputs"] >= 4  # each worker opens with both
    assert figures["status_5xx"] == 0 and figures["bad_inputs_accepted"] == 0 and figures["other_errors"] == []
    assert figures["probes"] >= 2 and figures["probe_mismatches"] == 0
    assert figures["left_running"] == 0 and figures["kv_cache_usage"] == 0
    assert len(figures["rss_mib"]) >= 20 and figures["timed_out"] is False and figures["problems"] == []


def clean_figures() -> soak.SoakFigures:
    return soak.SoakFigures(served=Counter({"chat body det": 3}), probes=4, rss_mib=[100.0] * 20, rss_warm_index=3,
                            left_running=0, kv_cache_usage=0.0)


@pytest.mark.parametrize("spoil, reason", [
    (lambda f: setattr(f, "probe_mismatches", 1), "probes differed"),
    (lambda f: setattr(f, "status_5xx", 2), "5xx"),
    (lambda f: setattr(f, "bad_inputs_accepted", 1), "bad inputs were accepted"),
    (lambda f: setattr(f, "rss_mib", [100.0] * 10 + [300.0] * 10), "RSS grew"),
    (lambda f: setattr(f, "kv_cache_usage", 0.02), "leaked blocks"),
    (lambda f: setattr(f, "left_running", 1), "still running"),
    (lambda f: f.other_errors.append("ReadError: boom"), "requests failed"),
    (lambda f: setattr(f, "served", Counter()), "no request completed"),
    (lambda f: setattr(f, "timed_out", True), "hit --max-duration"),
])
def test_the_verdict_names_every_kind_of_failure(spoil, reason):
    figures = clean_figures()
    assert figures.passed(max_rss_growth_mib=64)
    spoil(figures)
    problems = figures.verdict(max_rss_growth_mib=64)
    assert len(problems) == 1 and reason in problems[0]
    assert "FAIL" in figures.table(64) and not figures.passed(64)


def test_gauges_are_read_from_the_prometheus_text_format():
    text = "# HELP x y\n# TYPE detserve:kv_cache_usage_perc gauge\ndetserve:kv_cache_usage_perc 0.25\n" \
           'detserve:requests_total{mode="fast"} 3.0\ndetserve:num_requests_running 2.0\n'
    assert soak.parse_gauges(text) == {"detserve:kv_cache_usage_perc": 0.25, "detserve:num_requests_running": 2.0}
