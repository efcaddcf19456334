"""MetaSchedule tuning: the database under a folder, applied by compile; resume, corruption, two writers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import FGQ, quantize, tune
from tvm_lowbit.compiler import Artifact, CompileError


def _host_conv_kernel() -> str:
    from tvm_lowbit.kernels.avx2 import has_avx2
    from tvm_lowbit.kernels.vnni import vnni_lanes
    from tvm_lowbit.targets import load_target

    host = load_target("x86-host").tvm_target()
    if vnni_lanes(host):  # FGQ's 7-bit alpha codes fold into int8 weights: the VNNI kernel where the CPU has it
        return "ternary_conv2d_vnni"
    return "ternary_conv2d_avx2" if has_avx2(host) else "ternary_conv2d"


CONV = _host_conv_kernel()  # the x86 host's kernel for the tiny model's ternary conv


@pytest.fixture
def tiny(tiny_fgq) -> tuple[nn.Module, np.ndarray]:
    """The tiny model (conftest.tiny_fgq): the stem stays float, the tasks are the ternary conv and the activation
    quantizer."""
    return tiny_fgq


@pytest.fixture
def tuned(tiny_tuned) -> tuple[Path, tune.TuneReport]:
    """Its database, 3 trials a task (conftest.tiny_tuned, shared with tests/test_tune_judge.py: read only)."""
    return tiny_tuned


@pytest.fixture(scope="module")
def default(tiny_fgq) -> Artifact:
    """The tiny model compiled with the default schedules (no database)."""
    q, x = tiny_fgq
    return tvm_lowbit.compile(q, x, schedules=False)


def test_tune_writes_a_standard_database(tuned) -> None:
    from tvm.s_tir import meta_schedule as ms

    d, rep = tuned
    assert {t.kind for t in rep.tasks} == {CONV, "quantize_act"}
    assert rep.trials_run >= 4 and rep.failed == 0, rep.errors[:1]
    lines = (d / tune.RECORD_FILE).read_text().splitlines()
    assert len(lines) == rep.trials_run  # every measured candidate was appended
    stock = ms.database.JSONDatabase(work_dir=str(d))  # MetaSchedule's own reader takes the files
    assert len(stock.get_all_tuning_records()) == len(lines)


def test_compile_applies_the_database_bit_exact(tiny, tuned, default) -> None:
    q, x = tiny
    d, _ = tuned
    art = tvm_lowbit.compile(q, x, schedules=d)
    assert set(art.tuning.applied) == {CONV, "quantize_act"}
    assert art.tuning.missing and CONV not in art.tuning.missing  # float ops: no record
    assert "without a record" in art.tuning.text()
    assert default.tuning is None
    np.testing.assert_array_equal(art.run(x), default.run(x))  # only integer kernels were re-scheduled
    with pytest.raises(CompileError, match="no such tuning database"):
        tvm_lowbit.compile(q, x, schedules=d / "nope")


def test_a_database_tuned_under_emulation_applies_only_when_asked(tiny, tuned, tmp_path, monkeypatch,
                                                                  capsys) -> None:
    q, x = tiny
    d, _ = tuned
    shutil.copytree(d, tmp_path / "x86-host")
    monkeypatch.setattr(tune, "SCHEDULES_DIR", tmp_path)
    assert tvm_lowbit.compile(q, x).tuning is not None  # schedules/<target>/ applies by default
    (tmp_path / "x86-host" / tune.EMULATED_MARK).write_text("timed under qemu\n")
    assert tvm_lowbit.compile(q, x, verbose=True).tuning is None
    assert "tuned on an emulated board and is not applied by default" in capsys.readouterr().out
    assert CONV in tvm_lowbit.compile(q, x, schedules=tmp_path / "x86-host").tuning.applied


def test_compile_applies_only_records_that_beat_the_default_schedule(tiny, tuned, default, tmp_path) -> None:
    """DEFAULTS_FILE holds each workload's default-schedule time from tune time: a workload whose default is faster
    than its best record keeps the default schedule; the others get their best record."""
    q, x = tiny
    d, _ = tuned
    db = tmp_path / "db"
    shutil.copytree(d, db)
    best: dict[str, float] = {}
    kind: dict[str, str] = {}
    for r in tune.load_database(db)[0].get_all_tuning_records():
        key = tune.workload_key(r.workload.mod)
        best[key] = min(best.get(key, float("inf")), float(r.run_secs[0]))
        kind[key] = str(tune.kernel_kind(r.workload.mod))
    assert sorted(kind.values()) == sorted([CONV, "quantize_act"])
    # the conv's default is twice as fast as its best record; the quantizer's default twice as slow
    defaults = {k: {"task": kind[k], "kind": kind[k], "seconds": best[k] * (0.5 if kind[k] == CONV else 2.0)}
                for k in best}
    (db / tune.DEFAULTS_FILE).write_text(json.dumps(defaults))
    art = tvm_lowbit.compile(q, x, schedules=db)
    assert art.tuning.applied == ["quantize_act"] and CONV in art.tuning.missing, art.tuning.text()
    assert art.tuning.load.default_wins == [CONV]
    assert "1 workloads of the database keep the default schedule" in art.tuning.text()
    np.testing.assert_array_equal(art.run(x), default.run(x))
    # without the file (a database tuned before it existed) every best record applies, as before
    (db / tune.DEFAULTS_FILE).unlink()
    assert set(tvm_lowbit.compile(q, x, schedules=db).tuning.applied) == {CONV, "quantize_act"}


def test_a_record_with_more_instructions_than_the_default_is_not_applied(tiny, tuned, tmp_path) -> None:
    """With instruction counts (INSNS_FILE, and "insns" in DEFAULTS_FILE, as a tune on the cycle estimate writes them)
    compile applies the fastest record that beats the default's run time with no more instructions than it: here
    the conv's fastest record executes more instructions than its default, so its second-fastest is applied; every
    quantizer record executes more, so the quantizer keeps its default schedule."""
    q, x = tiny
    d, _ = tuned
    db = tmp_path / "db"
    shutil.copytree(d, db)
    keys: list[str] = []
    workloads, records = tune._parse_files(db, tune.LoadReport(db), keys=keys)
    by_kind: dict[str, list[tuple[float, str]]] = {}
    for (i, r), k in zip(records, keys):
        by_kind.setdefault(str(tune.kernel_kind(workloads[i].mod)), []).append((float(r.run_secs[0]), k))
    conv = sorted(by_kind[CONV])
    assert len({s for s, _ in conv}) >= 2, conv  # two records of distinct run time
    slowest = max(s for s, _ in conv + by_kind["quantize_act"])
    defaults = {tune.workload_key(w.mod): {"task": str(tune.kernel_kind(w.mod)), "seconds": 2 * slowest,
                                           "insns": 1000.0} for w in workloads}
    (db / tune.DEFAULTS_FILE).write_text(json.dumps(defaults))
    counts = [(conv[0][1], 1000.5)] + [(k, 900.0) for _, k in conv[1:]]  # the fastest conv record: +0.5 instructions
    counts += [(k, 1001.0) for _, k in by_kind["quantize_act"]]
    tune.append_instructions(db, counts)
    mem, load = tune.load_database(db, winners_only=True)
    conv_wl = next(w for w in workloads if tune.kernel_kind(w.mod) == CONV)
    applied = mem.get_top_k(mem.commit_workload(conv_wl.mod), 1)
    assert [float(r.run_secs[0]) for r in applied] == [min(s for s, _ in conv[1:])], (conv, applied)
    assert load.default_wins == ["quantize_act"] and sorted(load.insns_vetoes) == sorted([CONV, "quantize_act"])
    art = tvm_lowbit.compile(q, x, schedules=db)
    assert art.tuning.applied == [CONV] and "quantize_act" in art.tuning.missing, art.tuning.text()
    assert "executes more instructions than the default schedule" in art.tuning.text()
    versus = {v.task: v for v in tune.versus_default(workloads, records, defaults, tune.read_instructions(db), keys)}
    assert versus[CONV].wins and versus[CONV].insns_veto and versus[CONV].best_insns == 900.0
    assert not versus["quantize_act"].wins and versus["quantize_act"].best is None
    # the same records with no instruction count for the default: run time alone decides, the fastest applies
    for e in defaults.values():
        del e["insns"]
    (db / tune.DEFAULTS_FILE).write_text(json.dumps(defaults))
    mem, load = tune.load_database(db, winners_only=True)
    assert [float(r.run_secs[0]) for r in mem.get_top_k(mem.commit_workload(conv_wl.mod), 1)] == [conv[0][0]]
    assert not load.default_wins and not load.insns_vetoes


def test_a_database_for_another_model_says_so_in_one_line(tuned) -> None:
    d, _ = tuned
    torch.manual_seed(1)  # the tiny model's layers on 6x6 inputs: every workload has other shapes
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()
    calib = torch.randn(16, 8, 6, 6)
    q = quantize(model, FGQ(group_size=4, act_bits=8, first_layer="float"), calib, progress=False)
    art = tvm_lowbit.compile(q, calib[:1].numpy(), schedules=d)
    text = art.tuning.text()
    assert not art.tuning.applied and "\n" not in text, text
    assert "no record matches any of this model's" in text and "default schedules used" in text, text


def test_shipped_pi_databases_are_tuned_on_the_estimate() -> None:
    # tuned by scripts/tune_pi.py on the cycle estimate; every workload's default schedule was measured with them
    for name in ("rasp4b", "rasp5"):
        d = tune.SCHEDULES_DIR / name
        if (d / tune.WORKLOAD_FILE).is_file():
            assert (d / tune.ESTIMATE_MARK).is_file() and not (d / tune.EMULATED_MARK).exists(), d
            workloads = [json.loads(ln) for ln in (d / tune.WORKLOAD_FILE).read_text().splitlines() if ln.strip()]
            defaults = tune.read_defaults(d)
            assert len(defaults) >= len(workloads), f"{d}: a workload has no default measurement"
            # the estimate counts instructions too: every default and every record has its count (compile's rule)
            assert all(e.get("insns", 0) > 0 for e in defaults.values() if e["seconds"] is not None), d
            records = [json.loads(ln)[1] for ln in (d / tune.RECORD_FILE).read_text().splitlines() if ln.strip()]
            measured = {json.dumps(r[0]) for r in records if max(r[1]) < 1e9}  # failed candidates have no count
            assert len(tune.read_instructions(d)) >= len(measured) > 0, d
            # every record compile may apply was judged inside a model (tvm_lowbit.judge), and won there
            verdicts = tune.read_in_model(d)
            assert verdicts is not None, f"{d}: no {tune.IN_MODEL_FILE} (scripts/tune_pi.py --judge-only)"
            keys: list[str] = []
            tune._parse_files(d, tune.LoadReport(d), keys=keys)
            kept = [k for k, v in verdicts.items() if v["apply"]]
            assert set(kept) <= set(keys), f"{d}: a verdict names a record the database does not hold"
            assert all(all(m["record_cycles"] < m["default_cycles"] and m["record_insns"] <= m["default_insns"]
                           for m in verdicts[k]["models"].values()) for k in kept), d


def test_rerun_resumes_without_new_trials(tiny, tuned, tmp_path, capsys) -> None:
    """`tvm-lowbit tune` on the saved model finds the API run's records: only missing trials would run."""
    from tvm_lowbit.cli import main
    from tvm_lowbit.compiler import save_quantized

    q, x = tiny
    d = tmp_path / "x86-host"  # a copy: the session's database stays as tuned
    shutil.copytree(tuned[0], d)
    first = tuned[1]
    n = len((d / tune.RECORD_FILE).read_text().splitlines())
    pt2 = save_quantized(q, x, tmp_path / "tiny.pt2")
    main(["tune", str(pt2), "--trials", "3", "--kernels-only", "--out", str(d)])
    out = capsys.readouterr().out
    conv_records = sum(1 for r in tune.load_database(d)[0].get_all_tuning_records()
                       if "ternary_conv2d" in str(r.workload.mod))
    assert conv_records == 3  # the conv task was complete: nothing new ran for it
    ran = int(out.split(" trials run")[0].split()[-1])
    skipped = int(out.split(" already in the database")[0].split()[-1])
    assert skipped >= 3 and ran < first.trials_run, out  # only the small quantize_act space may still run
    assert len((d / tune.RECORD_FILE).read_text().splitlines()) == n + ran


