"""`bench serve` end to end against the fake server: vLLM's metrics, load shapes, datasets, failures."""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import pytest

from detserve.server.bench import serve
from detserve.server.bench.serve import WorkItem, arrivals
from tests.bench.fake_server import MODEL, FakeServer


def bench(fake: FakeServer, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict[str, Any]]:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--base-url", fake.url, "--json", "--disable-tqdm", "--input-len", "8", *argv])
    code = serve.run(args)
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_requests_report_vllm_metrics(fake, capsys, endpoint):
    fake.reset(token_delay=0.01)
    code, report = bench(fake, capsys, "--endpoint", endpoint, "--num-prompts", "4", "--output-len", "5",
                         "--ignore-eos", "--percentiles", "50,90,99")
    assert code == 0
    assert (report["completed"], report["failed"]) == (4, 0)
    assert report["model_id"] == MODEL
    assert report["total_input_tokens"] == 32  # the fake's usage: one token per word
    assert report["total_output_tokens"] == 20
    assert report["output_lens"] == [5, 5, 5, 5]
    assert [len(itl) for itl in report["itls"]] == [4, 4, 4, 4]
    assert report["request_throughput"] == pytest.approx(4 / report["duration"])
    assert report["output_throughput"] == pytest.approx(20 / report["duration"])
    assert report["total_token_throughput"] == pytest.approx(52 / report["duration"])
    assert report["client_cpu_per_output_token_ms"] > 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert {f"{s}_{metric}_ms" for s in ("mean", "median", "std", "p50", "p90", "p99")} <= report.keys()
    assert report["mean_tpot_ms"] >= 8  # 10 ms between tokens, by the fake's clock
    assert report["mean_e2el_ms"] >= report["mean_ttft_ms"] + 4 * 8
    assert all(s.body["ignore_eos"] and s.body["stream"] and s.body["max_tokens"] == 5 for s in fake.seen)
    assert all(s.body["stream_options"] == {"include_usage": True} for s in fake.seen)


def test_the_table_uses_vllm_labels(fake, capsys):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert serve.run(parser.parse_args(["--base-url", fake.url, "--disable-tqdm", "--num-prompts", "2",
                                        "--input-len", "4", "--output-len", "3", "--max-concurrency", "1"])) == 0
    table = capsys.readouterr().out
    for label in ("Successful requests:", "Failed requests:", "Maximum request concurrency:", "Total generated tokens:",
                  "Request throughput (req/s):", "Mean TTFT (ms):", "Median TPOT (ms):", "P99 ITL (ms):", "P99 E2EL (ms):"):
        assert label in table


def test_max_concurrency_caps_the_requests_in_flight(fake, capsys):
    fake.reset(gather=2)  # the first two meet in flight, however slow the client
    code, report = bench(fake, capsys, "--num-prompts", "6", "--output-len", "4", "--max-concurrency", "2")
    assert (code, report["completed"], report["max_concurrency"]) == (0, 6, 2)
    assert fake.max_in_flight == 2


def test_an_infinite_request_rate_sends_every_request_at_once(fake, capsys):
    fake.reset(gather=5)  # all five meet in flight unless one waited for another
    code, report = bench(fake, capsys, "--num-prompts", "5", "--output-len", "4")
    assert (code, report["request_rate"]) == (0, "inf")
    assert fake.max_in_flight == 5


async def test_poisson_arrivals_wait_the_seeded_exponential_gaps():
    expected = sum(random.Random(3).expovariate(40.0) for _ in range(3))
    started = time.perf_counter()
    items = [item async for item in arrivals([WorkItem("p", 1, 1)] * 4, 40.0, random.Random(3))]
    assert len(items) == 4
    assert time.perf_counter() - started >= expected * 0.9


