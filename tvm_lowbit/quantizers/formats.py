"""The weight formats a layer can take in a mixed-precision model, and what each one stores.

A format is named by a short string:

==============  ===========================================================================  ==========
name            weight                                                                       bits/weight
==============  ===========================================================================  ==========
``ternary``     FGQ grouped ternary, N = 4 (``ternary-n16``: N = 16): 2-bit codes + 8-bit      4 (2.5)
                alpha code per group
``pow2-b``      power of two, b = 3, 4, 5 bits (INQ's set, projected post-training):          4 or 8
                4-bit codes when every exponent fits a nibble, else 8-bit codes
``int4``        4-bit integers in groups of 32 (``int4-g64``: 64; ``int4-g0``: one scale per   4.25
                output channel) with an 8-bit scale code per group
``int8``        8-bit integers, one scale per output channel (``int8-g32``: groups of 32)     8
``float``       the layer stays float32                                                       32
==============  ===========================================================================  ==========

On top of the bits per weight, every quantized layer stores one float32 scale per output channel,
and group codes are padded to whole groups (a ragged group stores its padding): the byte counts here
(``weight_bytes``) are the exact sizes of what the compiled layer keeps for its weight, from
``qmath``'s ``storage_bytes``.  Biases and the folded batch norm (the per-channel epilogue) are the
same for every format and not counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from tvm_lowbit import qmath

WeightObject = qmath.TernaryWeight | qmath.Pow2Weight | qmath.IntWeight

DEFAULT_INT4_GROUP = 32
_PATTERN = re.compile(r"^(?:(float)|(ternary)(?:-n(\d+))?|pow2-(\d)|int(4|8)(?:-g(\d+))?)$")


@dataclass(frozen=True)
class Format:
    """A parsed format name (see the module docstring)."""

    name: str
    kind: str           # "float" | "ternary" | "pow2" | "int"
    bits: int = 32      # pow2: INQ bits; int: 4 or 8; ternary: 2
    group_size: int = 0  # ternary N; int: scale group (0: per output channel)

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    def quantize(self, w: torch.Tensor) -> WeightObject | None:
        """The weight ``w`` (float) in this format, or None for ``float``."""
        if self.kind == "ternary":
            return qmath.ternarize_weight(w, self.group_size)
        if self.kind == "pow2":
            if not float(w.detach().abs().max()) > 0:  # an all-zero weight: every code is zero
                return qmath.Pow2Weight(torch.zeros_like(w, dtype=torch.int32),
                                        torch.ones(w.shape[0], dtype=torch.float32), self.bits)
            return qmath.pow2_quantize_weight(w, self.bits)
        if self.kind == "int":
            return qmath.int_quantize_weight(w, self.bits, self.group_size)
        return None


def parse_format(name: str) -> Format:
    """``"ternary"``, ``"ternary-n16"``, ``"pow2-4"``, ``"int4"``, ``"int4-g64"``, ``"int8"``, ``"float"``."""
    m = _PATTERN.match(str(name).strip().lower()) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown weight format {name!r}: use ternary[-nN], pow2-3|pow2-4|pow2-5, "
                         "int4[-gN], int8[-gN] or float")
    if m.group(1):
        return Format("float", "float")
    if m.group(2):
        n = int(m.group(3) or 4)
        if n < 1:
            raise ValueError(f"weight format {name!r}: the ternary group size must be >= 1")
        return Format("ternary" if n == 4 else f"ternary-n{n}", "ternary", 2, n)
    if m.group(4):
        bits = int(m.group(4))
        if bits not in (3, 4, 5):
            raise ValueError(f"weight format {name!r}: power-of-two weights take 3, 4 or 5 bits here")
        return Format(f"pow2-{bits}", "pow2", bits)
    bits = int(m.group(5))
    default = DEFAULT_INT4_GROUP if bits == 4 else 0
    group = int(m.group(6)) if m.group(6) is not None else default
    return Format(f"int{bits}" if group == default else f"int{bits}-g{group}", "int", bits, group)


def weight_bytes(tw: WeightObject | None, numel: int) -> int:
    """Bytes of a layer's weight as compiled (``tw`` None: float32)."""
    return qmath.weight_storage_bytes(tw, numel)


def compiled_weight(module: nn.Module) -> WeightObject | None:
    """The integer weight the compiler will lower a fake-quant layer to (decomposed from its ``w_int``
    and format as ``passes.ternary`` does), or None when it stays float (a plain Conv2d/Linear, or a
    weight no kernel takes)."""
    from tvm_lowbit.quantizers.layers import QuantLayer

    if not isinstance(module, QuantLayer):
        return None
    w = module.w_int.numpy()
    fmt, n = module.weight_format, module.group_size
    if fmt == "pow2":
        return qmath.decompose_pow2(w)
    if fmt in ("int4", "int8"):
        return qmath.decompose_int(w, int(fmt[3:]), n)
    if fmt == "int":
        return qmath.decompose_k_bit(w)
    return qmath.decompose_w_int(w, n) if n > 0 else None


def model_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, number of weights) of every Conv2d/Linear weight of a float or fake-quant model, as
    compiled: integer layers by their codes and scales, float layers at 4 bytes a weight."""
    from tvm_lowbit.quantizers.layers import QuantLayer

    total, count = 0, 0
    for m in model.modules():
        if isinstance(m, QuantLayer):
            n = m.w_int.numel()
            total += weight_bytes(compiled_weight(m), n)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            n = m.weight.numel()
            total += 4 * n
        else:
            continue
        count += n
    return total, count


def avg_weight_bits(model: nn.Module) -> float:
    """8 * weight bytes / number of weights over all Conv2d/Linear layers (32.0 for a float model)."""
    total, count = model_weight_bytes(model)
    return 8.0 * total / max(count, 1)
