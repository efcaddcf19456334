"""FGQ grouped ternary: 2-bit codes in groups of N input values, one 8-bit alpha code per group
against a float32 scale per output channel.  Names: ``ternary`` (N = 4), ``ternary-nN``."""

from __future__ import annotations

import re

import numpy as np
import torch

from tvm_lowbit import qmath
from tvm_lowbit.formats.base import Format, WeightFormat, WeightObject

DEFAULT_GROUP = 4
_NAME = re.compile(r"^ternary(?:-n(\d+))?$")


class TernaryFormat(WeightFormat):
    kind = "ternary"
    family = "ternary"
    recorded = ("ternary",)
    grammar = ("ternary[-nN]",)
    description = "grouped-ternary"
    # a layer with no recorded format: a real group first (largest first), groups of one last (any
    # small integer weight is ternary in groups of one, so other formats rank before it)
    guesses = ((0, 64), (1, 32), (2, 16), (3, 8), (4, 4), (5, 2), (7, 1))

    def parse(self, name: str) -> Format | None:
        m = _NAME.match(name)
        if m is None:
            return None
        n = int(m.group(1) or DEFAULT_GROUP)
        if n < 1:
            raise ValueError(f"weight format {name!r}: the ternary group size must be >= 1")
        return Format("ternary" if n == DEFAULT_GROUP else f"ternary-n{n}", self.kind, 2, n)

    def quantize(self, fmt: Format, w: torch.Tensor) -> WeightObject | None:
        return qmath.ternarize_weight(w, fmt.group_size)

    def decompose(self, weight_format: str | None, w_int: np.ndarray, group_size: int | None
                  ) -> tuple[WeightObject | None, str]:
        n = int(group_size or 0)
        tw = qmath.decompose_w_int(w_int, n) if n > 0 else None
        return (tw, "") if tw is not None else (None, f"its integer weight {tuple(w_int.shape)} is not grouped-ternary "
                                                      f"with group size {n} and 8-bit alpha codes")

    def rounding_grid(self, obj: WeightObject) -> tuple[torch.Tensor, int, int] | None:
        lay = obj.layout  # type: ignore[union-attr]
        alpha = obj.alpha_q.double() * obj.w_scale.double()[:, None]  # type: ignore[union-attr]
        step = qmath.from_grouped(alpha[..., None].expand(-1, -1, lay.group_size).contiguous(), lay)
        return step, -1, 1

    def with_codes(self, obj: WeightObject, codes: torch.Tensor) -> WeightObject:
        lay = obj.layout  # type: ignore[union-attr]
        return qmath.TernaryWeight(lay, qmath.to_grouped(codes, lay).to(torch.int8), obj.alpha_q,  # type: ignore[union-attr]
                                   obj.w_scale)
