"""ShuffleQuantize: ShuffleNet's concat, channel shuffle, split and the next quantizer in one kernel, bit for bit.

After ``NHWCShuffle`` every ShuffleNetV2 block ends with::

    cat = concat((x1, b), axis=3)                                   # x1: the previous half, b: the branch
    s = reshape(permute_dims(reshape(cat, (n, h, w, g, C/g)), [0, 1, 2, 4, 3]), (n, h, w, C))
    x1', x2 = split(s, [C/2], axis=3)                               # (no split after a stage's last block)
    c = call_tir(quantize_act, (x2,))                               # the next block's conv reads the codes

which Relax runs as one loop nest per op (the concat, reshape and transpose copies, the split's copies, the
quantizer).  This pass replaces the chain by one ``call_tir`` to ``kernels.shuffle.channel_shuffle`` that
writes, straight from ``x1`` and ``b``, each channel range that something reads: the float32 values
(``x1'``, which the next concat reads) or, for a range whose reader is a ``quantize_act`` with the plain
division attribute (``fuse_add_quantize.ACT_QUANT_ATTR``), its codes.  Only data moves before the quantizer,
and the quantizer is ``kernels.common.quantize_act`` of the same values, so every output is the same bits
(``tests/test_x86_glue2.py`` compiles ShuffleNet-style blocks with and without the pass).

Required: ``concat`` on the last axis of float32 NHWC tensors with static shapes, the shuffle's reshape /
``permute_dims([0, 1, 2, 4, 3])`` / reshape with one user each, and a ``split`` (if any) on the last axis whose
only users are its items.  ``TVM_LOWBIT_SHUFFLE_QUANT=off`` turns the pass off (for the benchmark's before rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import tvm
from tvm import relax

from tvm_lowbit.kernels import kernel_attrs
from tvm_lowbit.kernels.shuffle import NAME, Piece, channel_shuffle
from tvm_lowbit.passes.function_pass import CountedRewrite, emit_like, rewrite_matches
from tvm_lowbit.passes.fuse_add_quantize import act_quantizer
from tvm_lowbit.passes.patterns import static_shape, users, var2val

ENV_SWITCH = "TVM_LOWBIT_SHUFFLE_QUANT"
_OPS = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("concat", "reshape", "permute_dims", "split", "call_tir")}


def _is(e: relax.Expr, name: str) -> bool:
    return isinstance(e, relax.Call) and e.op.same_as(_OPS[name])


def _shape(e: relax.Expr) -> tuple[int, ...] | None:
    return static_shape(e, "float32")


@dataclass
class _Fusion:
    parts: list[relax.Expr]
    groups: int
    last: relax.Var                                     # s: the kernel is emitted at its binding
    pieces: list[Piece] = field(default_factory=list)
    remap: list[relax.Var] = field(default_factory=list)  # per piece: the var it replaces
    skip: list[relax.Var] = field(default_factory=list)   # bindings that disappear (split, its items, s)


class _Graph:
    def __init__(self, mod: tvm.IRModule, func: relax.Function) -> None:
        self.mod = mod
        self.values = var2val(func)
        self.users = users(func)

    def user_list(self, v: relax.Var) -> list[relax.Var | None]:
        return self.users.get(v.__hash__(), [])

    def sole_user(self, v: relax.Var) -> relax.Var | None:
        u = self.user_list(v)
        return u[0] if len(u) == 1 else None

    def quantizer(self, user: relax.Var | None, v: relax.Var) -> tuple[float, int, bool] | None:
        """The plain-division quantizer ``user`` applies to ``v`` alone, if it is one."""
        quant = act_quantizer(self.mod, self.values.get(user)) if user is not None else None
        if quant is None or not quant[0].same_as(v):
            return None
        return quant[1:]

    def chain(self, cat_var: relax.Var) -> _Fusion | None:
        """The fusion starting at ``cat_var = concat(...)``, or None when the chain is not the shuffle."""
        cat = self.values[cat_var]
        shape = _shape(cat_var)
        if shape is None or len(shape) != 4 or int(cat.attrs.axis) not in (3, -1):
            return None
        parts = list(cat.args[0].fields)
        if any(_shape(p) is None or _shape(p)[:3] != shape[:3] for p in parts):
            return None
        n, h, w, c = shape
        r = self.sole_user(cat_var)
        if r is None or not _is(self.values.get(r), "reshape") or _shape(r) is None or len(_shape(r)) != 5:
            return None
        g = _shape(r)[3]
        if _shape(r) != (n, h, w, g, c // g) or g * (c // g) != c:
            return None
        t = self.sole_user(r)
        tv = self.values.get(t) if t is not None else None
        if not _is(tv, "permute_dims") or tv.attrs.axes is None or [int(a) for a in tv.attrs.axes] != [0, 1, 2, 4, 3]:
            return None
        s = self.sole_user(t)
        if s is None or not _is(self.values.get(s), "reshape") or _shape(s) != shape:
            return None
        f = _Fusion(parts, g, s)
        sections: list[tuple[int, int, relax.Var]] = []
        users = self.user_list(s)
        split = self.values.get(users[0]) if len(users) == 1 and users[0] is not None else None
        if _is(split, "split") and int(split.attrs.axis) in (3, -1):
            sp = users[0]
            ind = split.attrs.indices_or_sections
            bounds = [0, *(int(i) for i in ind), c] if not isinstance(ind, tvm.tirx.IntImm) else \
                [k * c // int(ind) for k in range(int(ind) + 1)]
            items: dict[int, relax.Var] = {}
            for u in self.user_list(sp):
                item = self.values.get(u) if u is not None else None
                if not isinstance(item, relax.TupleGetItem) or int(item.index) in items:
                    return None
                items[int(item.index)] = u
            sections = [(bounds[i], bounds[i + 1], items[i]) for i in sorted(items)]
            f.skip += [s, sp, *items.values()]
        else:
            sections = [(0, c, s)]
        for lo, hi, v in sections:
            readers = self.user_list(v)
            quant_at = next((u for u in readers if self.quantizer(u, v) is not None), None)
            if quant_at is not None:
                f.pieces.append((lo, hi, self.quantizer(quant_at, v)))
                f.remap.append(quant_at)
                f.skip.append(quant_at)
            if any(u is None or not u.same_as(quant_at) for u in readers):
                f.pieces.append((lo, hi, None))
                f.remap.append(v)
        return f if f.pieces else None


def _find(mod: tvm.IRModule, func: relax.Function) -> list[_Fusion]:
    graph = _Graph(mod, func)
    found = []
    for block in func.body.blocks:
        for b in block.bindings:
            if _is(b.value, "concat"):
                f = graph.chain(b.var)
                if f is not None:
                    found.append(f)
    return found


@relax.expr_functor.mutator
class _Fuse(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, fusions: list[_Fusion]) -> None:
        super().__init__(mod)
        self.at_last = {f.last.__hash__(): f for f in fusions}
        self.skip = {v.__hash__() for f in fusions for v in f.skip}
        self.pending: dict[int, relax.Expr] = {}   # a replaced var -> its piece (bound where the var was)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        h = binding.var.__hash__()
        f = self.at_last.get(h)
        if f is not None:
            parts = [self.visit_expr(p) for p in f.parts]
            out = self.builder_.emit_te(channel_shuffle, *parts, groups=f.groups, pieces=f.pieces,
                                        primfunc_name_hint=NAME, primfunc_attrs=kernel_attrs(NAME))
            for k, var in enumerate(f.remap):
                piece = out if len(f.pieces) == 1 else relax.TupleGetItem(out, k)
                self.pending[var.__hash__()] = piece
            if h in self.pending:  # s itself read as a whole (no split)
                self.set_var_remap(binding.var, emit_like(self.builder_, self.pending.pop(h), binding.var))
            return
        if h in self.pending:  # a split item or a quantizer: its piece, bound here
            self.set_var_remap(binding.var, emit_like(self.builder_, self.pending.pop(h), binding.var))
            return
        if h in self.skip:
            return
        super().visit_var_binding_(binding)


def shuffle_quantize(mod: tvm.IRModule, func_name: str = "main") -> tuple[tvm.IRModule, int]:
    """``mod`` with every NHWC concat + channel shuffle [+ split] [+ quantizers] of ``func_name`` in one
    kernel (module docstring); returns the module and how many were fused (0 when
    ``TVM_LOWBIT_SHUFFLE_QUANT=off``)."""
    if os.environ.get(ENV_SWITCH, "on").lower() in ("0", "off", "false", "no"):
        return mod, 0
    return rewrite_matches(mod, func_name, _find, _Fuse)


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.ShuffleQuantize")
class ShuffleQuantize(CountedRewrite):
    """Module-pass form of :func:`shuffle_quantize`; the count is kept in ``self.count``."""

    def rewrite(self, mod: tvm.IRModule, func_name: str) -> tuple[tvm.IRModule, int]:
        return shuffle_quantize(mod, func_name)
