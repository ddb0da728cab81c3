"""Tensor parallelism: a deterministic request's token ids and logprob bits are the same at every TP
size that divides the K-splits S, on gloo processes of this machine.

Each TP size runs `tests/engine/tp_runs.py` in a process of its own (rank 0 there spawns the other
ranks), and the answers are compared as exact hex floats. The kernel-level facts the sharding
rests on (an integer kernel's output column has the same bits in any shard; every TP size cuts
the same K-splits) are checked here directly.
"""

from __future__ import annotations

import functools
import multiprocessing
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from detserve import kernels
from detserve.engine.config import EngineConfig
from detserve.engine.llm_engine import LLMEngine
from detserve.engine.parallel import Layout, TensorParallel
from detserve.kernels import quantized

REPO = Path(__file__).parents[2]
pytestmark = pytest.mark.slow

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 1024, "rms_norm_eps": 1e-5}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 496, "hidden_size": 128, "intermediate_size": 384,
         "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
         "max_position_embeddings": 1024, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
QWEN3_MOE = {**QWEN3, "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "num_attention_heads": 4,
             "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": True}
"""Small random models of the three shapes; Qwen3's vocabulary (496) leaves the last shard padded at TP 4."""


def tp_run(tp: int, splits: int, *flags: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "tests.engine.tp_runs", "--tp", str(tp), "--splits", str(splits),
                             *flags], cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def deterministic_part(run: dict) -> dict:
    return {key: run[key] for key in ("alone", "amid_load", "scored", "fingerprint")}


LLAMA_GPU = {**LLAMA, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 8,
             "num_key_value_heads": 2, "vocab_size": 32000}


def _config_dir(config: dict, folder: Path) -> Path:
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(params=[LLAMA, QWEN3, QWEN3_MOE], ids=["llama", "qwen3", "qwen3-moe"])
def random_model(request, tmp_path: Path) -> list[str]:
    return ["--model", str(_config_dir(request.param, tmp_path)), "--load-format", "dummy", "--quantization", "int4"]


def test_random_models_give_the_same_bits_at_tp_1_2_and_4(random_model: list[str]) -> None:
    runs = {tp: tp_run(tp, 4, *random_model) for tp in (1, 2, 4)}
    for tp in (2, 4):
        assert deterministic_part(runs[tp]) == deterministic_part(runs[1]), f"TP {tp} differs from TP 1"
    one = runs[1]
    assert one["amid_load"] == one["alone"], "company changed a deterministic answer"
    assert all(run["prefix_cache_hits"] > 0 and run["preemptions"] > 0 for run in runs.values())
    assert len(one["scored"]["prompt_logprobs"]) == 30
    # Fast mode all-reduces: close to TP 1, not promised equal.
    assert runs[2]["fast_ids"] == one["fast_ids"]
    assert max(abs(a - b) for a, b in zip(runs[2]["fast_logprobs"], one["fast_logprobs"])) < 1e-2


