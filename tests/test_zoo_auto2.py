"""Auto whose search keeps every layer float (issue 16: "nothing stays float without being named").

On mobilenet_v2 at 32x32 (``bench_models.py``'s CNN Auto, 432 check views, 1 standard error to spare) the
only mix that met ``agree>=90`` was the most accurate one, every layer float; ``build_mixed`` returned a
copy of the float model with no ``tvm_lowbit_report`` and ``quantize_auto`` stopped with
``AttributeError: 'MobileNetV2' object has no attribute 'tvm_lowbit_report'``.  The all-float mix must come
back like any other: a report naming every layer Auto left float, and a model that compiles.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit.quantizers.auto import Auto, build_mixed


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(self.stem(x)).mean((2, 3)))


LAYERS = {"stem.0": "Conv2d", "dw.0": "Conv2d", "fc": "Linear"}


def _data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return Small().eval(), torch.randn(16, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)


def test_build_mixed_all_float_names_every_layer() -> None:
    model, calib, _ = _data()
    q = build_mixed(model, {n: "float" for n in LAYERS}, calib, Auto(formats=("int4", "float"), calibration="minmax"))
    rep = q.tvm_lowbit_report
    assert not rep.quantized
    assert {(s.path, s.cls) for s in rep.left_float} == set(LAYERS.items()), rep.left_float
    assert all(s.chosen and s.reason == f"Auto chose float for {s.path}" for s in rep.left_float), rep.left_float


def test_auto_search_ending_all_float_returns_a_named_report_and_compiles() -> None:
    model, calib, val = _data()
    # cos>=1: only the float model itself reads a cosine of 1 to FP32 on every check input
    cfg = Auto(budget="cos>=1", formats=("int4", "float"), calibration="minmax", sensitivity_images=4, max_evals=3)
    q = tvm_lowbit.quantize(model, cfg, calib, val)
    assert {s.path for s in q.tvm_lowbit_report.left_float} == set(LAYERS), q.tvm_lowbit_report.left_float
    assert set(q.tvm_lowbit_auto.formats.values()) == {"float"}, q.tvm_lowbit_auto.formats
    art = tvm_lowbit.compile(q, val[:4], "x86-host")
    assert not art.report.lowered and not art.report.fallback
    with torch.no_grad():
        want = model(val[:4]).numpy()
    np.testing.assert_allclose(art.run(val[:4].numpy()), want, rtol=1e-5, atol=1e-5)
