"""PoolQuantize: a float32 max pool and the next layer's input quantizer in one kernel, bit for bit.

After ``LowerIntegerLayers`` a network's stem (ResNet-18, ShuffleNetV2) reads::

    y = conv kernel (float32 out, ReLU fused)
    p = max_pool2d(y)                         # float32, Relax legalizes it to a padding stage + the max
    c = call_tir(quantize_act, (p,))          # the next conv's codes
    [r = add(..., p)]                         # ResNet: the first residual reads p too

The pool is two loop nests that ``ScheduleFloatOps`` schedules one by one (a padded copy of ``y``, then the
window max, vectorized only when the channel count is a multiple of the float32 vector: ShuffleNet's 24 is
not), and the quantizer a third pass over ``p``.  This pass replaces ``p`` and ``c`` by one ``call_tir`` to
``kernels.pool.maxpool_quantize``: TOPI's ``pool2d`` (what the legalization calls, with the same
attributes) and ``kernels.common.quantize_act`` of its result, in one PrimFunc whose schedule inlines the
padding, vectorizes the channels and quantizes each pooled vector in place.  Every value is computed by the
same float32 operations in the same order as before, so ``p`` and ``c`` are the same bits
(``tests/test_x86_glue2.py`` compiles with and without the pass).

Why not the quantizer *above* the pool (``q(maxpool(y)) == maxpool(q(y))``, exact since ``q`` is monotone
and the pool's padding never wins a window)?  After the lowering it would quantize ``y`` (4x the pooled
elements) to save a float pass over ``p``: slower.  It pays only where the conv producing ``y`` writes the
codes itself (its requantization epilogue), which needs ``LowerIntegerLayers`` to find a layer's input
quantizer through a pool; and in ResNet-18 ``p`` also feeds the residual add, so the float pool stays.

The quantizer must be the plain division form (``fuse_add_quantize.ACT_QUANT_ATTR``; the aarch64
reciprocal form has none); the pool float32 with static shapes, ``layout == out_layout`` in NHWC or NCHW.
When ``p`` has other users (ResNet's residual) the kernel writes ``p`` too; when it is read by two
quantizers, the first one is fused and the other reads ``p``.  ``TVM_LOWBIT_POOL_QUANT=off`` turns the
pass off (for the benchmark's before rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tvm
from tvm import relax

from tvm_lowbit.kernels import kernel_attrs
from tvm_lowbit.kernels.pool import LAYOUT_ATTR, NAME, maxpool_quantize
from tvm_lowbit.passes.function_pass import CountedRewrite, emit_like, rewrite_matches
from tvm_lowbit.passes.fuse_add_quantize import act_quantizer
from tvm_lowbit.passes.patterns import static_shape, users, var2val

ENV_SWITCH = "TVM_LOWBIT_POOL_QUANT"
MAX_POOL2D = tvm.ir.Op.get("relax.nn.max_pool2d")


@dataclass(frozen=True)
class _Fusion:
    pool: relax.Var          # p
    codes: relax.Var         # c
    data: relax.Expr         # y
    attrs: dict
    scale: float
    bits: int
    signed: bool
    keep_pool: bool          # p has users besides the fused quantizer


def _pool_attrs(call: relax.Call) -> dict | None:
    a = call.attrs
    layout = str(a.layout)
    if str(a.out_layout) != layout or layout not in ("NHWC", "NCHW"):
        return None
    return dict(pool_size=[int(v) for v in a.pool_size], strides=[int(v) for v in a.strides],
                dilation=[int(v) for v in a.dilation], padding=[int(v) for v in a.padding],
                ceil_mode=bool(a.ceil_mode), layout=layout)


def _find(mod: tvm.IRModule, func: relax.Function) -> list[_Fusion]:
    values = var2val(func)
    used = users(func)
    found: dict[int, _Fusion] = {}
    for block in func.body.blocks:
        for bnd in block.bindings:
            quant = act_quantizer(mod, bnd.value)
            if quant is None or not isinstance(quant[0], relax.Var):
                continue
            p, scale, bits, signed = quant
            pool = values.get(p)
            if not (isinstance(pool, relax.Call) and pool.op.same_as(MAX_POOL2D)) or p.__hash__() in found:
                continue  # not a pool, or a second quantizer of one pool (it keeps reading p)
            pattrs = _pool_attrs(pool)
            if pattrs is None or static_shape(p, "float32") is None or static_shape(pool.args[0], "float32") is None:
                continue
            found[p.__hash__()] = _Fusion(p, bnd.var, pool.args[0], pattrs, scale, bits, signed,
                                          len(used.get(p.__hash__(), [])) > 1)
    return list(found.values())


@relax.expr_functor.mutator
class _Fuse(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, fusions: list[_Fusion]) -> None:
        super().__init__(mod)
        self.at_pool = {f.pool.__hash__(): f for f in fusions}
        self.at_codes = {f.codes.__hash__(): f for f in fusions}
        self.codes: dict[int, relax.Expr] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        h = binding.var.__hash__()
        f = self.at_pool.get(h)
        if f is not None:
            out = self.builder_.emit_te(maxpool_quantize, self.visit_expr(f.data), **f.attrs, scale=f.scale,
                                        bits=f.bits, signed=f.signed, keep_pool=f.keep_pool,
                                        primfunc_name_hint=NAME,
                                        primfunc_attrs={**kernel_attrs(NAME), LAYOUT_ATTR: f.attrs["layout"]})
            if f.keep_pool:
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


def pool_quantize(mod: tvm.IRModule, func_name: str = "main") -> tuple[tvm.IRModule, int]:
    """``mod`` with every ``quantize_act(max_pool2d(y))`` of ``func_name`` in one kernel (module docstring);
    returns the module and how many were fused (0 when ``TVM_LOWBIT_POOL_QUANT=off``)."""
    if os.environ.get(ENV_SWITCH, "on").lower() in ("0", "off", "false", "no"):
        return mod, 0
    return rewrite_matches(mod, func_name, _find, _Fuse)


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.PoolQuantize")
class PoolQuantize(CountedRewrite):
    """Module-pass form of :func:`pool_quantize`; the count is kept in ``self.count``."""

    def rewrite(self, mod: tvm.IRModule, func_name: str) -> tuple[tvm.IRModule, int]:
        return pool_quantize(mod, func_name)
