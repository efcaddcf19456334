"""Quick checks of the benchmark baselines (ResNet-18 definition, TVM FP32, ORT int8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tvm_lowbit.models.resnet_imagenet import resnet18


class TwoConv(nn.Module):
    """Tiny conv net: enough ops (conv, BN, relu, pool, linear) to exercise each importer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _tiny() -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(0)
    m = TwoConv().eval()
    with torch.no_grad():  # non-trivial BN statistics, so BN folding/lowering is really tested
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    return m, x


def test_resnet18_shape_and_params() -> None:
    m = resnet18(num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == 11_689_512  # torchvision's resnet18
    with torch.inference_mode():
        y = m(torch.zeros(1, 3, 224, 224))
    assert y.shape == (1, 1000)
    # deterministic init from the seed
    a, b = resnet18(seed=1), resnet18(seed=1)
    assert torch.equal(a.layer3[0].conv1.weight, b.layer3[0].conv1.weight)
    assert not torch.equal(a.fc.weight, resnet18(seed=2).fc.weight)


def test_tvm_fp32_matches_torch() -> None:
    pytest.importorskip("tvm")
    from tvm_lowbit.baselines import tvm_fp32

    m, x = _tiny()
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    r = tvm_fp32(m, x)
    np.testing.assert_allclose(r.run(x), ref, rtol=1e-4, atol=1e-4)
    assert r.median_ms(x, repeat=3) > 0
    assert r.weight_bytes == 4 * sum(p.numel() for p in m.parameters())


def test_ort_int8_agrees_on_argmax() -> None:
    pytest.importorskip("onnxruntime")
    from tvm_lowbit.baselines import ort_int8

    m, _ = _tiny()
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    xs = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    r = ort_int8(m, xs[:1], calib)
    with torch.no_grad():
        ref = m(torch.from_numpy(xs)).numpy().argmax(1)
    got = np.array([r.run(xs[i: i + 1]).argmax(1)[0] for i in range(len(xs))])
    assert (got == ref).mean() >= 0.75
    # int8 weights: about one byte per conv/linear weight (+ per-channel zero points)
    n_w = sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert n_w <= r.weight_bytes < 2 * n_w
    assert r.median_ms(xs[:1], repeat=3) > 0
