"""`detserve bench serve`: latency and throughput under load, reported as vLLM's serving benchmark does.

Metric names and meanings follow vLLM's `benchmark_serving.py` (`vllm bench serve`), so numbers
taken from detserve and from other servers line up: completed, failed, total_input_tokens,
total_output_tokens, request/output/total-token throughput, and mean/median/std/percentiles of
ttft_ms, tpot_ms, itl_ms and e2el_ms. Requests are streamed; only the public OpenAI API is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import httpx2
from tqdm import tqdm

from detserve.server.bench.common import (
    Grid,
    RequestResult,
    Row,
    Summary,
    add_client_arguments,
    build_payload,
    comma_list,
    emit,
    first_model,
    format_report,
    make_client,
    percentile_label,
    random_prompt,
    run_client,
    sample_length,
    send_request,
    summarize,
)

METRICS = {  # name -> (short name, section title), in vLLM's order
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}

EPILOG = """\
datasets: random = distinct prompts of random common words (about one token each), lengths uniform
in L*[1-r, 1+r] for --range-ratio r; random-ids = the same lengths in random token ids below 1000
(any vocabulary has them), sent as token ids with vLLM's return_token_ids, for a model served
without a tokenizer (random weights from a config.json; completions only); fixed = one prompt of --input-len words sent every time (shows
the prefix-cache path); jsonl = --dataset-path lines {"prompt": ..., "output_len" or "max_tokens": ...}
in order, repeated up to --num-prompts.

Input tokens are the server's usage.prompt_tokens (else the word count); output tokens its
usage.completion_tokens (else the streamed chunks). TTFT and ITL count only chunks that carry text.

exit status: 0 when every request completed, 1 when any failed, 2 when the benchmark could not run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_client_arguments(parser, default_endpoint="completions")
    parser.add_argument("--dataset", choices=["random", "random-ids", "fixed", "jsonl"], default="random",
                        help="where prompts come from (default: %(default)s)")
    parser.add_argument("--dataset-path", type=Path, help="the JSONL file for --dataset jsonl")
    parser.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default: %(default)s)")
    parser.add_argument("--input-len", type=int, default=1024, help="mean prompt length in words (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=128, help="mean max_tokens (default: %(default)s)")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random lengths are uniform in L*[1-r, 1+r] (default: %(default)s)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="open-loop Poisson arrivals per second; inf sends all at once (default: inf)")
    parser.add_argument("--max-concurrency", type=int,
                        help="most requests in flight; with --request-rate inf this is a closed loop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and arrival times (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos: true (vLLM, SGLang, detserve) so outputs run to max_tokens")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                        help="send detserve's `deterministic` field (default: not sent, the server decides)")
    parser.add_argument("--percentiles", "--metric-percentiles", dest="percentiles", type=comma_list(float),
                        default=[99.0], help="comma-separated percentiles to report, e.g. 50,90,99 (default: 99)")
    parser.add_argument("--percentile-metrics", type=comma_list(str), default=list(METRICS),
                        help=f"which of {','.join(METRICS)} to report (default: all)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the report; nonzero exit when requests failed or it could not run."""
    if problem := _invalid(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        report = run_client(benchmark(args, load_workload(args)))
    except (httpx2.HTTPError, RuntimeError, ValueError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    emit(args, report.to_json(), report.table())
    return 0 if report.metrics.failed == 0 and report.metrics.completed > 0 else 1


def _invalid(args: argparse.Namespace) -> str | None:
    if min(args.num_prompts, args.input_len, args.output_len) < 1:
        return "--num-prompts, --input-len and --output-len must be at least 1"
    if not 0 <= args.range_ratio < 1:
        return "--range-ratio must be in [0, 1)"
    if args.dataset == "jsonl" and args.dataset_path is None:
        return "--dataset jsonl needs --dataset-path"
    if args.dataset == "random-ids" and args.endpoint != "completions":
        return "--dataset random-ids sends token ids, which only --endpoint completions takes"
    if not args.request_rate > 0:
        return "--request-rate must be positive (inf for all at once)"
    if args.max_concurrency is not None and args.max_concurrency < 1:
        return "--max-concurrency must be at least 1"
    if unknown := set(args.percentile_metrics) - set(METRICS):
        return f"--percentile-metrics: unknown {sorted(unknown)}; choose from {list(METRICS)}"
    if not all(0 < p <= 100 for p in args.percentiles):
        return "--percentiles must be in (0, 100]"
    return None


# -- the workload ---------------------------------------------------------------------------------------


RANDOM_ID_LIMIT = 1000
"""--dataset random-ids draws its token ids below this: every model's vocabulary has them."""


@dataclass
class WorkItem:
    prompt: str | list[int]  # text, or token ids (random-ids)
    prompt_len: int  # in words or ids: the input token count when the server reports no usage
    max_tokens: int


def load_workload(args: argparse.Namespace) -> list[WorkItem]:
    rng = random.Random(args.seed)
    if args.dataset == "fixed":
        return [WorkItem(random_prompt(rng, args.input_len), args.input_len, args.output_len)] * args.num_prompts
    if args.dataset == "jsonl":
        return list(itertools.islice(itertools.cycle(_read_jsonl(args.dataset_path, args.output_len)), args.num_prompts))
    items = []
    for _ in range(args.num_prompts):
        input_len = sample_length(rng, args.input_len, args.range_ratio)
        prompt = ([rng.randrange(RANDOM_ID_LIMIT) for _ in range(input_len)] if args.dataset == "random-ids"
                  else random_prompt(rng, input_len))
        items.append(WorkItem(prompt, input_len, sample_length(rng, args.output_len, args.range_ratio)))
    return items


def _read_jsonl(path: Path, default_output_len: int) -> list[WorkItem]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string \"prompt\"")
        max_tokens = int(record.get("output_len") or record.get("max_tokens") or default_output_len)
        items.append(WorkItem(record["prompt"], len(record["prompt"].split()), max_tokens))
    if not items:
        raise ValueError(f"{path} has no prompts")
    return items


async def arrivals(items: Sequence[WorkItem], request_rate: float, rng: random.Random) -> AsyncIterator[WorkItem]:
    """The items at Poisson arrival times (exponential gaps averaging 1/rate), or all at once for inf."""
    for i, item in enumerate(items):
        if i and math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))
        yield item


