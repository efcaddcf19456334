"""The MetaSchedule runner whose run time is the cycle estimate (tvm_lowbit.cost.runner), on one small kernel:
a float matmul cross-compiled for the Pi 5 and run on the emulated board. Each measurement starts the board's
Python under qemu (10-30 s on a loaded 2-core host), hence `slow`; skipped when the board is not built."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tvm_lowbit.cost import mca
from tvm_lowbit.deploy import board as emu


def _ready() -> bool:
    d = emu.board_dir()
    try:
        mca.llvm_version()
    except mca.CostError:
        return False
    return (d / "plugins" / "libicount.so").is_file() and (d / "bin" / "python3").is_file() and \
        shutil.which("aarch64-linux-gnu-g++") is not None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _ready(), reason="the emulated board or llvm-mca is missing "
                                 "(bash scripts/board/setup.sh)")]


def _matmul(n: int, path: Path) -> object:
    """An n x n x n float32 matmul PrimFunc built for rasp5 into ``path``; returns its argument infos."""
    import tvm
    from tvm import te
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.support import cc

    from tvm_lowbit.targets import load_target

    a, b = te.placeholder((n, n), "float32", name="A"), te.placeholder((n, n), "float32", name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    tvm.compile(mod, target=load_target("rasp5").tvm_target()).export_library(
        str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return ArgInfo.from_prim_func(mod["main"])


def test_estimate_runner_on_a_small_kernel(tmp_path: Path) -> None:
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from tvm_lowbit.cost.runner import EstimateRunner

    small, big = tmp_path / "mm16.so", tmp_path / "mm32.so"
    info16, info32 = _matmul(16, small), _matmul(32, big)
    runner = EstimateRunner("rasp5", max_workers=2)
    try:
        results = [f.result() for f in runner.run([RunnerInput(str(small), "cpu", info16),
                                                   RunnerInput(str(big), "cpu", info32),
                                                   RunnerInput(str(tmp_path / "missing.so"), "cpu", info16)])]
    finally:
        runner.close()  # the warm boards
    assert all(r.error_msg is None for r in results[:2]), [r.error_msg for r in results]
    t16, t32 = (float(r.run_secs[0]) for r in results[:2])
    # 2.4 GHz Pi 5: 4096 multiply-adds take at least 512 cycles (the A76 peak: two 4-lane FMLA pipes) and
    # less than 40960 (10 cycles per multiply-add would be worse than scalar code)
    assert 512 / 2.4e9 <= t16 < 40960 / 2.4e9, t16
    # 8x the multiply-adds cost more than 4x the time, and no less than the A76 peak allows
    assert t32 > 4 * t16 and t32 >= 8 * 512 / 2.4e9, (t16, t32)
    assert results[2].run_secs is None and "missing.so" in str(results[2].error_msg)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_killed_board_fails_its_candidate_and_the_next_ones_run(tmp_path: Path) -> None:
    """The warm board (qemu) is killed while it runs a candidate: that candidate is a failed measurement naming the
    board's end, the board starts again, and the candidates after it are measured as usual."""
    import os
    import signal
    import threading
    import time

    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from tvm_lowbit.cost.runner import EstimateRunner

    small, big = tmp_path / "mm16.so", tmp_path / "mm64.so"
    info16, info64 = _matmul(16, small), _matmul(64, big)
    runner = EstimateRunner("rasp5", max_workers=1)
    board = runner.boards[0]
    killed: list[int] = []

    def kill_during_the_second_candidate() -> None:
        deadline = time.time() + 900
        while time.time() < deadline and board.served < 2:
            time.sleep(0.01)
        while time.time() < deadline and not killed:
            pid = board.pid
            if pid is not None and _children(pid):  # the server forked the candidate's child: it is running
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_during_the_second_candidate)
    killer.start()
    try:
        futures = runner.run([RunnerInput(str(small), "cpu", info16), RunnerInput(str(big), "cpu", info64),
                              RunnerInput(str(small), "cpu", info16), RunnerInput(str(big), "cpu", info64)])
        results = [f.result() for f in futures]
    finally:
        killer.join()
        runner.close()
    assert killed, "the board was never seen running the second candidate"
    errors = [r.error_msg for r in results]
    assert errors[0] is None and errors[2] is None and errors[3] is None, errors
    assert results[1].run_secs is None and "ended" in str(errors[1]), errors[1]
    assert board.starts == 2 and board.pid is None  # started again after the kill; closed at the end
    # the restarted board measures as the first one did (the estimate is deterministic)
    assert float(results[0].run_secs[0]) == float(results[2].run_secs[0])
    assert float(results[3].run_secs[0]) > 4 * float(results[2].run_secs[0])
