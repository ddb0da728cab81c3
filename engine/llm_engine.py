"""The synchronous engine: add requests, then `step()` = schedule -> execute -> update, until done."""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
from dataclasses import dataclass, replace

import torch

from detserve import kernels
from detserve.engine import __version__, weights
from detserve.engine.block_manager import BlockManager
from detserve.engine.config import EngineConfig
from detserve.engine import workers
from detserve.engine.model_runner import model_facts
from detserve.engine.request import FinishReason, Request, RequestOutput, SamplingParams, TokenLogprob
from detserve.engine.scheduler import Scheduler
from detserve.engine.structured import Grammars, GrammarState
from detserve.engine.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """The served model's facts: what the server reports, and what requests are checked against."""

    name: str  # the id clients send
    root: str  # where its weights were read from
    max_model_len: int  # the context window
    vocab_size: int
    max_request_tokens: int  # prompt + output of one request: the context window or the whole KV cache, if smaller
    default_deterministic: bool  # for requests that do not say
    fingerprints: tuple[str, str]  # system fingerprint of (fast, deterministic) requests

    def fingerprint(self, deterministic: bool) -> str:
        """Equal fingerprints promise equal bits for equal deterministic requests."""
        return self.fingerprints[deterministic]

    def check_token_ids(self, ids: list[int], name: str = "prompt token ids") -> None:
        """ValueError unless every id is an integer token of this model's vocabulary."""
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"{name} must be integers in [0, {self.vocab_size})")


@dataclass(frozen=True)
class AdmittedRequest:
    """A request that passed admission, which the engine then trusts: its prompt as token ids, its
    params with every default settled, and its grammar's matcher (compiled once, at admission)."""

    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens and deterministic set
    grammar: GrammarState | None = None  # where the structured output starts; None: unconstrained

    def with_seed(self, seed: int | None) -> "AdmittedRequest":
        """Another choice of the same request: the same prompt and rules, its own seed and grammar state."""
        return AdmittedRequest(self.prompt_token_ids, replace(self.params, seed=seed),
                               self.grammar.copy() if self.grammar is not None else None)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of KV blocks in use by requests (0.0 when idle)
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


