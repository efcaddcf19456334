"""NormalizeTake: make every ``relax.take`` read inside its tensor.

TVM's PyTorch importer turns ``x[:, -1]`` (``aten.select.int`` with a negative index) into
``take(x, const(-1), axis=1, mode="fast")``. Mode "fast" does no bounds handling, so the kernel reads
before the tensor: the output is garbage that changes from run to run (an LSTM/GRU model's usual
``out[:, -1]`` was off by 1e7..1e30). This pass rewrites, before anything else runs:

* a constant index on an axis of static size ``d``: ``i < 0`` becomes ``i + d`` (what PyTorch and NumPy
  mean); an index outside ``[-d, d)`` is a ``CompileError`` naming the op (PyTorch refuses it too);
* any other index (computed, or on an axis of symbolic size) in mode "fast": mode "wrap", which reads
  index ``i`` as ``i mod d``, so negative indices mean what PyTorch means and nothing reads out of bounds.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_lowbit.errors import CompileError

TAKE = tvm.ir.Op.get("relax.take")


def _axis_size(x: relax.Expr, axis: int) -> tuple[int, int | None]:
    """(the non-negative axis, its static size or None)."""
    sinfo = x.ty
    shape = getattr(sinfo, "shape", None)
    ndim = int(sinfo.ndim)
    ax = axis + ndim if axis < 0 else axis
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return ax, None
    dim = shape.values[ax]
    return ax, int(dim.value) if isinstance(dim, tvm.tirx.IntImm) else None


@mutator
class _TakeRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D401 - the mutator's hook
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or call.op != TAKE:
            return call
        x, idx = call.args
        axis = 0 if call.attrs.axis is None else int(call.attrs.axis)
        mode = str(call.attrs.mode)
        ax, size = _axis_size(x, axis)
        if isinstance(idx, tvm.ir.expr.GenericConst) and hasattr(idx.value, "numpy") and size is not None:
            v = idx.value.numpy()
            if v.size and (v.min() < -size or v.max() >= size):
                bad = int(v[(v < -size) | (v >= size)].flat[0])
                raise CompileError(f"take (indexing) of a tensor of shape {_shape(x)} with index {bad} on axis "
                                   f"{ax} of size {size}: the index is out of range")
            if v.size and v.min() < 0:
                self.rewritten += 1
                fixed = relax.const(np.where(v < 0, v + size, v).astype(v.dtype), str(v.dtype))
                return relax.op.take(x, fixed, ax, mode)
            return call
        if mode == "fast":
            self.rewritten += 1
            return relax.op.take(x, idx, ax, "wrap")
        return call


def _shape(x: relax.Expr) -> str:
    shape = getattr(x.ty, "shape", None)
    return str(tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in shape.values)) \
        if isinstance(shape, relax.ShapeExpr) else "(?)"


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.NormalizeTake")
class NormalizeTake:
    """Every ``relax.take`` of every Relax function reads inside its tensor (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return normalize_take(mod)


def normalize_take(mod: tvm.IRModule) -> tvm.IRModule:
    """The pass as a function: ``mod`` with negative constant take indices made non-negative and computed
    indices in mode "wrap"."""
    rewriter = _TakeRewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
