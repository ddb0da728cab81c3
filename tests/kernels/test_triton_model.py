"""A whole tiny Llama on the Triton kernels, in the interpreter: the GPU path's wiring, tested on CPU.

Every op the model calls is routed to its Triton kernel (matmul, RMSNorm, RoPE, attention,
SiLU-mul, log-softmax, sampling) with small tiles, as invariant mode on a GPU routes them. The
probe's logits must be bitwise equal alone and amid company, close to the torch reference path,
and the engine must generate through the Triton sampler. On a GPU the same checks run at 8B shapes
(test_triton_gpu.py).
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from tests.kernels.model_probe import probe_logits
from tests.kernels.test_triton_matmul import SMALL
from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from detserve import kernels  # noqa: E402
from detserve.engine.config import EngineConfig  # noqa: E402
from detserve.engine.llm_engine import LLMEngine  # noqa: E402
from detserve.engine.request import SamplingParams  # noqa: E402
from detserve.kernels import KV_SPLIT_SIZE, configs, gpu  # noqa: E402

pytestmark = pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU, test_triton_gpu.py runs these checks at 8B shapes")

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Tiles small enough that decode steps split K in parallel and prefills run the sequential launches,
# large enough that the interpreter runs few programs.
TILES = configs.ArchConfig(
    matmul=dataclasses.replace(SMALL, block_m=64),
    attention=configs.AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    rows=configs.RowConfig(softmax_block=128, softmax_warps=4, norm_max_warps=4),
)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory) -> LLMEngine:
    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    return LLMEngine(EngineConfig(model=str(folder), load_format="dummy", dtype="float32", device="cpu",
                                  kv_cache_tokens=4096, max_num_seqs=16))


@pytest.fixture
def on_triton(monkeypatch) -> list[str]:
    """Route every op to its Triton kernel, as on a GPU; returns the Triton modules' ops as called."""
    from detserve.kernels import elementwise, matmul, paged_attention, rmsnorm, sampling

    monkeypatch.setattr(kernels, "_triton_device", lambda x: True)
    monkeypatch.setattr(gpu, "_config", lambda device: TILES)
    called: list[str] = []
    for module, name in [(matmul, "linear"), (rmsnorm, "rms_norm"), (rmsnorm, "add_rms_norm"),
                         (elementwise, "rope"), (elementwise, "silu_mul"), (paged_attention, "paged_attention"),
                         (sampling, "log_softmax"), (sampling, "sample_tokens")]:
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _op=op, _name=name, **kw: called.append(_name) or _op(*a, **kw))
    return called


def test_tiny_model_logits_on_triton_kernels_are_bitwise_equal_alone_and_amid_company(tiny_engine, on_triton) -> None:
    prompt = [random.Random(1).randrange(384) for _ in range(KV_SPLIT_SIZE + 40)]
    alone = probe_logits(tiny_engine, prompt, 0, seed=0)
    assert {"linear", "rms_norm", "add_rms_norm", "rope", "silu_mul", "paged_attention"} <= set(on_triton)
    for num_others in (1, 6):
        prefill, decode = probe_logits(tiny_engine, prompt, num_others, seed=num_others)
        assert torch.equal(prefill, alone[0]), f"prefill logits differ amid {num_others} others"
        assert torch.equal(decode, alone[1]), f"decode logits differ amid {num_others} others"


def test_tiny_model_on_triton_kernels_computes_the_reference_paths_logits(tiny_engine, monkeypatch) -> None:
    prompt = [random.Random(2).randrange(384) for _ in range(50)]
    reference_logits = probe_logits(tiny_engine, prompt, 0, seed=0)
    monkeypatch.setattr(kernels, "_triton_device", lambda x: True)
    monkeypatch.setattr(gpu, "_config", lambda device: TILES)
    triton_logits = probe_logits(tiny_engine, prompt, 0, seed=0)
    for ours, expected in zip(triton_logits, reference_logits):
        assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_engine_generates_through_the_triton_sampler_with_the_same_tokens_alone_and_in_a_batch(
    tiny_engine, on_triton
) -> None:
    prompts = [[random.Random(i).randrange(384) for _ in range(9 + i)] for i in range(5)]
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=6, temperature=0.9, seed=11, ignore_eos=True)]
    alone = [tiny_engine.generate([prompts[i]], params[i])[0] for i in range(2)]
    together = tiny_engine.generate(prompts, params + [SamplingParams(max_tokens=4, temperature=1.2, seed=i, ignore_eos=True)
                                                       for i in range(3)])
    assert "sample_tokens" in on_triton and "log_softmax" in on_triton
    for one, crowded in zip(alone, together):
        assert crowded.output_token_ids == one.output_token_ids and len(one.output_token_ids) == 6
    assert [lp.logprob for lp in together[0].output_logprobs] == [lp.logprob for lp in alone[0].output_logprobs]
    assert all(len(lp.top) == 2 for lp in alone[0].output_logprobs)


