"""`detserve bench determinism`: send one prompt N times at temperature 0 under load and count the answers.

The classic experiment (Thinking Machines, "Defeating Nondeterminism in LLM Inference", 2025): a stock
server gives many distinct completions because a request's numerics depend on what else is batched
with it. Each probe here runs while a chosen number of other requests (random prompts and lengths)
is being generated, and the report says how many distinct completions came back, where they first
diverge, and how far the logprobs of the agreeing prefix moved. Only the public OpenAI API is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Iterable, Literal, Sequence

import httpx2
from tqdm import tqdm

from detserve.server.bench.common import (
    Endpoint,
    Grid,
    RequestResult,
    Row,
    add_client_arguments,
    build_payload,
    comma_list,
    emit,
    first_model,
    format_report,
    make_client,
    random_prompt,
    run_client,
    sample_length,
    send_request,
)

DEFAULT_PROMPT = "Tell me about Richard Feynman."

EPILOG = """\
--num-probes is the total: it is split evenly across the --concurrency levels (earlier levels take
the remainder), so `-n 1000 --concurrency 0,8,64` sends 1000 probes, about 333 per level, and the
unique count covers all of them: an invariant server gives one completion at every level. The
table also breaks the probes down per level. Probes add load of their own (--probe-concurrency);
use --probe-concurrency 1 --concurrency 0 for the probe alone.

