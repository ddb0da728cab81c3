"""The benchmarks' arithmetic on hand-made data: divergence, drift, histograms, percentiles, TPOT, throughput."""

from __future__ import annotations

import argparse
import math
import random

import pytest

from detserve.server.bench import determinism, serve
from detserve.server.bench.common import RequestResult, build_payload, normalize_base_url, percentile_label, sample_length, summarize
from detserve.server.bench.determinism import analyze, first_divergence, histogram, logprob_drift, split_evenly
from detserve.server.bench.serve import WorkItem, compute_metrics, tpot


def completion(tokens: list[str], logprobs: list[float] | None = None) -> RequestResult:
    return RequestResult(text="".join(tokens), tokens=tokens, logprobs=logprobs or [-1.0] * len(tokens))


def test_first_divergence_is_the_first_differing_index():
    assert first_divergence(("a", "b", "c"), ("a", "x", "c")) == 1
    assert first_divergence(("a", "b"), ("a", "b")) is None
    assert first_divergence("Feynman was", "Feynman is") == 8


def test_a_strict_prefix_diverges_where_it_ends():
    assert first_divergence(("a", "b"), ("a", "b", "c")) == 2
    assert first_divergence(("a", "b", "c"), ("a",)) == 1
    assert first_divergence((), ("a",)) == 0


def test_logprob_drift_is_the_largest_change_within_the_shared_prefix():
    a = [-0.5, -1.0, -2.0, -9.0]
    b = [-0.5, -1.25, -2.0, -1.0]
    assert logprob_drift(a, b, 3) == 0.25  # index 3 is past the divergence and ignored
    assert logprob_drift(a, b, 4) == 8.0
    assert logprob_drift(a, b, 0) == 0.0


def test_equal_infinite_logprobs_do_not_drift():
    assert logprob_drift([-math.inf, -1.0], [-math.inf, -1.0], 2) == 0.0


def test_histogram_counts_each_value_sorted_by_value():
    assert histogram([5, 2, 5, 9, 2, 5]) == {2: 2, 5: 3, 9: 1}
    assert list(histogram([9, 1, 5])) == [1, 5, 9]


def test_split_evenly_gives_the_remainder_to_the_first_levels():
    assert split_evenly(1000, 3) == [334, 333, 333]
    assert split_evenly(6, 2) == [3, 3]
    assert sum(split_evenly(7, 4)) == 7


def test_analyze_counts_variants_and_measures_against_the_most_common_first_occurrence():
    base = ["A", "B", "C", "D"]
    results = [
        completion(["A", "B", "X", "D"]),  # a minority variant comes first: it must not become the reference
        completion(base, [-1.0, -1.0, -1.0, -1.0]),  # first occurrence of the mode: the reference
        completion(base, [-1.0, -1.5, -1.0, -1.0]),  # same tokens, drifted logprob at index 1
        completion(base, [-1.0, -1.0, -1.0, -1.0]),
        completion(["A", "Y"], [-1.0, -1.125]),  # diverges at 1: its drift there does not count
    ]
    analysis = analyze(results)
    assert analysis.compared_by == "tokens"
    assert [v.count for v in analysis.variants] == [3, 1, 1]
    assert [v.divergence for v in analysis.variants] == [None, 2, 1]
    assert analysis.variants[0].text == "ABCD"
    assert analysis.divergence_histogram == {1: 1, 2: 1}
    assert [c.variant for c in analysis.comparisons] == [1, 0, 0, 0, 2]
    assert analysis.max_logprob_drift == 0.5
    assert analysis.num_logprob_drift == 1
    assert analysis.num_unique_with_logprobs == 4
    assert not analysis.identical


def test_analyze_calls_bitwise_equal_completions_identical():
    analysis = analyze([completion(["A", "B"], [-0.1, -0.2]) for _ in range(4)])
    assert len(analysis.variants) == 1
    assert analysis.max_logprob_drift == 0.0
    assert analysis.identical


def test_same_tokens_with_drifted_logprobs_are_not_identical():
    analysis = analyze([completion(["A"], [-0.1]), completion(["A"], [-0.1000001])])
    assert len(analysis.variants) == 1
    assert not analysis.identical


def test_analyze_compares_text_by_character_when_a_probe_has_no_tokens():
    results = [completion(["Hi", " there"]), RequestResult(text="Hi where"), completion(["Hi", " there"])]
    analysis = analyze(results)
    assert analysis.compared_by == "text"
    assert analysis.divergence_histogram == {3: 1}
    assert analysis.max_logprob_drift is None


