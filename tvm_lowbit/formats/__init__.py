"""Weight formats: what a quantized layer's integer weight is, and how the compiler reads it back.

``decompose(weight_format, w_int, group_size)`` is the one question the lowering pass asks: the
integer weight constant of a layer, in the packed integer form its kernels take, or the reason it
does not fit.  ``kernel_family(obj)`` names the kernel family that takes the decomposed weight.
"""

from __future__ import annotations

import numpy as np

from tvm_lowbit import qmath

WeightObject = qmath.TernaryWeight | qmath.Pow2Weight | qmath.IntWeight

# without a recorded format: grouped ternary with a real group first, then power of two, then ternary
# groups of one (which any small integer weight satisfies, so it comes last: a shift beats a multiply)
_GUESS_ORDER: tuple[int | str, ...] = (64, 32, 16, 8, 4, 2, "pow2", 1)


def kernel_family(obj: WeightObject) -> str:
    """"ternary", "pow2" or "int": the kernels that take this decomposed weight."""
    return "int" if isinstance(obj, qmath.IntWeight) else str(obj.format)


def decompose(weight_format: str | None, w_int: np.ndarray, group_size: int | None) -> tuple[WeightObject | None, str]:
    """The integer weight ``w_int`` of a layer recorded with ``weight_format`` ("ternary", "pow2", "int",
    "int4", "int8", or None when unknown) as the object its kernels take, or (None, why it does not fit)."""
    shape = tuple(w_int.shape)
    if weight_format == "pow2":
        tw = qmath.decompose_pow2(w_int)
        return (tw, "") if tw is not None else (None, f"its integer weight {shape} is not power-of-two "
                                                      f"(every value 0 or +-2^e, e <= {qmath.POW2_MAX_EXP})")
    if weight_format in ("ternary", None):
        sizes = [group_size] if weight_format else list(_GUESS_ORDER)
        for n in sizes:
            tw = qmath.decompose_pow2(w_int) if n == "pow2" else qmath.decompose_w_int(w_int, int(n))
            if tw is not None:
                return tw, ""
        return None, (f"its integer weight {shape} is not grouped-ternary with group size {sizes[0]} and 8-bit "
                      "alpha codes" + ("" if weight_format else " (nor power-of-two)"))
    if weight_format == "int":
        # k-bit integer weights (PACT/DoReFa): the narrowest packed integer kernel that holds them exactly
        tw = qmath.decompose_k_bit(w_int)
        return (tw, "") if tw is not None else (None, f"its integer weight {shape} has values beyond +-255, "
                                                      "which the integer kernels do not take")
    if weight_format in ("int4", "int8"):
        bits = int(weight_format[3:])
        n = group_size or 0
        tw = qmath.decompose_int(w_int, bits, n)
        return (tw, "") if tw is not None else (None, f"its integer weight {shape} is not {weight_format} "
                                                      f"(|code| <= {qmath.int_qmax(bits)} times an 8-bit scale "
                                                      f"code per group of {n})")
    return None, f"no integer kernel for weight format {weight_format!r} (known: ternary, pow2, int, int4, int8)"
