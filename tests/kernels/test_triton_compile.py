"""The invariant Triton kernels compile for real GPUs at their pinned tiles, checked without a GPU.

`bench.kernel_compile` compiles each kernel ahead of time for sm_90 and sm_80 (Triton's own
ptxas and cuobjdump, no driver). It runs in a subprocess because the interpreter tests in this
session set TRITON_INTERPRET, which swaps the kernels for Python functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_SHARED_KIB = {"sm_90": 227, "sm_80": 163}  # per block, opt-in maximum


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    report = tmp_path_factory.mktemp("compile") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "bench.kernel_compile", "--arch", "90,80", "--json", str(report)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(report.read_text())


def test_every_kernel_compiles_for_hopper_and_ampere(compiled):
    kernels = {(r["arch"], r["kernel"], r["variant"]) for r in compiled}
    assert len(kernels) == len(compiled) == 30
    assert {arch for arch, _, _ in kernels} == {"sm_90", "sm_80"}


def test_matmul_and_attention_use_the_tensor_cores_of_each_arch(compiled):
    for r in compiled:
        if r["kernel"].startswith("matmul") or r["kernel"] in ("attention_sequential_kernel", "attention_split_kernel"):
            assert r["mma"] == ("wgmma" if r["arch"] == "sm_90" else "mma.sync"), r


def test_shared_memory_fits_the_arch(compiled):
    for r in compiled:
        assert r["shared_bytes"] <= MAX_SHARED_KIB[r["arch"]] * 1024, r


def test_matmul_tiles_stream_in_with_16_byte_copies_or_tma_and_no_spills(compiled):
    # Triton vectorizes the K-masked tile loads only when it knows K is a multiple of 16; the
    # report compiles with the launch's specialisation, so this is what a real launch gets.
    for r in compiled:
        if r["kernel"].startswith("matmul_"):
            hopper_tma = r["variant"].endswith("tma") and r["arch"] == "sm_90"
            assert r["tma"] == hopper_tma and r["stack_bytes"] == 0, r
            assert r["async_copy_bytes"] == ([] if hopper_tma else [16]), r


def test_only_the_last_split_folds_use_an_atomic_and_it_releases_and_acquires_at_gpu_scope(compiled):
    # The arrival must publish the program's partial stores to, and show every other split's to,
    # whichever program folds: a relaxed or CTA-scoped atomic would let the fold read stale partials.
    folding = {"parallel, last split folds", "split, last split merges"}
    for r in compiled:
        expected = ["atom.global.gpu.acq_rel.add.u32"] if r["variant"] in folding else []
        assert r["atomics"] == expected, r
