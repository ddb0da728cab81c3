"""The CPU's C row ops (`kernels/cpu_native.py`): invariant by construction, close to the torch
ops, and a build that falls back to torch cleanly where it cannot happen.

Invariance is checked with torch.equal against the row computed alone, at 1 and 2 threads;
accuracy against float64 or the torch reference with a tolerance. The attention scenarios (chunked
prefill, company, decode after prefill, cached prefixes) run through the kernels facade for both
CPU backends in tests/kernels/test_invariance.py; here are the C ops' own properties.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detserve import kernels
from detserve.kernels import cpu_native
from detserve.kernels.inputs import RotaryInputs
from detserve.kernels.quantized import QuantizedWeight
from detserve.kernels.reference import noise, rows
from tests.kernels.paged import PagedCache, attention_float64, run_chunked, sequence

pytestmark = pytest.mark.skipif(not cpu_native.enabled(), reason="the C ops do not build here (no C compiler)")
SETTINGS = settings(max_examples=20, deadline=None)


def _threads(n: int):
    """OpenMP's thread count for the C ops: the library reads $OMP_NUM_THREADS once, so it is set
    through omp_set_num_threads."""
    return _omp().omp_set_num_threads(n)


@functools.cache
def _omp():
    import ctypes

    return ctypes.CDLL("libgomp.so.1")


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    yield
    _threads(torch.get_num_threads())


@st.composite
def companies(draw) -> tuple[int, int, int, int]:
    """(rows M, the row's position, OpenMP threads, seed of the other rows)."""
    m = draw(st.integers(1, 70))
    return m, draw(st.integers(0, m - 1)), draw(st.sampled_from([1, 2])), draw(st.integers(0, 2**31))


def _in_company(row: torch.Tensor, company: tuple[int, int, int, int]) -> torch.Tensor:
    m, position, threads, seed = company
    _threads(threads)
    batch = torch.randn((m,) + row.shape, generator=torch.Generator().manual_seed(seed)) * 3
    batch[position] = row
    return batch.to(row.dtype)


def _alone(fn, row: torch.Tensor):
    _threads(1)
    return fn(row[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@SETTINGS
@given(company=companies(), dim=st.sampled_from([576, 896, 17]))
def test_rms_norm_row_is_independent_of_its_company_and_threads(company, dim: int, dtype, out_dtype) -> None:
    weight = torch.randn(dim)
    row = torch.randn(dim).to(dtype)
    fn = functools.partial(cpu_native.rms_norm, weight=weight, eps=1e-5, out_dtype=out_dtype)
    assert torch.equal(_alone(fn, row)[0], fn(_in_company(row, company))[company[1]])


@SETTINGS
@given(company=companies())
def test_add_rms_norm_row_is_independent_of_its_company_and_threads(company) -> None:
    weight, residual, row = torch.randn(576), torch.randn(576), torch.randn(576).bfloat16()
    _threads(1)
    normed, total = cpu_native.add_rms_norm(row[None], residual[None], weight, 1e-5, out_dtype=torch.bfloat16)
    batch = _in_company(row, company)
    residuals = torch.randn(batch.shape)
    residuals[company[1]] = residual
    normed_in, total_in = cpu_native.add_rms_norm(batch, residuals, weight, 1e-5, out_dtype=torch.bfloat16)
    assert torch.equal(normed[0], normed_in[company[1]]) and torch.equal(total[0], total_in[company[1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@SETTINGS
@given(company=companies())
def test_silu_mul_row_is_independent_of_its_company_and_threads(company, dtype) -> None:
    row = (torch.randn(2 * 1536) * 4).to(dtype)
    fn = functools.partial(cpu_native.silu_mul, out_dtype=torch.bfloat16)
    assert torch.equal(_alone(fn, row)[0], fn(_in_company(row, company))[company[1]])


def _gguf_like_int4(n: int, k: int, seed: int) -> QuantizedWeight:
    """A 4-bit weight whose scales and minimums are float16 values, as a GGUF Q4_1 block stores them
    (the C matmul's float16 copies of them are then exact)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half().float()
    mins = (torch.randn(n, k // 32, generator=g) * 0.05).half().float()
    return QuantizedWeight(4, q, scales, mins + 8 * scales)


@SETTINGS
@given(company=companies(), shape=st.sampled_from([(960, 576), (3072, 576), (576, 1536), (32, 64)]))
def test_the_4bit_matmul_gives_a_row_the_same_bits_alone_and_in_any_company(company, shape) -> None:
    weight = _gguf_like_int4(*shape, seed=shape[0]).pack(native=True)
    row = torch.randn(shape[1])
    fn = functools.partial(cpu_native.int4_linear, nibbles=weight.data, halves=weight.scales)
    assert torch.equal(_alone(fn, row)[0], fn(_in_company(row, company))[company[1]])


def _vector_isas() -> list:
    """Each vector code path of the C matmuls, skipped where this CPU lacks it."""
    return [pytest.param(isa, marks=pytest.mark.skipif(isa not in cpu_native.matmul_isas(), reason=f"no {isa} here"))
            for isa in cpu_native.MATMUL_ISAS[1:]]


@pytest.mark.parametrize("isa", _vector_isas())
@pytest.mark.parametrize("rows", [1, 3, 4, 70])
def test_the_4bit_matmuls_vector_code_gives_the_plain_c_bits(rows: int, isa: str) -> None:
    weight = _gguf_like_int4(96, 160, seed=rows).pack(native=True)
    x = torch.randn(rows, 160) * 5
    x[0, :32] = 0.0  # a group of zeros: scale 0
    x[-1, 32:64] *= 1e6
    assert torch.equal(cpu_native.int4_linear(x, weight.data, weight.scales, isa=isa),
                       cpu_native.int4_linear(x, weight.data, weight.scales, isa="plain"))


def test_the_4bit_matmul_reads_gguf_blocks_exactly_and_16bit_activations_cost_under_1e4() -> None:
    """Against float64 of the dequantized weight: the only rounding is the activations' (groups of 32
    to 16 bits) and the float32 sums, far below torch's int4 kernel (bfloat16 activations, scales
    and zeros: about 3e-3 here)."""
    quantized = _gguf_like_int4(192, 576, seed=1)
    x = torch.randn(7, 576) * 3
    reference = x.double() @ quantized.dequantize().double().T
    native = cpu_native.int4_linear(x, *(lambda w: (w.data, w.scales))(quantized.pack(native=True)))
    ours = float((native.double() - reference).norm() / reference.norm())
    torch_kernel = kernels.linear(x, quantized.pack(native=False))
    theirs = float((torch_kernel.double() - reference).norm() / reference.norm())
    assert ours < 1e-4 and theirs > 10 * ours
    assert torch.equal(cpu_native.int4_linear(x.bfloat16(), quantized.pack(native=True).data,
                                              quantized.pack(native=True).scales),
                       cpu_native.int4_linear(x.bfloat16().float(), quantized.pack(native=True).data,
                                              quantized.pack(native=True).scales))


def _q8_0(n: int, k: int, seed: int) -> QuantizedWeight:
    """An 8-bit weight with a float16 scale per 32 inputs, as GGUF's Q8_0 stores it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return QuantizedWeight(8, q, (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half().float(), None, 32)


@SETTINGS
@given(company=companies(), shape=st.sampled_from([(49152, 576), (960, 576), (32, 64)]))
def test_the_8bit_matmul_gives_a_row_the_same_bits_alone_and_in_any_company(company, shape) -> None:
    weight = _packed_q8_0(*shape)
    row = torch.randn(shape[1])
    fn = functools.partial(cpu_native.int8_linear, data=weight.data, halves=weight.scales)
    assert torch.equal(_alone(fn, row)[0], fn(_in_company(row, company))[company[1]])


@functools.cache
def _packed_q8_0(n: int, k: int):
    return _q8_0(n, k, seed=n).pack(native=True)


@pytest.mark.parametrize("isa", _vector_isas())
@pytest.mark.parametrize("rows", [1, 3, 4, 70])
def test_the_8bit_matmuls_vector_code_gives_the_plain_c_bits_and_reads_q8_0_exactly(rows: int, isa: str) -> None:
    """Against float64 of the Q8_0 weight the only rounding is the activations' and the float32
    sums (torch's 8-bit kernel, one bfloat16 scale per row and bfloat16 activations: about 7e-3)."""
    quantized = _q8_0(96, 160, seed=rows)
    weight = quantized.pack(native=True)
    x = torch.randn(rows, 160) * 5
    x[0, :32] = 0.0
    out = cpu_native.int8_linear(x, weight.data, weight.scales, isa=isa)
    assert torch.equal(out, cpu_native.int8_linear(x, weight.data, weight.scales, isa="plain"))
    reference = x.double() @ quantized.dequantize().double().T
    assert float((out.double() - reference).norm() / reference.norm()) < 1e-4


def test_a_q8_0_weight_keeps_its_groups_for_the_c_matmul_and_splits_on_them() -> None:
    quantized = _q8_0(32, 128, seed=5)
    with cpu_native.selected("native"):
        assert quantized.kernel_form() is quantized and quantized.pack().layout == "native"
        left, right = quantized.inputs(0, 64).pack(), quantized.inputs(64, 128).pack()
        x = torch.randn(3, 128)
        assert torch.allclose(kernels.linear(x[:, :64], left) + kernels.linear(x[:, 64:], right),
                              kernels.linear(x, quantized.pack()), rtol=1e-4, atol=1e-4)
    with cpu_native.selected("torch"):
        form = quantized.kernel_form()
        assert form.group_size == 128 and form.pack().layout == "torch"  # one scale per row, torch's kernel
    with pytest.raises(ValueError, match="cut a 8-bit group of 32"):
        quantized.inputs(0, 48)


def test_a_4bit_weight_is_packed_for_the_matmul_of_the_selected_cpu_ops() -> None:
    quantized = _gguf_like_int4(32, 64, seed=2)
    with cpu_native.selected("native"):
        weight = quantized.pack()
        assert weight.layout == "native" and weight.in_features == 64 and weight.out_features == 32
        assert kernels.matmul_input_dtype(weight) is None  # the C matmul reads float32 as it is
    with cpu_native.selected("torch"):
        assert quantized.pack().layout == "torch"
    with pytest.raises(ValueError, match="x has 63 inputs, the weight 64"):
        cpu_native.int4_linear(torch.randn(2, 63), weight.data, weight.scales)


def test_a_bfloat16_result_is_the_float32_result_rounded() -> None:
    """Writing a matmul's input dtype in the op itself (`kernels.matmul_input_dtype`) changes no bit
    against casting the float32 result, torch's way (round to nearest even, NaN kept)."""
    g = torch.Generator().manual_seed(3)
    x, weight, residual = torch.randn(9, 576, generator=g) * 7, torch.randn(576, generator=g), torch.randn(9, 576)
    assert torch.equal(cpu_native.rms_norm(x, weight, 1e-5, torch.bfloat16),
                       cpu_native.rms_norm(x, weight, 1e-5).bfloat16())
    normed, total = cpu_native.add_rms_norm(x.bfloat16(), residual, weight, 1e-5, torch.bfloat16)
    normed32, total32 = cpu_native.add_rms_norm(x.bfloat16(), residual, weight, 1e-5)
    assert torch.equal(normed, normed32.bfloat16()) and torch.equal(total, total32)
    assert torch.equal(total, x.bfloat16().float() + residual)  # the add is torch's float32 add
    gate_up = torch.randn(9, 2 * 1536, generator=g) * 6
    gate_up[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    assert torch.equal(cpu_native.silu_mul(gate_up, torch.bfloat16), cpu_native.silu_mul(gate_up).bfloat16(),
                       ) or torch.equal(cpu_native.silu_mul(gate_up, torch.bfloat16).isnan(),
                                        cpu_native.silu_mul(gate_up).bfloat16().isnan())


def test_ops_stay_close_to_the_torch_reference() -> None:
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(33, 576, generator=g), torch.randn(576, generator=g)
    assert torch.allclose(cpu_native.rms_norm(x, weight, 1e-5), rows.rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(33, 2 * 1536, generator=g) * 5
    assert torch.allclose(cpu_native.silu_mul(gate_up), rows.silu_mul(gate_up), rtol=1e-5, atol=1e-6)


def test_silu_is_accurate_over_the_whole_float_range() -> None:
    """exp is a polynomial here: within a few ulp of float64, and finite where e^-g overflows
    (silu of a large negative gate is about -0, not NaN)."""
    gate = torch.cat([torch.linspace(-100, 100, 200_001), torch.tensor([-1e4, -89.0, 89.0, 1e4])])
    out = cpu_native.silu_mul(torch.stack([gate, torch.ones_like(gate)]).reshape(1, -1))[0].double()
    ref = torch.nn.functional.silu(gate.double())
    assert torch.isfinite(out).all()
    assert ((out - ref).abs() <= 2e-6 * ref.abs() + 1e-30).all()  # tiny results: e^-g stops at e^88


def test_rope_gives_the_torch_references_bits() -> None:
    """RoPE is multiplies and adds, in the same order as the torch op: equal to the bit."""
    g = torch.Generator().manual_seed(2)
    cos_sin = torch.randn(4096, 64, generator=g)
    qkv = torch.randn(13, (9 + 2 * 3) * 64, generator=g)
    q, k = qkv[:, :576].view(13, 9, 64), qkv[:, 576:768].view(13, 3, 64)
    rotary = RotaryInputs.of(torch.randint(0, 4096, (13,), generator=g), cos_sin)
    for got, want in zip(cpu_native.rope(q, k, rotary), rows.rope(q, k, rotary)):
        assert torch.equal(got, want)
    bf16_q = qkv.bfloat16()[:, :576].view(13, 9, 64)
    assert torch.equal(cpu_native.rope(bf16_q, k, rotary)[0], rows.rope(bf16_q.float(), k, rotary)[0])


def test_kv_store_writes_each_row_to_its_slot() -> None:
    k_cache, v_cache = torch.zeros(8, 4, 3, 64), torch.zeros(8, 4, 3, 64)
    k, v = torch.randn(5, 3, 64), torch.randn(5, 3 * 64 * 2).bfloat16()[:, : 3 * 64].view(5, 3, 64)
    slots = torch.tensor([7, 0, 31, 12, 13])
    cpu_native.kv_store(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 3, 64)[slots], k) and torch.equal(v_cache.view(-1, 3, 64)[slots], v.float())


def _native_attend(q, k_cache, v_cache, meta) -> torch.Tensor:
    with cpu_native.selected("native"):
        plan = kernels.plan_attention(meta, q.shape[1], k_cache.shape[2])
        assert isinstance(plan, cpu_native.NativePlan)
        return kernels.attention(q, k_cache, v_cache, plan, scale=0.125)


def test_attention_matches_float64_and_a_prefill_equals_its_decodes() -> None:
    qkv = sequence(700, seed=4, num_heads=9, num_kv_heads=3, head_dim=64)
    def cache(seed: int) -> PagedCache:
        return PagedCache(_native_attend, num_blocks=200, num_kv_heads=3, head_dim=64, seed=seed)

    whole = run_chunked(cache(0), "s", qkv, [700])
    assert torch.allclose(whole.double(), attention_float64(*qkv, 0.125), rtol=1e-5, atol=1e-5)
    _threads(1)
    token_by_token = run_chunked(cache(1), "s", qkv, list(range(1, 701)), company=[("o", 33, 5)])
    assert torch.equal(whole, token_by_token)


def test_attention_writes_bfloat16_as_the_float32_result_rounded() -> None:
    q, k, v = sequence(40, seed=6, num_heads=9, num_kv_heads=3, head_dim=64)
    cache = PagedCache(_native_attend, num_blocks=8, num_kv_heads=3, head_dim=64)
    q_all, meta = cache.store([("s", q, k, v, 0)])
    plan = cpu_native.plan(meta, 9, 3, torch.device("cpu"))
    out = cpu_native.attention(q_all, cache.k, cache.v, plan, 0.125)
    assert torch.equal(cpu_native.attention(q_all, cache.k, cache.v, plan, 0.125, out_dtype=torch.bfloat16),
                       out.bfloat16())


def test_the_digest_names_the_backend_that_runs() -> None:
    with cpu_native.selected("native"):
        native = kernels.config_digest()
    with cpu_native.selected("torch"):
        torch_ops = kernels.config_digest()
        assert not kernels.matmul_input_dtype(kernels.quantize(torch.randn(32, 64), 4).pack())
    assert f"cpu-native-v{cpu_native.VERSION}" in native and "cpu-torch" in torch_ops


def test_without_a_compiler_auto_runs_torch_and_native_is_refused(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", os.path.join(str(tmp_path), "no-such-cc"))
    for cached in (cpu_native.library, cpu_native._available):
        monkeypatch.setattr(cpu_native, cached.__name__, functools.cache(cached.__wrapped__))
    with pytest.raises(cpu_native.NativeBuildError, match="does not run"):
        with cpu_native.selected("native"):
            pass
    with cpu_native.selected("auto"):
        assert not cpu_native.enabled() and kernels.config_digest().endswith("cpu-torch")
    assert "run in torch" in caplog.text


def test_a_failed_compile_says_why(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C")
    monkeypatch.setattr(cpu_native, "SOURCES", (broken,))
    with pytest.raises(cpu_native.NativeBuildError, match="compiling broken.c failed"):
        cpu_native.build()
    assert not list((tmp_path / "native").glob("*.so"))


def test_a_build_is_cached_by_source_and_flags(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(tmp_path))
    first = cpu_native.build()
    assert cpu_native.build() == first and first.parent == tmp_path / "native"
    edited = tmp_path / "cpu_matmul.c"
    edited.write_text(cpu_native.SOURCES[1].read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cpu_native, "SOURCES", (cpu_native.SOURCES[0], edited, cpu_native.SOURCES[2]))
    assert cpu_native.build() != first


def test_what_the_c_ops_cannot_read_is_refused_by_name() -> None:
    q, k, v = sequence(4, seed=8, num_heads=9, num_kv_heads=3, head_dim=64)
    cache = PagedCache(_native_attend, num_blocks=4, num_kv_heads=3, head_dim=64)
    q_all, meta = cache.store([("s", q, k, v, 0)])
    plan = cpu_native.plan(meta, 9, 3, torch.device("cpu"))
    slots = torch.arange(4)
    with pytest.raises(TypeError, match="contiguous float32 KV cache"):
        cpu_native.attention(q_all, cache.k.bfloat16(), cache.v, plan, 0.125)
    with pytest.raises(TypeError, match="contiguous int64"):
        cpu_native.rope_store_attention(q, k, v, RotaryInputs.of(slots, torch.randn(8, 64)), cache.k, cache.v,
                                        slots.int(), plan, 0.125)
    with pytest.raises(TypeError, match="this backend reads NativePlan"):
        cpu_native.attention(q_all, cache.k, cache.v, object(), 0.125)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu_native.rms_norm(torch.ones(2, 8, dtype=torch.float16), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="unknown CPU kernels 'fast'"):
        with cpu_native.selected("fast"):
            pass


def test_a_model_of_another_dtype_runs_the_torch_ops_and_refuses_native() -> None:
    from detserve.engine.cpu_runtime import cpu_kernels_for

    assert cpu_kernels_for("auto", torch.bfloat16) == "torch"
    assert cpu_kernels_for("native", torch.float32) == "native"
    with pytest.raises(ValueError, match="--dtype float32"):
        cpu_kernels_for("native", torch.bfloat16)


@pytest.mark.parametrize("vocab", [1, 17, 49152])
def test_the_c_argmax_picks_torchs_token_ties_and_nans_included(vocab: int) -> None:
    logits = torch.randn(6, vocab)
    logits[1] = float("-inf")  # a row a grammar masked entirely
    logits[2, vocab // 2 :] = logits[2].max()  # a tie: the first index wins
    logits[3, vocab - 1] = float("inf")
    logits[4, -1] = float("nan")  # a NaN counts as the largest
    logits[5, vocab // 3] = float("nan")
    logits[5, -1] = float("nan")
    zeros = torch.zeros(6, dtype=torch.int64)
    tokens = cpu_native.sample_tokens(logits, zeros.double(), zeros, zeros)
    assert tokens.tolist() == torch.argmax(logits, dim=-1).tolist()


def test_the_c_sampler_draws_the_seeded_rows_as_the_torch_one() -> None:
    logits = torch.randn(5, 1000)
    temperatures = torch.tensor([0.0, 0.7, 0.0, 1.3, 1.0], dtype=torch.float64)
    seeds, positions = torch.arange(5) * 11, torch.arange(5) + 3
    assert torch.equal(cpu_native.sample_tokens(logits, temperatures, seeds, positions),
                       noise.sample_tokens(logits, temperatures, seeds, positions))


def test_the_c_log_softmax_is_row_invariant_and_as_close_to_float64_as_torchs() -> None:
    logits = torch.randn(6, 4099) * 6  # not a multiple of the vector width: a tail
    logits[1, 10:] = float("-inf")  # a grammar's masked tokens stay -inf
    logits[2, 0] = 95.0  # past exp's clamp, still the row's max
    ours = cpu_native.log_softmax(logits)
    for r in range(6):
        assert torch.equal(cpu_native.log_softmax(logits[r : r + 1])[0], ours[r])
    reference = torch.log_softmax(logits.double(), dim=-1)
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(ours))
    theirs = (torch.log_softmax(logits, dim=-1).double() - reference)[finite].abs().max()
    assert (ours.double() - reference)[finite].abs().max() <= 2 * theirs
