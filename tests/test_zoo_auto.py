"""Auto mixes of the torchvision zoo's layer kinds, compiled (issue 16: "every torchvision model quantizes
(FGQ N=4, int8, Auto) and compiles ... nothing stays float without being named; compiled vs fake-quant
bit-exact on the integer parts").

An Auto mix puts int4, int8 and float layers next to each other (``bench_models.py``'s ``CNN_AUTO_FORMATS``;
mobilenet_v3_small's mix at 32x32: 15 int4, 10 int8, 29 float of 54).  A small network with the zoo's layer
kinds (a stride-2 stem, a depthwise conv, squeeze-excitation with a hard-sigmoid gate, a grouped conv, a
residual add, a linear head), each layer given a format by hand (``auto.build_mixed``, the function Auto's
search builds every mix with), is compiled for x86: every lowered layer's int32 accumulators must equal an
independent int64 reference computed from the codes the fake-quant model fed it, every layer Auto made float
must be named by the quantizer (``tvm_lowbit_report.left_float``) and nothing else may stay float; and built
for rasp5, the bundle on the emulated Pi 5 gives the fake-quant outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import qmath
from tvm_lowbit.deploy import board as emu
from tvm_lowbit.deploy.bundle import export_bundle, run_bundle_emulated
from tvm_lowbit.quantizers.auto import Auto, build_mixed
from tvm_lowbit.quantizers.layers import QConv2d, quant_layers


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class ZooKinds(nn.Module):
    """The layer kinds of the six torchvision models in one small network."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, 3, 2)
        self.expand = _cbr(16, 32, 1)
        self.dw = _cbr(32, 32, 3, groups=32)
        self.se_reduce, self.se_expand = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.grouped = _cbr(16, 32, 3, groups=2)
        self.head = _cbr(32, 48, 1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.dw(self.expand(x))
        g = nn.functional.hardsigmoid(self.se_expand(nn.functional.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        x = x + self.project(h * g)
        return self.fc(self.head(self.grouped(x)).mean((2, 3)))


# int4 / int8 / float interleaved: a float layer between integer ones (expand), a float SE conv feeding an
# integer one, int4 depthwise and grouped convs, the int8 stem and head.
MIX = {"stem.0": "int8", "expand.0": "float", "dw.0": "int4", "se_reduce": "float", "se_expand": "int4",
       "project.0": "int4", "grouped.0": "int4", "head.0": "int8", "fc": "int8"}


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _record(codes: dict[str, np.ndarray], name: str, c: torch.Tensor) -> torch.Tensor:
    codes[name] = c.detach().numpy().copy()
    return c


@dataclass
class Mixed:
    q: nn.Module
    x: torch.Tensor
    want: np.ndarray             # the fake-quant logits of x
    codes: dict[str, np.ndarray]  # the input codes each integer layer got in PyTorch


@pytest.fixture(scope="module")
def mixed() -> Mixed:
    torch.manual_seed(0)
    model = ZooKinds().eval()
    _randomize_bn(model)
    g = torch.Generator().manual_seed(2)
    calib = torch.randn(32, 3, 32, 32, generator=g)
    x = torch.randn(4, 3, 32, 32, generator=g)
    q = build_mixed(model, MIX, calib, Auto(formats=("int4", "int8", "float"), calibration="minmax"))
    codes: dict[str, np.ndarray] = {}
    layers = quant_layers(q)
    for name, m in layers.items():  # the codes each layer's quantizer gives (instance attribute)
        orig = m.quantize_input
        m.quantize_input = lambda t, name=name, orig=orig: _record(codes, name, orig(t))
    with torch.no_grad():
        want = q(x).numpy()
    for m in layers.values():
        del m.quantize_input
    return Mixed(q, x, want, codes)


def test_auto_mix_of_zoo_layer_kinds_is_bit_exact_on_the_integer_layers(mixed: Mixed) -> None:
    q, x, want, codes = mixed.q, mixed.x, mixed.want, mixed.codes
    floats = {n for n, f in MIX.items() if f == "float"}
    left = {s.path: s.reason for s in q.tvm_lowbit_report.left_float}
    assert set(left) == floats, left
    assert all("Auto chose float" in why for why in left.values()), left
    layers = quant_layers(q)
    assert set(layers) == set(MIX) - floats

    art = tvm_lowbit.compile(q, x, "x86-host", expose_acc=True)
    assert not art.report.fallback, art.report.fallback
    assert set(art.report.lowered) == set(layers)
    outs = art.run_all(x.numpy())
    for name, acc in zip(art.report.lowered, outs[1:]):
        m = layers[name]
        w = m.w_int.numpy().astype(np.int64)
        c = codes[name].astype(np.int64)
        ref = qmath.conv2d_int_np(c, w, m.stride, m.padding, m.dilation, m.groups) if isinstance(m, QConv2d) \
            else c @ w.T
        np.testing.assert_array_equal(acc.astype(np.int64), ref, err_msg=f"layer {name} ({MIX[name]})")
    np.testing.assert_allclose(outs[0], want, rtol=0, atol=1e-4)
    assert (outs[0].argmax(1) == want.argmax(1)).all()


@pytest.mark.slow
def test_auto_mix_of_zoo_layer_kinds_on_an_emulated_pi5(mixed: Mixed, tmp_path: Path, one_thread) -> None:
    """The same mix built for rasp5 (int4 and int8 layers on the sdot / depthwise / generic aarch64 kernels,
    their integer requantization epilogues) gives the fake-quant logits on the emulated Cortex-A76."""
    try:
        emu.require_board()
    except emu.BoardError as e:
        pytest.skip(str(e))
    x = mixed.x.numpy()
    art = tvm_lowbit.compile(mixed.q, x, "rasp5")
    assert not art.report.fallback, art.report.fallback
    bundle = export_bundle(art, tmp_path / "bundle", x, mixed.want, atol=1e-4)
    run = run_bundle_emulated(bundle, emu.qemu_cpu("rasp5"), runs=1)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"max_abs_diff \S+ atol \S+ OK", run.stdout), run.stdout
