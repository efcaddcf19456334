"""The cycle estimate (tvm_lowbit.cost.mca) and the board plugin's instruction classes.

The anchors are published throughputs, reproduced in kind by a real aarch64 program run on the emulated board
under the TCG plugin and timed by the estimate end to end:
  Cortex-A72 Software Optimization Guide (UAN 0016A), ASIMD FP multiply-accumulate, Q-form (FMLA): throughput 1
  per cycle (8 single-precision FLOPs per cycle), so 8 independent FMLAs take 8 cycles per loop iteration;
  Cortex-A76 Software Optimization Guide, ASIMD FP multiply-accumulate and ASIMD dot product (SDOT): throughput 2
  per cycle (pipelines V0 and V1), so 8 independent FMLAs or SDOTs take 4 cycles.
The loop counter and branch issue on the integer and branch pipes beside them and cost nothing extra.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tvm_lowbit.cost import mca
from tvm_lowbit.deploy import board as emu

from helpers import board_ready, has_cross_gcc, mca_ready

ITER = 20000

needs_board = pytest.mark.skipif(not board_ready() or not has_cross_gcc(),
                                 reason="the emulated board is not built (bash scripts/board/setup.sh)")
needs_mca = pytest.mark.skipif(not mca_ready(), reason="llvm-mca >= 17 is not installed (scripts/board/setup.sh)")


def _loop_program(tmp: Path, body: list[str], name: str) -> Path:
    """A static aarch64 program: ``body`` in a loop of ITER iterations, then exit(0)."""
    src = tmp / f"{name}.S"
    src.write_text("\n".join([".globl _start", "_start:", f"    mov x0, #{ITER}", "1:", *(f"    {i}" for i in body),
                              "    subs x0, x0, #1", "    b.ne 1b", "    mov x0, #0", "    mov x8, #93",
                              "    svc #0", ""]))
    exe = tmp / name
    subprocess.run(["aarch64-linux-gnu-gcc", "-nostdlib", "-static", "-march=armv8.2-a+dotprod", "-o", str(exe),
                    str(src)], check=True, capture_output=True)
    return exe


def _run(exe: Path, cpu: str, tmp: Path) -> tuple[dict, Path]:
    out, blocks = tmp / f"{exe.name}-{cpu}.json", tmp / f"{exe.name}-{cpu}.txt"
    r = emu.board_exec([str(exe)], cpu, plugin=f"{emu.icount_plugin()},out={out},match=/{exe.name},blocks={blocks}")
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()), blocks


def test_read_blocks_merges_retranslated_blocks(tmp_path: Path) -> None:
    f = tmp_path / "b.txt"
    f.write_text("d8 10 4e31ce00 54fffee1\nd8 5 4e31ce00 54fffee1\n100 1 d2800000\n")
    assert mca.read_blocks(f) == {(0x4E31CE00, 0x54FFFEE1): 15, (0xD2800000,): 1}


@needs_mca
def test_disassemble_marks_unknown_encodings() -> None:
    asm = mca.disassemble([0x4E31CE00, 0xFFFFFFFF, 0x4E809400])
    assert asm[0x4E31CE00] == "fmla v0.4s, v16.4s, v17.4s"
    assert asm[0x4E809400] == "sdot v0.4s, v0.16b, v0.16b"
    assert asm[0xFFFFFFFF] is None


@needs_mca
def test_estimate_is_deterministic_and_cached(tmp_path: Path) -> None:
    blocks = {(0x4E31CE00, 0x4E31CE01, 0xF1000400, 0x54FFFFA1): 1000, (0xD2800000,): 3}
    first = mca.estimate(blocks, mca.core("cortex-a76"), cache=tmp_path)
    assert list(tmp_path.glob("*.json")), "the block cycles were not cached"
    again = mca.estimate(blocks, mca.core("cortex-a76"), cache=tmp_path)
    assert first == again and first.cycles > 0 and first.unmodelled_insns == 0
    assert first.insns == 4 * 1000 + 3


def test_core_mapping() -> None:
    assert mca.core("cortex-a72").mcpu == "cortex-a72" and mca.core("cortex-a72").clock_hz == 1.8e9
    assert mca.core("cortex-a76").mcpu == "neoverse-n1" and mca.core("cortex-a76").clock_hz == 2.4e9
    with pytest.raises(mca.CostError, match="no cycle model"):
        mca.core("max")


@needs_mca
@pytest.mark.parametrize("cpu, resource", [("cortex-a72", "A57Unit"), ("cortex-a76", "N1Unit")])
def test_llvm_models_are_the_documented_ones(cpu: str, resource: str) -> None:
    """-mcpu=cortex-a72 is LLVM's A57 model; our A76 stand-in is the Neoverse N1 model."""
    r = subprocess.run([mca.llvm_tool("llvm-mca"), "-mtriple=aarch64", f"-mcpu={mca.core(cpu).mcpu}", "--json"],
                       input="add x0, x0, x1\n", capture_output=True, text=True, check=True)
    assert all(name.startswith(resource) for name in json.loads(r.stdout)["TargetInfo"]["Resources"])


@needs_board
@needs_mca
@pytest.mark.parametrize("cpu, insn, cycles_per_iter", [
    ("cortex-a72", "fmla v{i}.4s, v16.4s, v17.4s", 8.0),  # A72 guide: FMLA Q-form, 1 per cycle
    ("cortex-a76", "fmla v{i}.4s, v16.4s, v17.4s", 4.0),  # A76 guide: FMLA, 2 per cycle
    ("cortex-a76", "sdot v{i}.4s, v16.16b, v17.16b", 4.0),  # A76 guide: SDOT, 2 per cycle
])
def test_published_throughput_anchor(tmp_path: Path, cpu: str, insn: str, cycles_per_iter: float) -> None:
    exe = _loop_program(tmp_path, [insn.format(i=i) for i in range(8)], insn.split()[0])
    counts, blocks = _run(exe, cpu, tmp_path)
    assert counts["matched_insns"] == 10 * ITER + 4
    est = mca.estimate_file(blocks, cpu, cache=tmp_path)
    assert est.unmodelled_insns == 0
    assert est.cycles == pytest.approx(cycles_per_iter * ITER, rel=0.01), est


@needs_board
def test_plugin_instruction_classes(tmp_path: Path) -> None:
    body = ["sdot v0.4s, v1.16b, v2.16b", "sdot v3.4s, v1.16b, v2.4b[1]",  # dot: vector, by element
            "smull v4.8h, v5.8b, v6.8b", "smlal2 v7.4s, v5.8h, v6.8h", "umlal v8.2d, v5.2s, v6.s[1]",  # widening
            "ldr q9, [sp, #-16]", "str q9, [sp, #-32]", "ldp x1, x2, [sp, #-48]",  # loads and stores
            "add v10.4s, v10.4s, v11.4s", "mla v12.4s, v13.4s, v14.4s", "sadalp v15.4s, v16.8h",  # other SIMD
            "fmadd s0, s1, s2, s3", "scvtf d4, x5",  # scalar float
            "add x6, x6, #1"]  # other (with subs and b.ne)
    exe = _loop_program(tmp_path, body, "classes")
    counts, _ = _run(exe, "cortex-a76", tmp_path)
    # outside the loop: mov (before), mov, mov, svc (after) = 4 "other"
    assert counts["matched_classes"] == {"dot": 2 * ITER, "widening_mul": 3 * ITER, "load_store": 3 * ITER,
                                         "simd_other": 3 * ITER, "scalar_float": 2 * ITER, "other": 3 * ITER + 4}