async def benchmark(args: argparse.Namespace, items: list[WorkItem]) -> ServeReport:
    extra: dict[str, Any] = {"ignore_eos": True} if args.ignore_eos else {}
    if args.deterministic is not None:
        extra["deterministic"] = args.deterministic
    if args.dataset == "random-ids":  # no text may come back: the chunks' token ids time the output
        extra["return_token_ids"] = True
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    async with make_client(args) as client:
        model = args.model or await first_model(client)

        async def one(item: WorkItem, bar: tqdm) -> RequestResult:
            payload = build_payload(args.endpoint, model, item.prompt, item.max_tokens, temperature=args.temperature,
                                    stream=True, extra=extra)
            async with limit:
                result = await send_request(client, args.endpoint, payload)
            bar.update(1)
            return result

        with tqdm(total=len(items), file=sys.stderr, disable=args.disable_tqdm, unit="req") as bar:
            started, cpu_started = time.perf_counter(), time.process_time()
            tasks = [asyncio.create_task(one(item, bar)) async for item in arrivals(items, args.request_rate, random.Random(args.seed))]
            results = list(await asyncio.gather(*tasks))
            duration, client_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return ServeReport(args, model, items, results,
                       compute_metrics(items, results, duration, client_cpu, args.percentiles))


# -- metrics ----------------------------------------------------------------------------------------------


def tpot(result: RequestResult) -> float | None:
    """Seconds per output token after the first, (latency - ttft) / (output_tokens - 1); None for < 2 tokens."""
    if result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def input_len(item: WorkItem, result: RequestResult) -> int:
    return result.prompt_tokens if result.prompt_tokens is not None else item.prompt_len


@dataclass
class ServeMetrics:
    """vLLM's BenchmarkMetrics; the four summaries are in milliseconds."""

    duration: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2el: Summary
    client_cpu_per_output_token_ms: float  # this process's CPU over the run: on the server's machine it is the server's loss


