"""Our Llama-family forward pass against Hugging Face `transformers` on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detserve import kernels
from detserve.kernels import cpu_native
from detserve.engine import weights
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.request import Request, SamplingParams
from detserve.engine.scheduler import ScheduledRequest, SchedulerOutput

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count from one to ten."}],
]


def all_position_logits(engine: LLMEngine, token_ids: list[int], mode: str, chunk: int | None = None) -> torch.Tensor:
    """Logits at every position, computed through the engine's runner in prefill chunks of `chunk`."""
    request = Request("logits-probe", token_ids, SamplingParams(), True, seed=0)
    chunk = chunk or len(token_ids)
    outputs = []
    try:
        for start in range(0, len(token_ids), chunk):
            n = min(chunk, len(token_ids) - start)
            engine.block_manager.allocate(request, start + n)
            step = SchedulerOutput([ScheduledRequest(request, start, n, True)], mode == "invariant", [])
            batch = engine.runner.prepare(step)
            batch.logits_indices = torch.arange(n)  # every row of the chunk, not just the last
            with kernels.mode(mode):
                outputs.append(engine.runner.model.compute_logits(engine.runner.model(batch, engine.runner.kv_caches)))
            request.num_computed_tokens = start + n
    finally:
        engine.block_manager.free(request)
    return torch.cat(outputs)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module")
def hf_model():
    """transformers' own float32 dequantization of the default GGUF."""
    from transformers import LlamaForCausalLM

    path = weights.default_model_path()
    return LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_smollm2_logits_match_transformers(make_engine, hf_model, mode: str) -> None:
    engine = make_engine(quantization="none")
    for messages in PROMPTS:
        ids = engine.tokenizer.apply_chat_template(messages)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]
        assert relative_error(all_position_logits(engine, ids, mode, chunk=7), ref) < 1e-4


def test_smollm2_64_greedy_tokens_match_transformers(make_engine, hf_model) -> None:
    engine = make_engine(quantization="none")
    ids = engine.tokenizer.apply_chat_template(PROMPTS[1])
    expected: list[int] = []
    with torch.no_grad():  # whole sequence each step: transformers is renaming its cache argument
        for _ in range(64):
            expected.append(int(hf_model(torch.tensor([ids + expected]), use_cache=False).logits[0, -1].argmax()))
    [request] = engine.generate([ids], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    assert request.output_token_ids == expected


INT4 = "int4-g32-c" if cpu_native.enabled() else "int4-g32"
"""The 4-bit weights' format: the C matmul's layout where the C ops run (`-c`), else torch's kernel's."""


def _tiny_hf_model(tmp_path: Path, arch: str):
    """Save a tiny random Qwen2/Qwen3 model (no tokenizer) as a Hugging Face folder."""
    import transformers

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.Qwen3Config(head_dim=32, **common)
        model = transformers.Qwen3ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # large enough that biases and q/k norms matter
    model.eval().save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_variants_match_transformers(tmp_path: Path, arch: str) -> None:
    hf = _tiny_hf_model(tmp_path, arch)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_tokens=1024))
    assert engine.model_config.attention_bias == (arch == "qwen2")
    assert engine.model_config.qk_norm == ("head" if arch == "qwen3" else "none")
    ids = [int(t) for t in torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    for mode in ("invariant", "fast"):
        assert relative_error(all_position_logits(engine, ids, mode, chunk=9), ref) < 1e-4


def test_a_qwen2_model_runs_its_layers_in_one_c_call_with_the_per_op_bits(tmp_path: Path, monkeypatch) -> None:
    """The q|k|v bias is added in the C call as torch adds it, and its final norm reads the sampling
    rows and then the scored ones (prompt logprobs) as the per-op path does; a q/k-normed model
    (Qwen3) runs op by op."""
    if not cpu_native.enabled():
        pytest.skip("the C ops do not build here")
    _tiny_hf_model(tmp_path / "qwen2", "qwen2")
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "qwen2"), kv_cache_tokens=1024, quantization="int4",
                                    cpu_kernels="native"))
    assert engine.runner.model.c_layers is not None
    prompts = [[int(t) for t in torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (5, 40, 17)]
    params = [SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.8, seed=3, prompt_logprobs=1, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=0, ignore_eos=True)]

    def run() -> list:
        return [(r.output_token_ids, r.output_logprobs, r.prompt_logprobs) for r in engine.generate(prompts, params)]

    whole = run()
    monkeypatch.setattr(engine.runner.model, "c_layers", None)
    assert run() == whole
    _tiny_hf_model(tmp_path / "qwen3", "qwen3")
    qwen3 = LLMEngine(EngineConfig(model=str(tmp_path / "qwen3"), kv_cache_tokens=1024, quantization="int4",
                                   cpu_kernels="native"))
    assert qwen3.runner.model.c_layers is None


def test_dummy_weights_build_any_config_reproducibly(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    engines = [LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", kv_cache_tokens=512)) for _ in range(2)]
    assert engines[0].tokenizer is None
    runs = [e.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8, temperature=0))[0].output_token_ids for e in engines]
    assert runs[0] == runs[1] and len(runs[0]) == 8
    with pytest.raises(ValueError, match="token ids"):
        engines[0].admit("hello", SamplingParams())


def test_gguf_conversion_is_cached_so_the_second_start_is_fast(make_engine) -> None:
    make_engine()  # the first conversion happened here (or in an earlier session)
    folder = weights.resolve_model_dir(None)
    written = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert weights.resolve_model_dir(None) == folder
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == written, "converted again"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_weights_digest_follows_content_not_file_dates(tmp_path: Path) -> None:
    import os
    import shutil

    _tiny_hf_model(tmp_path / "a", "qwen2")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.utime(tmp_path / "b" / "model.safetensors", (1, 1))
    assert weights.file_digest(tmp_path / "a") == weights.file_digest(tmp_path / "b")
    state = weights.load_state_dict(tmp_path / "b")
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "b" / "model.safetensors"))
    assert weights.file_digest(tmp_path / "a") != weights.file_digest(tmp_path / "b")


