"""VectorMath: float32 ``exp`` legalized to a vectorizable expression with the C library's bits.

TVM legalizes ``relax.exp`` to ``tirx.exp``, which LLVM turns into one scalar call of the C library's ``expf``
per element (16 calls per vector in a vectorized loop): the SiLU of ``TorchSiLU`` and the sigmoid tail of
``TorchSigmoid`` spend most of an EfficientNet's time there.  ``VectorMath(target)`` legalizes every float32
``relax.exp`` to :func:`tvm_lowbit.kernels.vecmath.expf`, glibc's algorithm written as element-wise TIR, so
the op fuses and vectorizes as before and every output keeps the library's bits.  Only on targets where
that expression is the library the built module calls (:func:`~tvm_lowbit.kernels.vecmath.expf_matches_libm`);
elsewhere, and for other dtypes, nothing changes.  It runs in the CPU build pipeline before TVM's own
``LegalizeOps`` (``schedule_float_ops.build_pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, te

from tvm_lowbit.kernels import vecmath

LegalizeFunc = Callable[[relax.BlockBuilder, relax.Call], relax.Expr]


def _default(op_name: str) -> LegalizeFunc:
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _legalize_exp(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    x = call.args[0]
    if getattr(x.ty, "dtype", None) != "float32":
        return _default("relax.exp")(bb, call)

    def compute(t: te.Tensor) -> te.Tensor:
        return te.compute(t.shape, lambda *i: vecmath.expf(t(*i)), name="vexpf", tag="elemwise")

    return bb.call_te(compute, x, primfunc_name_hint="exp")


def vector_math_legalizations(target: tvm.target.Target) -> dict[str, LegalizeFunc]:
    """The ops :class:`VectorMath` legalizes for ``target`` (empty where the C library's bits are not known)."""
    return {"relax.exp": _legalize_exp} if vecmath.expf_matches_libm(target) else {}


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.VectorMath")
class VectorMath:
    """Legalize float32 ``exp`` to :func:`tvm_lowbit.kernels.vecmath.expf` on targets where it has the C
    library's bits (module docstring); the other ops are legalized as ``relax.transform.LegalizeOps`` does."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.legalizations = vector_math_legalizations(target)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.legalizations:
            return mod
        return relax.transform.LegalizeOps(self.legalizations)(mod)


__all__ = ["VectorMath", "vector_math_legalizations"]
