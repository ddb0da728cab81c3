"""Decode steps in CUDA graphs: buckets, pad rows, the static input buffer (on any host), and
replayed steps bitwise equal to eager ones (GPU only).

Graphs themselves need a GPU; what makes them safe does not. A pad row must leave every real row's
bits alone, which the CPU kernels show here through the whole engine, and the static buffer must
hold exactly the step's inputs.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from detserve import kernels
from detserve.engine.config import EngineConfig
from detserve.engine.cuda_graphs import DecodeGraphs, StaticBuffer, bucket_for, decode_buckets
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.model_runner import StepInputs
from detserve.engine.request import SamplingParams
from tests.engine.test_determinism import GREEDY, SEEDED, Result, probe_ids, run_alone


def test_buckets_double_to_8_then_step_by_8_through_max_num_seqs() -> None:
    assert decode_buckets(1) == (1,)
    assert decode_buckets(3) == (1, 2, 4)
    assert decode_buckets(8) == (1, 2, 4, 8)
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert decode_buckets(60)[-1] == 64
    buckets = decode_buckets(20)
    assert [bucket_for(n, buckets) for n in (1, 3, 5, 9, 17, 24, 25)] == [1, 4, 8, 16, 24, 24, None]


def _decode_inputs() -> StepInputs:
    """Three decodes: 301 keys (2 splits, 19 blocks), 3 keys, 18 keys (2 blocks)."""
    return StepInputs("invariant", input_ids=[5, 6, 7], positions=[300, 2, 17], query_start_loc=[0, 1, 2, 3],
                      seq_lens=[301, 3, 18], num_new_tokens=[1, 1, 1],
                      block_tables=[list(range(40, 59)), [3], [11, 12]], logits_indices=[0, 1, 2])


def test_pad_rows_are_one_token_sequences_in_the_pad_block_that_sample() -> None:
    padded = _decode_inputs().padded(5, pad_block=99)
    assert padded.input_ids == [5, 6, 7, 0, 0] and padded.positions == [300, 2, 17, 0, 0]
    assert padded.query_start_loc == [0, 1, 2, 3, 4, 5] and padded.seq_lens == [301, 3, 18, 1, 1]
    assert padded.block_tables[3:] == [[99], [99]] and padded.logits_indices == [0, 1, 2, 3, 4]
    assert _decode_inputs().padded(3, pad_block=99) == _decode_inputs()


def test_the_static_buffer_holds_the_padded_step_and_its_attention_items() -> None:
    padded = _decode_inputs().padded(4, pad_block=99)
    buffer = StaticBuffer(capacity=8, max_blocks=32, max_splits=3, device=torch.device("cpu"))
    buffer.load(_decode_inputs().padded(8, pad_block=7))  # an earlier, larger step leaves stale entries
    buffer.load(padded)
    static = buffer.views(4)
    assert static.input_ids.tolist() == padded.input_ids and static.positions.tolist() == padded.positions
    for row, table in zip(static.block_tables.tolist(), padded.block_tables):
        assert row[: len(table)] == table
    assert static.items.tolist() == kernels.graph_decode_items(padded.seq_lens, 3)
    assert static.items.numel() == kernels.graph_table_length(4, 3)
    # The graph derives the cache slots from these views as the eager batch does from the lists.
    slots = kernels.cache_slots(static.block_tables, torch.arange(4), static.positions.long(), 16)
    assert slots.tolist() == [t[p // 16] * 16 + p % 16 for t, p in zip(padded.block_tables, padded.positions)]


def test_only_decode_steps_within_the_largest_bucket_take_a_graph(make_engine) -> None:
    runner = make_engine().runner
    assert runner.graphs is None  # a CPU runs every step eagerly
    graphs = DecodeGraphs(runner, max_num_seqs=4, max_model_len=512)
    decodes = _decode_inputs()
    assert graphs.bucket(decodes) == 4
    five = StepInputs("fast", [1] * 5, [9] * 5, list(range(6)), [10] * 5, [1] * 5, [[0]] * 5, list(range(5)))
    assert graphs.bucket(five) is None
    prefill = StepInputs("invariant", [1, 2, 3], [0, 1, 2], [0, 3], [3], [3], [[0]], [2])
    assert graphs.bucket(prefill) is None
    scoring = StepInputs("invariant", [4], [3], [0, 1], [4], [1], [[0]], [0], scored_rows=[0])
    assert graphs.bucket(scoring) is None
    chunk_without_sampling = StepInputs("invariant", [4], [3], [0, 1], [4], [1], [[0]], [])
    assert graphs.bucket(chunk_without_sampling) is None


class PaddedEagerly(DecodeGraphs):
    """The graph path's padding without the capture (none exists on a CPU): each decode step padded
    to its bucket and run eagerly, the pad rows' logits dropped."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.padded_steps: list[tuple[int, int]] = []

    def logits(self, inputs: StepInputs, bucket: int) -> torch.Tensor:
        self.padded_steps.append((len(inputs.seq_lens), bucket))
        padded, runner = inputs.padded(bucket, self.runner.pad_block), self.runner
        return next(runner._logits(runner._hidden(padded, []), padded))[: len(inputs.seq_lens)]


