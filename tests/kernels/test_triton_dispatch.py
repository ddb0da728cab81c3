"""The kernel interface around the Triton kernels: the fingerprint digest and the CPU fallbacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detserve import kernels
from detserve.kernels import configs, contract, cpu_native


@pytest.mark.skipif(torch.cuda.is_available(), reason="the digest adds the Triton configs where CUDA runs them")
def test_config_digest_without_cuda_is_the_cpu_reference_digest() -> None:
    expected = (f"torch-ref-v{contract.VERSION}:rows={kernels.ROWS_PER_CALL}:kvsplit={kernels.KV_SPLIT_SIZE}"
                f":{cpu_native.backend_digest()}")
    assert kernels.config_digest() == expected


def test_triton_digest_changes_with_the_pinned_tiles_and_the_triton_version() -> None:
    sm90 = configs.digest((9, 0), "3.6.0")
    assert repr(configs.PINNED[(9, 0)]) in sm90
    assert configs.digest((8, 0), "3.6.0") != sm90  # sm_80 runs the default tiles
    assert configs.digest((9, 0), "3.7.0") != sm90
    retiled = dataclasses.replace(configs.PINNED[(9, 0)].matmul, block_k=32)
    assert repr(retiled) not in sm90


def test_a_matmul_tiling_pinned_for_one_weight_shape_applies_to_that_shape_alone() -> None:
    sm90 = configs.PINNED[(9, 0)]
    tuned = dataclasses.replace(sm90.matmul, block_n=256)
    arch = dataclasses.replace(sm90, matmul_by_shape=(((14336, 4096), tuned),))
    assert arch.matmul_for(14336, 4096) == tuned
    assert arch.matmul_for(4096, 14336) == arch.matmul_for(4096, 4096) == sm90.matmul
    assert repr(tuned) in repr(arch) and repr(tuned) not in repr(sm90)  # and so in the fingerprint's digest


@pytest.mark.parametrize("mode", kernels.MODES)
def test_add_rms_norm_on_cpu_gives_the_bits_of_the_add_then_the_norm(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, residual, weight = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g), torch.rand(64, generator=g)
    with kernels.mode(mode):
        normed, total = kernels.add_rms_norm(x, residual, weight, 1e-6)
        assert torch.equal(total, x + residual)
        assert torch.equal(normed, kernels.rms_norm(x + residual, weight, 1e-6))