def test_summary_matches_numpy_linear_percentiles_and_population_std():
    summary = summarize([1.0, 2.0, 3.0, 4.0], [50, 99])
    assert summary.mean == 2.5
    assert summary.median == 2.5
    assert summary.std == pytest.approx(math.sqrt(1.25))
    assert summary.percentiles == {50: 2.5, 99: pytest.approx(3.97)}


def test_no_values_summarize_as_zeros():
    summary = summarize([], [99])
    assert (summary.mean, summary.median, summary.std, summary.percentiles) == (0.0, 0.0, 0.0, {99: 0.0})


def test_percentile_labels_follow_vllm_key_names():
    assert percentile_label(99.0) == "99"
    assert percentile_label(99.9) == "99.9"


def test_tpot_excludes_the_first_token():
    assert tpot(RequestResult(latency=1.0, ttft=0.2, completion_tokens=5)) == pytest.approx(0.2)
    assert tpot(RequestResult(latency=1.0, ttft=0.2, completion_tokens=1)) is None


def test_output_tokens_prefer_usage_then_logprob_tokens_then_chunks():
    assert RequestResult(completion_tokens=7, tokens=["a"], num_chunks=3).output_tokens == 7
    assert RequestResult(tokens=["a", "b"], num_chunks=1).output_tokens == 2
    assert RequestResult(num_chunks=3).output_tokens == 3


def test_metrics_count_completed_requests_only():
    items = [WorkItem("p", 10, 4), WorkItem("q", 20, 4), WorkItem("r", 30, 4)]
    results = [
        RequestResult(prompt_tokens=12, completion_tokens=4, ttft=0.1, itl=[0.1, 0.2, 0.3], latency=0.7),
        RequestResult(completion_tokens=3, ttft=0.3, itl=[0.4, 0.4], latency=1.1),  # no prompt usage: the estimate
        RequestResult(error="HTTP 500: boom", ttft=5.0, latency=9.0),
    ]
    m = compute_metrics(items, results, duration=2.0, client_cpu=0.014, percentiles=[50])
    assert (m.completed, m.failed) == (2, 1)
    assert m.client_cpu_per_output_token_ms == pytest.approx(2.0)  # per token of the completed requests
    assert (m.total_input_tokens, m.total_output_tokens) == (32, 7)
    assert m.request_throughput == 1.0
    assert m.output_throughput == 3.5
    assert m.total_token_throughput == 19.5
    assert m.ttft.mean == pytest.approx(200.0)
    assert m.tpot.mean == pytest.approx(((0.6 / 3) + (0.8 / 2)) / 2 * 1000)
    assert m.itl.median == pytest.approx(300.0)
    assert m.e2el.percentiles[50] == pytest.approx(900.0)


def test_sampled_lengths_stay_in_the_range_ratio_band():
    rng = random.Random(0)
    assert {sample_length(rng, 100, 0.0) for _ in range(20)} == {100}
    lengths = [sample_length(rng, 100, 0.5) for _ in range(500)]
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 50


def test_payloads_ask_each_endpoint_for_logprobs_in_its_own_shape():
    chat = build_payload("chat", "m", "hi", 4, temperature=0.0, stream=True, logprobs=True, extra={"deterministic": True})
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert (chat["logprobs"], chat["top_logprobs"], chat["deterministic"]) == (True, 1, True)
    assert chat["stream_options"] == {"include_usage": True}
    text = build_payload("completions", "m", "hi", 4, temperature=0.7, stream=False, seed=3, logprobs=True)
    assert (text["prompt"], text["logprobs"], text["seed"], text["temperature"]) == ("hi", 1, 3, 0.7)
    assert "stream" not in text and "deterministic" not in text


def test_base_url_gets_v1_only_when_it_has_no_path():
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert normalize_base_url("http://h/openai/v1") == "http://h/openai/v1"


@pytest.mark.parametrize("module, argv", [
    (determinism, ["--concurrency", "0,-1"]),
    (determinism, ["--num-probes", "0"]),
    (serve, ["--dataset", "jsonl"]),
    (serve, ["--percentile-metrics", "ttft,latency"]),
    (serve, ["--request-rate", "0"]),
])
def test_invalid_settings_exit_2_before_any_request(module, argv, capsys):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    assert module.run(parser.parse_args(["--base-url", "http://127.0.0.1:9", *argv])) == 2
    assert capsys.readouterr().err.startswith("error: ")