def _run_amid_company(engine: LLMEngine, num_others: int) -> list[Result]:
    """The greedy and seeded probes amid `num_others` seeded requests of other lengths; every result."""
    rng = random.Random(num_others)
    requests = [engine.add_request(f"pad-{num_others}-{i}", engine.admit(
        [rng.randrange(200, 40000) for _ in range(rng.randint(3, 40))],
        SamplingParams(max_tokens=rng.randint(2, 14), temperature=0.7, seed=i, logprobs=1, ignore_eos=True)))
        for i in range(num_others)]
    requests += [engine.add_request(f"probe-{num_others}-{i}", engine.admit(probe_ids(engine), params))
                 for i, params in enumerate((GREEDY, SEEDED))]
    while engine.has_unfinished_requests():
        engine.step()
    return [Result.of(r) for r in requests]


def test_pad_rows_leave_every_real_rows_bits(make_engine, monkeypatch) -> None:
    """Greedy and seeded probes amid company, every step padded to its bucket or not: the same bits
    for every request (a pad row writing a real request's cache would change that request's), and
    the probes' bits alone."""
    engine = make_engine(enable_prefix_caching=False)
    alone = [run_alone(engine, GREEDY), run_alone(engine, SEEDED)]
    padding = PaddedEagerly(engine.runner, engine.config.max_num_seqs, engine.max_model_len)
    monkeypatch.setattr(engine.runner, "graphs", None)
    for num_others in (1, 2, 5, 10):
        engine.runner.graphs = None
        unpadded = _run_amid_company(engine, num_others)
        engine.runner.graphs = padding
        assert _run_amid_company(engine, num_others) == unpadded, f"padding changed bits amid {num_others} others"
        assert unpadded[-2:] == alone, f"a probe diverged amid {num_others} others"
    assert any(batch < bucket for batch, bucket in padding.padded_steps), "no step was padded"


def test_a_runner_whose_graphs_cannot_be_captured_runs_every_step_eagerly(make_engine, monkeypatch, caplog) -> None:
    """Here the capture fails for real, at the runner's start (a CPU has no CUDA streams): the
    runner is left without graphs, and says so."""
    runner = make_engine().runner
    monkeypatch.setattr(kernels, "can_capture_decodes", lambda device: True)
    assert runner._decode_graphs(512) is None
    assert "CUDA graphs are off" in caplog.text and "GraphCaptureError" in caplog.text


# ---------------------------------------------------------------------------------------------
# on a GPU: graphs replayed


SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": 1,
}


def _gpu_engine(folder, enforce_eager: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(folder), load_format="dummy", device="cuda", dtype="bfloat16",
                                  kv_cache_tokens=65536, max_num_seqs=256, enforce_eager=enforce_eager))


def _probe_amid(engine: LLMEngine, prompt: list[int], num_others: int, deterministic: bool) -> list[Result]:
    rng = random.Random(num_others)
    for i in range(num_others):
        engine.add_request(f"other-{num_others}-{i}", engine.admit(
            [rng.randrange(2, 2048) for _ in range(rng.randint(1, 60))],
            SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, deterministic=deterministic)))
    probes = [engine.add_request(f"probe-{num_others}-{i}", engine.admit(prompt, p)) for i, p in enumerate(
        (SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True, deterministic=deterministic),
         SamplingParams(max_tokens=12, temperature=0.9, seed=5, logprobs=2, ignore_eos=True,
                        deterministic=deterministic)))]
    while engine.has_unfinished_requests():
        engine.step()
    return [Result.of(p) for p in probes]


@pytest.mark.gpu
def test_replayed_decode_steps_give_the_eager_bits_alone_and_amid_1_to_255_others(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMALL_LLAMA))
    prompt = [random.Random(0).randrange(2, 2048) for _ in range(300)]  # decodes span two key splits
    eager, graphed = _gpu_engine(tmp_path, enforce_eager=True), _gpu_engine(tmp_path, enforce_eager=False)
    graphs = graphed.runner.graphs
    assert eager.runner.graphs is None and len(graphs.graphs) == 2 * len(graphs.buckets)  # all captured
    replayed: list[tuple[int, str]] = []
    replay = graphs.logits
    graphs.logits = lambda inputs, bucket: replayed.append((bucket, inputs.mode)) or replay(inputs, bucket)
    alone = _probe_amid(eager, prompt, 0, deterministic=True)
    for num_others in (0, 1, 3, 31, 255):
        assert _probe_amid(graphed, prompt, num_others, deterministic=True) == alone, f"amid {num_others}"
    # the probes alone (2), the last company request alone (1), and a crowd
    assert {1, 2} <= {b for b, _ in replayed} and max(b for b, _ in replayed) >= 128
    fast = _probe_amid(graphed, prompt, 3, deterministic=False)
    assert all(len(r.token_ids) == 12 for r in fast) and ("fast" in {m for _, m in replayed})
