"""The Triton kernels at Llama-3-8B shapes in bfloat16, and a whole random-weight 8B model (GPU only).

Same properties as the interpreter tests, at the shapes and dtype that matter on the GPU, with
the tile configs pinned for the GPU's arch: a row's bits alone equal its bits in any batch.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from bench.engine_step import LLAMA3_8B
from tests.kernels.model_probe import probe_logits
from tests.kernels.paged import PagedCache, attention_float64, run_chunked, sequence, triton_attend
from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from detserve import kernels  # noqa: E402
from detserve.kernels import KV_SPLIT_SIZE, configs, matmul, rmsnorm, sampling  # noqa: E402
from detserve.kernels.reference import noise  # noqa: E402

pytestmark = pytest.mark.gpu

# (K, N) as the engine multiplies: q|k|v fused, o, gate|up fused, down; and a lone k or v projection.
LAYER_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 1024)]
M_VALUES = [1, 2, 3, 8, 31, 64, 127, 128, 129, 300, 512, 1000, 2048, 4097, 8192]


def _arch() -> configs.ArchConfig:
    return configs.for_capability(torch.cuda.get_device_capability())


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("k,n", LAYER_SHAPES)
def test_matmul_rows_are_batch_invariant_for_m_from_1_to_8192(k: int, n: int) -> None:
    config = _arch().matmul_for(n, k)
    x, w = _randn(8192, k, seed=k), _randn(n, k, seed=n, scale=k**-0.5)
    full = matmul.linear(x, w, None, config)
    for m in M_VALUES:
        assert torch.equal(matmul.linear(x[:m], w, None, config), full[:m]), f"M={m}"
    rows = torch.randperm(8192, generator=torch.Generator().manual_seed(0))[:300].to(DEVICE)
    assert torch.equal(matmul.linear(x[rows], w, None, config), full[rows])
    for start, m in [(5, 1), (77, 3), (1001, 130)]:  # views at unaligned row offsets
        assert torch.equal(matmul.linear(x[start : start + m], w, None, config), full[start : start + m])


@pytest.mark.parametrize("k,n", LAYER_SHAPES)
@pytest.mark.parametrize("m", [1, 64, 1000])
def test_matmul_parallel_and_sequential_split_launches_agree(k: int, n: int, m: int) -> None:
    config = _arch().matmul_for(n, k)
    x, w, b = _randn(m, k, seed=1), _randn(n, k, seed=2, scale=k**-0.5), _randn(n, seed=3)
    parallel = matmul.linear(x, w, b, config, launch="parallel")
    assert torch.equal(parallel, matmul.linear(x, w, b, config, launch="sequential"))


@pytest.mark.parametrize("k,n", LAYER_SHAPES)
def test_matmul_tma_tiles_give_the_bits_of_pointer_loads(k: int, n: int) -> None:
    """So a TMA tiling may fall back to pointer loads where a bulk copy cannot read the rows."""
    config = _arch().matmul_for(n, k)
    tma, pointers = dataclasses.replace(config, tma=True), dataclasses.replace(config, tma=False)
    x, w = _randn(1000, k, seed=15), _randn(n, k, seed=16, scale=k**-0.5)
    for m in (1, 64, 1000):
        assert torch.equal(matmul.linear(x[:m], w, None, tma), matmul.linear(x[:m], w, None, pointers)), f"M={m}"


@pytest.mark.parametrize("k,n", LAYER_SHAPES)
def test_matmul_last_split_fold_gives_the_fold_kernels_bits_however_programs_race(k: int, n: int) -> None:
    """The tile's last program to arrive folds; which one that is changes from run to run, so
    repeat the decode-sized launches (where splits run in parallel) to meet many orders. Inputs
    alternate, so a fold that read a partial before it was written would see the other input's."""
    config = _arch().matmul_for(n, k)
    last_folds = dataclasses.replace(config, last_split_folds=True)
    two_launches = dataclasses.replace(config, last_split_folds=False)
    xs, w, b = [_randn(64, k, seed=17), _randn(64, k, seed=20)], _randn(n, k, seed=18, scale=k**-0.5), _randn(n, seed=19)
    for m in (1, 8, 64):
        expected = [matmul.linear(x[:m], w, b, two_launches, launch="parallel") for x in xs]
        for attempt in range(50):
            got = matmul.linear(xs[attempt % 2][:m], w, b, last_folds, launch="parallel")
            assert torch.equal(got, expected[attempt % 2]), f"M={m}, attempt {attempt}"