def test_decode_steps_run_as_a_graph_replays_them_give_the_eager_bits_in_company(tiny_engine, on_triton,
                                                                                  monkeypatch) -> None:
    """The CUDA graph path without the capture (a CPU has none): every (bucket, mode) "captured" at
    the start on pad rows alone, then each decode step staged in the one static buffer, padded to
    its bucket, attention over the fixed-capacity plan, and the captured work run again on every
    replay. Greedy and seeded requests amid company give the bits of the eager steps alone; a fast
    request's steps replay a fast graph (its decode attention the Triton kernel's too)."""
    from detserve.engine.cuda_graphs import DecodeGraphs
    from detserve.engine.model_runner import StepInputs

    replayed: list[tuple[int, str]] = []

    class ReplayedEagerly(DecodeGraphs):
        def _capture(self, bucket: int, mode: kernels.Mode):
            self.forward(bucket, mode)

            def replay() -> None:
                replayed.append((bucket, mode))
                self.forward(bucket, mode)

            return type("Graph", (), {"replay": staticmethod(replay)})

    prompts = [[random.Random(i).randrange(384) for _ in range(KV_SPLIT_SIZE + 3 if i == 0 else 5 + i)]
               for i in range(4)]
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=5, temperature=0.9, seed=11, ignore_eos=True, logprobs=0)]
    alone = [tiny_engine.generate([prompts[i]], params[i])[0] for i in range(2)]
    graphs = ReplayedEagerly(tiny_engine.runner, 4, tiny_engine.max_model_len)
    graphs.capture_all(StepInputs("invariant"))
    assert set(graphs.graphs) == {(b, m) for b in (1, 2, 4) for m in kernels.MODES}
    monkeypatch.setattr(tiny_engine.runner, "graphs", graphs)
    # Decodes: 4 rows, then 3 (padded to 4) once the first company request ends, then the fast one alone.
    company = [SamplingParams(max_tokens=3, temperature=1.0, seed=0, ignore_eos=True),
               SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True, deterministic=False)]
    together = tiny_engine.generate(prompts, params + company)
    assert set(replayed) == {(4, "invariant"), (1, "fast")} and len(together[3].output_token_ids) == 8
    for one, crowded in zip(alone, together):
        assert crowded.output_token_ids == one.output_token_ids
        assert [(lp.logprob, lp.top) for lp in crowded.output_logprobs] == [(lp.logprob, lp.top) for lp in
                                                                              one.output_logprobs]


TINY_MOE = TINY_LLAMA | {"architectures": ["Qwen3MoeForCausalLM"], "head_dim": 16, "moe_intermediate_size": 32,
                         "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}


def test_tiny_moe_on_the_grouped_triton_matmul_keeps_its_bits_amid_company(tmp_path, on_triton, monkeypatch) -> None:
    """The experts in one grouped launch per matmul, as on a GPU: a probe's logits are bitwise equal
    alone and amid other requests (whose tokens change every expert's row count), and close to the
    torch reference path's."""
    from detserve.kernels import grouped_matmul

    grouped = grouped_matmul.grouped_linear
    monkeypatch.setattr(grouped_matmul, "grouped_linear",
                        lambda *a, **kw: on_triton.append("grouped_linear") or grouped(*a, **kw))
    (tmp_path / "config.json").write_text(json.dumps(TINY_MOE))
    engine = LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", dtype="float32", device="cpu",
                                    kv_cache_tokens=2048, max_num_seqs=8))
    prompt = [random.Random(3).randrange(384) for _ in range(40)]
    alone = probe_logits(engine, prompt, 0, seed=0)
    assert "grouped_linear" in on_triton
    prefill, decode = probe_logits(engine, prompt, 5, seed=5)
    assert torch.equal(prefill, alone[0]) and torch.equal(decode, alone[1])
    monkeypatch.setattr(kernels, "_triton_device", lambda x: False)
    for ours, expected in zip(alone, probe_logits(engine, prompt, 0, seed=0)):
        assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
