"""The depthwise conv kernels (kernels.depthwise) scheduled for the Pi 4 (Cortex-A72) and the Pi 5
(Cortex-A76) and run on the emulated boards: bit for bit the numpy integer reference (small shapes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import BoardPythons
from test_board import pytestmark  # noqa: F401  (the board tests' skips)
from tvm_lowbit.deploy import board as emu

BOARD_CASES = [  # kind, C, HW, R, stride, signed, in layout, out layout, out mode (test_depthwise.dw_case)
    ("int8", 32, 14, 3, 1, False, "NHWC", "NHWC", "requant"),
    ("ternary", 16, 15, 3, 2, False, "NHWC", "NHWC", "float"),
    ("ternary", 24, 9, 5, 1, False, "NHWC", "NCHW", "acc"),
    ("int8", 16, 10, 5, 2, True, "NCHW", "NHWC", "requant"),
    ("int4", 8, 7, 3, 1, True, "NHWC", "NHWC", "acc"),
]


@pytest.mark.parametrize("cpu", ["rasp4b", "rasp5"])
def test_depthwise_kernels_are_bit_exact_on_the_board(board_python: BoardPythons, tmp_path: Path,
                                                      cpu: str) -> None:
    import tvm

    from test_depthwise import dw_case
    from tvm_lowbit.kernels import depthwise
    from tvm_lowbit.targets import load_target

    target = load_target(cpu)
    feeds, want = {}, {}
    for case in BOARD_CASES:
        func, arrays, expected = dw_case(*case, wide=True)
        name = str(func.attrs["global_symbol"])
        sch = tvm.s_tir.Schedule(func)
        depthwise.schedule_dwconv2d(sch, target.tvm_target())
        lib = tvm.compile(sch.mod, target=target.tvm_target())
        lib.export_library(str(tmp_path / f"{name}.so"), cc=target.compiler_path())
        feeds.update({f"{name}/{i}": a for i, a in enumerate(arrays)})
        want[name] = expected
    ok, err = board_python.run(tmp_path, feeds, emu.qemu_cpu(cpu))
    assert ok, err
    for name, w in want.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        assert got.dtype == w.dtype and np.array_equal(got, w), name
