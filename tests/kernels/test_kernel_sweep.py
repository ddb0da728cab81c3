"""`bench.kernels`: the tiling sweep's checks, choice and paste-ready output, and the report's tables.

Runs the real bench code in the Triton interpreter at tiny shapes with stand-in timers, so the GPU
session that runs it for timings spends no device time on its bugs.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tests.kernels.test_triton_matmul import SMALL
from tests.kernels.triton_setup import DEVICE

pytest.importorskip("triton")

from bench import kernels as bench  # noqa: E402
from detserve.kernels import configs  # noqa: E402

WIDER = dataclasses.replace(SMALL, block_n=64)
ATTENTION = configs.AttentionConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)


def _trial(config: configs.MatmulConfig, ratios: list[float], invariant: bool = True) -> bench.MatmulTrial:
    return bench.MatmulTrial(64, 96, config, invariant, ratios if invariant else [])


def test_sweep_checks_each_candidate_and_times_it_at_every_m() -> None:
    calls = []

    def timer(fn, num_products: int) -> float:
        calls.append((fn(), num_products))
        return float(len(calls))

    trials = bench.sweep_matmul([SMALL, WIDER], [(64, 96)], [1, 5, 40], timer, device=DEVICE, dtype=torch.float32,
                                replicate=lambda w: [w, w.clone()])
    assert [(t.k, t.n, t.config, t.invariant) for t in trials] == [(64, 96, SMALL, True), (64, 96, WIDER, True)]
    assert len(calls) == 3 * 3  # cuBLAS, then each candidate, at each M
    assert [[tuple(out.shape) for out in outs] + [n] for outs, n in calls[:3]] == [
        [(1, 96), (1, 96), 2], [(5, 96), (5, 96), 2], [(40, 96), (40, 96), 2]]  # one product per weight copy
    assert trials[0].ratios == [4 / 1, 5 / 2, 6 / 3] and trials[1].ratios == [7 / 1, 8 / 2, 9 / 3]


def test_sweep_names_the_candidates_that_give_identical_bits() -> None:
    # Same split count and K tile: each output element is summed in the same order, whatever the
    # N tile. A shorter K tile changes that order.
    shorter_k = dataclasses.replace(SMALL, block_k=16, min_k_tiles_per_split=2)
    trials = bench.sweep_matmul([SMALL, WIDER, shorter_k], [(64, 96)], [1, 40], lambda fn, n: 1.0, DEVICE, torch.float32)
    assert [t.same_bits_as for t in trials] == [None, 0, None]


def test_the_invariance_check_rejects_a_kernel_whose_rows_change_with_m(monkeypatch) -> None:
    x, w = torch.randn(40, 64, device=DEVICE), torch.randn(96, 64, device=DEVICE)
    assert bench.matmul_is_invariant(x, w, [1, 5, 40], SMALL)
    linear = bench.matmul.linear
    monkeypatch.setattr(bench.matmul, "linear", lambda x, w, b, c, launch="auto": linear(x, w, b, c) + x.shape[0] * 1e-3)
    assert not bench.matmul_is_invariant(x, w, [1, 5, 40], SMALL)


def test_the_best_tiling_is_the_invariant_one_with_the_lowest_worst_ratio(capsys) -> None:
    steady, spiky, broken = SMALL, WIDER, dataclasses.replace(SMALL, num_warps=8)
    trials = [_trial(steady, [1.08, 1.05, 1.02]), _trial(spiky, [0.9, 0.9, 1.3]), _trial(broken, [0.5], invariant=False)]
    assert bench.best_matmul_per_shape(trials) == {(64, 96): trials[0]}
    bench.print_matmul_sweep(trials, [steady, spiky, broken], [1, 8, 32])
    out = capsys.readouterr().out
    assert f"((96, 64), {steady!r}),  # worst 1.08x, geomean 1.05x cuBLAS" in out
    pinned = eval(out.split("((96, 64), ")[1].split("),  #")[0], {"MatmulConfig": configs.MatmulConfig})
    assert pinned == steady  # the printed entry pastes back into configs.py as the same config


@pytest.fixture
def tiny_bench(monkeypatch) -> None:
    """bench.kernels on this device at interpreter-sized shapes; eager timers alternate 2, 1 (ours,
    then torch's) and graph timers 3, 1, so every ratio the tables print is known."""
    for name, value in dict(
        DEVICE=DEVICE, DTYPE=torch.float32, MATMUL_SHAPES=[(64, 96)], MATMUL_M=[1, 8, 40], DECODE=[(2, 300), (3, 40)],
        PREFILL=[(1, 20)], NUM_HEADS=4, NUM_KV_HEADS=2, HEAD_DIM=16,
        MATMUL_CANDIDATES=[SMALL, dataclasses.replace(SMALL, last_split_folds=True)],
        ATTENTION_CANDIDATES=[ATTENTION, dataclasses.replace(ATTENTION, last_split_merges=True)],
    ).items():
        monkeypatch.setattr(bench, name, value)
    eager, graph = itertools.cycle([2.0, 1.0]), itertools.cycle([3.0, 1.0])
    monkeypatch.setattr(bench, "_ms", lambda fn: (fn(), next(eager))[1])
    monkeypatch.setattr(bench, "_graph_ms", lambda fn, calls=1: (fn(), next(graph) / calls)[1])
    monkeypatch.setattr(bench, "_l2_bytes", lambda: 1000)
    monkeypatch.setattr(bench, "measured_bandwidth_gbs", lambda: 1000.0)



def test_the_report_prints_every_shape_and_the_summary_of_its_ratios(tiny_bench, capsys) -> None:
    bench.report(configs.ArchConfig(matmul=SMALL, attention=ATTENTION, rows=configs.DEFAULT.rows))
    out = capsys.readouterr().out
    graphs, eager = out.split("== summary")[1].split("matmul, ")[1:3]
    assert "64x96   3.00   3.00   3.00     3.00   3.00" in graphs  # in CUDA graphs: ours 3 / cuBLAS 1
    assert "64x96   2.00   2.00   2.00     2.00   2.00" in eager
    for case in ("decode 2 x 300", "decode 3 x 40", "prefill 1 x 20"):
        assert f"{case}   1.00" in eager  # ours 1 (after planning's 2) / the faster SDPA's 1


def test_the_sweep_shows_the_one_launch_folds_give_the_two_launch_bits(tiny_bench, capsys) -> None:
    bench.sweep()
    out = capsys.readouterr().out
    attention = [line.split() for line in out.splitlines() if line.endswith(")") and "AttentionConfig(" in line]
    assert [row[:2] for row in attention] == [["0", "0"], ["1", "0"]]  # timed (0 GB/s here), not "x": launches agree
    matmul = [line.split() for line in out.split("== matmul sweep")[1].splitlines() if "MatmulConfig" in line][:2]
    assert [row[3:5] for row in matmul] == [["0", "-"], ["1", "0"]]  # the twin (#1) gave #0's bits
    assert all(row[5] != "x" for row in matmul)  # and both passed the invariance check, so were timed
    assert "best invariant tiling per weight" in out
