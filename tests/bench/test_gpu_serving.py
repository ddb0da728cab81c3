"""bench.gpu_serving on a tiny random-weight model on CPU: a tokenizer-less server through HTTP and
the same engine in-process, both modes, with the ratios the GPU targets are stated in."""

from __future__ import annotations

import json

import pytest

from bench import gpu_serving
from detserve.server.bench.serve import RANDOM_ID_LIMIT
from tests.bench.test_engine_step import TINY


def test_the_server_and_the_engine_serve_random_ids_in_both_modes_and_their_ratios_print(tmp_path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY | {"vocab_size": RANDOM_ID_LIMIT}))
    assert gpu_serving.main(["--config", str(config), "--device", "cpu", "--concurrency", "1,2",
                             "--requests-per-slot", "1", "--input-len", "8", "--output-len", "4"]) == 0
    out = capsys.readouterr().out.split("== output tokens/s")[1].splitlines()
    cells = {line[:32].strip(): [float(x) for x in line[32:].split()] for line in out[3:]}
    for system in ("detserve deterministic", "detserve fast", "engine deterministic", "engine fast"):
        assert len(cells[system]) == 2 and all(x > 0 for x in cells[system]), system
    for ratio, top, bottom in [("deterministic / fast", "detserve deterministic", "detserve fast"),
                               ("server / engine, deterministic", "detserve deterministic", "engine deterministic"),
                               ("server / engine, fast", "detserve fast", "engine fast")]:
        expected = [t / b for t, b in zip(cells[top], cells[bottom])]
        assert cells[ratio] == pytest.approx(expected, rel=0.02, abs=0.006), ratio  # printed to 0.01
    assert "server / engine, curl" not in cells and "deterministic / llama.cpp" not in cells
