"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read with NumPy (no network)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (pixels in [0, 1])
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataMissingError(FileNotFoundError):
    pass


def data_dir() -> Path:
    """Where the IDX files live: ``$TVM_LOWBIT_DATA`` or the Debian package's folder."""
    candidates = [os.environ["TVM_LOWBIT_DATA"]] if os.environ.get("TVM_LOWBIT_DATA") else []
    candidates += list(DEFAULT_DIRS)
    for c in candidates:
        if (Path(c) / "t10k-labels-idx1-ubyte.gz").is_file():
            return Path(c)
    raise DataMissingError(
        f"Fashion-MNIST not found (looked in {', '.join(candidates)}). Install it with "
        "`apt-get install dataset-fashion-mnist` (or run scripts/setup.sh), or point "
        "TVM_LOWBIT_DATA at a folder holding the four *-ubyte.gz IDX files.")


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (the MNIST container format) into a NumPy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise ValueError(f"{path}: expected {count} bytes of data for shape {dims}, found {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [n, 28, 28], labels int64 [n]) for ``split`` in {"train", "test"}."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    d = data_dir()
    images = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split")
    return images, labels


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28] -> float32 [n, 1, 28, 28], the built-in models' input."""
    x = images.astype(np.float32)[:, None] / 255.0
    return (x - MEAN) / STD


def load(split: str, limit: int | None = None, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float images [n, 1, 28, 28] and labels, optionally a slice [offset, offset+limit)."""
    images, labels = load_split(split)
    end = None if limit is None else offset + limit
    return normalize(images[offset:end]), labels[offset:end]


def calibration_set(n: int = 512, seed: int = 0) -> np.ndarray:
    """``n`` training images (never test images) drawn with a fixed seed, for calibration."""
    images, _ = load_split("train")
    idx = np.random.default_rng(seed).choice(images.shape[0], size=n, replace=False)
    return normalize(images[np.sort(idx)])
