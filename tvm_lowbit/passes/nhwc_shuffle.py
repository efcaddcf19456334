"""NHWCShuffle: ShuffleNet's channel shuffle in NHWC, so the float data between its integer convs is not
transposed to NCHW and back in every block.

The integer region runs in NHWC (``passes.convert_layout``), but ``ConvertLayout`` has no rule for the
channel shuffle (``reshape(n, g, c/g, h, w)`` -> ``permute_dims(0, 2, 1, 3, 4)`` -> ``reshape(n, c, h, w)``),
so after ``LowerIntegerLayers`` a ShuffleNetV2 block reads::

    t = permute_dims(b, [0, 3, 1, 2])                   # the branch's NHWC output -> NCHW (a copy)
    c = concat((x1, t), axis=1)                         # NCHW
    s = reshape(permute_dims(reshape(c, (n, g, c/g, h, w)), [0, 2, 1, 3, 4]), (n, c, h, w))
    x1', x2 = split(s, [c/2], axis=1)                   # x1' feeds the next block's concat
    q = quantize_act(permute_dims(x2, [0, 2, 3, 1]))    # back to NHWC for the next conv

This pass follows, binding by binding, which values are an NCHW ``permute_dims`` of an NHWC value and
builds the NHWC form of each op on them: ``concat`` on axis 3, the shuffle as
``reshape(n, h, w, g, c/g)`` -> ``permute_dims(0, 1, 2, 4, 3)`` -> ``reshape(n, h, w, c)``, ``split`` on
axis 3; a ``permute_dims(_, [0, 2, 3, 1])`` of such a value becomes the NHWC value itself.  The NCHW ops
stay where something still reads them; the rest is removed as dead code.  Only data moves, so every
output is bit-identical (``tests/test_int_glue.py``).  It applies to any target (pure Relax ops).
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_lowbit.passes.function_pass import CountedRewrite, replace_function
from tvm_lowbit.passes.patterns import static_shape

TO_NCHW, TO_NHWC, SHUFFLE = [0, 3, 1, 2], [0, 2, 3, 1], [0, 2, 1, 3, 4]
_OPS = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("permute_dims", "reshape", "concat", "split")}


def _axes(call: relax.Call) -> list[int] | None:
    axes = call.attrs.axes
    return None if axes is None else [int(a) for a in axes]


def _is(call: relax.Expr, name: str) -> bool:
    return isinstance(call, relax.Call) and call.op.same_as(_OPS[name])


@relax.expr_functor.mutator
class _ToNHWC(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.nhwc: dict[int, relax.Expr] = {}       # NCHW var -> its NHWC value (already emitted)
        self.grouped: dict[int, tuple] = {}         # reshape(c, (n, g, c/g, h, w)) var -> (NHWC value, g)
        self.shuffled: dict[int, tuple] = {}        # its permute_dims(0, 2, 1, 3, 4) -> (NHWC value, g)
        self.splits: dict[int, relax.Expr] = {}     # split var -> the NHWC split
        self.changed = 0

    def _nhwc_of(self, e: relax.Expr) -> relax.Expr | None:
        return self.nhwc.get(e.__hash__()) if isinstance(e, relax.Var) else None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var, call = binding.var, binding.value
        h = var.__hash__()
        if _is(call, "permute_dims") and static_shape(call.args[0]) is not None:
            x, axes = call.args[0], _axes(call)
            ndim = len(static_shape(x))
            if ndim == 4 and axes == TO_NHWC and self._nhwc_of(x) is not None:
                self.set_var_remap(var, self.nhwc[x.__hash__()] if isinstance(var, relax.DataflowVar)
                                   else self.builder_.emit_output(self.nhwc[x.__hash__()]))
                self.changed += 1
                return
            super().visit_var_binding_(binding)
            if ndim == 4 and axes == TO_NCHW:
                self.nhwc[h] = self.visit_expr(x)
            elif ndim == 5 and axes == SHUFFLE and isinstance(x, relax.Var) and x.__hash__() in self.grouped:
                self.shuffled[h] = self.grouped[x.__hash__()]
            return
        super().visit_var_binding_(binding)
        if _is(call, "concat") and int(call.attrs.axis) == 1 and isinstance(call.args[0], relax.Tuple):
            fields = [self._nhwc_of(f) for f in call.args[0].fields]
            if fields and all(f is not None and len(static_shape(f) or ()) == 4 for f in fields):
                self.nhwc[h] = self.builder_.emit(relax.op.concat(fields, axis=3))
        elif _is(call, "reshape") and isinstance(call.args[0], relax.Var):
            x, out = call.args[0], static_shape(var)
            src = static_shape(x)
            if self._nhwc_of(x) is not None and out is not None and len(out) == 5 and src is not None \
                    and len(src) == 4:
                n, c, hh, w = src
                g = out[1]
                if out == (n, g, c // g, hh, w) and g * (c // g) == c:
                    self.grouped[h] = (self.nhwc[x.__hash__()], g)
            elif x.__hash__() in self.shuffled and out is not None and len(out) == 4:
                y, g = self.shuffled[x.__hash__()]
                n, hh, w, c = static_shape(y)
                if out == (n, c, hh, w):
                    z = self.builder_.emit(relax.op.reshape(y, (n, hh, w, g, c // g)))
                    z = self.builder_.emit(relax.op.permute_dims(z, [0, 1, 2, 4, 3]))
                    self.nhwc[h] = self.builder_.emit(relax.op.reshape(z, (n, hh, w, c)))
        elif _is(call, "split") and int(call.attrs.axis) == 1 and self._nhwc_of(call.args[0]) is not None:
            if len(static_shape(call.args[0]) or ()) == 4:
                self.splits[h] = self.builder_.emit(
                    relax.op.split(self.nhwc[call.args[0].__hash__()], call.attrs.indices_or_sections, axis=3))
        elif isinstance(call, relax.TupleGetItem) and isinstance(call.tuple_value, relax.Var) \
                and call.tuple_value.__hash__() in self.splits:
            self.nhwc[h] = self.builder_.emit(relax.TupleGetItem(self.splits[call.tuple_value.__hash__()],
                                                                 int(call.index)))


def nhwc_shuffle(mod: tvm.IRModule, func_name: str = "main") -> tuple[tvm.IRModule, int]:
    """``mod`` with the NCHW detours of ``func_name``'s concat / channel shuffle / split chains in NHWC (module
    docstring); returns the module and how many ``permute_dims`` back to NHWC were removed."""
    if func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, 0
    mut = _ToNHWC(mod)
    new_func = mut.visit_expr(mod[func_name])
    if not mut.changed:
        return mod, 0
    return replace_function(mod, func_name, mut, new_func), mut.changed


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.NHWCShuffle")
class NHWCShuffle(CountedRewrite):
    """Module-pass form of :func:`nhwc_shuffle`; the count is kept in ``self.count``."""

    def rewrite(self, mod: tvm.IRModule, func_name: str) -> tuple[tvm.IRModule, int]:
        return nhwc_shuffle(mod, func_name)
