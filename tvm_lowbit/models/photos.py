"""Real photos for the model zoo, offline: the colour photos that scikit-image and scikit-learn ship.

They carry no ImageNet labels, so a quantized classifier is judged by how often its top-1 equals the
FP32 model's on many *views* (crops, scales, horizontal flips) of each photo.  Calibration photos are
held apart from evaluation photos: no photo appears in both.

``views(split, size, per_photo)`` returns uint8 images ``[n, size, size, 3]`` (RGB); each model's
loader normalizes them its own way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

# (name, loader); loaders return an RGB or grey uint8 array
EVAL_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "china", "flower")
CALIB_PHOTOS = ("motorcycle_left", "motorcycle_right", "camera", "coins", "hubble_deep_field",
                "immunohistochemistry", "retina", "grass", "gravel", "brick", "moon", "horse")
SPLITS = {"eval": EVAL_PHOTOS, "calib": CALIB_PHOTOS}


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        if name.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            return left if name.endswith("left") else right
        return getattr(data, name)()
    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]
    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    **{n: _skimage(n) for n in EVAL_PHOTOS[:4] + CALIB_PHOTOS},
    "china": _sklearn(0),
    "flower": _sklearn(1),
}


def photo(name: str) -> np.ndarray:
    """One photo as RGB uint8 ``[h, w, 3]`` (grey photos are repeated on the three channels)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown photo {name!r}; known: {', '.join(_LOADERS)}")
    try:
        img = np.asarray(_LOADERS[name]())
    except ImportError as e:
        raise ImportError(f"photo {name!r} needs scikit-image and scikit-learn (pip install scikit-image "
                          f"scikit-learn): {e}") from e
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


@dataclass(frozen=True)
class View:
    """A square crop of side ``scale`` x the photo's short side, its centre at relative position
    (``cy``, ``cx``) of the free room, resized to the model's size, optionally flipped left-right."""

    scale: float
    cy: float
    cx: float
    flip: bool

    def apply(self, img: np.ndarray, size: int) -> np.ndarray:
        h, w = img.shape[:2]
        side = max(8, int(round(min(h, w) * self.scale)))
        top, left = int(round((h - side) * self.cy)), int(round((w - side) * self.cx))
        crop = Image.fromarray(img[top:top + side, left:left + side])
        out = np.asarray(crop.resize((size, size), Image.BILINEAR))
        return out[:, ::-1] if self.flip else out


def view_list(per_photo: int) -> list[View]:
    """The first ``per_photo`` views, in a fixed order that mixes scales, positions and flips."""
    scales = (1.0, 0.8, 0.6, 0.9, 0.7, 0.5)
    positions = ((0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.0), (0.5, 1.0))
    out: list[View] = []
    i = 0
    while len(out) < per_photo:
        s = scales[i % len(scales)]
        cy, cx = positions[(i // 2) % len(positions)] if s < 1.0 else (0.5, 0.5)
        v = View(s, cy, cx, flip=bool(i % 2))
        if v not in out:
            out.append(v)
        i += 1
        if i > 10_000:
            raise ValueError(f"per_photo={per_photo}: at most {len(out)} distinct views")
    return out


def views(split: str, size: int, per_photo: int) -> np.ndarray:
    """``per_photo`` views of every photo of ``split`` ("eval" or "calib"), uint8 ``[n, size, size, 3]``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use 'eval' (evaluation photos) or 'calib' (calibration photos)")
    vs = view_list(per_photo)
    out = []
    for name in SPLITS[split]:
        img = photo(name)
        out.extend(v.apply(img, size) for v in vs)
    return np.stack(out)
