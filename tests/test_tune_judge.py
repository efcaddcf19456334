"""Records judged inside the model: the estimate attributed to a library's functions (tvm_lowbit.cost.attribute),
the in-model verdicts compile obeys (tune.IN_MODEL_FILE), and the judge end to end on the emulated board."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import FGQ, quantize, tune
from tvm_lowbit.cost import attribute, mca
from tvm_lowbit.cost.attribute import Share
from tvm_lowbit.deploy import board as emu
from tvm_lowbit.judge import Judgement, judge_model

from helpers import board_ready, has_cross_gcc, mca_ready

needs_gcc = pytest.mark.skipif(not has_cross_gcc(), reason="no aarch64 cross gcc")
needs_board = pytest.mark.skipif(not board_ready(), reason="the emulated board is not built (scripts/board/setup.sh)")
needs_mca = pytest.mark.skipif(not mca_ready(), reason="llvm-mca >= 17 is not installed (scripts/board/setup.sh)")

# work_a: a 1000-iteration loop; work_b calls a routine with no symbol (as TVM's parallel-loop bodies) whose address
# it takes with adrp + add: that routine's 500 iterations belong to work_b. _start has no size: unattributed.
PROGRAM = """
.text
.globl _start
_start:
    bl work_a
    bl work_b
    mov x0, #0
    mov x8, #93
    svc #0
.p2align 4
.type work_a, %function
work_a:
    mov x1, #1000
1:  add x2, x2, #1
    subs x1, x1, #1
    b.ne 1b
    ret