def test_tensorized_records_load_whole_in_a_fresh_process(tuned) -> None:
    """Records of tensorized kernels name the project's tensor intrinsics in their traces: a fresh process
    (nothing registered yet) must still read every record, not drop them as damaged."""
    d, _ = tuned
    lines = len((d / tune.RECORD_FILE).read_text().splitlines())
    code = (f"from tvm_lowbit import tune; _, r = tune.load_database({str(d)!r}, repair=False); "
            "print(r.records, len(r.bad_lines))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == [str(lines), "0"], out.stdout


def test_a_global_budget_shared_by_the_gradient_scheduler(tiny, tmp_path) -> None:
    q, x = tiny
    rep = tune.tune(q, x, "x86-host", trials_per_task=8, max_trials_global=6, work_dir=tmp_path / "g",
                    only_kernels=True, progress=False, seed=0)  # auto: gradient (6 < 2 tasks x 8)
    assert 2 <= rep.trials_run <= 6 + 2 and rep.failed == 0, rep.errors[:1]  # + one batch of overshoot
    with pytest.raises(ValueError, match="round-robin"):
        tune.tune(q, x, "x86-host", work_dir=tmp_path / "h", scheduler="fastest")


def test_corrupted_database_keeps_valid_records(tuned, tmp_path) -> None:
    d, _ = tuned
    bad = tmp_path / "db"
    shutil.copytree(d, bad)
    rec = bad / tune.RECORD_FILE
    lines = rec.read_text().splitlines()
    rec.write_text("\n".join(lines[:-1]) + "\n" + "{not json\n" + lines[-1][: len(lines[-1]) // 2])  # truncated
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    _, read = tune.load_database(bad)  # a read drops the damaged record and writes nothing
    assert read.records == len(lines) - 1 and len(read.bad_lines) == 1 and not read.backups, read.bad_lines
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before
    db, report = tune.load_database(bad, repair=True)
    assert report.records == len(lines) - 1 and len(report.bad_lines) == 2, report.bad_lines
    assert "corrupted" in report.text() and report.backups and report.backups[0].is_file()
    assert len(db.get_all_tuning_records()) == len(lines) - 1
    _, again = tune.load_database(bad)  # the files were rewritten without the damaged lines
    assert not again.bad_lines and again.records == len(lines) - 1


WRITER = textwrap.dedent("""
    import sys
    from tvm_lowbit import tune
    src, dst, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    records = tune.load_database(src)[0].get_all_tuning_records()
    db = tune.shared_database(__import__("pathlib").Path(dst))
    for _ in range(rounds):
        for r in records:
            db.commit_workload(r.workload.mod)
            db.commit_tuning_record(r)
""")


def test_two_writers_keep_all_records(tuned, tmp_path) -> None:
    d, _ = tuned
    n = len(tune.load_database(d)[0].get_all_tuning_records())
    dst = tmp_path / "shared"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(d), str(dst), "5"]) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    _, report = tune.load_database(dst)
    assert not report.bad_lines and report.records == 2 * 5 * n
    assert report.workloads == len({json.loads(ln)[0] for ln in (d / tune.WORKLOAD_FILE).read_text().splitlines()})


def test_cli_tune_board_needs_a_tracker(capsys) -> None:
    from tvm_lowbit.cli import main

    with pytest.raises(SystemExit):
        main(["tune", "--target", "rasp3b"])  # no cycle model for its core
    assert "--tracker" in capsys.readouterr().err


def test_cli_compile_schedules_option(tiny, tuned, tmp_path, capsys, monkeypatch) -> None:
    from tvm_lowbit.cli import main
    from tvm_lowbit.compiler import save_quantized

    q, x = tiny
    d, _ = tuned
    pt2 = save_quantized(q, x, tmp_path / "q.pt2")
    main(["compile", str(pt2), "--out", str(tmp_path / "a"), "--schedules", str(d)])
    assert f"tuned schedules from {d}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compile", str(pt2), "--out", str(tmp_path / "b"), "--schedules", str(tmp_path / "nope")])
    assert "no such tuning database folder" in capsys.readouterr().err
    shutil.copytree(d, tmp_path / "dbs" / "x86-host")
    (tmp_path / "dbs" / "x86-host" / tune.EMULATED_MARK).write_text("timed under qemu\n")
    monkeypatch.setattr(tune, "SCHEDULES_DIR", tmp_path / "dbs")
    main(["compile", str(pt2), "--out", str(tmp_path / "c")])
    assert "tuned on an emulated board and is not applied by default" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TVM_LOWBIT_BOARD_TUNE"),
                    reason="tuning on the emulated board takes ~2 minutes: set TVM_LOWBIT_BOARD_TUNE=1")
