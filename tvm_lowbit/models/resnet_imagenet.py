"""ImageNet-shaped ResNet-18 (He et al. 2016, table 1) in plain torch, for speed benchmarks.

torchvision is not installable here, so this re-implements its ``resnet18`` layout (same module
structure and parameter count: 11,689,512 for 1000 classes). Weights are random (seeded), not trained:
the model is only used to time compiled code at ImageNet shapes (1x3x224x224).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:  # projection shortcut (1x1 conv + BN), as torchvision
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.downsample(x))


class ResNetImageNet(nn.Module):
    """7x7/2 stem + 3x3/2 maxpool, four stages of BasicBlocks (widths 64..512), global pool, fc."""

    def __init__(self, blocks: tuple[int, int, int, int] = (2, 2, 2, 2), num_classes: int = 1000,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: list[nn.Sequential] = []
        cin = 64
        for i, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layers = []
            for b in range(n):
                layers.append(BasicBlock(cin, cout, 2 if i > 0 and b == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_(model: nn.Module, seed: int) -> None:
    """torchvision's init, drawn from a private generator so results do not depend on global RNG state."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):  # kaiming_normal_(fan_out, relu): std = sqrt(2 / fan_out)
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features ** 0.5
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)


def resnet18(num_classes: int = 1000, seed: int = 0) -> ResNetImageNet:
    """Untrained ResNet-18 in eval mode, deterministic for a given ``seed``."""
    model = ResNetImageNet((2, 2, 2, 2), num_classes=num_classes)
    _init_(model, seed)
    return model.eval()
