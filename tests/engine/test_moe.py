"""Mixture-of-experts models (Qwen3-MoE, Mixtral, OLMoE): what transformers computes, with the
determinism contract of the dense models, and the batch leak the invariant expert path closes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detserve import kernels
from detserve.engine import weights
from detserve.engine.config import EngineConfig, MoEConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.models.moe import SparseMoE
from detserve.engine.request import SamplingParams
from tests.engine.test_determinism import GREEDY, SEEDED, Result, run_alone, run_under_load
from tests.engine.test_model import all_position_logits, relative_error

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
MOE_CONFIGS = {  # transformers' config class and model, and its MoE fields
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, clip_qkv=1.5)),
}


def _hf_moe(tmp_path: Path, kind: str, vocab_size: int = 300):
    """A tiny random transformers MoE model of `kind`, saved as a Hugging Face folder."""
    import transformers

    config_cls, model_cls, moe = MOE_CONFIGS[kind]
    config = getattr(transformers, config_cls)(vocab_size=vocab_size, **SHAPE, **moe)
    config.eos_token_id = None
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # large enough that routing, norms and clipping matter
    model.eval().save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_moe_logits_and_greedy_tokens_match_transformers(tmp_path: Path, kind: str) -> None:
    hf = _hf_moe(tmp_path, kind)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_tokens=1024))
    assert engine.model_config.moe is not None
    ids = [int(t) for t in torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    for mode in ("invariant", "fast"):
        assert relative_error(all_position_logits(engine, ids, mode, chunk=9), ref) < 1e-4
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            expected.append(int(hf(torch.tensor([ids + expected]), use_cache=False).logits[0, -1].argmax()))
    [request] = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert request.output_token_ids == expected


def test_checkpoints_naming_experts_one_by_one_or_fused_load_alike() -> None:
    gate, up, down = torch.randn(3, 4, 6), torch.randn(3, 4, 6), torch.randn(3, 6, 4)
    fused = {"model.layers.0.mlp.experts.gate_up_proj": torch.cat([gate, up], dim=1),
             "model.layers.0.mlp.experts.down_proj": down, "model.layers.0.mlp.gate.weight": torch.ones(3, 6)}
    mixtral = {"model.layers.0.block_sparse_moe.gate.weight": torch.ones(3, 6)}
    for e in range(3):
        mixtral |= {f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": gate[e],
                    f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight": up[e],
                    f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": down[e]}
    a, b = weights.unify_expert_names(fused), weights.unify_expert_names(mixtral)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["model.layers.0.mlp.experts.2.up_proj.weight"], up[2])


def test_equal_router_probabilities_go_to_the_lower_expert_index() -> None:
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5]])
    weights, experts = kernels.route_experts(logits, top_k=2, normalize=True)
    assert experts.tolist() == [[1, 2]] and weights.tolist() == [[0.5, 0.5]]


def _moe_layer(num_experts: int = 4) -> SparseMoE:
    torch.manual_seed(3)
    moe = SparseMoE(MoEConfig(num_experts=num_experts, top_k=2, intermediate_size=96, normalize_top_k=True))
    moe.router = torch.randn(num_experts, 64)
    moe.gate_up_proj = torch.randn(num_experts, 192, 64) * 0.1
    moe.down_proj = [torch.randn(num_experts, 64, 96) * 0.1]  # one K-split
    return moe


def test_a_tokens_expert_output_leaks_its_company_through_a_plain_matmul_but_not_through_the_moe() -> None:
    """The same token routed to the same expert amid 0-40 other tokens that chose it too: a plain
    float32 matmul over the expert's rows changes the token's bits with that count; the MoE layer's
    invariant path keeps them."""
    moe = _moe_layer()
    token = torch.randn(1, 64)
    others = torch.randn(64, 64)

    def plain_expert(rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, moe.gate_up_proj[0]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, moe.down_proj[0][0])[0]

    plain = {n: plain_expert(torch.cat([token, others[:n]])) for n in range(41)}
    assert len({tuple(v.tolist()) for v in plain.values()}) > 1, "the plain matmul did not leak on this machine"
    with kernels.mode("invariant"):
        alone = moe(token)[0]
        assert all(torch.equal(moe(torch.cat([token, others[:n]]))[0], alone) for n in range(41))


def _moe_engine_dir(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    """A random-weight MoE model of `kind` with the default model's tokenizer (and chat template)."""
    import transformers

    config_cls, _, moe = MOE_CONFIGS[kind]
    folder = tmp_path_factory.mktemp(f"{kind}-dummy")
    source = weights.resolve_model_dir(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    config = getattr(transformers, config_cls)(vocab_size=49152, **SHAPE, **moe).to_dict()
    config["eos_token_id"] = json.loads((source / "config.json").read_text())["eos_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_dir(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _moe_engine_dir(tmp_path_factory, request.param)


def test_moe_bits_are_the_same_alone_and_amid_random_concurrent_load(make_engine, moe_dir: Path) -> None:
    engine = make_engine(model=str(moe_dir), load_format="dummy", enable_prefix_caching=False)
    greedy_alone, seeded_alone = run_alone(engine, GREEDY), run_alone(engine, SEEDED)
    rng = random.Random(26)
    for run in range(6):
        assert run_under_load(engine, rng, run) == (greedy_alone, seeded_alone), f"run {run} diverged"


def test_moe_bits_survive_chunked_prefill_prefix_hits_and_preemption(make_engine, moe_dir: Path) -> None:
    common = dict(model=str(moe_dir), load_format="dummy")
    reference = make_engine(**common, enable_prefix_caching=False)
    rng = random.Random(5)
    prompts = [[rng.randrange(200, 40000) for _ in range(rng.randint(20, 50))] for _ in range(6)]
    params = [GREEDY, SEEDED] * 3
    expected = [run_alone(reference, p, prompt) for prompt, p in zip(prompts, params)]
    chunked = make_engine(**common, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert [run_alone(chunked, p, prompt) for prompt, p in zip(prompts, params)] == expected
    cached = make_engine(**common)
    cached.generate([prompts[0]], GREEDY)
    [hit] = cached.generate([prompts[0]], GREEDY)
    assert hit.num_cached_prompt_tokens > 0 and Result.of(hit) == expected[0]
    tiny = make_engine(**common, kv_cache_tokens=160, enable_prefix_caching=False)
    crowded = tiny.generate(prompts, params)
    assert any(r.num_preemptions > 0 for r in crowded)
    assert [Result.of(r) for r in crowded] == expected


def test_int8_experts_run_the_row_invariant_kernel_with_the_same_bits_in_any_company(
        make_engine, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = _moe_engine_dir(tmp_path_factory, "qwen3_moe")
    engine = make_engine(model=str(folder), load_format="dummy", quantization="int8", enable_prefix_caching=False)
    # every expert, the router aside, on an integer kernel: torch's (one scale per row), or the C
    # matmul where a row is one group of 32 inputs
    assert set(engine.runner.weight_format.split("+")) <= {"int8", "int8-g32-c"}
    alone = run_alone(engine, GREEDY), run_alone(engine, SEEDED)
    rng = random.Random(8)
    for run in range(3):
        assert run_under_load(engine, rng, run) == alone, f"run {run} diverged"