def test_jsonl_prompts_are_sent_in_order_with_their_own_lengths(fake, capsys, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one two", "output_len": 2}\n\n{"prompt": "three", "max_tokens": 3}\n{"prompt": "four"}\n')
    code, report = bench(fake, capsys, "--dataset", "jsonl", "--dataset-path", str(path), "--num-prompts", "4",
                         "--output-len", "6", "--max-concurrency", "1")
    assert code == 0
    assert [(s.body["prompt"], s.body["max_tokens"]) for s in fake.seen] == [
        ("one two", 2), ("three", 3), ("four", 6), ("one two", 2)]
    assert report["input_lens"] == [2, 1, 1, 2]


def test_the_fixed_dataset_sends_one_prompt_of_input_len_words(fake, capsys):
    bench(fake, capsys, "--dataset", "fixed", "--num-prompts", "3", "--output-len", "2")
    prompts = {s.body["prompt"] for s in fake.seen}
    assert len(fake.seen) == 3 and len(prompts) == 1
    assert len(prompts.pop().split()) == 8


def test_the_random_dataset_is_reproducible_from_its_seed(fake, capsys):
    argv = ("--num-prompts", "3", "--output-len", "2", "--range-ratio", "0.5", "--seed", "5", "--max-concurrency", "1")
    bench(fake, capsys, *argv)
    first = [s.body["prompt"] for s in fake.seen]
    fake.reset()
    bench(fake, capsys, *argv)
    assert [s.body["prompt"] for s in fake.seen] == first
    assert len(set(first)) == 3


def test_failed_requests_are_counted_apart_and_exit_1(fake, capsys, tmp_path):
    fake.reset(fail_every=2)  # the fake fails every second request whose prompt is its probe prompt
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": fake.behaviour.probe_prompt}) + "\n")
    code, report = bench(fake, capsys, "--dataset", "jsonl", "--dataset-path", str(path), "--num-prompts", "4",
                         "--output-len", "3", "--max-concurrency", "1")
    assert code == 1
    assert (report["completed"], report["failed"]) == (2, 2)
    assert report["errors"].count("HTTP 500: injected failure") == 2
    assert report["output_lens"] == [3, 0, 3, 0]
    assert report["total_output_tokens"] == 6


def test_an_unreachable_server_exits_2(capsys):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert serve.run(parser.parse_args(["--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--disable-tqdm"])) == 2
    assert "ConnectError" in capsys.readouterr().err


def test_deterministic_field_is_sent_only_when_asked(fake, capsys):
    bench(fake, capsys, "--num-prompts", "1", "--output-len", "2")
    assert "deterministic" not in fake.seen[0].body
    fake.reset()
    bench(fake, capsys, "--num-prompts", "1", "--output-len", "2", "--no-deterministic")
    assert fake.seen[0].body["deterministic"] is False


def test_random_ids_time_every_token_of_a_model_served_without_a_tokenizer(tmp_path, capsys):
    """A random-weight model from a config.json streams no text: the token ids it returns still
    time every output token (4 gaps for 5 tokens), and its usage counts the ids sent."""
    from types import SimpleNamespace

    from detserve.engine.async_engine import AsyncEngine
    from detserve.engine.config import EngineConfig
    from tests.server.conftest import serve as serving

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}))
    engine = AsyncEngine(EngineConfig(model=str(tmp_path), load_format="dummy", kv_cache_tokens=2048))
    with serving(engine) as live:
        code, report = bench(SimpleNamespace(url=live.url + "/v1"), capsys, "--dataset", "random-ids",
                             "--num-prompts", "3", "--output-len", "5", "--ignore-eos", "--max-concurrency", "2")
    assert code == 0, report["errors"]
    assert report["total_output_tokens"] == 15 and report["total_input_tokens"] == 24
    assert [len(itl) for itl in report["itls"]] == [4, 4, 4]


def test_random_ids_go_to_completions_only(capsys):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--base-url", "http://127.0.0.1:9", "--dataset", "random-ids", "--endpoint", "chat"])
    assert serve.run(args) == 2
    assert "only --endpoint completions" in capsys.readouterr().err