exit status: 0 every probe succeeded and all were identical (tokens, and logprobs when returned);
1 completions differed; 2 probes failed (and none differed), or the audit could not run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_client_arguments(parser, default_endpoint="chat")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the probe prompt (default: %(default)r)")
    parser.add_argument("-n", "--num-probes", type=int, default=1000,
                        help="probe requests in all, split across the concurrency levels (default: %(default)s)")
    parser.add_argument("--concurrency", type=comma_list(int), default=[0],
                        help="background requests kept in flight while the probes run; a comma-separated "
                             "list runs one level after another, e.g. 0,8,64 (default: 0)")
    parser.add_argument("--probe-concurrency", type=int, default=8,
                        help="probes in flight at once (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="probe output length; divergence often starts dozens of tokens in (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="probe temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="probe sampling seed, for seeded sampling at --temperature > 0")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                        help="the `deterministic` field sent with every request (default: true)")
    parser.add_argument("--no-extra-body", dest="extra_body", action="store_false",
                        help="send no `deterministic` field, for servers that reject unknown fields")
    parser.add_argument("--no-logprobs", dest="logprobs", action="store_false",
                        help="do not ask for logprobs: compare text only, no drift")
    parser.add_argument("--stream", action="store_true", help="stream the probes too (background requests always stream)")
    parser.add_argument("--background-input-len", type=int, default=256,
                        help="mean background prompt length in words, about one token each (default: %(default)s)")
    parser.add_argument("--background-output-len", type=int, default=128,
                        help="mean background max_tokens (default: %(default)s)")
    parser.add_argument("--background-range-ratio", type=float, default=0.9,
                        help="background lengths are uniform in mean*[1-r, 1+r] (default: %(default)s)")
    parser.add_argument("--background-seed", type=int, default=0, help="seed of the background prompts (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Run the audit, print the report; the exit status says identical (0), divergent (1) or failed (2)."""
    if problem := _invalid(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        report = run_client(audit(args))
    except (httpx2.HTTPError, RuntimeError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    emit(args, report.to_json(), report.table())
    return report.exit_code


def _invalid(args: argparse.Namespace) -> str | None:
    if args.num_probes < 1 or args.probe_concurrency < 1 or args.max_tokens < 1:
        return "--num-probes, --probe-concurrency and --max-tokens must be at least 1"
    if not args.concurrency or min(args.concurrency) < 0:
        return "--concurrency needs one or more levels, each at least 0"
    if not 0 <= args.background_range_ratio < 1:
        return "--background-range-ratio must be in [0, 1)"
    return None


# -- analysis: pure functions over completed probes ---------------------------------------------------


def first_divergence(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """The first index where `a` and `b` differ; a strict prefix diverges where it ends; None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def logprob_drift(a: Sequence[float], b: Sequence[float], length: int) -> float:
    """max |a[i] - b[i]| over i < length: how far logprobs moved where the tokens still agree."""
    return max((0.0 if x == y else abs(x - y) for x, y in zip(a[:length], b[:length])), default=0.0)


def histogram(values: Iterable[int]) -> dict[int, int]:
    return dict(sorted(Counter(values).items()))


@dataclass
class Comparison:
    """One probe against the reference: the first occurrence of the most common completion."""

    variant: int  # which distinct completion it is: 0 is the most common
    divergence: int | None  # first index (token or character) that differs from the reference; None if none
    drift: float | None  # max |logprob delta| on the prefix shared with the reference; None without logprobs


@dataclass
class Variant:
    """One distinct completion, most common first."""

    count: int
    divergence: int | None
    text: str


@dataclass
class Analysis:
    compared_by: Literal["tokens", "text"]
    variants: list[Variant]
    comparisons: list[Comparison]  # per probe, in probe order
    num_unique_with_logprobs: int  # distinct (tokens, logprobs) pairs: bit-level variants

    @property
    def divergence_histogram(self) -> dict[int, int]:
        return histogram(c.divergence for c in self.comparisons if c.divergence is not None)

    @property
    def max_logprob_drift(self) -> float | None:
        drifts = [c.drift for c in self.comparisons if c.drift is not None]
        return max(drifts) if drifts else None

    @property
    def num_logprob_drift(self) -> int:
        return sum(1 for c in self.comparisons if c.drift)

    @property
    def identical(self) -> bool:
        return len(self.variants) == 1 and self.num_logprob_drift == 0


def analyze(results: Sequence[RequestResult]) -> Analysis:
    """Compare completed probes (in probe order, at least one) by token sequence when every probe has
    tokens from logprobs, else by text (divergence is then a character index)."""
    by_tokens = all(r.tokens is not None for r in results)
    sequences: list[Sequence[Any]] = [tuple(r.tokens or ()) if by_tokens else r.text for r in results]
    ranked = [seq for seq, _ in Counter(sequences).most_common()]  # ties: first seen first
    variant_of = {seq: i for i, seq in enumerate(ranked)}
    reference = results[sequences.index(ranked[0])]
    comparisons = []
    for seq, result in zip(sequences, results):
        divergence = first_divergence(seq, ranked[0])
        shared = len(seq) if divergence is None else divergence
        drift = logprob_drift(result.logprobs or [], reference.logprobs or [], shared) if by_tokens else None
        comparisons.append(Comparison(variant_of[seq], divergence, drift))
    counts = Counter(c.variant for c in comparisons)
    variants = [
        Variant(counts[i], first_divergence(seq, ranked[0]), results[sequences.index(seq)].text)
        for i, seq in enumerate(ranked)
    ]
    bit_variants = {(seq, tuple(r.logprobs or ())) for seq, r in zip(sequences, results)}
    return Analysis("tokens" if by_tokens else "text", variants, comparisons, len(bit_variants))


# -- running the probes ---------------------------------------------------------------------------------


@dataclass
class Probe:
    level: int  # background concurrency it ran under
    result: RequestResult


@dataclass
class LevelReport:
    concurrency: int
    probes: int
    failed: int
    num_unique: int
    matching_mode: int  # probes equal to the overall most common completion
    max_logprob_drift: float | None
    background_completed: int
    background_failed: int
    duration: float


@dataclass
class BackgroundLoad:
    completed: int = 0
    failed: int = 0


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal counts, the remainder going to the first ones: 10, 3 -> 4, 3, 3."""
    return [total // parts + (i < total % parts) for i in range(parts)]


@contextlib.asynccontextmanager
async def background_load(
    client: httpx2.AsyncClient, args: argparse.Namespace, model: str, concurrency: int, rng: random.Random
) -> AsyncIterator[BackgroundLoad]:
    """Keep `concurrency` streamed requests in flight until the block exits, then abort them.

    The block is entered once each has produced output, so no probe runs before the load is real.
    """
    load = BackgroundLoad()
    extra = _extra_body(args)

    async def worker(serving: asyncio.Event) -> None:
        while True:
            prompt = random_prompt(rng, sample_length(rng, args.background_input_len, args.background_range_ratio))
            max_tokens = sample_length(rng, args.background_output_len, args.background_range_ratio)
            payload = build_payload(args.endpoint, model, prompt, max_tokens, temperature=0.0, stream=True, extra=extra)
            result = await send_request(client, args.endpoint, payload, serving)
            serving.set()
            if result.ok:
                load.completed += 1
            else:
                load.failed += 1
                await asyncio.sleep(0.1)  # a server refusing the load must not be hammered in a hot loop

    serving = [asyncio.Event() for _ in range(concurrency)]
    tasks = [asyncio.create_task(worker(event)) for event in serving]
    try:
        await asyncio.gather(*(event.wait() for event in serving))
        yield load
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _extra_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"deterministic": args.deterministic} if args.extra_body else {}


async def _run_probes(
    client: httpx2.AsyncClient, endpoint: Endpoint, payload: dict[str, Any], count: int, concurrency: int, bar: tqdm
) -> list[RequestResult]:
    limit = asyncio.Semaphore(concurrency)

    async def probe() -> RequestResult:
        async with limit:
            result = await send_request(client, endpoint, payload)
        bar.update(1)
        return result

    return list(await asyncio.gather(*(probe() for _ in range(count))))


async def audit(args: argparse.Namespace) -> AuditReport:
    """Run every level in order: start its background load, then its share of the probes."""
    async with make_client(args) as client:
        model = args.model or await first_model(client)
        payload = build_payload(
            args.endpoint, model, args.prompt, args.max_tokens, temperature=args.temperature, stream=args.stream,
            seed=args.seed, logprobs=args.logprobs, extra=_extra_body(args),
        )
        rng = random.Random(args.background_seed)
        probes: list[Probe] = []
        loads: list[tuple[BackgroundLoad, float]] = []
        started = time.perf_counter()
        with tqdm(total=args.num_probes, file=sys.stderr, disable=args.disable_tqdm, unit="probe") as bar:
            for level, count in zip(args.concurrency, split_evenly(args.num_probes, len(args.concurrency))):
                bar.set_description(f"concurrency {level}")
                level_started = time.perf_counter()
                async with background_load(client, args, model, level, rng) as load:
                    results = await _run_probes(client, args.endpoint, payload, count, args.probe_concurrency, bar)
                probes += [Probe(level, result) for result in results]
                loads.append((load, time.perf_counter() - level_started))
    return AuditReport.build(args, model, probes, loads, time.perf_counter() - started)


# -- the report -----------------------------------------------------------------------------------------


@dataclass
class AuditReport:
    model: str
    endpoint: str
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None
    deterministic: bool | None  # None: the field was not sent
    probe_concurrency: int
    num_probes: int
    completed: int
    failed: int
    duration: float
    analysis: Analysis | None  # None when no probe completed
    levels: list[LevelReport]
    system_fingerprints: dict[str, int]
    num_output_digests: int  # distinct detserve output digests (0 from other servers)
    errors: dict[str, int]

    @classmethod
    def build(
        cls,
        args: argparse.Namespace,
        model: str,
        probes: list[Probe],
        loads: list[tuple[BackgroundLoad, float]],
        duration: float,
    ) -> AuditReport:
        done = [p for p in probes if p.result.ok]
        analysis = analyze([p.result for p in done]) if done else None
        comparisons = analysis.comparisons if analysis else []
        levels = []
        for level, (load, level_duration) in zip(args.concurrency, loads):
            mine = [c for p, c in zip(done, comparisons) if p.level == level]
            drifts = [c.drift for c in mine if c.drift is not None]
            levels.append(LevelReport(
                concurrency=level,
                probes=sum(1 for p in probes if p.level == level),
                failed=sum(1 for p in probes if p.level == level and not p.result.ok),
                num_unique=len({c.variant for c in mine}),
                matching_mode=sum(1 for c in mine if c.variant == 0),
                max_logprob_drift=max(drifts) if drifts else None,
                background_completed=load.completed,
                background_failed=load.failed,
                duration=level_duration,
            ))
        return cls(
            model=model,
            endpoint=args.endpoint,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            deterministic=args.deterministic if args.extra_body else None,
            probe_concurrency=args.probe_concurrency,
            num_probes=len(probes),
            completed=len(done),
            failed=len(probes) - len(done),
            duration=duration,
            analysis=analysis,
            levels=levels,
            system_fingerprints=dict(Counter(p.result.fingerprint or "(none)" for p in done)),
            num_output_digests=len({p.result.digest for p in done if p.result.digest}),
            errors=dict(Counter(p.result.error for p in probes if not p.result.ok).most_common()),
        )

    @property
    def exit_code(self) -> int:
        if self.analysis is None:
            return 2
        if not self.analysis.identical:
            return 1
        return 2 if self.failed else 0

    @property
    def verdict(self) -> str:
        if self.analysis is None:
            return "no probe completed"
        if not self.analysis.identical:
            return "DIVERGENT"
        return f"identical, but {self.failed} probes failed" if self.failed else "identical"

    def to_json(self) -> dict[str, Any]:
        a = self.analysis
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "concurrency": [level.concurrency for level in self.levels],
            "probe_concurrency": self.probe_concurrency,
            "num_probes": self.num_probes,
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration,
            "identical": a.identical if a else None,
            "verdict": self.verdict,
            "compared_by": a.compared_by if a else None,
            "num_unique": len(a.variants) if a else 0,
            "num_unique_with_logprobs": a.num_unique_with_logprobs if a else 0,
            "mode_count": a.variants[0].count if a else 0,
            "divergence_histogram": {str(i): n for i, n in a.divergence_histogram.items()} if a else {},
            "max_logprob_drift": a.max_logprob_drift if a else None,
            "num_logprob_drift": a.num_logprob_drift if a else 0,
            "system_fingerprints": self.system_fingerprints,
            "num_output_digests": self.num_output_digests,
            "errors": self.errors,
            "levels": [asdict(level) for level in self.levels],
            "variants": [asdict(v) for v in a.variants] if a else [],
        }

    def table(self, max_variants: int = 5) -> str:
        a = self.analysis
        unit = "token" if a is None or a.compared_by == "tokens" else "character"
        rows: list[Row] = [
            ("Model", self.model),
            ("Endpoint", self.endpoint),
            ("Deterministic field", "not sent" if self.deterministic is None else str(self.deterministic).lower()),
            ("Probes completed", self.completed),
            ("Probes failed", self.failed),
            ("Duration (s)", self.duration),
        ]
        if a is not None:
            drift = a.max_logprob_drift
            rows += [
                ("Compared by", a.compared_by),
                ("Unique completions", len(a.variants)),
                ("Most common completion count", a.variants[0].count),
                ("Unique incl. logprob bits", a.num_unique_with_logprobs if drift is not None else "n/a"),
                ("Probes with logprob drift", a.num_logprob_drift if drift is not None else "n/a"),
                ("Max logprob drift", f"{drift:.3g}" if drift is not None else "n/a"),
            ]
        fingerprints = ", ".join(f"{fp} ({n})" for fp, n in self.system_fingerprints.items())
        rows += [("System fingerprints", fingerprints or "-"), ("Output digests", self.num_output_digests),
                 ("Verdict", self.verdict), "By background concurrency"]
        rows.append(Grid(
            ["concurrency", "probes", "failed", "unique", "matching mode", "max drift", "bg done", "bg failed", "time (s)"],
            [[lv.concurrency, lv.probes, lv.failed, lv.num_unique, lv.matching_mode,
              "-" if lv.max_logprob_drift is None else f"{lv.max_logprob_drift:.3g}",
              lv.background_completed, lv.background_failed, f"{lv.duration:.1f}"] for lv in self.levels],
        ))
        if a is not None and len(a.variants) > 1:
            rows += [f"First divergence ({unit} index)",
                     Grid([f"{unit} index", "probes"], list(a.divergence_histogram.items()))]
        if a is not None:
            rows += ["Completions (most common first)", Grid(
                ["count", "diverges at", "text"],
                [[v.count, "-" if v.divergence is None else v.divergence, _preview(v.text)] for v in a.variants[:max_variants]],
            )]
        if self.errors:
            rows += ["Errors", Grid(["count", "error"], [[n, _preview(e)] for e, n in list(self.errors.items())[:5]])]
        return format_report("Determinism Audit", rows)


def _preview(text: str, width: int = 60) -> str:
    flat = repr(text)[1:-1]
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detserve.server.bench.determinism", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
