"""Auto whose search keeps every layer float (issue 16: "nothing stays float without being named").

On mobilenet_v2 at 32x32 (``bench_models.py``'s CNN Auto, 432 check views, 1 standard error to spare) the
only mix that met ``agree>=90`` was the most accurate one, every layer float; ``build_mixed`` returned a
copy of the float model with no ``tvm_lowbit_report`` and ``quantize_auto`` stopped with
``AttributeError: 'MobileNetV2' object has no attribute 'tvm_lowbit_report'``.  The all-float mix must come
back like any other: a report naming every layer Auto left float, and a model that compiles.

Also a guard of ``scripts/compare_layers.py``'s ``--codes`` and ``--quantized`` paths on a small Auto mix: the
codes each lowered kernel read in the build, returned beside its accumulators, equal PyTorch's, the
accumulators equal an int64 reference of them, and a saved quantized model loads back computing the same.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit.quantizers.auto import Auto, build_mixed
from tvm_lowbit.quantizers.layers import quant_layers

from helpers import load_script


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


def test_compare_layers_codes_and_saved_model_on_an_auto_mix(tmp_path) -> None:  # noqa: ANN001
    cl = load_script("compare_layers")
    model, calib, val = _data()
    q = build_mixed(model, {"stem.0": "int8", "dw.0": "float", "fc": "int4"}, calib,
                    Auto(formats=("int4", "int8", "float"), calibration="minmax"))
    x = val[:4]
    ratios: dict[str, np.ndarray] = {}
    want, codes = cl.record_codes(q, x, ratios)
    art, shapes = cl.board_build(q, x.numpy(), "x86-host", codes=True)
    names = list(art.report.lowered)
    assert sorted(names) == ["fc", "stem.0"]
    assert len(shapes) == 1 + 2 * len(names)
    flat = art.run_all(x.numpy())[0]
    ends = np.cumsum([int(np.prod(sh[1:])) for sh in shapes])
    outs = [flat[:, e - int(np.prod(sh[1:])):e].reshape((4,) + sh[1:]) for e, sh in zip(ends, shapes)]
    layers = quant_layers(q)
    for k, name in enumerate(names):
        got = cl.to_nchw(outs[1 + len(names) + k], codes[name])
        assert any(np.array_equal(g, codes[name]) for g in got), name
        np.testing.assert_array_equal(outs[1 + k].astype(np.int64), cl.int_ref(layers[name], codes[name]), err_msg=name)
        assert np.all(cl.midpoint_ulps(ratios[name]) >= 0)
    np.testing.assert_allclose(outs[0], want, rtol=0, atol=1e-4)

    path = tmp_path / "q.pt"
    cl.save_quantized(q, path)
    back = cl.load_quantized(path)
    assert set(quant_layers(back)) == set(layers)
    with torch.no_grad():
        np.testing.assert_array_equal(back(x).numpy(), q(x).numpy())
    assert {s.path for s in back.tvm_lowbit_report.left_float} == {"dw.0"}