def test_tune_on_the_emulated_board_over_rpc(tiny, tmp_path) -> None:
    from tvm_lowbit.deploy import board as emu

    q, x = tiny
    emu.require_board()
    tracker = emu.free_port()
    state = emu.start("test-tune", "rasp4b", boards=1, rpc_port=emu.free_port(), tracker_port=tracker)
    try:
        rep = tune.tune(q, x, "rasp4b", trials_per_task=2, work_dir=tmp_path / "rasp4b", only_kernels=True,
                        boards=tune.RPCBoards("127.0.0.1", tracker, state.key), progress=False, seed=0)
    finally:
        emu.stop("test-tune")
    assert rep.trials_run >= 2 and rep.failed == 0, rep.errors[:1]
    _, load = tune.load_database(tmp_path / "rasp4b")  # the aarch64 traces (transform_layout) read back
    assert load.records == rep.trials_run and not load.bad_lines


def test_board_targets_tune_with_the_estimate_unless_boards_are_given() -> None:
    import dataclasses

    from tvm_lowbit.targets import load_target

    pi5, pi4 = load_target("rasp5"), load_target("rasp4b")
    boards = tune.RPCBoards("127.0.0.1", 9190, "rasp5")
    assert tune.measurement(load_target("x86-host"), None) == "local"
    assert tune.measurement(pi5, None) == "estimate" and tune.measurement(pi4, None) == "estimate"
    assert tune.measurement(pi5, boards) == "rpc"
    no_emulator = dataclasses.replace(pi4, qemu_cpu=None)  # a board with no emulated board: only RPC measures it
    assert tune.measurement(no_emulator, boards) == "rpc"
    with pytest.raises(tune.TuneError, match="boards=RPCBoards"):
        tune.measurement(no_emulator, None)
    with pytest.raises(tune.TuneError, match="no cycle model"):  # armv7 Cortex-A53: no llvm-mca model here
        tune.measurement(load_target("rasp3b"), None)