def test_the_default_model_gives_the_same_bits_at_tp_1_and_3() -> None:
    """SmolLM2-135M: 9 query and 3 KV heads allow TP 3; 576 inputs of o_proj are 18 groups of 32, so S = 6."""
    one, three = tp_run(1, 6), tp_run(3, 6)
    assert deterministic_part(three) == deterministic_part(one)
    assert one["amid_load"] == one["alone"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_give_the_bits_of_one(tmp_path: Path) -> None:
    """NCCL, float weights on the Triton kernels (bench/gpu_check.sh's `tp` step). Column shards take
    the whole weight's matmul plan (`kernels.column_shard`), so they should agree; until this has
    passed on two GPUs, a GPU's fingerprint names the TP size."""
    model = ["--model", str(_config_dir(LLAMA_GPU, tmp_path)), "--load-format", "dummy"]
    assert deterministic_part(tp_run(2, 2, *model)) | {"fingerprint": None} == \
        deterministic_part(tp_run(1, 2, *model)) | {"fingerprint": None}


def test_the_fingerprint_names_the_splits_and_not_the_tp_size(make_engine) -> None:
    default = make_engine()
    with_splits = LLMEngine(EngineConfig(tp_invariant_splits=6, kv_cache_tokens=512))
    assert with_splits.info.fingerprint(True) != default.info.fingerprint(True)


@functools.cache
def whole_and_shards(n: int, k: int, bits: int, size: int) -> tuple[kernels.PackedWeight, list[kernels.PackedWeight]]:
    weight = quantized.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + bits)) * 0.02, bits)
    rows = n // size
    return weight.pack(), [weight.outputs(r * rows, (r + 1) * rows).pack() for r in range(size)]


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), shape=st.sampled_from([(1728, 576), (3072, 576), (576, 1536), (49152, 576)]),
       size=st.sampled_from([2, 3, 4, 6]), m=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_an_integer_kernels_output_columns_have_the_same_bits_in_any_shard(bits, shape, size, m, seed) -> None:
    """Column parallelism rests on this: a rank's shard computes its columns as the whole weight does
    (SmolLM2's q|k|v, gate|up, down and LM head shapes)."""
    n, k = shape
    rows = n // size
    assume(n % size == 0 and (bits == 8 or rows % 16 == 0))  # other shards are refused at load
    whole, shards = whole_and_shards(n, k, bits, size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    expected = quantized.linear(x, whole, None)
    for r, shard in enumerate(shards):
        assert torch.equal(quantized.linear(x, shard, None), expected[:, r * rows : (r + 1) * rows])


@pytest.mark.parametrize("splits", [1, 2, 4, 8])
def test_every_tp_size_cuts_the_same_k_splits(splits: int) -> None:
    alone = Layout(0, 1, splits).input_splits(1024, "inputs")
    for size in (s for s in (1, 2, 4, 8) if splits % s == 0):
        cuts = [c for rank in range(size) for c in Layout(rank, size, splits).input_splits(1024, "inputs")]
        assert cuts == alone and len(cuts) == splits


def test_a_row_parallel_matmul_folds_its_splits_in_order() -> None:
    """Alone, S partials folded 0..S-1 are what the kernels give split by split, in both modes."""
    generator = torch.Generator().manual_seed(0)
    weight = quantized.quantize(torch.randn(64, 256, generator=generator), 4)
    x = torch.randn(5, 256, generator=generator)
    splits = [weight.inputs(a, b).pack() for a, b in Layout(0, 1, 4).input_splits(256, "inputs")]
    expected = sum((quantized.linear(x[:, 64 * j : 64 * (j + 1)], w, None).float() for j, w in enumerate(splits)),
                   torch.zeros(5, 64))
    for mode in kernels.MODES:
        with kernels.mode(mode):
            assert torch.equal(TensorParallel(Layout(0, 1, 4)).row_linear(x, splits), expected)


FOLD_WEIGHT = torch.tensor([[1e8, 1.0, -1e8, 1.0]])
"""Partials whose float32 sum depends on the order: folded 0..3, ((1e8 + 1) - 1e8) + 1 = 1 (the
first 1 is lost against 1e8); summed per rank of two and then across, (1e8 + 1) + (-1e8 + 1) = 0."""


def _row_linear_on_rank(rank: int, size: int, port: int, results: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    tp = TensorParallel(Layout(rank, size, 4), torch.distributed.group.WORLD)
    splits = [FOLD_WEIGHT[:, a:b] for a, b in tp.layout.input_splits(4, "inputs")]
    x = torch.ones(1, 4 // size)
    sums = {}
    for mode in kernels.MODES:
        with kernels.mode(mode):
            sums[mode] = tp.row_linear(x, splits).item()
    torch.distributed.destroy_process_group()
    (results / f"rank{rank}.json").write_text(json.dumps(sums))


@pytest.mark.parametrize("size", [2, 4])
def test_the_invariant_fold_keeps_tp_1s_sum_where_an_all_reduce_does_not(size: int, tmp_path: Path) -> None:
    """The row-parallel fold itself, where the order shows (the integer kernels' bfloat16 partials
    rarely show it: their float32 sums are mostly exact in any order)."""
    alone = TensorParallel(Layout(0, 1, 4)).row_linear(torch.ones(1, 4), list(FOLD_WEIGHT.split(1, dim=1)))
    assert alone.item() == 1.0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_row_linear_on_rank, args=(size, port, tmp_path), nprocs=size)
    for rank in range(size):
        sums = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sums["invariant"] == 1.0, f"rank {rank} of {size}"
        if size == 2:  # the local sums (1e8 and -1e8, each +1 lost) all-reduced, in either order
            assert sums["fast"] == 0.0


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(tensor_parallel_size=2, tp_invariant_splits=3), "multiple of tensor_parallel_size"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be >= 1"),
    (dict(tp_invariant_splits=0), "tp_invariant_splits must be >= 1"),
])
def test_tensor_parallel_options_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**overrides)


def test_a_model_whose_heads_do_not_split_is_refused_before_it_loads() -> None:
    with pytest.raises(ValueError, match=r"attention heads \(9\) do not split over --tensor-parallel-size 2"):
        LLMEngine(EngineConfig(tensor_parallel_size=2, kv_cache_tokens=512))


def test_float_weights_on_cpu_are_refused_by_every_rank_and_the_workers_stop(tmp_path: Path) -> None:
    """Float CPU matmuls are not proven column-invariant; the error is rank 0's own, and the spawned
    worker, which refused too, has exited by then."""
    config = EngineConfig(model=str(_config_dir(LLAMA, tmp_path)), load_format="dummy", quantization="none",
                          tensor_parallel_size=2, kv_cache_tokens=512)
    with pytest.raises(ValueError, match="tensor parallelism on CPU runs the integer kernels"):
        LLMEngine(config)
    assert not torch.distributed.is_initialized()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("detserve-tp-rank")]
