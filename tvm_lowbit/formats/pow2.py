"""Power-of-two weights (INQ's set, projected post-training): every value 0 or +-2^e times a per-channel
scale; 4-bit codes when every exponent fits a nibble, else 8-bit.  Names: ``pow2-3``, ``pow2-4``,
``pow2-5`` (the INQ bit width)."""

from __future__ import annotations

import re

import numpy as np
import torch

from tvm_lowbit import qmath
from tvm_lowbit.formats.base import Format, WeightFormat, WeightObject

BITS = (3, 4, 5)
_NAME = re.compile(r"^pow2-(\d)$")


class Pow2Format(WeightFormat):
    kind = "pow2"
    family = "pow2"
    recorded = ("pow2",)
    grammar = ("pow2-3|pow2-4|pow2-5",)
    description = "power-of-two"
    guesses = ((6, 0),)  # a shift beats a multiply: before ternary groups of one

    def parse(self, name: str) -> Format | None:
        m = _NAME.match(name)
        if m is None:
            return None
        bits = int(m.group(1))
        if bits not in BITS:
            raise ValueError(f"weight format {name!r}: power-of-two weights take 3, 4 or 5 bits here")
        return Format(f"pow2-{bits}", self.kind, bits)

    def quantize(self, fmt: Format, w: torch.Tensor) -> WeightObject | None:
        if not float(w.detach().abs().max()) > 0:  # an all-zero weight: every code is zero
            return qmath.Pow2Weight(torch.zeros_like(w, dtype=torch.int32),
                                    torch.ones(w.shape[0], dtype=torch.float32), fmt.bits)
        return qmath.pow2_quantize_weight(w, fmt.bits)

    def decompose(self, weight_format: str | None, w_int: np.ndarray, group_size: int | None
                  ) -> tuple[WeightObject | None, str]:
        tw = qmath.decompose_pow2(w_int)
        return (tw, "") if tw is not None else (None, f"its integer weight {tuple(w_int.shape)} is not power-of-two "
                                                      f"(every value 0 or +-2^e, e <= {qmath.POW2_MAX_EXP})")
