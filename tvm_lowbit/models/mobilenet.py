"""A compact MobileNetV2-style network (Sandler et al. 2018) for 1-channel 28x28 Fashion-MNIST images.

Inverted residual blocks: 1x1 expansion (ratio t) -> 3x3 depthwise -> 1x1 linear projection, with an
identity shortcut when the stride is 1 and the width does not change.  Sized for 28x28 inputs (the
first block keeps 28x28, two stride-2 blocks reach 7x7) and CPU training: at width 1.0, 9.5 M
multiply-adds per image and 144 k conv/linear weights (0.6 MB in float32).

It uses ReLU where MobileNetV2 has ReLU6: activation calibration clips the range anyway, and a ReLU
right after a quantized layer is fused into its integer kernel (ReLU6 would stay a float op between
two quantized layers).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# (expansion t, output channels c, blocks n, stride of the first block s), as in MobileNetV2's table 2
CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),   # 28x28
    (4, 24, 2, 2),   # 14x14
    (4, 32, 2, 2),   # 7x7
    (4, 64, 2, 1),
    (4, 96, 1, 1),
)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn(cin, hidden, 1)
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)     # depthwise
        layers += _conv_bn(hidden, cout, 1, relu=False)                   # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


def _width(c: int, mult: float) -> int:
    """Channels scaled by the width multiplier, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(c * mult + 4) // 8 * 8)


class MobileNetV2(nn.Module):
    """Stem conv 3x3 -> inverted residual blocks (``CONFIG``) -> 1x1 conv to ``last`` channels -> global
    average pool -> linear classifier."""

    def __init__(self, width: float = 1.0, last: int = 256, in_channels: int = 1, num_classes: int = 10,
                 dropout: float = 0.1) -> None:
        super().__init__()
        cin = _width(16, width)
        features: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, cin, 3))]
        for t, c, n, s in CONFIG:
            cout = _width(c, width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(nn.Sequential(*_conv_bn(cin, last, 1)))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def mobilenet(**kw: float) -> MobileNetV2:
    """The built-in compact model (width 1.0)."""
    return MobileNetV2(**kw)  # type: ignore[arg-type]


# The checkpoint was trained on the first 55,000 Fashion-MNIST training images
# (``scripts/train_zoo.py --model mobilenet --holdout 5000``); the last 5,000 are a validation split
# the model never saw, for choosing per-layer precision without touching the test set.
HOLDOUT = 5000


def validation_split(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The held-out validation images and labels: the last ``HOLDOUT`` training images."""
    from tvm_lowbit import data

    images, labels = data.load_split("train")
    start = len(images) - HOLDOUT
    end = len(images) if limit is None else min(len(images), start + limit)
    return data.normalize(images[start:end]), labels[start:end]


def calibration_split(n: int = 1024, seed: int = 0) -> np.ndarray:
    """``n`` training images drawn with a fixed seed from the part the validation split excludes."""
    from tvm_lowbit import data

    images, _ = data.load_split("train")
    idx = np.random.default_rng(seed).choice(len(images) - HOLDOUT, size=n, replace=False)
    return data.normalize(images[np.sort(idx)])
