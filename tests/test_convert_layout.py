"""The NHWC integer region (passes.convert_layout): after lowering for an x86 target the only transposes
left are at the float boundaries, and the compiled model stays bit-exact (tests/test_compile.py checks the
built-in model; here a small residual network)."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from torch import nn

import tvm_lowbit
from tvm_lowbit import FGQ, quantize
from tvm_lowbit.compiler import import_torch, layer_infos
from tvm_lowbit.passes import lower_integer_layers
from tvm_lowbit.passes.convert_layout import integer_layout

X86_AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})
X86_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
X86_PLAIN = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
RASP5 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                           "mattr": ["+neon", "+dotprod"]})
RASP4 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]})


class Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(y)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _qmodel() -> nn.Module:
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 10, 10)
    return quantize(Res().eval(), FGQ(group_size=4, alpha_bits=7), calib, progress=False)


def test_layout_by_target() -> None:
    assert integer_layout(X86_AVX2) == "NHWC"
    assert integer_layout(X86_PLAIN) == "NCHW" and integer_layout(None) == "NCHW"
    assert integer_layout(RASP5) == "NHWC" and integer_layout(RASP4) == "NHWC"  # kernels.neon reads/writes NHWC


def test_transposes_only_at_float_boundaries() -> None:
    q = _qmodel()
    mod = import_torch(q, torch.randn(1, 3, 10, 10))
    out, report = lower_integer_layers(mod, layer_infos(q), target=X86_VNNI)
    assert not report.fallback and len(report.lowered) == 3
    assert set(report.kernel_names.values()) == {"int_conv2d_vnni", "ternary_conv2d_vnni"}
    # the network input and the flatten before the float classifier; none around the integer layers
    assert out["main"].script().count("R.permute_dims") == 2
    # AVX2 only: the signed int8 stem runs on the generic NCHW kernel, with a transpose on each side
    out, report = lower_integer_layers(mod, layer_infos(q), target=X86_AVX2)
    assert report.kernel_names["stem"] == "int_conv2d"
    assert out["main"].script().count("R.permute_dims") == 4
    # aarch64: the folded-alpha kernels of kernels.neon take NHWC, the stem (signed codes) too
    for target, isa in ((RASP5, "a76"), (RASP4, "neon")):
        out, report = lower_integer_layers(mod, layer_infos(q), target=target)
        assert not report.fallback and set(report.fast_kernels.values()) == {isa}, report.kernel_names
        assert out["main"].script().count("R.permute_dims") == 2
    nchw, _ = lower_integer_layers(mod, layer_infos(q), target=X86_PLAIN)
    assert nchw["main"].script().count("R.permute_dims") == 0


def test_nhwc_model_bit_exact_with_fake_quant() -> None:
    q = _qmodel()
    x = np.random.default_rng(1).standard_normal((2, 3, 10, 10)).astype(np.float32)
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    for target in ({"kind": "llvm", "mcpu": "x86-64-v3"}, {"kind": "llvm", "mcpu": "x86-64"}):
        spec = tvm_lowbit.targets.load_target("x86-host")
        import dataclasses

        art = tvm_lowbit.compile(q, x, dataclasses.replace(spec, target_dict={**spec.target_dict, **target}))
        np.testing.assert_allclose(art.run(x), ref, rtol=1e-5, atol=1e-5)
