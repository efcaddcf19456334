"""The compact zoo model (MobileNetV2-style): checkpoint, structure, and a mix of every weight format on it
compiled for the host bit-exact, with predictions equal to its fake-quant model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import data
from tvm_lowbit.formats import avg_weight_bits
from tvm_lowbit.models import load_pretrained
from tvm_lowbit.models.mobilenet import HOLDOUT, MobileNetV2, calibration_split, validation_split
from tvm_lowbit.models.resnet import checkpoint_path
from tvm_lowbit.quantizers.auto import build_mixed
from tvm_lowbit.quantizers.layers import quant_layers
from tvm_lowbit.quantizers.surgery import execution_order


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return load_pretrained("mobilenet")


def test_checkpoint_is_small_and_accurate(model: nn.Module) -> None:
    path = checkpoint_path("mobilenet")
    assert path.stat().st_size < 2_000_000
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["holdout"] == HOLDOUT  # the validation split was held out of training
    x, y = data.load("test", limit=1000)
    with torch.inference_mode():
        acc = 100.0 * float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert acc > 88.0 and ckpt["test_top1"] > 88.0


def test_depthwise_separable_inverted_residuals(model: nn.Module) -> None:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups == m.in_channels == m.out_channels > 1]
    pointwise = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(depthwise) == 8 and len(pointwise) == 7 + 8 + 1  # expansions, projections, the head conv
    assert sum(m.residual for m in model.modules() if hasattr(m, "residual")) == 4
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert MobileNetV2(width=0.5)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_splits_do_not_overlap() -> None:
    xv, yv = validation_split(50)
    images, labels = data.load_split("train")
    np.testing.assert_array_equal(yv, labels[len(labels) - HOLDOUT:][:50])
    assert calibration_split(16).shape == (16, 1, 28, 28)


def test_every_format_on_mobilenet_compiles_bit_exact(model: nn.Module) -> None:
    from test_compile import reference_accumulators

    calib = calibration_split(256)
    names = execution_order(model, torch.from_numpy(calib[:1]))
    cycle = ["int8", "int4", "ternary", "pow2-4", "ternary-n16", "int4-g0", "pow2-5"]
    formats = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    formats[names[-1]] = "float"  # a float classifier after integer layers
    q = build_mixed(model, formats, calib)
    assert len(quant_layers(q)) == len(names) - 1 and 4 < avg_weight_bits(q) < 32
    x, _ = data.load("test", limit=400, offset=3000)
    art = tvm_lowbit.compile(q, x[:25], expose_acc=True)
    assert not art.report.fallback and len(art.report.lowered) == len(names) - 1
    assert {"int4", "int8", "ternary", "pow2"} <= set(art.report.kernels.values())
    assert len(art.report.requant_fused) >= len(names) // 2
    agree = []
    for i in range(0, len(x), 25):
        outs = art.run_all(x[i:i + 25])
        if i == 0:  # every layer's integer accumulators, bit for bit, against the NumPy int64 reference
            ref = reference_accumulators(q, x[:25])
            for name, acc in zip(art.report.lowered, outs[1:]):
                np.testing.assert_array_equal(acc.astype(np.int64), ref[name], err_msg=name)
        with torch.inference_mode():
            agree.append(outs[0].argmax(1) == q(torch.from_numpy(x[i:i + 25])).argmax(1).numpy())
    assert np.concatenate(agree).mean() >= 0.9975  # at most one of 400 images differs