.size work_a, .-work_a
.p2align 4
.type work_b, %function
work_b:
    stp x29, x30, [sp, #-16]!
    adrp x3, hidden
    add x3, x3, :lo12:hidden
    blr x3
    ldp x29, x30, [sp], #16
    ret
.size work_b, .-work_b
.p2align 4
hidden:
    mov x1, #500
1:  add x2, x2, #2
    add x4, x4, #3
    subs x1, x1, #1
    b.ne 1b
    ret
"""
WORK_A = 1 + 3 * 1000 + 1
WORK_B = 6 + (1 + 4 * 500 + 1)
START = 5


def _program(tmp: Path) -> Path:
    (tmp / "known.S").write_text(PROGRAM)
    exe = tmp / "known"
    subprocess.run(["aarch64-linux-gnu-gcc", "-nostdlib", "-static", "-o", str(exe), str(tmp / "known.S")],
                   check=True, capture_output=True)
    return exe


@needs_gcc
def test_elf_map_names_functions_and_gives_the_hidden_routine_to_its_caller(tmp_path: Path) -> None:
    exe = _program(tmp_path)
    elf = attribute.elf_functions(exe)
    names = {f.name for f in elf.functions}
    assert {"work_a", "work_b"} <= names and "_start" not in names  # _start has no size
    owned = [owner for owner in elf.gaps.values() if owner is not None]
    assert owned == ["work_b"], elf.gaps  # the routine after work_b, found by its adrp + add, not by position
    a = next(f for f in elf.functions if f.name == "work_a")
    assert elf.name_at(a.start) == "work_a" and elf.name_at(a.end - 4) == "work_a"
    assert elf.name_at(0) is None and elf.section_at(a.start) == "[.text]"


def test_primfunc_names_fold_entry_body_and_compute() -> None:
    assert attribute.primfunc_name("__tvm_ffi_int_conv2d_neon1") == "int_conv2d_neon1"
    assert attribute.primfunc_name("int_conv2d_neon1_compute_") == "int_conv2d_neon1"
    assert attribute.primfunc_name("__truncsfhf2") == "__truncsfhf2"


@needs_gcc
@needs_board
@needs_mca
def test_attribution_of_a_known_program_adds_up(tmp_path: Path) -> None:
    """Exact instruction counts per function, the unsized _start unattributed, and every sum equal to the whole
    estimate and to the plugin's own count."""
    exe = _program(tmp_path)
    out, blocks = tmp_path / "counts.json", tmp_path / "blocks.txt"
    r = emu.board_exec([str(exe)], "cortex-a72", plugin=f"{emu.icount_plugin()},out={out},match=/known,"
                       f"blocks={blocks}")
    assert r.returncode == 0, r.stderr
    att = attribute.attribute_file(blocks, exe, mca.core("cortex-a72"), cache=tmp_path)
    assert att.by_function["work_a"].insns == WORK_A
    assert att.by_function["work_b"].insns == WORK_B
    assert sum(s.insns for s in att.unattributed.values()) == START and list(att.unattributed) == ["[.text]"]
    assert att.total.insns == WORK_A + WORK_B + START == json.loads(out.read_text())["matched_insns"]
    parts = [*att.by_function.values(), *att.unattributed.values()]
    assert sum(p.cycles for p in parts) == pytest.approx(att.total.cycles, rel=1e-12)
    assert att.total.cycles == pytest.approx(mca.estimate_file(blocks, "cortex-a72", cache=tmp_path).cycles, rel=1e-9)
    # the loops dominate: work_a (1000 x 3 insns) costs more than the hidden routine's 500 x 4 in work_b
    assert att.by_function["work_a"].cycles > att.by_function["work_b"].cycles > 0
    assert 0 < att.share_unattributed() < 0.01


def test_a_record_is_kept_only_with_fewer_cycles_and_no_more_instructions() -> None:
    def judged(cycles: float, insns: int) -> Judgement:
        return Judgement("w", "r", ["f"], Share(1000.0, 500), Share(cycles, insns), 1e-6)

    assert judged(999.0, 500).apply and judged(999.0, 400).apply
    assert not judged(1000.0, 400).apply  # equal cycles: no gain
    assert not judged(1006.7, 499).apply  # fewer instructions but more cycles (resnet20 rasp4b's case)
    assert not judged(900.0, 501).apply  # fewer cycles but more instructions
    assert "+0.67%" in judged(1006.7, 499).why and "loses in the model" in judged(1006.7, 499).why
    changed = Judgement("w", "r", ["f"], Share(1000.0, 500), Share(10.0, 5), 1e-6, output_changed=True)
    assert not changed.apply and "output changed" in changed.why


# --------------------------------------------------------------------------------------------
# compile obeys the verdicts (a database tuned on this host, verdicts written by hand)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def tiny(tiny_fgq) -> tuple[nn.Module, np.ndarray]:
    """The tiny model of tests/test_tune.py (conftest.tiny_fgq)."""
    return tiny_fgq


@pytest.fixture
def tuned(tiny_tuned) -> Path:
    """Its database tuned on this host (conftest.tiny_tuned, read only: copy it to write)."""
    return tiny_tuned[0]


def _verdict(task: str, workload: str, apply: bool, model: str = "tiny") -> dict:
    why = "wins in the model: est. cycles -1.00%" if apply else "loses in the model: est. cycles +0.67%"
    return {"workload": workload, "task": task, "models": {model: {"apply": apply, "why": why}}}


def test_compile_applies_only_records_judged_to_win_in_the_model(tiny, tuned, tmp_path) -> None:
    q, x = tiny
    db = tmp_path / "db"
    shutil.copytree(tuned, db)
    ranked = tune.ranked_candidates(db)
    art = tvm_lowbit.compile(q, x, schedules=db)
    names = {w: sorted(n for n in art.tuning.applied if art.tuning.workloads[n] == w) for w in ranked}
    assert len(ranked) == 2 and all(names.values()), (ranked, art.tuning.workloads)
    (conv_w, conv), (act_w, act) = sorted(((w, n) for w, n in names.items()), key=lambda e: "quantize" in e[1][0])
    assert "quantize_act" in act[0] and "conv" in conv[0]
    # the conv's best record loses in the model; the quantizer's best wins
    tune.write_in_model(db, {ranked[conv_w][0][0]: _verdict(conv[0], conv_w, False),
                             ranked[act_w][0][0]: _verdict(act[0], act_w, True)})
    judged = tvm_lowbit.compile(q, x, schedules=db)
    assert judged.tuning.applied == act, judged.tuning.text()
    assert judged.tuning.load.in_model_refusals == [f"{conv[0]} (in tiny: loses in the model: est. cycles +0.67%)"]
    assert "not in the model and are not applied" in judged.tuning.text()
    np.testing.assert_array_equal(judged.run(x), art.run(x))
    # a second model where the quantizer's record loses: refused everywhere (every model must agree)
    tune.write_in_model(db, {ranked[act_w][0][0]: _verdict(act[0], act_w, False, model="other")})
    entry = json.loads((db / tune.IN_MODEL_FILE).read_text())[ranked[act_w][0][0]]
    assert not entry["apply"] and set(entry["models"]) == {"tiny", "other"} and entry["why"].startswith("in other:")
    none = tvm_lowbit.compile(q, x, schedules=db)
    assert not none.tuning.applied and "lost inside the model: 2 refused" in none.tuning.text(), none.tuning.text()
    # a record never judged is not applied where verdicts exist; without the file every winner applies again
    (db / tune.IN_MODEL_FILE).write_text("{}")
    load = tune.load_database(db, winners_only=True)[1]
    assert len(load.in_model_refusals) == 2, load.in_model_refusals
    assert all(r.endswith(" (not judged in a model)") for r in load.in_model_refusals), load.in_model_refusals
    (db / tune.IN_MODEL_FILE).unlink()
    assert sorted(tvm_lowbit.compile(q, x, schedules=db).tuning.applied) == sorted(art.tuning.applied)


def test_write_subset_keeps_only_the_chosen_records(tuned, tmp_path) -> None:
    ranked = tune.ranked_candidates(tuned)
    chosen = {c[-1][0] for c in ranked.values()}  # each workload's slowest winner
    assert tune.write_subset(tuned, chosen, tmp_path / "sub") == len(chosen)
    _, load = tune.load_database(tmp_path / "sub")  # a valid database
    assert load.records == len(chosen) and not load.bad_lines
    sub = tune.ranked_candidates(tmp_path / "sub")
    assert set(sub) == set(ranked) and {k for c in sub.values() for k, _ in c} == chosen


# --------------------------------------------------------------------------------------------
# the judge end to end: a tiny model tuned on the cycle estimate for the Pi 4, judged on the emulated board
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_board
@needs_mca
def test_judge_on_the_emulated_board(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()
    calib = torch.randn(8, 8, 6, 6)
    q = quantize(model, FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq"), calib, progress=False)
    x = calib[:1].numpy()
    d = tmp_path / "rasp4b"
    rep = tune.tune(q, x, "rasp4b", trials_per_task=3, work_dir=d, only_kernels=True, progress=False, seed=0,
                    max_trials_global=6)
    assert rep.trials_run > 0 and rep.failed == 0, rep.errors[:1]
    judged = judge_model(q, x, "rasp4b", d, label="tiny", rounds=1)
    att = judged.default
    parts = [*att.by_function.values(), *att.unattributed.values()]
    assert sum(p.insns for p in parts) == att.total.insns
    assert sum(p.cycles for p in parts) == pytest.approx(att.total.cycles, rel=1e-9)
    assert att.share_unattributed() < 0.05, att.unattributed
    candidates = tune.ranked_candidates(d)
    assert len(judged.judgements) == len(candidates) > 0, (judged.judgements, candidates)
    for j in judged.judgements:  # the record's functions are the model's, and each was measured in both builds
        assert all(f in att.by_function for f in j.functions) and j.default.cycles > 0 and j.tuned.cycles > 0
    verdicts = json.loads((d / tune.IN_MODEL_FILE).read_text())
    assert {k: v["apply"] for k, v in verdicts.items()} == {j.record: j.apply for j in judged.judgements}
    art = tvm_lowbit.compile(q, x, "rasp4b", schedules=d)
    kept = sorted(f for j in judged.judgements if j.apply for f in j.functions)
    assert art.tuning.applied == kept, (art.tuning.text(), judged.table())
    assert len(art.tuning.load.in_model_refusals) == len(judged.judgements) - len(judged.accepted())
