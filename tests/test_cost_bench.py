"""scripts/bench_arm.py with tuned schedules: rows named "-tuned" when a database was applied, ratios against the
untuned fp32 row, the floor on the tuned FGQ row (fast; no board)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from helpers import load_script
from tvm_lowbit import tune

CLASSES = ("dot", "widening_mul", "load_store", "simd_other", "scalar_float", "other")


def _load() -> ModuleType:
    return load_script("bench_arm")


def _row(variant: str, insns: int, cycles: int) -> dict:
    return {"model": "resnet20", "variant": variant, "target": "rasp4b", "model_insns": insns, "est_cycles": cycles,
            "insn_classes": {c: 0 for c in CLASSES}, "est_ms": 0.0, "isa": "neon", "weights": "w", "calibration": "c"}


def test_a_row_is_tuned_only_when_a_workload_was_applied() -> None:
    bench = _load()
    load = tune.LoadReport(Path("db"))
    applied = tune.ApplyReport(Path("db"), ["fused_conv"], [], load)
    nothing = tune.ApplyReport(Path("db"), [], ["fused_conv"], load)
    assert bench.row_variant("tvm-fgq-n4", applied) == "tvm-fgq-n4-tuned"
    assert bench.row_variant("tvm-fgq-n4", nothing) == "tvm-fgq-n4"
    assert bench.row_variant("tvm-fgq-n4", None) == "tvm-fgq-n4"
    assert bench.base_variant("tvm-fgq-n4-tuned") == "tvm-fgq-n4" and bench.base_variant("ort-int8") == "ort-int8"


def test_tuned_rows_get_ratios_and_the_floor(tmp_path, capsys) -> None:
    bench = _load()
    rows = [_row("tvm-fp32", 800, 900), _row("tvm-fp32-tuned", 400, 450), _row("tvm-fgq-n4-tuned", 200, 300),
            _row("ort-int8", 100, 150)]
    assert bench.report(rows, tmp_path / "a.json") == 0
    fgq = rows[2]
    # against the untuned fp32 row, not the tuned one
    assert fgq["ratio_vs_fp32"] == 0.25 and fgq["ratio_vs_ort_int8"] == 2.0 and fgq["ratio_vs_ort_int8_cycles"] == 2.0
    assert "floor: tvm-fgq-n4-tuned on rasp4b executes 0.250x" in capsys.readouterr().out
    only_tuned = [_row("tvm-fp32-tuned", 400, 450), _row("tvm-fgq-n4-tuned", 300, 300)]
    assert bench.report(only_tuned, None) == 1  # 0.75 > the 0.5 floor: a tuned row is held to it too
    assert only_tuned[1]["ratio_vs_fp32"] == 0.75
