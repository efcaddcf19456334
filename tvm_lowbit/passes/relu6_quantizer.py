"""Relu6Quantizer: a quantizer that reads ``clip(y, 0, b)`` (ReLU6) reads ``relu(y)`` when the bound ``b``
already quantizes to the top code.

MobileNetV2's ``conv -> batch norm -> ReLU6 -> next conv`` imports as ``q(clip(y, 0, 6))`` with the quantizer
``q(v) = clip(round(v / s), lo, hi)``.  ``q`` is monotone (a float32 division by ``s > 0`` and ``round`` both
are), so ``q(clip(y, 0, b)) == clip(q(y), q(0), q(b))`` for every ``y``, and ``q(relu(y)) == clip(q(y), q(0),
hi)``: the two are equal, bit for bit, whenever ``q(b) == hi``, which holds for any scale calibrated on the
clipped outputs (``s <= b / hi`` up to rounding).  The rewrite is checked per quantizer, in float32 as the
graph computes it; other users of the clip keep it.

With a ReLU instead of the clip, ``LowerIntegerLayers`` fuses the activation and the next layer's
quantization into the conv's epilogue (``relu`` + requantize), so the conv writes uint8 codes instead of a
float32 tensor that a separate clip and a separate quantize read again.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from tvm_lowbit.passes.patterns import const_value, prim_float

_Y, _LO_CLIP, _HI_CLIP = wildcard(), wildcard(), wildcard()
_SCALE, _LO, _HI = wildcard(), wildcard(), wildcard()
_CLIPPED = is_op("relax.clip")(_Y, _LO_CLIP, _HI_CLIP)
_QUANT = is_op("relax.clip")(is_op("relax.round")(is_op("relax.divide")(_CLIPPED, _SCALE)), _LO, _HI)


def _bound(e: relax.Expr) -> float | None:
    try:
        return prim_float(e)
    except (AttributeError, TypeError, ValueError):
        return None


def quantizes_to_top(bound: float, scale: np.ndarray, lo: float, hi: float) -> bool:
    """Whether ``clip(round(bound / scale), lo, hi) == hi`` for every scale, in float32 (the graph's dtype)."""
    s = np.asarray(scale, np.float32)
    if s.size == 0 or not np.all(s > 0):
        return False
    q = np.clip(np.round(np.float32(bound) / s), np.float32(lo), np.float32(hi))
    return bool(np.all(q == np.float32(hi)))


def _rewrite(call: relax.Expr, m: dict) -> relax.Expr:
    y = m[_Y]
    if getattr(y.ty, "dtype", None) != "float32":
        return call
    a, b, lo, hi = (_bound(m[p]) for p in (_LO_CLIP, _HI_CLIP, _LO, _HI))
    scale = const_value(m[_SCALE], {})
    if None in (a, b, lo, hi) or scale is None or a != 0.0 or not lo <= 0.0 <= hi:
        return call
    if not quantizes_to_top(b, scale, lo, hi):
        return call
    return relax.op.clip(relax.op.round(relax.op.divide(relax.op.nn.relu(y), m[_SCALE])), m[_LO], m[_HI])


def relu6_quantizer(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """``mod`` with every quantizer of ``clip(y, 0, b)`` whose ``b`` quantizes to the top code reading
    ``relu(y)`` (module docstring); run after FoldConstant (the scales must be constants)."""
    if func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    mod = mod.clone() if hasattr(mod, "clone") else mod
    mod[func_name] = rewrite_call(_QUANT, _rewrite, mod[func_name])
    return mod


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.Relu6Quantizer")
class Relu6Quantizer:
    """Module-pass form of :func:`relu6_quantizer`."""

    def __init__(self, func_name: str = "main") -> None:
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return relu6_quantizer(mod, self.func_name)