def test_matmul_matches_float64_in_bfloat16() -> None:
    x, w, b = _randn(64, 4096, seed=4), _randn(1024, 4096, seed=5, scale=4096**-0.5), _randn(1024, seed=6)
    out = matmul.linear(x, w, b, _arch().matmul_for(1024, 4096))
    ref = x.double() @ w.double().T + b.double()
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-2


def test_rms_norm_and_fused_add_are_batch_invariant_in_bfloat16() -> None:
    rows = _arch().rows
    x, residual, weight = _randn(8192, 4096, seed=7), _randn(8192, 4096, seed=8), _randn(4096, seed=9) + 1
    full = rmsnorm.rms_norm(x, weight, 1e-5, rows)
    fused, total = rmsnorm.add_rms_norm(x, residual, weight, 1e-5, rows)
    assert torch.equal(total, x + residual)
    assert torch.equal(fused, rmsnorm.rms_norm(x + residual, weight, 1e-5, rows))
    for m in M_VALUES:
        assert torch.equal(rmsnorm.rms_norm(x[:m], weight, 1e-5, rows), full[:m]), f"M={m}"
    heads, head_weight = x[:64].view(64 * 32, 128), weight[:128]  # per-head q/k norm shape
    alone = rmsnorm.rms_norm(heads[5:6], head_weight, 1e-5, rows)
    assert torch.equal(alone[0], rmsnorm.rms_norm(heads, head_weight, 1e-5, rows)[5])


def test_log_softmax_is_batch_invariant_over_a_llama3_vocab() -> None:
    rows = _arch().rows
    logits = _randn(64, 128256, seed=10, scale=5.0).float()
    full = sampling.log_softmax(logits, rows)
    for m in (1, 7, 33):
        assert torch.equal(sampling.log_softmax(logits[:m], rows), full[:m])
    assert (full.double() - torch.log_softmax(logits.double(), -1)).abs().max() < 1e-4


def test_sampling_over_a_llama3_vocab_ignores_the_batch_and_matches_the_host_reference() -> None:
    rows = _arch().rows
    logits = _randn(64, 128256, seed=14, scale=3.0).float()
    temperatures = torch.tensor([(0.0, 0.6, 1.0, 1.3)[i % 4] for i in range(64)], dtype=torch.float64, device=DEVICE)
    seeds = torch.arange(64, dtype=torch.int64, device=DEVICE) * 7_919_000_003
    positions = torch.arange(64, dtype=torch.int64, device=DEVICE) + 4000
    full = sampling.sample_tokens(logits, temperatures, seeds, positions, rows)
    for m in (1, 7, 33):
        assert torch.equal(sampling.sample_tokens(logits[:m], temperatures[:m], seeds[:m], positions[:m], rows), full[:m])
    assert torch.equal(full.cpu(), noise.sample_tokens(logits, temperatures, seeds, positions).cpu())


def _attention_cache(seed: int) -> PagedCache:
    config = _arch().attention

    def attend(q, k_cache, v_cache, meta):
        return triton_attend(q, k_cache, v_cache, meta, 128**-0.5, config)

    return PagedCache(
        attend, num_blocks=4096, num_kv_heads=8, head_dim=128, seed=seed, dtype=torch.bfloat16, device=DEVICE
    )


def _llama_sequence(length: int, seed: int):
    return sequence(length, seed, num_heads=32, num_kv_heads=8, head_dim=128)


def test_attention_bits_ignore_chunking_decoding_and_company_at_8b_head_shapes() -> None:
    length = 4 * KV_SPLIT_SIZE + 100
    qkv = _llama_sequence(length, seed=11)
    one_prefill = run_chunked(_attention_cache(0), "s", qkv, [length])
    cuts = [7, 300, KV_SPLIT_SIZE * 2, KV_SPLIT_SIZE * 2 + 1, 900, length]
    company = [(f"o{i}", n, i) for i, n in enumerate([1, 15, 255, 256, 257, 700, 1500])]
    assert torch.equal(one_prefill, run_chunked(_attention_cache(1), "s", qkv, cuts, company))
    decode_from = length - 40
    decode_cuts = [decode_from] + list(range(decode_from + 1, length + 1))
    token_by_token = run_chunked(_attention_cache(2), "s", qkv, decode_cuts, company[:3])
    assert torch.equal(one_prefill, token_by_token)
    q, k, v = (t.to(torch.bfloat16) for t in qkv)
    ref = attention_float64(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 128**-0.5)
    assert (one_prefill.double() - ref).abs().max() < 2e-2


