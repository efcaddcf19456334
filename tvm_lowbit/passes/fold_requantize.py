"""FoldRequantize: drop a quantizer that re-quantizes codes it would reproduce exactly.

Fake-quant models often quantize an activation twice with the same scale: PACT's exported clip
(``clip(round(x / s), 0, 2^k - 1) * s``) feeds the next layer's input quantizer
(``clip(round(y / s), lo, hi)``).  With codes ``c`` from the first quantizer, ``(c * s) / s`` in
float32 lies within two ulps of ``c``, so rounding gives ``c`` back for any ``|c| < 2^22``; when the
second range contains the first, the clip changes nothing either.  This pass points the second
quantizer's users at the first one's codes, so the integer-layer lowering sees one quantizer and can fuse the
requantization into the producing kernel::

    c1 = clip(round(divide(x, s)), lo1, hi1)         c1 = clip(round(divide(x, s)), lo1, hi1)
    y  = multiply(c1, s)                       ->    y  = multiply(c1, s)   # other users keep it
    c2 = clip(round(divide(y, s)), lo2, hi2)         (uses of c2 read c1; dead code is removed)

Only float32 tensors and float32-equal scales are folded; anything else is left as it is.  The
quantizer and the multiply are the patterns of :mod:`tvm_lowbit.passes.patterns`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_lowbit.passes.function_pass import CountedRewrite, replace_function
from tvm_lowbit.passes.patterns import MULTIPLY, bound_call, const_value, match_quantizer, var2val
from tvm_lowbit.passes.report import LoweringReport


def _quantizer(e: relax.Expr, values: dict[relax.Var, relax.Expr]) -> tuple[relax.Expr, float, float, float] | None:
    """``e = clip(round(divide(x, s)), lo, hi)`` with a positive float32 scalar ``s`` and float32 ``x``
    -> (x, s, lo, hi)."""
    m = match_quantizer(e, values)
    if m is None:
        return None
    s = _scalar(m.scale)
    if s is None or s <= 0 or getattr(m.source.ty, "dtype", None) != "float32":
        return None
    return m.source, s, m.lo, m.hi


def _scalar(v: np.ndarray | None) -> float | None:
    if v is not None and v.size == 1 and v.dtype == np.float32:
        return float(v.reshape(()))
    return None


def _redundant_pairs(func: relax.Function) -> dict[int, relax.Var]:
    """Second quantizer var -> first quantizer var, for every exactly redundant pair."""
    values = var2val(func)
    order = [b.var for block in func.body.blocks for b in block.bindings]
    vars_by_hash = {v.__hash__(): v for v in order}
    pairs: dict[int, relax.Var] = {}
    for v in order:
        second = _quantizer(v, values)
        if second is None:
            continue
        y, s2, lo2, hi2 = second
        mul = bound_call(MULTIPLY, y, values)
        if mul is None:
            continue
        for codes, scale in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
            first = _quantizer(codes, values) if isinstance(codes, relax.Var) else None
            s_mul = _scalar(const_value(scale, values))
            if first is None or s_mul is None:
                continue
            _, s1, lo1, hi1 = first
            exact = max(abs(lo1), abs(hi1)) < 2 ** 22
            if exact and np.float32(s1) == np.float32(s2) == np.float32(s_mul) and lo2 <= lo1 and hi1 <= hi2:
                pairs[v.__hash__()] = pairs.get(codes.__hash__(), vars_by_hash[codes.__hash__()])
                break
    return pairs


@relax.expr_functor.mutator
class _Redirect(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, pairs: dict[int, relax.Var]) -> None:
        super().__init__(mod)
        self.pairs = pairs

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        first = self.pairs.get(binding.var.__hash__())
        if first is None:
            super().visit_var_binding_(binding)
            return
        codes = self.visit_expr(first)
        if not isinstance(binding.var, relax.DataflowVar):
            codes = self.builder_.emit_output(codes)  # the value leaves the dataflow block
        self.set_var_remap(binding.var, codes)


def fold_requantize(mod: tvm.IRModule, func_name: str = "main") -> tuple[tvm.IRModule, int]:
    """Fold exactly redundant re-quantizers in ``mod[func_name]``; returns the module and how many."""
    func = mod[func_name]
    pairs = _redundant_pairs(func)
    if not pairs:
        return mod, 0
    mut = _Redirect(mod, pairs)
    return replace_function(mod, func_name, mut, mut.visit_expr(func)), len(pairs)


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.FoldRequantize")
class FoldRequantize(CountedRewrite):
    """Module-pass form of :func:`fold_requantize`: the count is kept in ``self.folded`` and, when a
    ``report`` is given, in its ``requant_folded``."""

    def __init__(self, func_name: str = "main", report: LoweringReport | None = None) -> None:
        super().__init__(func_name)
        self.report = report

    @property
    def folded(self) -> int:
        """How many re-quantizers the last run folded."""
        return self.count

    def rewrite(self, mod: tvm.IRModule, func_name: str) -> tuple[tvm.IRModule, int]:
        out, folded = fold_requantize(mod, func_name)
        if self.report is not None:
            self.report.requant_folded = folded
        return out, folded
