"""bench.cpu_matmul: one column per code path this CPU runs, bits checked before anything is timed."""

from __future__ import annotations

import pytest
import torch

from bench import cpu_matmul
from detserve.kernels import cpu_native

pytestmark = pytest.mark.skipif(not cpu_native.enabled(), reason="the C ops do not build here (no C compiler)")


def test_the_table_has_a_column_per_code_path_and_a_row_per_shape_and_m(capsys) -> None:
    assert cpu_matmul.main(["--rows", "1,3", "--rounds", "1", "--shapes", "o"]) == 0
    lines = capsys.readouterr().out.splitlines()
    isas = list(cpu_native.matmul_isas())
    assert lines[2].split()[3 : 3 + len(isas)] == isas
    rows = [line.split() for line in lines[3:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("o", "576x576", "1"), ("o", "576x576", "3")]
    assert all(float(value) > 0 for r in rows for value in r[3 : 3 + len(isas)])


def test_a_path_that_gives_other_bits_is_reported_not_timed() -> None:
    def kernel(x, data, halves, isa):
        return x.sum(-1, keepdim=True) + (isa == "avx2")

    with pytest.raises(AssertionError, match="the avx2 code gave other bits than the plain code"):
        cpu_matmul.time_paths(kernel, torch.ones(1, 32), cpu_matmul.packed(4, 16, 32), ["plain", "avx2"], rounds=1)