def compute_metrics(
    items: Sequence[WorkItem], results: Sequence[RequestResult], duration: float, client_cpu: float,
    percentiles: Sequence[float],
) -> ServeMetrics:
    """Token totals and latency stats count completed requests only, as vLLM's calculate_metrics does."""
    done = [(item, r) for item, r in zip(items, results) if r.ok]
    total_input = sum(input_len(item, r) for item, r in done)
    total_output = sum(r.output_tokens for _, r in done)
    tpots = [t for _, r in done if (t := tpot(r)) is not None]

    def ms(values: Sequence[float]) -> Summary:
        return summarize([v * 1000 for v in values], percentiles)

    return ServeMetrics(
        duration=duration,
        completed=len(done),
        failed=len(results) - len(done),
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(done) / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        ttft=ms([r.ttft for _, r in done]),
        tpot=ms(tpots),
        itl=ms([gap for _, r in done for gap in r.itl]),
        e2el=ms([r.latency for _, r in done]),
        client_cpu_per_output_token_ms=client_cpu * 1000 / total_output if total_output else 0.0,
    )


@dataclass
class ServeReport:
    args: argparse.Namespace
    model: str
    items: list[WorkItem]
    results: list[RequestResult]
    metrics: ServeMetrics

    def to_json(self) -> dict[str, Any]:
        """vLLM's result keys (per-request times in seconds, summaries in ms) plus the run's settings."""
        m, args = self.metrics, self.args
        body: dict[str, Any] = {
            "model_id": self.model,
            "endpoint": args.endpoint,
            "dataset": args.dataset,
            "num_prompts": len(self.items),
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "max_concurrency": args.max_concurrency,
            "duration": m.duration,
            "completed": m.completed,
            "failed": m.failed,
            "total_input_tokens": m.total_input_tokens,
            "total_output_tokens": m.total_output_tokens,
            "request_throughput": m.request_throughput,
            "output_throughput": m.output_throughput,
            "total_token_throughput": m.total_token_throughput,
            "client_cpu_per_output_token_ms": m.client_cpu_per_output_token_ms,
            "input_lens": [input_len(item, r) for item, r in zip(self.items, self.results)],
            "output_lens": [r.output_tokens if r.ok else 0 for r in self.results],
            "ttfts": [r.ttft for r in self.results],
            "itls": [r.itl for r in self.results],
            "latencies": [r.latency for r in self.results],
            "generated_texts": [r.text for r in self.results],
            "errors": [r.error for r in self.results],
        }
        for name in self._selected():
            summary: Summary = getattr(m, name)
            body |= {f"mean_{name}_ms": summary.mean, f"median_{name}_ms": summary.median, f"std_{name}_ms": summary.std}
            body |= {f"p{percentile_label(p)}_{name}_ms": v for p, v in summary.percentiles.items()}
        return body

    def table(self) -> str:
        m, args = self.metrics, self.args
        rows: list[Row] = [("Successful requests", m.completed), ("Failed requests", m.failed)]
        if args.max_concurrency is not None:
            rows.append(("Maximum request concurrency", args.max_concurrency))
        if math.isfinite(args.request_rate):
            rows.append(("Request rate configured (RPS)", args.request_rate))
        rows += [
            ("Benchmark duration (s)", m.duration),
            ("Total input tokens", m.total_input_tokens),
            ("Total generated tokens", m.total_output_tokens),
            ("Request throughput (req/s)", m.request_throughput),
            ("Output token throughput (tok/s)", m.output_throughput),
            ("Total Token throughput (tok/s)", m.total_token_throughput),
            ("Client CPU per output token (ms)", m.client_cpu_per_output_token_ms),
        ]
        for name in self._selected():
            short, title = METRICS[name]
            summary: Summary = getattr(m, name)
            rows += [title, (f"Mean {short} (ms)", summary.mean), (f"Median {short} (ms)", summary.median),
                     (f"Std {short} (ms)", summary.std)]
            rows += [(f"P{percentile_label(p)} {short} (ms)", v) for p, v in summary.percentiles.items()]
        if errors := Counter(r.error for r in self.results if not r.ok):
            rows += ["Errors", Grid(["count", "error"], [[n, e[:80]] for e, n in errors.most_common(5)])]
        return format_report("Serving Benchmark Result", rows)

    def _selected(self) -> list[str]:
        return [name for name in METRICS if name in self.args.percentile_metrics]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detserve.server.bench.serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
