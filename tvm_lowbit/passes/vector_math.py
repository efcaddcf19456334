"""VectorMath: float32 ``exp`` / ``erf`` legalized to vectorizable expressions with the C library's bits.

TVM legalizes ``relax.exp`` (and the exp stage of ``relax.nn.softmax``) to ``tirx.exp`` and ``relax.erf``
(and the erf stage of ``relax.nn.gelu``) to ``tirx.erf``, which LLVM turns into one scalar call of the C
library's ``expf`` / ``erff`` per element (16 calls per vector in a vectorized loop): the SiLU of
``TorchSiLU`` spends most of an EfficientNet's time there, GELU a quarter of MiniLM's.  ``VectorMath(target)``
legalizes these ops on float32 as TVM does, stage for stage, with :func:`tvm_lowbit.kernels.vecmath.expf` /
:func:`~tvm_lowbit.kernels.vecmath.erff` (glibc's algorithms as element-wise TIR) in place of the intrinsic,
so they fuse and vectorize as before and every output keeps the library's bits.  Only on targets where those
expressions are the library the built module calls (``vecmath.expf_matches_libm`` / ``erff_matches_libm``);
elsewhere, for other dtypes, and with ``TVM_LOWBIT_VECMATH=off``, nothing changes.  Only these calls are
legalized; the rest of the module is left as it was.  It runs in the CPU backend right after the integer
lowering (``backends/cpu.py``: before a tuning database's "zero" pipeline legalizes and fuses everything) and
in the x86 build pipeline before TVM's ``LegalizeOps`` (``schedule_float_ops.build_pipeline``, for modules
built with it directly).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import tvm
from tvm import relax, te, tirx

from tvm_lowbit.kernels import vecmath

VECMATH_ENV = "TVM_LOWBIT_VECMATH"  # "off": leave every op to TVM's legalization (the C library's scalar calls)
LegalizeFunc = Callable[[relax.BlockBuilder, relax.Call], relax.Expr]


def _default(op_name: str) -> LegalizeFunc:
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _is_f32(x: relax.Expr) -> bool:
    return getattr(x.ty, "dtype", None) == "float32"


def _elementwise(f: Callable[[tirx.PrimExpr], tirx.PrimExpr], name: str) -> Callable[[te.Tensor], te.Tensor]:
    return lambda t: te.compute(t.shape, lambda *i: f(t(*i)), name=name, tag="elemwise")


def _legalize_exp(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_f32(call.args[0]):
        return _default("relax.exp")(bb, call)
    return bb.call_te(_elementwise(vecmath.expf, "T_exp"), call.args[0], primfunc_name_hint="exp")


def _legalize_erf(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_f32(call.args[0]):
        return _default("relax.erf")(bb, call)
    return bb.call_te(_elementwise(vecmath.erff, "T_erf"), call.args[0], primfunc_name_hint="erf")


def _legalize_gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """TVM's ``relax.nn.gelu`` legalization, ``x * (0.5 + erf(x * sqrt(0.5)) * 0.5)`` stage by stage (each
    stage rounds to float32: no contraction across them), with the erf stage :func:`vecmath.erff`."""
    if not _is_f32(call.args[0]):
        return _default("relax.nn.gelu")(bb, call)

    def gelu(x: te.Tensor) -> te.Tensor:
        erf = _elementwise(vecmath.erff, "T_erf")(x * tirx.const(0.5**0.5, "float32"))
        return x * (tirx.const(0.5, "float32") + erf * tirx.const(0.5, "float32"))

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _legalize_softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """TVM's ``relax.nn.softmax`` legalization (``topi.nn.softmax``: max, ``exp(x - max)``, sum, divide, the
    same stages and reduction order) with the exp stage :func:`vecmath.expf`."""
    x = call.args[0]
    if not _is_f32(x):
        return _default("relax.nn.softmax")(bb, call)

    def softmax(t: te.Tensor, axis: int) -> te.Tensor:
        axis = axis + len(t.shape) if axis < 0 else axis
        k1 = te.reduce_axis((0, t.shape[axis]), name="k")
        k2 = te.reduce_axis((0, t.shape[axis]), name="k")
        reduced = tuple(d for i, d in enumerate(t.shape) if i != axis)

        def outer(idx: tuple) -> tuple:
            return tuple(v for i, v in enumerate(idx) if i != axis)

        def at(idx: tuple, k: tirx.PrimExpr) -> tuple:
            return (*idx[:axis], k, *idx[axis:])

        max_elem = te.compute(reduced, lambda *i: te.max(t[at(i, k1)], axis=k1), name="T_softmax_maxelem")
        exp = te.compute(t.shape, lambda *i: vecmath.expf(t[i] - max_elem[outer(i)]), name="T_softmax_exp")
        expsum = te.compute(reduced, lambda *i: te.sum(exp[at(i, k2)], axis=k2), name="T_softmax_expsum")
        return te.compute(t.shape, lambda *i: exp[i] / expsum[outer(i)], name="T_softmax_norm",
                          attrs={"axis": axis})

    return bb.call_te(softmax, x, int(call.attrs.axis), primfunc_name_hint="softmax")


def vector_math_legalizations(target: tvm.target.Target) -> dict[str, LegalizeFunc]:
    """The ops :class:`VectorMath` legalizes for ``target`` (empty where the C library's bits are not known, or
    when the environment variable ``TVM_LOWBIT_VECMATH`` is ``off``: to measure against the library calls)."""
    if os.environ.get(VECMATH_ENV, "").lower() == "off":
        return {}
    out: dict[str, LegalizeFunc] = {}
    if vecmath.expf_matches_libm(target):
        out.update({"relax.exp": _legalize_exp, "relax.nn.softmax": _legalize_softmax})
    if vecmath.erff_matches_libm(target):
        out.update({"relax.erf": _legalize_erf, "relax.nn.gelu": _legalize_gelu})
    return out


@relax.expr_functor.mutator
class _Legalizer(relax.PyExprMutator):
    """Legalizes the calls of ``legalizations``' ops (only those: the rest stays Relax for the pipeline)."""

    def __init__(self, mod: tvm.IRModule, legalizations: dict[str, LegalizeFunc]) -> None:
        super().__init__(mod)
        self.legalizations = {tvm.ir.Op.get(name): f for name, f in legalizations.items()}

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 - the mutator's hook
        call = self.visit_expr_post_order(call)
        f = next((f for op, f in self.legalizations.items() if call.op.same_as(op)), None)
        return call if f is None else f(self.builder_, call)


def vector_math(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` with every float32 ``exp``, ``erf``, ``nn.softmax`` and ``nn.gelu`` call of its Relax functions
    legalized with :mod:`tvm_lowbit.kernels.vecmath` where that has ``target``'s C library bits (module
    docstring); every other call is left to the pipeline's ``LegalizeOps``."""
    legalizations = vector_math_legalizations(target)
    if not legalizations:
        return mod
    mutator = _Legalizer(mod, legalizations)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.VectorMath")
class VectorMath:
    """Module-pass form of :func:`vector_math`."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return vector_math(mod, self.target)


__all__ = ["VECMATH_ENV", "VectorMath", "vector_math", "vector_math_legalizations"]
