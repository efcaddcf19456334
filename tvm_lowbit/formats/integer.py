"""k-bit integer weights: ``int4`` in groups of 32 (``int4-gN``; ``int4-g0``: one scale per output
channel) and ``int8`` per output channel (``int8-gN``: groups of N), codes symmetric, an 8-bit scale
code per group against a float32 scale per output channel."""

from __future__ import annotations

import re

import numpy as np
import torch

from tvm_lowbit import qmath
from tvm_lowbit.formats.base import Format, WeightFormat, WeightObject

DEFAULT_INT4_GROUP = 32
_NAME = re.compile(r"^int(4|8)(?:-g(\d+))?$")


class IntFormat(WeightFormat):
    kind = "int"
    family = "int"
    recorded = ("int4", "int8")
    grammar = ("int4[-gN]", "int8[-gN]")
    description = "int4/int8"

    def parse(self, name: str) -> Format | None:
        m = _NAME.match(name)
        if m is None:
            return None
        bits = int(m.group(1))
        default = DEFAULT_INT4_GROUP if bits == 4 else 0
        group = int(m.group(2)) if m.group(2) is not None else default
        return Format(f"int{bits}" if group == default else f"int{bits}-g{group}", self.kind, bits, group)

    def quantize(self, fmt: Format, w: torch.Tensor) -> WeightObject | None:
        return qmath.int_quantize_weight(w, fmt.bits, fmt.group_size)

    def decompose(self, weight_format: str | None, w_int: np.ndarray, group_size: int | None
                  ) -> tuple[WeightObject | None, str]:
        fmt = str(weight_format)
        bits = int(fmt[3:])
        n = group_size or 0
        tw = qmath.decompose_int(w_int, bits, n)
        return (tw, "") if tw is not None else (None, f"its integer weight {tuple(w_int.shape)} is not {fmt} "
                                                      f"(|code| <= {qmath.int_qmax(bits)} times an 8-bit scale "
                                                      f"code per group of {n})")

    def rounding_grid(self, obj: WeightObject) -> tuple[torch.Tensor, int, int] | None:
        step, qmax = qmath.int_grid(obj)  # type: ignore[arg-type]
        return step, -qmax, qmax

    def with_codes(self, obj: WeightObject, codes: torch.Tensor) -> WeightObject:
        return qmath.int_from_codes(obj, codes)  # type: ignore[arg-type]
