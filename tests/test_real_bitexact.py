"""Compiled vs fake-quant, layer by layer, on an EfficientNet-style block (issue 16 item 6): a stride-2 stem,
an expansion conv, a depthwise conv, squeeze-excitation (pool, two 1x1 convs, SiLU, sigmoid gate multiply),
a projection conv and a residual add, FGQ N=4 with the int8 stem.

Every lowered layer's int32 accumulators (``expose_acc``) must equal, bit for bit, an independent int64
reference (``qmath.conv2d_int_np``) computed from the codes the fake-quant model fed that layer; the
outputs must agree to float rounding.  The float ops between the integer layers (SiLU, sigmoid, the mean,
the gate multiply) are TVM's, not PyTorch's: they may differ in the last bit (docs/results-models.md,
"Speed and compiled-vs-fake-quant"), which moves a code only for a value within one ulp of a rounding
midpoint; the inputs here have none.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import tvm_lowbit
from tvm_lowbit import qmath
from tvm_lowbit.passes.torch_mean import torch_mean, torch_sum_lanes
from tvm_lowbit.passes.torch_sigmoid import torch_sigmoid, torch_vector_lanes
from tvm_lowbit.quantizers.layers import QConv2d, quant_layers


def _cbs(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.SiLU()) if act else nn.Sequential(*layers)


class SEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbs(3, 16, 3, 2)
        self.expand = _cbs(16, 32, 1)
        self.dw = _cbs(32, 32, 3, groups=32)
        self.se_reduce, self.se_expand = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = _cbs(32, 16, 1, act=False)
        self.head = _cbs(16, 48, 1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.dw(self.expand(x))
        g = torch.sigmoid(self.se_expand(nn.functional.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        x = x + self.project(h * g)
        return self.fc(self.head(x).mean((2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.slow
def test_se_depthwise_block_accumulators_bit_exact() -> None:
    torch.manual_seed(0)
    model = SEBlock().eval()
    _randomize_bn(model)
    g = torch.Generator().manual_seed(2)
    calib = torch.randn(32, 3, 32, 32, generator=g)
    x = torch.randn(4, 3, 32, 32, generator=g)
    q = tvm_lowbit.quantize(model, tvm_lowbit.FGQ(group_size=4, bn_reestimate=False), calib, progress=False)
    layers = quant_layers(q)
    assert {"stem.0", "expand.0", "dw.0", "se_reduce", "se_expand", "project.0", "head.0"} <= set(layers)

    codes: dict[str, np.ndarray] = {}
    for name, m in layers.items():  # record the codes each layer's quantizer gives (instance attribute)
        orig = m.quantize_input
        m.quantize_input = lambda t, name=name, orig=orig: _record(codes, name, orig(t))
    with torch.no_grad():
        want = q(x).numpy()
    for m in layers.values():
        del m.quantize_input

    art = tvm_lowbit.compile(q, x, "x86-host", expose_acc=True)
    outs = art.run_all(x.numpy())
    assert not art.report.fallback, art.report.fallback
    assert len(outs) == 1 + len(art.report.lowered)
    for name, acc in zip(art.report.lowered, outs[1:]):
        m = layers[name]
        w = m.w_int.numpy().astype(np.int64)
        c = codes[name].astype(np.int64)
        if isinstance(m, QConv2d):
            ref = qmath.conv2d_int_np(c, w, m.stride, m.padding, m.dilation, m.groups)
        else:
            ref = c @ w.T
        assert acc.dtype == np.int32, name
        np.testing.assert_array_equal(acc.astype(np.int64), ref, err_msg=f"layer {name}")
    np.testing.assert_allclose(outs[0], want, rtol=0, atol=1e-5)
    assert (outs[0].argmax(1) == want.argmax(1)).all()


def _record(codes: dict[str, np.ndarray], name: str, c: torch.Tensor) -> torch.Tensor:
    codes[name] = c.detach().numpy().copy()
    return c


def _check_midpoint(model: nn.Module, x: torch.Tensor, calib: torch.Tensor, name: str, scale: float,
                    layer_input: torch.Tensor, code: int) -> None:
    """FGQ on ``calib`` with layer ``name``'s activation scale set to ``scale``: PyTorch quantizes ``layer_input``
    (what the float ops before it give for ``x``) to ``code`` everywhere, and the compiled model's accumulators
    equal the integer reference of those codes and its outputs PyTorch's, bit for bit."""
    q = tvm_lowbit.quantize(model, tvm_lowbit.FGQ(bn_reestimate=False, bias_correction=False), calib, progress=False)
    layer = quant_layers(q)[name]
    layer.set_activation(float(np.float32(scale)), True)
    with torch.no_grad():
        codes = layer.quantize_input(layer_input).numpy()
        want = q(x).numpy()
    assert (codes == code).all()
    art = tvm_lowbit.compile(q, x, "x86-host", expose_acc=True)
    out, acc = art.run_all(x.numpy())
    ref = qmath.conv2d_int_np(codes.astype(np.int64), layer.w_int.numpy().astype(np.int64), (1, 1), (0, 0), (1, 1), 1)
    np.testing.assert_array_equal(acc.astype(np.int64), ref)
    np.testing.assert_array_equal(out, want)


