"""FuseAddQuantize: a residual add (+ ReLU) and the next layer's input quantizer in one loop, bit for bit.

After ``LowerIntegerLayers`` a residual block's end reads::

    s = add(y, identity)                      # float32, y from a conv's float epilogue
    r = relu(s)                               # float32 (absent in MobileNetV2's blocks)
    c = call_tir(quantize_act, (r,))          # the next conv's codes (uint8 / int8)

Relax lowers ``add`` + ``relu`` to one fused loop that writes ``r`` and ``quantize_act`` to a second one that
reads ``r`` back: two passes over the tensor and two parallel regions.  This pass computes both in one
``call_tir``: for every element ``v = max(y + identity, 0)``, ``r = v`` (only when ``r`` has other users,
e.g. the next block's residual) and ``c = clip(nearbyint(v / s), lo, hi)``.  The float operations and their
order are those of the unfused graph (one float32 add, one max, one division by the same float32 ``s``),
so ``r`` and ``c`` are identical bit for bit (``tests/test_int_glue.py``); no multiply is next to an add, so
LLVM cannot contract anything into an FMA.

The quantizer's parameters come from the ``quantize_act`` PrimFunc's :data:`ACT_QUANT_ATTR` attribute,
which ``LowerIntegerLayers`` sets only on the plain division form (the aarch64 reciprocal form has none and
is never fused).  Both inputs must be float32 tensors of the result's shape (no broadcast), and the add
must have no other user.  The fused loop is a float op: on x86 ``ScheduleFloatOps`` gives it a parallel,
vectorized schedule; the pass runs where that schedule exists (``backends.cpu``: x86 hosts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx

from tvm_lowbit import qmath
from tvm_lowbit.kernels.common import round_clip
from tvm_lowbit.passes.function_pass import CountedRewrite, emit_like, rewrite_matches
from tvm_lowbit.passes.patterns import ADD, RELU, bound_call, static_shape, users, var2val

CALL_TIR = tvm.ir.Op.get("relax.call_tir")
ACT_QUANT_ATTR = "tvm_lowbit.act_quant"
"""PrimFunc attribute of a ``quantize_act`` call: ``[scale, bits, signed]`` (float32 scale, int, 0/1)."""


def act_quant_attrs(scale: float, bits: int, signed: bool) -> dict[str, list]:
    """The attributes ``LowerIntegerLayers`` puts on a plain-division ``quantize_act`` PrimFunc."""
    return {ACT_QUANT_ATTR: [float(np.float32(scale)), int(bits), int(signed)]}


@dataclass(frozen=True)
class _Fusion:
    codes: relax.Var        # the quantize_act binding
    value: relax.Var        # r (the relu, or the add when there is no relu)
    a: relax.Expr
    b: relax.Expr
    relu: bool
    keep_value: bool        # r has users besides the quantizer
    scale: float
    bits: int
    signed: bool


def add_relu_quantize(a: te.Tensor, b: te.Tensor, scale: float, bits: int, signed: bool, relu: bool,
                      keep_value: bool) -> te.Tensor | list[te.Tensor]:
    """``[v, codes]`` (or ``codes``) with ``v = [max](a + b[, 0])`` and ``codes`` as ``kernels.quantize_act``
    computes them from ``v`` (its plain division form), in one loop nest."""
    lo, hi = qmath.act_range(bits, signed)
    dtype = qmath.act_dtype(bits, signed)
    s = tirx.const(float(np.float32(scale)), "float32")

    def value(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        v = a[i] + b[i]
        return tirx.max(v, tirx.const(0, "float32")) if relu else v

    def codes(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        return round_clip(value(*i) / s, lo, hi, dtype)

    if keep_value:
        return list(te.compute(a.shape, lambda *i: [value(*i), codes(*i)], name="add_quantize"))
    return te.compute(a.shape, codes, name="add_quantize")


def act_quantizer(mod: tvm.IRModule, call: relax.Expr) -> tuple[relax.Expr, float, int, bool] | None:
    """(input, scale, bits, signed) when ``call`` is a ``call_tir`` of a plain-division ``quantize_act``
    (its PrimFunc carries :data:`ACT_QUANT_ATTR`) with one argument; else None."""
    if not (isinstance(call, relax.Call) and call.op.same_as(CALL_TIR)):
        return None
    gv, args = call.args[0], call.args[1]
    prim = mod[gv] if isinstance(gv, relax.GlobalVar) else None
    attrs = getattr(prim, "attrs", None) or {}
    if ACT_QUANT_ATTR not in attrs or len(args.fields) != 1:
        return None
    scale, bits, signed = attrs[ACT_QUANT_ATTR]
    return args.fields[0], float(scale), int(bits), bool(int(signed))


def _find(mod: tvm.IRModule, func: relax.Function) -> list[_Fusion]:
    values = var2val(func)
    used = users(func)
    found = []
    for block in func.body.blocks:
        for bnd in block.bindings:
            quant = act_quantizer(mod, bnd.value)
            if quant is None or not isinstance(quant[0], relax.Var):
                continue
            r, scale, bits, signed = quant
            relu = bound_call(RELU, r, values) is not None
            s = values[r].args[0] if relu else r
            add = bound_call(ADD, s, values)
            if add is None or not isinstance(s, relax.Var) or (relu and len(used.get(s.__hash__(), [])) != 1):
                continue
            shape = static_shape(r, "float32")
            if (shape is None or static_shape(add.args[0], "float32") != shape
                    or static_shape(add.args[1], "float32") != shape):
                continue
            found.append(_Fusion(bnd.var, r, add.args[0], add.args[1], relu, len(used.get(r.__hash__(), [])) > 1,
                                 scale, bits, signed))
    per_value: dict[int, int] = {}
    for f in found:
        per_value[f.value.__hash__()] = per_value.get(f.value.__hash__(), 0) + 1
    return [f for f in found if per_value[f.value.__hash__()] == 1]  # two quantizers of one value: neither


@relax.expr_functor.mutator
class _Fuse(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, fusions: list[_Fusion]) -> None:
        super().__init__(mod)
        self.at_value = {f.value.__hash__(): f for f in fusions}
        self.at_codes = {f.codes.__hash__(): f for f in fusions}
        self.codes: dict[int, relax.Expr] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        h = binding.var.__hash__()
        f = self.at_value.get(h)
        if f is not None:
            out = self.builder_.emit_te(add_relu_quantize, self.visit_expr(f.a), self.visit_expr(f.b),
                                        scale=f.scale, bits=f.bits, signed=f.signed, relu=f.relu,
                                        keep_value=f.keep_value, primfunc_name_hint="add_quantize")
            if f.keep_value:
                self.set_var_remap(binding.var, emit_like(self.builder_, relax.TupleGetItem(out, 0), binding.var))
                self.codes[f.codes.__hash__()] = self.builder_.emit(relax.TupleGetItem(out, 1))
            else:
                self.codes[f.codes.__hash__()] = out
            return
        f = self.at_codes.get(h)
        if f is not None:
            codes = self.codes[h]
            if not isinstance(binding.var, relax.DataflowVar):
                codes = self.builder_.emit_output(codes)
            self.set_var_remap(binding.var, codes)
            return
        super().visit_var_binding_(binding)


def fuse_add_quantize(mod: tvm.IRModule, func_name: str = "main") -> tuple[tvm.IRModule, int]:
    """``mod`` with every ``quantize_act(relu(add(a, b)))`` / ``quantize_act(add(a, b))`` of ``func_name``
    in one loop (module docstring); returns the module and how many were fused."""
    return rewrite_matches(mod, func_name, _find, _Fuse)


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.FuseAddQuantize")
class FuseAddQuantize(CountedRewrite):
    """Module-pass form of :func:`fuse_add_quantize`; the count is kept in ``self.count``."""

    def rewrite(self, mod: tvm.IRModule, func_name: str) -> tuple[tvm.IRModule, int]:
        return fuse_add_quantize(mod, func_name)
