"""The dataflow patterns of a fake-quant graph, defined once with ``tvm.relax.dpl`` and shared by the
requantize fold, the integer-layer lowering and the ONNX quantizer.

A quantized layer of an imported fake-quant model reads::

    q   = clip(round(divide(x, s)), lo, hi)              # QUANTIZER: activation codes, as float
    acc = conv2d(q, W) | matmul(q, permute_dims(W))      # CONV2D / MATMUL on a constant integer weight
    y   = astype(add(multiply(astype(acc, f64), S), B), f32)   # the epilogue: ASTYPE, MULTIPLY, ADD
    [relu(y)]                                            # RELU

The patterns match one binding at a time, looking through variables with the function's ``var2val``
(``relax.analysis.get_var2val``).  The walk along a layer's chain stays in the passes (with the binding
utilities): it must check that every intermediate value has exactly one user and accepts any number of
casts and leading-dimension reshapes between the codes and the op, which ``dpl`` cannot say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_op, wildcard

# --- the patterns ---------------------------------------------------------------------------------------

DIVIDE = is_op("relax.divide")(wildcard(), wildcard())
ROUND = is_op("relax.round")(wildcard())
QUANT_SOURCE, QUANT_SCALE = wildcard(), wildcard()  # x and s, for QUANTIZER.extract_matched_expr
QUANTIZER = is_op("relax.clip")(is_op("relax.round")(is_op("relax.divide")(QUANT_SOURCE, QUANT_SCALE)),
                                wildcard(), wildcard())
"""The activation quantizer ``clip(round(divide(x, s)), lo, hi)``."""
CONV2D = is_op("relax.nn.conv2d")(wildcard(), wildcard())
MATMUL = is_op("relax.matmul")(wildcard(), wildcard())
INTEGER_OP = CONV2D | MATMUL
"""The integer op of a layer: conv2d or matmul (the weight's constness is checked by :func:`const_value`)."""
PERMUTE_DIMS = is_op("relax.permute_dims")(wildcard())
ASTYPE = is_op("relax.astype")(wildcard())
RESHAPE = is_op("relax.reshape")(wildcard(), wildcard())
MULTIPLY = is_op("relax.multiply")(wildcard(), wildcard())
ADD = is_op("relax.add")(wildcard(), wildcard())
RELU = is_op("relax.nn.relu")(wildcard())


def var2val(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """Each bound variable of ``func`` -> its value (what the patterns look through)."""
    return dict(relax.analysis.get_var2val(func))


def users(func: relax.Function) -> dict[int, list[relax.Var | None]]:
    """Each variable's users in ``func`` (keyed by ``__hash__``): the variables bound to values that read it,
    and None for the function's result."""
    used: dict[int, list[relax.Var | None]] = {}
    for block in func.body.blocks:
        for b in block.bindings:
            for v in relax.analysis.free_vars(b.value):
                used.setdefault(v.__hash__(), []).append(b.var)
    for v in relax.analysis.free_vars(func.body.body):
        used.setdefault(v.__hash__(), []).append(None)
    return used


def static_shape(e: relax.Expr, dtype: str | None = None) -> tuple[int, ...] | None:
    """``e``'s shape when its type has one with no symbolic dimension (and, given ``dtype``, is of that
    dtype); else None."""
    ty = e.ty
    shape = getattr(ty, "shape", None)
    if shape is None or (dtype is not None and getattr(ty, "dtype", None) != dtype):
        return None
    try:
        return tuple(int(d) for d in shape)
    except TypeError:  # a symbolic dimension
        return None


def bound_call(pattern: DFPattern, e: relax.Expr, values: dict[relax.Var, relax.Expr]) -> relax.Call | None:
    """The call ``e`` is (or is bound to) when it matches ``pattern``; else None."""
    call = values.get(e, e) if isinstance(e, relax.Var) else e
    if isinstance(call, relax.Call) and pattern.match(call, values):
        return call
    return None


def const_value(e: relax.Expr, values: dict) -> np.ndarray | None:
    """The NumPy value of a constant, looking through a variable bound to one; else None."""
    e = values.get(e, e) if isinstance(e, relax.Var) else e
    if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "numpy"):
        return e.value.numpy()
    return None


def prim_float(e: relax.Expr) -> float:
    """A PrimValue argument (a clip bound) as a float."""
    v = e.value  # PrimValue -> IntImm/FloatImm (or a plain number, depending on the printer path)
    return float(getattr(v, "value", v))


@dataclass(frozen=True)
class QuantizerMatch:
    """``codes = clip(round(divide(source, scale)), lo, hi)`` with its intermediate variables."""

    codes: relax.Expr          # the clip (the matched expression)
    source: relax.Expr         # x
    scale: np.ndarray | None   # s, when it is a constant
    lo: float
    hi: float
    chain: tuple[relax.Expr, ...]  # the divide, round and clip values (variables where bound)


def match_quantizer(e: relax.Expr, values: dict[relax.Var, relax.Expr]) -> QuantizerMatch | None:
    """``e`` as an activation quantizer (:data:`QUANTIZER`), or None."""
    clip = bound_call(QUANTIZER, e, values)
    if clip is None:
        return None
    rnd = bound_call(ROUND, clip.args[0], values)
    div = bound_call(DIVIDE, rnd.args[0], values)
    return QuantizerMatch(e, div.args[0], const_value(div.args[1], values), prim_float(clip.args[1]),
                          prim_float(clip.args[2]), (rnd.args[0], clip.args[0], e))
