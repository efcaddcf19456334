"""PACT: activation gradient, levels, alpha > 0, DoReFa weights, export scales (fast)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvm_lowbit import qmath
from tvm_lowbit.quantizers.hooks import IntegerWeight
from tvm_lowbit.quantizers.layers import QConv2d, quant_layers
from tvm_lowbit.quantizers.pact import (PACT, PACTFunction, PACTQuant, PACTReLU, dorefa_codes, dorefa_weight)

from ddp_worker import TinyNet, synthetic  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_validation():
    with pytest.raises(ValueError, match="act_bits"):
        PACT(act_bits=1)
    with pytest.raises(ValueError, match="weight_bits"):
        PACT(weight_bits=9)
    with pytest.raises(ValueError, match="alpha_init"):
        PACT(alpha_init=0.0)
    with pytest.raises(ValueError, match="last_layer"):
        PACT(last_layer="fgq")


@pytest.mark.parametrize("bits", [2, 4])
def test_alpha_gradient_autograd_and_finite_difference(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2
    up = torch.randn(x.shape, generator=g, dtype=torch.float64)
    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    (up * PACTFunction.apply(xr, alpha, bits)).sum().backward()
    expect = float((up * (x >= 1.3)).sum())
    assert abs(float(alpha.grad) - expect) < 1e-9
    torch.testing.assert_close(xr.grad, up * ((x >= 0) & (x < 1.3)))
    # finite difference of the clip (the scale held constant, rounding straight-through): same formula
    h = 1e-6
    f = lambda a: float((up * torch.clamp(x, 0, a)).sum())  # noqa: E731
    fd = (f(1.3 + h) - f(1.3 - h)) / (2 * h)
    assert abs(fd - expect) < 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_output_levels(bits):
    act = PACTReLU(bits, alpha_init=2.0)
    x = torch.linspace(-3, 5, 20001)
    y = act(x).detach()
    levels = torch.unique(y)
    assert len(levels) == 2 ** bits
    s = np.float32(2.0 / (2 ** bits - 1))
    codes = (y / torch.tensor(s)).round()
    assert torch.equal(codes * torch.tensor(s), y) and codes.min() == 0 and codes.max() == 2 ** bits - 1
    assert float(y.max()) <= 2.0 * (1 + 1e-6)
    # the same codes as the compiler's activation quantizer with scale alpha / (2^k - 1)
    torch.testing.assert_close(codes, qmath.quantize_act(x, act.scale, bits, False), rtol=0, atol=0)


def test_alpha_stays_positive():
    torch.manual_seed(0)
    model = TinyNet()
    hook = PACT(alpha_init=0.5, alpha_min=1e-3).attach(model)
    opt = torch.optim.SGD(hook.alpha_parameters(), lr=100.0)
    x, y = synthetic(8)
    hook.begin_stage()
    for _ in range(3):
        loss = -100 * model(x).abs().mean() + hook.penalty() * 1e6  # pushes alpha hard toward 0 / below
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook.after_step()
        assert all(a >= 1e-3 for a in hook.alphas().values())


def test_relus_replaced_only_where_they_feed_quantized_layers():
    model = TinyNet()
    hook = PACT().attach(model)
    assert hook.layers == ["conv2", "conv3"]
    assert hook.activations == ["relu1", "relu2"]  # relu3 feeds the float fc only
    assert isinstance(model.relu1, PACTReLU) and isinstance(model.relu3, nn.ReLU)
    hook2 = PACT(last_layer="pact").attach(TinyNet())
    assert hook2.activations == ["relu1", "relu2", "relu3"]


def test_penalty_uses_weight_decay_by_default():
    hook = PACT(alpha_init=2.0).attach(TinyNet())
    assert abs(float(hook.penalty().detach()) - 5e-4 * 2 * 4.0) < 1e-6
    hook.weight_decay = 1e-3
    assert abs(float(hook.penalty().detach()) - 1e-3 * 2 * 4.0) < 1e-6
    hook3 = PACT(alpha_init=2.0, alpha_decay=0.1).attach(TinyNet())
    assert abs(float(hook3.penalty().detach()) - 0.1 * 2 * 4.0) < 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dorefa_levels_and_gradient(bits):
    n = 2 ** bits - 1
    w = (torch.randn(8, 4, 3, 3, dtype=torch.float64) * 0.7).requires_grad_(True)
    wq = dorefa_weight(w, bits)
    allowed = {(2 * c - n) / n for c in range(n + 1)}
    vals = torch.unique(wq.detach()).tolist()
    assert len(vals) <= 2 ** bits and all(min(abs(v - a) for a in allowed) < 1e-12 for v in vals)
    codes = dorefa_codes(w, bits)
    assert torch.all(codes % 2 != 0) and codes.abs().max() <= n
    torch.testing.assert_close(codes.double() / n, wq.detach())
    # straight-through the rounding only: the gradient is that of 2u - 1 (tanh and the max normalization)
    up = torch.randn(w.shape, dtype=torch.float64)
    (up * wq).sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    t = torch.tanh(w2)
    (up * (2 * (t / (2 * t.abs().max()) + 0.5) - 1)).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_int_format_layer_runs_exactly():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    w_int = torch.randint(-7, 8, (6, 4, 3, 3)) * 2 + 1
    layer = QConv2d("c", conv, IntegerWeight(w_int, torch.full((6,), 1 / 15)), act_bits=4)
    layer.set_activation(0.25, False)
    assert layer.weight_format == "int" and layer.group_size == 0
    x = torch.rand(2, 4, 5, 5) * 5
    q = qmath.quantize_act(x, 0.25, 4, False).numpy()
    acc = qmath.conv2d_int_np(q, w_int.numpy(), (1, 1), (1, 1), (1, 1), 1)
    ref = qmath.epilogue_np(acc, layer.out_scale.numpy(), layer.out_bias.numpy(), False, 1)
    np.testing.assert_array_equal(layer(x).detach().numpy(), ref)


def test_export_uses_learned_alpha_as_scale():
    torch.manual_seed(4)
    model = TinyNet()
    hook = PACT(act_bits=3, weight_bits=3, alpha_init=3.0).attach(model)
    x, y = synthetic(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in hook.stages():
        for _ in range(3):
            loss = F.cross_entropy(model(x), y) + hook.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            hook.after_step()
    model.eval()
    alphas = hook.alphas()
    q = hook.export(x, progress=False)
    layers = quant_layers(q)
    assert set(layers) == {"conv2", "conv3"}
    for name, src in (("conv2", "relu1"), ("conv3", "relu2")):
        layer = layers[name]
        expect = float(np.float32(np.float32(alphas[src]) / np.float32(7)))
        assert layer.scale_value == expect and not layer.act_signed and layer.act_bits == 3
        assert layer.weight_format == "int"
        codes = layer.w_int
        assert torch.all(codes % 2 != 0) and codes.abs().max() <= 7
        torch.testing.assert_close(layer.w_scale, torch.full_like(layer.w_scale, 1 / 7))
        assert isinstance(q.get_submodule(src), PACTQuant) and q.get_submodule(src).scale == expect
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max() + 1e-3
