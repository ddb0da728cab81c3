"""bench.tensor_parallel on a tiny random model: a row per TP:S run, both modes, and the on-paper bytes."""

from __future__ import annotations

import json

import pytest

from bench import tensor_parallel
from tests.engine.test_tensor_parallel import LLAMA


def test_the_all_gather_of_partials_moves_s_over_tp_rows_per_other_rank() -> None:
    assert tensor_parallel.bytes_per_token(4096, 2, 2) == (4096 * 4, 4096 * 4)  # one row each way at TP = S = 2
    invariant, fast = tensor_parallel.bytes_per_token(4096, 4, 8)
    assert invariant == 3 * 2 * 4096 * 4 and fast == 1.5 * 4096 * 4


@pytest.mark.slow
def test_the_bench_prints_a_row_per_run_with_both_modes(tmp_path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA))
    args = ["--runs", "1:1,2:2", "--config", str(config), "--quantization", "int4", "--batches", "1", "--steps", "3"]
    assert tensor_parallel.main(args) == 0
    out = capsys.readouterr().out
    rows = out.split("== decode tok/s")[1].splitlines()[2:4]
    assert [row.split()[:2] for row in rows] == [["1", "1"], ["2", "2"]]
    assert all(float(cell) > 0 for row in rows for cell in row.split()[3:5])
    assert "all_gather" in out and "== on paper" in out