def test_estimated_and_measured_run_times_do_not_mix(tmp_path) -> None:
    d = tmp_path / "db"
    d.mkdir()
    tune.check_database_kind(d, "estimate")
    tune.check_database_kind(d, "rpc")
    (d / tune.EMULATED_MARK).write_text("timed under qemu\n")
    with pytest.raises(tune.TuneError, match="measured under emulation"):
        tune.check_database_kind(d, "estimate")
    tune.check_database_kind(d, "rpc")
    (d / tune.EMULATED_MARK).unlink()
    (d / tune.ESTIMATE_MARK).write_text("estimated\n")
    tune.check_database_kind(d, "estimate")
    for how in ("rpc", "local"):
        with pytest.raises(tune.TuneError, match="estimated run times"):
            tune.check_database_kind(d, how)


def _estimate_ready() -> bool:
    from tvm_lowbit.cost import mca
    from tvm_lowbit.deploy import board as emu

    try:
        version = mca.llvm_version()
    except mca.CostError:
        return False
    d = emu.board_dir()
    return version.startswith("19") and (d / "plugins" / "libicount.so").is_file() and \
        (d / "bin" / "python3").is_file() and shutil.which("aarch64-linux-gnu-g++") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _estimate_ready(), reason="the emulated board or llvm-mca 19 is missing "
                    "(bash scripts/board/setup.sh)")
