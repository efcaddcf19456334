"""Relu6Quantizer: ReLU6 before a quantizer whose scale puts 6 at the top code fuses as a ReLU, bit-exact."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import FGQ, quantize
from tvm_lowbit.passes.relu6_quantizer import quantizes_to_top
from tvm_lowbit.quantizers.layers import quant_layer


def test_quantizes_to_top_in_float32() -> None:
    assert quantizes_to_top(6.0, np.float32(6.0 / 255), 0.0, 255.0)
    assert quantizes_to_top(6.0, np.float32(0.01), 0.0, 255.0)           # a tighter clip: 600 -> 255
    assert not quantizes_to_top(6.0, np.float32(0.03), 0.0, 255.0)       # 6 / 0.03 = 200 < 255
    assert not quantizes_to_top(6.0, np.float32(-1.0), 0.0, 255.0)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
                         nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6(),
                         nn.Conv2d(32, 16, 1), nn.Flatten(), nn.Linear(16 * 36, 4)).eval()


def _compile(q: nn.Module, x: np.ndarray) -> tuple[object, np.ndarray]:
    art = tvm_lowbit.compile(q, x)
    with torch.no_grad():
        want = q(torch.from_numpy(x)).numpy()
    return art, want


def test_relu6_fuses_into_the_requantization_and_stays_exact() -> None:
    torch.manual_seed(0)
    model = _model()
    calib = 3 * torch.randn(64, 8, 6, 6)  # activations past 6: the ReLU6 clips, the quantizer scale is 6/255
    q = quantize(model, FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq", alpha_bits=7), calib,
                 progress=False)
    x = 3 * torch.randn(4, 8, 6, 6).numpy()
    art, want = _compile(q, x)
    assert {"0", "3"} <= set(art.report.requant_fused), art.report.text()  # the two ReLU6 convs emit codes
    np.testing.assert_array_equal(art.run(x), want)


def test_a_scale_that_keeps_6_below_the_top_code_keeps_the_clip() -> None:
    torch.manual_seed(1)
    model = _model()
    q = quantize(model, FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq", alpha_bits=7),
                 3 * torch.randn(64, 8, 6, 6), progress=False)
    layer = quant_layer(q, "3")
    # 6 / 0.05 = 120: codes above 120 come from the ReLU6's clip, not the quantizer's (out_scale = s_x * ...)
    layer.out_scale.mul_(0.05 / float(layer.act_scale))
    layer.act_scale.fill_(0.05)
    layer.scale_value = 0.05
    x = 3 * torch.randn(4, 8, 6, 6).numpy()
    art, want = _compile(q, x)
    assert "0" not in art.report.requant_fused
    np.testing.assert_array_equal(art.run(x), want)