def test_silu_before_a_quantizer_gives_pytorchs_code_at_a_midpoint() -> None:
    """SiLU(0.97115785) / 0.093923949 is 7.4999995 in PyTorch (code 7); the importer's ``x * sigmoid(x)`` is one
    ulp higher (7.5 -> code 8), the value that made efficientnet_b0's build differ (passes.torch_silu)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.SiLU(), nn.Conv2d(4, 4, 1, bias=False)).eval()
    x = torch.full((1, 4, 2, 2), 0.97115785)
    calib = torch.randn(16, 4, 2, 2)
    _check_midpoint(model, x, calib, "1", 0.09392394870519638, nn.functional.silu(x), 7)


class SEGate(nn.Module):
    """The squeeze-excitation gate of torchvision's efficientnet: ``x * sigmoid(pool(x))`` into a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * torch.sigmoid(x.mean((2, 3), keepdim=True)))


def test_sigmoid_gate_before_a_quantizer_gives_pytorchs_code_at_a_midpoint() -> None:
    """``torch.sigmoid`` of 32 values takes PyTorch's vector path (Sleef's exp): sigmoid(1.0810503) is
    0.74669266 there, one ulp below the C library's 0.7466927 (TVM's ``sigmoid``); times 1.0810503 over the
    scale 0.10762832 that is code 7 in PyTorch and 8 with TVM's sigmoid, the value kind that made
    efficientnet_b0's build differ (passes.torch_sigmoid)."""
    torch.manual_seed(0)
    model = SEGate().eval()
    x = torch.full((1, 32, 1, 1), 1.0810502767562866)
    calib = torch.randn(16, 32, 1, 1)
    _check_midpoint(model, x, calib, "conv", 0.10762831568717957, x * torch.sigmoid(x), 7)


@pytest.mark.skipif(torch_vector_lanes() is None, reason="PyTorch's vector path on this host is not modelled")
@pytest.mark.parametrize("shape", [(1 << 16,), (4, 144, 1, 1), (1, 144, 1, 1), (3, 7, 5), (20,)])
def test_torch_sigmoid_equals_torch_sigmoid_bit_for_bit(shape: tuple[int, ...]) -> None:
    """The compiled ``TorchSigmoid`` gives ``torch.sigmoid``'s float32 bits: the vector path (Sleef's exp), the
    scalar tail, the clamps (+-200, 88.5, -103.9), NaN and 0; TVM's own ``sigmoid`` differs on ~4 %."""
    x = (np.random.default_rng(0).standard_normal(shape) * 3).astype(np.float32)
    x.flat[:6] = [200.0, -200.0, 88.5, -103.9, np.nan, 0.0]
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.sigmoid(xv)))
        bb.emit_func_output(out)
    ex = tvm.compile(torch_sigmoid(bb.get()), target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), torch.sigmoid(torch.from_numpy(x)).numpy().view(np.uint32))


