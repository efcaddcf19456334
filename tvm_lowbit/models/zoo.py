"""torchvision architectures for tests and benchmarks: third-party model code, random weights.

The point is model code written by other people (torchvision's own classes, its ``Conv2dNormActivation``,
squeeze-excitation, channel shuffle, RegNet's grouped stages), not accuracy, so the weights are
torchvision's random initialization drawn with a fixed seed.  ``calibrate_bn`` gives the batch-norm
layers running statistics measured on real photos (one pass in training mode), so activations have
realistic ranges and predictions on different photos differ; without it every BN keeps mean 0 / var 1
and deep random nets output nearly the same logits for any input.

torchvision on PyPI is a CUDA build; beside the CPU build of torch its C++ ops (``nms``, ``roi_align``)
cannot load, and ``import torchvision`` fails while registering a fake kernel for ``torchvision::nms``.
The model code needs none of these ops, so :func:`import_torchvision` declares the two missing op
schemas and imports torchvision unchanged (the detection ops then stay unavailable).
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np
import torch
from torch import nn

ARCHS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0", "regnet_x_400mf")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_MISSING_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_FRAGMENTS: list[torch.library.Library] = []  # kept alive: a Library's definitions vanish with it


def import_torchvision() -> ModuleType:
    """``import torchvision``, declaring its C++ op schemas first when its extension cannot load."""
    try:
        import torchvision
        return torchvision
    except ImportError as e:
        raise ImportError(f"the torchvision zoo needs torchvision matching torch {torch.__version__} "
                          f"(torch 2.13 -> torchvision 0.28): pip install --no-deps torchvision==0.28.0 ({e})") from e
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]  # the failed import left a half-initialized package behind
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_OPS:
        name = schema.split("(")[0]
        if not hasattr(torch.ops.torchvision, name):
            lib.define(schema)
    _FRAGMENTS.append(lib)
    import torchvision
    return torchvision


def torchvision_model(arch: str, seed: int = 0) -> nn.Module:
    """torchvision's ``arch`` (one of :data:`ARCHS`) with random weights drawn from ``seed``, in eval mode."""
    if arch not in ARCHS:
        raise ValueError(f"unknown zoo architecture {arch!r}; known: {', '.join(ARCHS)}")
    tv = import_torchvision()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = getattr(tv.models, arch)(weights=None)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``[n, h, w, 3]`` -> float ``[n, 3, h, w]`` with torchvision's ImageNet mean/std."""
    x = (np.asarray(images, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every batch norm's running statistics to those of ``x`` (one forward pass in training mode,
    cumulative averaging); dropout is kept off.  Returns ``model`` in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    model(x)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def load(arch: str, size: int = 224, seed: int = 0, calib_images: np.ndarray | None = None) -> nn.Module:
    """A zoo model ready to quantize: ``torchvision_model(arch, seed)`` with batch norm calibrated on
    ``calib_images`` (uint8 ``[n, h, w, 3]``; default: 16 calibration-photo views at ``size``)."""
    from tvm_lowbit.models import photos

    model = torchvision_model(arch, seed)
    imgs = photos.views("calib", size, 2) if calib_images is None else calib_images
    return calibrate_bn(model, normalize(imgs))