def test_fingerprint_separates_kernel_modes_and_is_stable(make_engine) -> None:
    engine = make_engine()
    assert engine.info.fingerprint(True) == engine.info.fingerprint(True)
    assert engine.info.fingerprint(True) != engine.info.fingerprint(False)


def test_gguf_blocks_read_as_integers_dequantize_to_exactly_transformers_weights(hf_model) -> None:
    from detserve.engine import gguf
    from detserve.kernels.quantized import QuantizedWeight

    state = gguf.read_weights(weights.default_model_path())
    reference = hf_model.state_dict()
    kinds = {(v.bits, v.group_size) for v in state.values() if isinstance(v, QuantizedWeight)}
    assert kinds == {(4, 32), (8, 32)}  # the default file: Q4_1 layers, a Q8_0 embedding
    for name, value in state.items():
        ours = value.dequantize() if isinstance(value, QuantizedWeight) else value
        assert torch.equal(ours, reference[name]), name


def test_quantized_default_model_stays_close_to_its_float32_dequantization(make_engine) -> None:
    """Within what 4-bit weights and the activations' rounding explain; a broken dequantization (a
    wrong zero point, swapped nibbles, q/k rows left permuted) sends the agreement towards chance."""
    quantized, exact = make_engine(), make_engine(quantization="none")
    head = "int8-g32-c" if cpu_native.enabled() else "int8"  # the GGUF's Q8_0 head: in the C matmul, groups kept
    assert quantized.runner.weight_format == f"{INT4}+{head}" and exact.runner.weight_format == "torch.float32"
    agree = total = 0
    for messages in PROMPTS:
        ids = exact.tokenizer.apply_chat_template(messages)
        [ref] = exact.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        full = ids + ref.output_token_ids
        lp_q = torch.log_softmax(all_position_logits(quantized, full, "invariant").double(), -1)
        lp_f = torch.log_softmax(all_position_logits(exact, full, "invariant").double(), -1)
        chosen = lp_f.argmax(-1, keepdim=True)
        agree += int((lp_q.argmax(-1, keepdim=True) == chosen).sum())
        total += len(full)
        assert float((lp_q.gather(1, chosen) - lp_f.gather(1, chosen)).abs().mean()) < 0.1
    assert agree / total > 0.9


@pytest.mark.parametrize("quantization, bound", [("int8", 0.05), ("int4", 0.3)])  # measured 0.025, 0.17
def test_a_float_checkpoint_is_quantized_at_load_once_and_cached(tmp_path: Path, monkeypatch, quantization: str,
                                                                   bound: float) -> None:
    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(tmp_path / "cache"))
    hf = _tiny_hf_model(tmp_path / "model", "qwen2")
    config = EngineConfig(model=str(tmp_path / "model"), kv_cache_tokens=1024, quantization=quantization)
    engine = LLMEngine(config)
    # the 300-token head is no multiple of 16, so the 4-bit kernel cannot take it: it runs in 8 bits
    assert engine.runner.weight_format == {"int8": "int8", "int4": f"{INT4}+int8"}[quantization]
    [cached] = (tmp_path / "cache").glob(f"*-{quantization}-*")
    written = (cached / "model.safetensors").stat().st_mtime_ns
    ids = [int(t) for t in torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    again = LLMEngine(config)  # reads the cache back: same weights, same bits
    assert (cached / "model.safetensors").stat().st_mtime_ns == written
    assert torch.equal(all_position_logits(engine, ids, "invariant"), all_position_logits(again, ids, "invariant"))
    assert relative_error(all_position_logits(engine, ids, "invariant", chunk=9), ref) < bound
    assert engine.info.fingerprint(True) != LLMEngine(EngineConfig(model=str(tmp_path / "model"),
                                                                     kv_cache_tokens=1024)).info.fingerprint(True)


def test_processes_quantizing_the_same_checkpoint_at_once_all_get_the_cached_weights(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """Tensor-parallel ranks (or two servers) convert one checkpoint together: the loser of the
    rename keeps the winner's folder instead of failing with 'Directory not empty'."""
    import threading

    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(tmp_path / "cache"))
    _tiny_hf_model(tmp_path / "model", "qwen2")
    both_converted = threading.Barrier(2, timeout=60)
    save = weights.save_state_dict

    def save_after_both_converted(state, path) -> None:
        both_converted.wait()
        save(state, path)

    monkeypatch.setattr(weights, "save_state_dict", save_after_both_converted)
    results: list[object] = [None, None]

    def load(slot: int) -> None:
        try:
            results[slot] = weights.load_weights(tmp_path / "model", "int8", False)
        except Exception as error:  # noqa: BLE001 - the test reports it below
            results[slot] = error

    threads = [threading.Thread(target=load, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(result, dict) for result in results), results
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [f"model-int8-{weights.file_digest(tmp_path / 'model')}"]


def test_a_sliding_window_caps_the_context_at_its_length(tmp_path: Path) -> None:
    """Attention here is plain causal: within a window as long as the context, exactly what the
    model's sliding-window attention computes, so the window is where the context ends."""
    config = {"architectures": ["MistralForCausalLM"], "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 1024, "sliding_window": 96}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", kv_cache_tokens=512)).max_model_len == 96
    config |= {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", kv_cache_tokens=512)).max_model_len == 1024
