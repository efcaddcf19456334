"""CIFAR-style ResNet (He et al. 2016, section 4.2) for 1-channel 28x28 Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
DEFAULT_MODEL = "resnet20"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:  # option B: projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + self.shortcut(x))


class ResNet(nn.Module):
    """3 stages of ``blocks`` basic blocks, widths w, 2w, 4w; depth = 6 * blocks + 2."""

    def __init__(self, blocks: int = 3, width: int = 16, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            stage_blocks = []
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                stage_blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(**kw: int) -> ResNet:
    return ResNet(blocks=3, **kw)


def checkpoint_path(name: str = DEFAULT_MODEL) -> Path:
    return ZOO_DIR / f"{name}_fmnist.pt"


def load_pretrained(name: str = DEFAULT_MODEL) -> ResNet:
    """The committed Fashion-MNIST checkpoint (made by ``scripts/train_zoo.py``), in eval mode."""
    from tvm_lowbit.models.mobilenet import mobilenet

    builders = {"resnet20": resnet20, "mobilenet": mobilenet}
    if name not in builders:
        raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(builders)}")
    path = checkpoint_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/train_zoo.py --model {name}` to make it")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = builders[name]()
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
