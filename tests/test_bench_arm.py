"""scripts/bench_arm.py: its ratios and ISA labels (fast), and its --quick run on the emulated Pi 5 (slow; skipped
when the board, its onnxruntime or llvm-mca is missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from helpers import load_script
from tvm_lowbit.cost import mca
from tvm_lowbit.deploy import board as emu

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_arm.py"


def _load() -> ModuleType:
    return load_script("bench_arm")


def _row(variant: str, target: str, insns: int, cycles: int) -> dict:
    return {"model": "resnet20", "variant": variant, "target": target, "model_insns": insns, "est_cycles": cycles}


def test_ratios_are_per_model_and_target() -> None:
    bench = _load()
    rows = [_row("tvm-fp32", "rasp4b", 800, 900), _row("tvm-fgq-n4", "rasp4b", 200, 300),
            _row("ort-int8", "rasp4b", 100, 150), _row("tvm-fgq-n4", "rasp5", 50, 40)]
    bench.add_ratios(rows)
    fgq4, fgq5 = rows[1], rows[3]
    assert fgq4["ratio_vs_fp32"] == 0.25 and fgq4["ratio_vs_ort_int8"] == 2.0 and fgq4["ratio_vs_ort_int8_cycles"] == 2.0
    assert rows[2]["ratio_vs_ort_int8"] == 1.0
    # no ORT row on rasp5: no ratio, never one borrowed from another target
    assert fgq5["ratio_vs_fp32"] is None and fgq5["ratio_vs_ort_int8"] is None
    assert fgq5["ratio_vs_ort_int8_cycles"] is None


def test_isa_label_follows_the_classes() -> None:
    bench = _load()
    base = dict.fromkeys(bench.CLASSES, 0)
    assert bench.isa_of({**base, "dot": 5, "widening_mul": 9}) == "neon+sdot"
    assert bench.isa_of({**base, "widening_mul": 9, "simd_other": 3}) == "neon smull/smlal"
    assert bench.isa_of({**base, "simd_other": 9, "scalar_float": 3}) == "neon"
    assert bench.isa_of({**base, "simd_other": 1, "scalar_float": 3}) == "scalar fp"


def test_json_fields_keep_the_contract() -> None:
    bench = _load()
    assert bench.FIELDS[:5] == ("model", "variant", "target", "model_insns", "ratio_vs_fp32")
    for f in ("ratio_vs_ort_int8", "insn_classes", "est_cycles", "ratio_vs_ort_int8_cycles"):
        assert f in bench.FIELDS
    assert {"ort-int8", "ort-fp32"} <= set(bench.VARIANTS)
    assert bench.MODELS == ("resnet20", "mobilenet", "resnet18-224")


def test_the_auto_variant_is_mobilenets() -> None:
    bench = _load()
    assert "tvm-auto" in bench.VARIANTS and bench.VARIANT_MODELS["tvm-auto"] == ("mobilenet",)
    resnet = bench.Bench("resnet20", None, None, None, "w", "c")
    with pytest.raises(ValueError, match="mobilenet only"):
        bench.tvm_model("tvm-auto", resnet)


def test_unknown_model_is_a_clear_error() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--models", "resnet50"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2 and "unknown model 'resnet50'" in r.stderr


def _ready() -> bool:
    try:
        emu.require_ort("cortex-a76")
        emu.icount_plugin()
        mca.llvm_version()
    except (emu.BoardError, mca.CostError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _ready(), reason="the emulated board with onnxruntime, or llvm-mca, is missing "
                    "(bash scripts/board/setup.sh)")
def test_quick_run_on_the_pi5(tmp_path: Path) -> None:
    out = tmp_path / "arm.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--targets", "rasp5", "--json", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    # the shipped rasp5 database (tuned on the estimate) applies by default: the row is then named -tuned
    fgq_name = "tvm-fgq-n4-tuned" if "tvm-fgq-n4-tuned" in rows else "tvm-fgq-n4"
    assert set(rows) == {fgq_name, "ort-int8"}
    ort, fgq = rows["ort-int8"], rows[fgq_name]
    assert ort["ratio_vs_ort_int8"] == 1.0 and ort["ratio_vs_ort_int8_cycles"] == 1.0
    for row in rows.values():
        assert row["model"] == "resnet20" and row["target"] == "rasp5"
        # the classes split the count (per-inference differences, rounded down per class)
        assert abs(sum(row["insn_classes"].values()) - row["model_insns"]) <= len(row["insn_classes"])
        assert row["est_cycles"] > 0 and row["isa"] == "neon+sdot"
    # ORT's int8 kernels on the A76 are sdot loops: about 31 M multiply-adds / 16 per sdot on resnet20
    assert 1.5e6 < ort["insn_classes"]["dot"] < 2.5e6
    assert fgq["ratio_vs_ort_int8"] == pytest.approx(fgq["model_insns"] / ort["model_insns"], rel=1e-3)
