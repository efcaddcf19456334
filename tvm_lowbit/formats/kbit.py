"""Plain k-bit integer weights of the training quantizers (PACT/DoReFa codes, recorded as ``int``): the
compiler stores them in the narrowest packed form that holds them exactly (int4, then int8 per
output channel, else ternary groups of one with an 8-bit alpha per weight).  It has no name of its
own: the training quantizers make these weights, not ``parse_format``."""

from __future__ import annotations

import numpy as np

from tvm_lowbit import qmath
from tvm_lowbit.formats.base import WeightFormat, WeightObject


class KBitFormat(WeightFormat):
    kind = "kbit"
    family = "int"  # what it decomposes to is int4/int8 (or ternary groups of one: see decompose)
    recorded = ("int",)
    description = "k-bit integer"

    def decompose(self, weight_format: str | None, w_int: np.ndarray, group_size: int | None
                  ) -> tuple[WeightObject | None, str]:
        tw = qmath.decompose_k_bit(w_int)
        return (tw, "") if tw is not None else (None, f"its integer weight {tuple(w_int.shape)} has values beyond "
                                                      "+-255, which the integer kernels do not take")