def test_tune_rasp5_with_the_cycle_estimate(tmp_path) -> None:
    torch.manual_seed(0)
    # 12 outputs: not a multiple of 16, so the fixed-code tbl kernel (not tunable) refuses it and a tunable one runs
    model = nn.Sequential(nn.Linear(32, 12)).eval()
    calib = torch.randn(8, 32)
    q = quantize(model, FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq"), calib, progress=False)
    d = tmp_path / "rasp5"
    rep = tune.tune(q, calib[:1].numpy(), "rasp5", trials_per_task=2, work_dir=d, only_kernels=True,
                    progress=False, seed=0, max_trials_global=4, estimate_workers=2)
    assert rep.trials_run >= 2 and rep.failed == 0, rep.errors[:1]
    mark = (d / tune.ESTIMATE_MARK).read_text()
    assert "NeoverseN1Model" in mark and "llvm: 19" in mark, mark
    assert not (d / tune.EMULATED_MARK).exists()
    db, load = tune.load_database(d)
    assert load.records == rep.trials_run and not load.bad_lines
    secs = [float(r.run_secs[0]) for r in db.get_all_tuning_records()]
    # estimated run time of a 32x12 ternary dense call at 2.4 GHz: finite, positive, well under a millisecond
    assert len(secs) == rep.trials_run and all(np.isfinite(s) and 0 < s < 1e-3 for s in secs), secs
    # every record's executed instructions were recorded under its key, and the default's beside its run time
    keys: list[str] = []
    tune._parse_files(d, tune.LoadReport(d), keys=keys)
    counts = tune.read_instructions(d)
    assert len(keys) == rep.trials_run and all(k in counts and counts[k] > 0 for k in keys), (keys, counts)
    defaults = list(tune.read_defaults(d).values())
    assert defaults and all(v["insns"] > 0 and v["seconds"] > 0 for v in defaults), defaults
    assert len(rep.versus) == len(defaults), (rep.versus, defaults)
    assert sorted(v.default_insns for v in rep.versus) == sorted(v["insns"] for v in defaults), rep.versus