@dataclass
class _TextState:
    """Per-request streaming text: the detokenizer and the stop-string checker."""

    detokenizer: IncrementalDetokenizer | None
    stop: StopChecker


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        dummy = config.load_format == "dummy"
        self.model_dir, self.model_config, self.max_model_len = model_facts(config)
        mc = self.model_config
        self.tokenizer = Tokenizer.load(self.model_dir)
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.grammars = Grammars(self.tokenizer, mc.vocab_size, self.eos_token_ids) if self.tokenizer else None
        self.tp = workers.launch(config)
        self.runner = workers.build_runner(workers.rank_config(config, 0), mc, self.model_dir, self.max_model_len,
                                           self.tp)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._text: dict[str, _TextState] = {}
        self._generate_ids = itertools.count()
        self._weights_digest = "dummy-seed%d" % config.seed if dummy else weights.file_digest(self.model_dir)
        self.info = ModelInfo(
            name=config.served_model_name or _model_name(config),
            root=str(self.model_dir),
            max_model_len=self.max_model_len,
            vocab_size=mc.vocab_size,
            max_request_tokens=min(self.max_model_len, config.kv_capacity_tokens),
            default_deterministic=config.default_deterministic,
            fingerprints=(self._system_fingerprint(False), self._system_fingerprint(True)),
        )

    # -- requests in -------------------------------------------------------------------------------

    def admit(self, prompt: str | list[int], params: SamplingParams) -> AdmittedRequest:
        """Check a request and settle its defaults, or raise ValueError saying what is wrong.

        The one place where a prompt is encoded (or its token ids checked against the vocabulary),
        its length checked against the context window and the KV cache, its grammar compiled, and
        `deterministic` and `max_tokens` (None: the rest of the context) take their defaults. It
        reads the engine and changes nothing, so the event loop runs it while the engine thread steps.
        """
        if isinstance(prompt, str):
            ids = self.require_tokenizer().encode(prompt)
        else:
            ids = list(prompt)
            self.info.check_token_ids(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        ids = self._truncated(ids, params)
        max_tokens = params.max_tokens if params.max_tokens is not None else max(1, self.info.max_request_tokens - len(ids))
        total = len(ids) + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(ids)} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion."
            )
        if total > self.info.max_request_tokens:
            raise ValueError(f"the request needs {total} tokens of KV cache but the server holds "
                             f"{self.info.max_request_tokens}")
        grammar = None
        if params.structured is not None:
            self.require_tokenizer()
            grammar = self.grammars.matcher(params.structured)  # GrammarError (a ValueError) if it is invalid
        deterministic = self.config.default_deterministic if params.deterministic is None else params.deterministic
        return AdmittedRequest(ids, replace(params, max_tokens=max_tokens, deterministic=deterministic), grammar)

    def _truncated(self, ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt cut to `truncate_prompt_tokens` (-1: the context window), dropping tokens from
        the `truncation_side` end: "left" keeps the last ones, as vLLM does."""
        keep = params.truncate_prompt_tokens
        if keep is None:
            return ids
        keep = self.max_model_len if keep == -1 else keep
        return ids[-keep:] if params.truncation_side == "left" else ids[:keep]

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or the ValueError every text-needing request gets from a model without one."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; send prompts as token ids to /v1/completions")
        return self.tokenizer

    def add_request(self, request_id: str, admitted: AdmittedRequest) -> Request:
        """Queue an admitted request as it is (`admit` checked it). ValueError for a duplicate id."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = admitted.params
        request = Request(
            request_id=request_id,
            prompt_token_ids=admitted.prompt_token_ids,
            params=params,
            deterministic=params.deterministic,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            grammar=admitted.grammar,
            prompt_logprobs=[None] * len(admitted.prompt_token_ids) if params.prompt_logprobs is not None else None,
        )
        detok = (IncrementalDetokenizer.for_prompt(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
                 if self.tokenizer else None)
        self.requests[request_id] = request
        self._text[request_id] = _TextState(detok, StopChecker(list(params.stop), params.include_stop_str_in_output))
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output, or None if unknown/finished."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return None
        return self._finish(request, FinishReason.ABORT, [], [], "")

    # -- the step ----------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def failure(self) -> str | None:
        """Why the engine cannot step any more (a tensor-parallel worker exited), or None."""
        return self.tp.failure

    def keepalive(self) -> None:
        """Called while idle: keeps tensor-parallel workers waiting (and finds out if one is gone)."""
        self.tp.keepalive()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any; the engine steps no more."""
        self.tp.close()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.block_manager.prefix_cache_queries,
            prefix_cache_hits=self.block_manager.prefix_cache_hits,
        )

    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update: the scheduler advances each request by the step's output
        (paired by request id), then each request with a new token (or a scored prompt) reports it."""
        step = self.scheduler.schedule()
        if not step.scheduled:
            return []
        output = self.runner.execute(step, self.eos_token_ids)
        outputs = []
        for request in self.scheduler.update_from_output(step, output.sampled, output.prompt_logprobs):
            try:
                outputs.append(self._report(request))
            except Exception as exc:  # one request's bookkeeping failed: fail it, not the batch
                logger.exception("request %s failed", request.request_id)
                outputs.append(self._fail(request, exc))
        return outputs

    def _fail(self, request: Request, exc: Exception) -> RequestOutput:
        output = self._finish(request, FinishReason.ABORT, [], [], "")
        output.error = f"{type(exc).__name__}: {exc}"
        return output

    def _report(self, request: Request) -> RequestOutput:
        """The output of a request the step advanced: its new token with the text it adds, finished
        when a stop rule says so; or, for a request that only scores its prompt, its end."""
        if request.params.max_tokens == 0:
            return self._finish(request, FinishReason.LENGTH, [], [], "")  # scored, nothing to add
        token = request.output_token_ids[-1]
        new_logprobs = request.output_logprobs[-1:] if request.params.logprobs is not None else []
        if request.grammar is not None:
            request.grammar.advance(token)
        text = self._text[request.request_id]
        stop_at = None
        if text.detokenizer is not None:
            num_new_chars = len(text.detokenizer.add(token))
            stop_at = text.stop.find(text.detokenizer.text, num_new_chars)
        if stop_at is not None:
            text.detokenizer.text = text.detokenizer.text[:stop_at]
        reason = check_stop(request, stop_at is not None, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            return self._finish(request, reason, [token], new_logprobs, None)
        delta = text.stop.take_emittable(text.detokenizer.text, False) if text.detokenizer else ""
        return self._output(request, [token], new_logprobs, delta)

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        new_ids: list[int],
        new_logprobs: list[TokenLogprob],
        delta: str | None,
    ) -> RequestOutput:
        """Mark finished, free blocks, and flush any held-back text (unless `delta` is given)."""
        request.finish_reason = reason
        self.scheduler.finish(request)
        text = self._text.pop(request.request_id)
        if delta is None:
            delta = text.stop.take_emittable(text.detokenizer.text, True) if text.detokenizer else ""
        del self.requests[request.request_id]
        return self._output(request, new_ids, new_logprobs, delta)

    def _output(self, request: Request, new_ids: list[int], new_logprobs: list[TokenLogprob], delta: str) -> RequestOutput:
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_ids,
            new_logprobs=new_logprobs,
            text_delta=delta,
            finished=request.finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_prompt_tokens,
            queue_seconds=request.queue_seconds,
            prompt_logprobs=prompt_logprobs,
        )

    # -- convenience -------------------------------------------------------------------------------

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run prompts to completion (for tests and scripts); returns the finished requests in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self.add_request(f"gen-{next(self._generate_ids)}", self.admit(p, sp))
                    for p, sp in zip(prompts, params_list)]
        while any(not r.finished for r in requests):
            self.step()
        return requests

    def _system_fingerprint(self, deterministic: bool) -> str:
        """What equal bits depend on, hashed; computed once, for `info`."""
        device = self.runner.device
        with self.runner.kernel_mode("invariant"):  # the digest names the runner's CPU row ops
            kernel_digest = kernels.config_digest()
        if device.type == "cuda":
            device_kind = torch.cuda.get_device_name(device)
        else:  # the vector ISA picks the BLAS kernels, and with them the bits
            device_kind = f"cpu-{torch.backends.cpu.get_cpu_capability()}"
        parts = [
            __version__,
            self._weights_digest,
            self.runner.weight_format,  # e.g. int4-g32+int8: the integer kernels' bits differ from float's
            str(self.runner.dtype),
            device_kind,
            f"torch-{torch.__version__}",
            kernel_digest if deterministic else "fast",
            self._tp_part(deterministic),
            f"threads={torch.get_num_threads()}",
        ]
        return "fp_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]

    def _tp_part(self, deterministic: bool) -> str:
        """S, and the TP size only where the bits may depend on it: fast mode's all-reduce, and on a
        GPU until measured (its column shards take the whole weight's matmul plan, so they should
        agree, but two GPUs never ran `bench/gpu_check.sh tp`; the CPU's integer kernels are proven
        in tests/engine/test_tensor_parallel.py)."""
        depends = not deterministic or self.runner.device.type == "cuda"
        return f"tp-splits={self.config.invariant_splits}" + (f"/tp={self.tp.layout.size}" if depends else "")


def check_stop(request: Request, hit_stop_string: bool, eos_token_ids: tuple[int, ...],
               max_model_len: int) -> FinishReason | None:
    """Whether the token just appended ends the request, and why: a stop string, a stop token or
    EOS (once min_tokens are out), a finished structured output, or the length limits."""
    p, token = request.params, request.output_token_ids[-1]
    if hit_stop_string:
        return FinishReason.STOP
    if request.num_output_tokens >= p.min_tokens and (
        token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids)
    ):
        return FinishReason.STOP
    if request.grammar is not None and request.grammar.done:
        return FinishReason.STOP
    if request.num_output_tokens >= p.max_tokens or request.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


def _model_name(config: EngineConfig) -> str:
    if config.model is None:
        return weights.DEFAULT_MODEL_NAME
    name = config.model.rstrip("/").split("/")[-1]
    return name.removesuffix(".gguf")
