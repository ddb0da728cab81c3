"""bench.engine_step on a tiny random-weight model on CPU: it times both modes and leaves the engine idle."""

from __future__ import annotations

import json
import math

from bench import engine_step

TINY = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}


def test_engine_step_bench_times_each_batch_in_both_modes_and_prints_their_ratio(tmp_path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    args = ["--config", str(config), "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1,3",
            "--prompt-tokens", "12", "--steps", "3"]
    assert engine_step.main(args) == 0
    out = capsys.readouterr().out
    rows = out.split("== engine decode step")[1].splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["1", "3"]
    for row in rows:
        invariant_ms, fast_ms, ratio = map(float, row.split()[1:4])
        # the printed times are rounded to 0.01 ms, and a tiny model's steps take about 1 ms
        assert invariant_ms > 0 and fast_ms > 0 and math.isclose(ratio, invariant_ms / fast_ms, rel_tol=0.05)


def test_each_timed_step_decodes_one_token_for_every_request() -> None:
    timings, floor_ms = engine_step.run(TINY, "cpu", "float32", [2], prompt_tokens=5, steps=2)
    assert [(t.batch, t.deterministic) for t in timings] == [(2, True), (2, False)]
    assert all(t.tokens_per_second == 2 / t.step_ms * 1e3 for t in timings)
    assert floor_ms is None  # measured on a GPU only


def test_the_weight_read_floor_counts_every_weight_a_decode_step_reads_once(tmp_path) -> None:
    from detserve.engine.config import EngineConfig
    from detserve.engine.llm_engine import LLMEngine

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    engine = LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", device="cpu", dtype="float32"))
    hidden, inter, kv = 32, 64, 2 * 8
    per_layer = (hidden + 2 * kv) * hidden + hidden * hidden + 2 * inter * hidden + hidden * inter + 2 * hidden
    lm_head, final_norm = 256 * hidden, hidden  # the embedding is not read whole: no tied head here
    assert engine_step.weight_bytes(engine) == 4 * (2 * per_layer + final_norm + lm_head)


def test_the_table_shows_step_times_as_multiples_of_the_floor() -> None:
    timings = [engine_step.StepTiming(1, True, 6.0), engine_step.StepTiming(1, False, 5.0)]
    row = engine_step.table(timings, floor_ms=4.0).splitlines()[1].split()
    assert row[0] == "1" and row[-2:] == ["1.50", "1.25"]


def test_structured_outputs_bench_times_constrained_and_plain_steps_on_the_default_model(capsys) -> None:
    from bench import structured_outputs

    assert structured_outputs.main(["--batch-sizes", "1,2", "--steps", "3", "--rounds", "1", "--prompt-tokens", "8"]) == 0
    rows = capsys.readouterr().out.split("== structured outputs")[1].splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["1", "2"]
    for row in rows:
        plain_ms, json_ms, _, _, ratio = map(float, row.split()[1:6])
        assert plain_ms > 0 and json_ms > 0 and math.isclose(ratio, plain_ms / json_ms, rel_tol=0.05)


def test_scoring_bench_times_prefill_and_scoring_on_the_default_model(capsys) -> None:
    from bench import scoring

    assert scoring.main(["--prompt-tokens", "40", "--rounds", "1"]) == 0
    rows = capsys.readouterr().out.split("== scoring a 40-token prompt")[1].splitlines()[2:]
    assert [row.split("  ")[0].strip() for row in rows] == list(scoring.CASES)
    assert all(float(row.split()[-3]) > 0 for row in rows)
