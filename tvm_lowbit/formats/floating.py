"""``float``: the layer stays float32 (4 bytes a weight); no integer kernel."""

from __future__ import annotations

import torch

from tvm_lowbit.formats.base import Format, WeightFormat, WeightObject


class FloatFormat(WeightFormat):
    kind = "float"
    family = None
    grammar = ("float",)
    description = "float32"

    def parse(self, name: str) -> Format | None:
        return Format("float", self.kind) if name == "float" else None

    def quantize(self, fmt: Format, w: torch.Tensor) -> WeightObject | None:
        return None
