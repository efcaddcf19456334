"""scripts/bench_models.py's compiled-vs-fake-quant measures: the bit-identical share, the named float layers,
and the rasp5 rows run on the emulated Pi 5 (the bundle runner under qemu-user) instead of build only."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from helpers import load_script
from tvm_lowbit.deploy import board as emu
from tvm_lowbit.passes.report import LoweringReport


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_models")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_identical_share_counts_inputs_equal_bit_for_bit(bench: ModuleType) -> None:
    want = np.arange(12, dtype=np.float32).reshape(4, 3)
    got = want.copy()
    assert bench.identical_share(got, want) == 100.0
    got[1, 2] = np.nextafter(got[1, 2], np.float32(np.inf))  # one ulp on one value of one input
    got[3, 0] = -0.0 if want[3, 0] == 0.0 else got[3, 0]
    assert bench.identical_share(got, want) == 75.0
    got[0, 0] = -0.0  # want[0, 0] is +0.0: equal as floats, not bit for bit
    assert bench.identical_share(got, want) == 50.0


def test_float_layers_name_the_quantizers_and_the_compilers(bench: ModuleType) -> None:
    x = torch.randn(8, 3, 8, 8)
    q = tvm_lowbit.quantize(small_net(), tvm_lowbit.FGQ(group_size=4), x, progress=False)  # last layer float
    art = SimpleNamespace(report=LoweringReport(fallback=[("1", "no kernel for this shape")]))
    names = bench.float_layers(q, art)
    assert any(n.startswith("6 (Linear): ") for n in names), names
    assert "1: compiled in float: no kernel for this shape" in names
    assert bench.float_layers(small_net(), SimpleNamespace(report=LoweringReport())) == []


@pytest.mark.slow
def test_rasp5_rows_run_on_the_emulated_pi5(bench: ModuleType, tmp_path: Path) -> None:
    """The rasp5 row's compiled_agree comes from the emulated Cortex-A76 (int8 end to end: bit-identical to the
    fake-quant model), over two chunks of the compiled batch (the last one padded)."""
    try:
        emu.require_board()
    except emu.BoardError as e:
        pytest.skip(f"no emulated board: {e}")
    x = torch.randn(24, 3, 8, 8)
    q = tvm_lowbit.quantize(small_net(), tvm_lowbit.Auto(budget="agree>=0", formats=("int8",)), x, x,
                            progress=False)
    with torch.no_grad():
        want = q(x[:6]).numpy()
    res = bench.Results(None)
    base = bench.Row("small", "int8", "agree_top1", n=6)
    old = bench.BOARD_VIEWS
    bench.BOARD_VIEWS = 5
    try:
        bench.compile_rows(res, base, q, x[:6], want, ["rasp5"], 4, 0)
    finally:
        bench.BOARD_VIEWS = old
    (row,) = res.rows
    assert row.error is None, row.error
    assert row.target == "rasp5" and row.n == 5 and row.board_s is not None
    assert row.compiled_agree == 100.0 and row.bit_identical == 100.0 and row.max_abs_diff == 0.0