def test_hardswish_before_a_quantizer_gives_pytorchs_code_at_a_midpoint() -> None:
    """hardswish(0.83619767) is 0.53463656 in PyTorch (``x * clip(x + 3, 0, 6) / 6``), one ulp below
    ``x * (clip(x + 3, 0, 6) / 6)`` (TVM's ``_hardswish`` converter's order); over the scale 0.071284883 that is
    code 7 in PyTorch and 8 in the other order.  The build follows PyTorch because ``torch.export``
    decomposes hardswish into PyTorch's order before the importer sees it (mobilenet_v3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Hardswish(), nn.Conv2d(4, 4, 1, bias=False)).eval()
    x = torch.full((1, 4, 2, 2), 0.8361976742744446)
    calib = torch.randn(16, 4, 2, 2)
    _check_midpoint(model, x, calib, "1", 0.07128488272428513, nn.functional.hardswish(x), 7)


def _pool_row() -> np.ndarray:
    """64 values whose mean is 0.56622142 in PyTorch's cascade sum and one ulp lower summed in order."""
    return (np.random.default_rng(7).standard_normal((1, 64, 8, 8)) * 2 + 1.0).astype(np.float32)[0, 0]


def test_pool_before_a_quantizer_gives_pytorchs_code_at_a_midpoint() -> None:
    """The squeeze-excitation pool (``AdaptiveAvgPool2d(1)``, a mean over H x W) of :func:`_pool_row` is
    0.56622142 in PyTorch and 0.56622136 added in order (TVM's ``mean``); over the scale 0.075496189 that is
    code 8 in PyTorch and 7 in order (passes.torch_mean)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1, bias=False)).eval()
    x = torch.from_numpy(np.broadcast_to(_pool_row(), (1, 8, 8, 8)).copy())
    calib = torch.randn(16, 8, 8, 8)
    _check_midpoint(model, x, calib, "1", 0.07549618929624557, nn.functional.adaptive_avg_pool2d(x, 1), 8)


@pytest.mark.skipif(torch_sum_lanes() is None, reason="PyTorch's sum kernel on this host is not modelled")
@pytest.mark.parametrize("shape", [(2, 8, 2, 2), (2, 8, 3, 3), (4, 96, 16, 16), (2, 16, 7, 7), (2, 16, 56, 56),
                                   (1, 2, 1024, 1024), (5, 37)])
def test_torch_mean_equals_torch_mean_bit_for_bit(shape: tuple[int, ...]) -> None:
    """The compiled ``TorchMean`` gives ``torch.mean``'s float32 bits over the trailing axes (scalar rows, the
    vector lanes with a scalar tail, and 1024 x 1024 rows that use the cascade's upper levels); TVM's own
    ``mean`` differs on most rows."""
    axes = [-1] if len(shape) == 2 else [-1, -2]
    x = (np.random.default_rng(0).standard_normal(shape) * 2 + 0.3).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.mean(xv, axis=axes, keepdims=True)))
        bb.emit_func_output(out)
    ex = tvm.compile(torch_mean(bb.get()), target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = torch.from_numpy(x).mean(tuple(axes), keepdim=True).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_torch_cpu_env_picks_the_reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TVM_LOWBIT_TORCH_CPU`` names the PyTorch CPU capability the float-op passes follow: AVX2's sigmoid
    has 8 lanes (16 on AVX-512), its sum 8 on both; ``none`` leaves TVM's own ops."""
    monkeypatch.setenv("TVM_LOWBIT_TORCH_CPU", "AVX2")
    assert (torch_vector_lanes(), torch_sum_lanes()) == (8, 8)
    monkeypatch.setenv("TVM_LOWBIT_TORCH_CPU", "AVX512")
    assert (torch_vector_lanes(), torch_sum_lanes()) == (16, 8)
    monkeypatch.setenv("TVM_LOWBIT_TORCH_CPU", "none")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((2, 32, 4, 4), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.sigmoid(relax.op.mean(xv, axis=[2, 3], keepdims=True))))
        bb.emit_func_output(out)
    text = str(torch_mean(torch_sigmoid(bb.get()))["main"])
    assert "R.mean(" in text and "R.sigmoid(" in text, text
    monkeypatch.setenv("TVM_LOWBIT_TORCH_CPU", "AVX512")
    text = str(torch_mean(torch_sigmoid(bb.get()))["main"])
    assert "R.mean(" not in text and "R.sigmoid(" not in text, text