def test_attention_launches_and_merges_agree_on_a_crowded_decode_and_prefill_step() -> None:
    cache = _attention_cache(3)
    rng = random.Random(0)
    lengths = {f"r{i}": rng.choice([2, 255, 256, 257, 600, 1100]) for i in range(48)}
    seqs = {name: _llama_sequence(n, i) for i, (name, n) in enumerate(lengths.items())}
    cuts = {name: max(1, n - rng.choice([1, 1, 1, 5, 40])) for name, n in lengths.items()}  # mostly decodes
    cache.step([(name, *(t[: cuts[name]] for t in seqs[name]), 0) for name in lengths])
    q, meta = cache.store([(name, *(t[cuts[name] :] for t in seqs[name]), cuts[name]) for name in lengths])
    config = _arch().attention
    parallel, sequential, auto = (
        triton_attend(q, cache.k, cache.v, meta, 128**-0.5, config, launch)
        for launch in ("parallel", "sequential", "auto")
    )
    assert torch.equal(parallel, sequential) and torch.equal(parallel, auto)
    # An item's last split program to arrive merges; which one changes from run to run, so repeat,
    # alternating queries so that a merge reading a partial before it was written would see the other's.
    two_launches = dataclasses.replace(config, last_split_merges=False)
    last_merges = dataclasses.replace(config, last_split_merges=True)
    queries = [q, -q]
    expected = [triton_attend(x, cache.k, cache.v, meta, 128**-0.5, two_launches, "parallel")
                for x in queries]
    for attempt in range(50):
        got = triton_attend(queries[attempt % 2], cache.k, cache.v, meta, 128**-0.5, last_merges,
                                              "parallel")
        assert torch.equal(got, expected[attempt % 2]), f"attempt {attempt}"


def test_invariant_mode_on_cuda_dispatches_to_triton_and_fingerprints_its_configs() -> None:
    x, w = _randn(5, 4096, seed=12), _randn(1024, 4096, seed=13)
    with kernels.mode("invariant"):
        assert torch.equal(kernels.linear(x, w), matmul.linear(x, w, None, _arch().matmul_for(1024, 4096)))
    with kernels.mode("fast"):
        assert torch.equal(kernels.linear(x, w), torch.nn.functional.linear(x, w))
    assert repr(_arch()) in kernels.config_digest()


# ---------------------------------------------------------------------------------------------
# a whole random-weight Llama-3-8B


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory):
    from detserve.engine.config import EngineConfig
    from detserve.engine.llm_engine import LLMEngine

    folder: Path = tmp_path_factory.mktemp("llama3-8b")
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    config = EngineConfig(  # eager: the probes build their steps themselves, no graph would replay
        model=str(folder), load_format="dummy", dtype="bfloat16", device="cuda",
        kv_cache_tokens=65536, max_num_seqs=512, enforce_eager=True,
    )
    engine = LLMEngine(config)
    yield engine
    del engine
    torch.cuda.empty_cache()


def test_llama_8b_logits_are_bitwise_equal_alone_and_amid_1_to_255_other_requests(llama_8b) -> None:
    prompt = [random.Random(1).randrange(128000) for _ in range(2 * KV_SPLIT_SIZE + 90)]
    alone = probe_logits(llama_8b, prompt, 0, seed=0)
    assert torch.isfinite(alone[0]).all() and torch.isfinite(alone[1]).all()
    for num_others in (1, 3, 31, 255):
        prefill, decode = probe_logits(llama_8b, prompt, num_others, seed=num_others)
        assert torch.equal(prefill, alone[0]), f"prefill logits differ amid {num_others} others"
        assert torch.equal(decode, alone[1]), f"decode logits differ amid {num_others} others"
