"""Accuracy, size and speed of quantized and compiled models on the built-in data."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def torch_top1(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 500, progress: bool = False) -> float:
    """Top-1 accuracy (%) of a PyTorch model."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in tqdm(range(0, len(x), batch), desc="evaluating (PyTorch)", disable=not progress, leave=False):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def predictions(artifact: object, x: np.ndarray, progress: bool = False) -> np.ndarray:
    """Argmax predictions of a compiled artifact, run in batches of its compiled batch size."""
    b = artifact.input_shape[0]  # type: ignore[attr-defined]
    n = (len(x) // b) * b
    out = [artifact.run(x[i:i + b]).argmax(-1)  # type: ignore[attr-defined]
           for i in tqdm(range(0, n, b), desc="evaluating (TVM)", disable=not progress, leave=False)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)
