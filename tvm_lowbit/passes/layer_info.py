"""What the quantizer tells the compiler about each layer, keyed by the value of its integer weight."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def weight_key(w: np.ndarray) -> str:
    """Identifies an integer weight constant by value (to find its layer name and group size)."""
    a = np.ascontiguousarray(np.asarray(w, np.float32))
    return f"{a.shape}:{hashlib.sha1(a.tobytes()).hexdigest()}"


@dataclass
class LayerInfo:
    """What the quantizer knows about a layer, keyed by ``weight_key`` of its integer weight."""

    name: str
    group_size: int
    weight_format: str = "ternary"
