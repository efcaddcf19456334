"""The tuning database under a tune and a compile racing: a read (``compile``'s ``apply_database``) writes
nothing; a repair swaps in new files under the writers' lock while a tune appends, and the tune re-reads
the workload numbering, so no record is lost or attached to the wrong workload."""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tvm_lowbit import tune

N_WORKLOADS, PER_WORKLOAD = 6, 5

# A "tune": the database a real tune writes through (tune.shared_database), committing records whose
# run time encodes their workload (w + k / 100), so a record attached to the wrong workload is found.
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms
    from tvm_lowbit import tune

    def workload(w):
        A = te.placeholder((16, 8 + w), name="A")
        B = te.compute((16, 8 + w), lambda i, j: A[i, j] * 2.0, name="B")
        return tvm.IRModule({{"main": te.create_prim_func([A, B])}})

    db = tune.shared_database(Path(sys.argv[1]))
    target = tvm.target.Target("llvm")
    for k in range(int(sys.argv[2])):
        for w in range({n}):
            mod = workload(w)
            sch = tvm.s_tir.Schedule(mod)
            sch.split(sch.get_loops(sch.get_sblock("B"))[0], [None, 1 + k % 4])
            wl = db.commit_workload(mod)
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, wl, [w + k / 100], target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
            time.sleep(0.02)
    print("done")
""").format(n=N_WORKLOADS)


def _check_records(directory: Path) -> int:
    """Every record's workload is the one its run time names; returns the record count."""
    db, report = tune.load_database(directory)
    assert not report.bad_lines, report.text()
    for r in db.get_all_tuning_records():
        w = int(float(r.run_secs[0]))
        shape = re.findall(r"T\.Buffer\(\((16, \d+)\)", r.workload.mod.script())
        assert shape and shape[0] == f"16, {8 + w}", f"a record of workload {w} is attached to a workload {shape}"
    return report.records


def _inject_damage(directory: Path) -> None:
    """A damaged workload line in the middle of the file (as a crash mid-write leaves it), appended under
    the writers' lock: every workload after it is renumbered by the next repair."""
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(directory / tune.WORKLOAD_FILE, "a") as f:
            f.write('{"damaged": \n')
        fcntl.flock(lock, fcntl.LOCK_UN)


def test_a_read_writes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "db"
    subprocess.run([sys.executable, "-c", WRITER, str(d), "1"],
                   check=True, capture_output=True, timeout=300)
    (d / ".lock").unlink()
    _inject_damage(d)
    (d / ".lock").unlink()
    with (d / tune.RECORD_FILE).open("a") as f:
        f.write("[0, {not json\n")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    _, report = tune.load_database(d)
    assert len(report.bad_lines) == 2 and not report.backups and "repair_database" in report.text()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # no lock file, no rewrite, no backup


def test_tune_and_compile_racing_lose_no_record(tmp_path: Path) -> None:
    d = tmp_path / "db"
    d.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(PER_WORKLOAD)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        repairs = reads = 0
        deadline = time.monotonic() + 240
        while writer.poll() is None:
            assert time.monotonic() < deadline, "the writer did not finish"
            if (d / tune.WORKLOAD_FILE).is_file() and repairs < 3 and reads >= 2 * repairs + 1:
                _inject_damage(d)
                time.sleep(0.1)  # the tune appends a few records behind the damaged line
                rep = tune.repair_database(d)  # the swap, under the lock the tune appends under
                assert rep.bad_lines and rep.backups, rep.text()
                repairs += 1
            # the compile's read, racing the appends and the swaps: never a damaged or misattached record
            if (d / tune.WORKLOAD_FILE).is_file():
                db, report = tune.load_database(d)
                assert all(b.startswith(tune.WORKLOAD_FILE) for b in report.bad_lines), report.bad_lines
                reads += 1
        out, err = writer.communicate(timeout=30)
        assert writer.returncode == 0 and "done" in out, err[-2000:]
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert repairs >= 1, "the race did not happen: the writer finished before the first repair"
    tune.repair_database(d)  # a damaged line injected last is dropped
    assert _check_records(d) == N_WORKLOADS * PER_WORKLOAD  # 0 lost, 0 attached to the wrong workload
    wl_lines = [ln for ln in (d / tune.WORKLOAD_FILE).read_text().splitlines() if ln.strip()]
    assert len(wl_lines) == N_WORKLOADS
    assert all(0 <= json.loads(ln)[0] < N_WORKLOADS for ln in (d / tune.RECORD_FILE).read_text().splitlines())


@pytest.mark.parametrize("damage", ["workload", "record"])
def test_repair_keeps_every_valid_record(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "db"
    subprocess.run([sys.executable, "-c", WRITER, str(d), "2"],
                   check=True, capture_output=True, timeout=300)
    if damage == "workload":  # workload 2's line damaged: its 2 records go, the later workloads renumber
        lines = (d / tune.WORKLOAD_FILE).read_text().splitlines(keepends=True)
        lines[2] = lines[2][: len(lines[2]) // 2] + "\n"
        (d / tune.WORKLOAD_FILE).write_text("".join(lines))
        lost = 2
    else:  # a record line cut off (a killed writer)
        with (d / tune.RECORD_FILE).open("a") as f:
            f.write("[1, {cut")
        lost = 0
    rep = tune.repair_database(d)
    assert rep.bad_lines and len(rep.backups) == 2
    assert not tune.repair_database(d).bad_lines  # the repaired files are clean
    assert _check_records(d) == 2 * N_WORKLOADS - lost  # every other record, on its own workload
