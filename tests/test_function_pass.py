"""passes.function_pass: the Relax-function rewrite, the counted module pass and the per-PrimFunc pass the
passes of ``tvm_lowbit.passes`` share, on toy modules."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax, te, tirx, topi
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_lowbit import kernels
from tvm_lowbit.passes.apply_kernel_schedules import ApplyKernelSchedules, apply_default_schedules
from tvm_lowbit.passes.function_pass import CountedRewrite, PrimFuncRewrite, replace_function
from tvm_lowbit.passes.fuse_add_quantize import FuseAddQuantize
from tvm_lowbit.passes.nhwc_shuffle import NHWCShuffle, nhwc_shuffle

LLVM = tvm.target.Target({"kind": "llvm"})


def _toy() -> tvm.IRModule:
    """``main(x) = add(exp(x), negative(x))`` and ``other(x) = exp(x)``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.exp(x))
            b = bb.emit(relax.op.negative(x))
            z = bb.emit_output(relax.op.add(a, b))
        bb.emit_func_output(z)
    y = relax.Var("y", relax.TensorType((4,), "float32"))
    with bb.function("other", [y]):
        with bb.dataflow():
            e = bb.emit_output(relax.op.exp(y))
        bb.emit_func_output(e)
    return bb.get()


def _ops(func: relax.Function) -> list[str]:
    names: list[str] = []
    relax.analysis.post_order_visit(
        func, lambda e: names.append(e.op.name) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return names


@relax.expr_functor.mutator
class _AddToLeft(relax.PyExprMutator):
    """``add(a, b)`` -> ``a``: ``b`` becomes dead."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 - the mutator's hook
        call = self.visit_expr_post_order(call)
        return call.args[0] if call.op.same_as(tvm.ir.Op.get("relax.add")) else call


@relax.expr_functor.mutator
class _NegativeAsTE(relax.PyExprMutator):
    """``negative(x)`` -> a ``call_tir`` of a new PrimFunc ``neg`` (emitted by the mutator's builder)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 - the mutator's hook
        call = self.visit_expr_post_order(call)
        if call.op.same_as(tvm.ir.Op.get("relax.negative")):
            return self.builder_.call_te(topi.negative, call.args[0], primfunc_name_hint="neg")
        return call


def test_replace_function_removes_dead_bindings_and_keeps_the_other_functions() -> None:
    mod = _toy()
    mut = _AddToLeft(mod)
    out = replace_function(mod, "main", mut, mut.visit_expr(mod["main"]))
    assert _ops(mod["main"]) == ["relax.exp", "relax.negative", "relax.add"]
    assert _ops(out["main"]) == ["relax.exp"]  # the add is gone and negative(x), now dead, with it
    tvm.ir.assert_structural_equal(out["other"], mod["other"])
    relax.analysis.well_formed(out)


def test_replace_function_keeps_what_the_mutator_emitted() -> None:
    mod = _toy()
    mut = _NegativeAsTE(mod)
    out = replace_function(mod, "main", mut, mut.visit_expr(mod["main"]))
    assert isinstance(out["neg"], tirx.PrimFunc)
    assert "relax.negative" not in _ops(out["main"]) and "relax.call_tir" in _ops(out["main"])
    assert "neg" not in [gv.name_hint for gv in mod.get_global_vars()]


@tvm.transform.module_pass(opt_level=0, name="test.CountExps")
class _CountExps(CountedRewrite):
    """Changes nothing; counts the ``exp`` calls of the function."""

    def rewrite(self, mod: tvm.IRModule, func_name: str) -> tuple[tvm.IRModule, int]:
        return mod, _ops(mod[func_name]).count("relax.exp")


def test_counted_rewrite_keeps_the_last_runs_count() -> None:
    mod = _toy()
    count = _CountExps()
    assert count.info.name == "test.CountExps" and count.count == 0 and count.func_name == "main"
    assert count(mod).same_as(mod) and count.count == 1
    other = _CountExps("other")
    other(mod)
    assert other.count == 1


def test_a_pass_without_rewrite_says_so() -> None:
    @tvm.transform.module_pass(opt_level=0, name="test.NoRewrite")
    class NoRewrite(CountedRewrite):
        pass

    with pytest.raises(Exception, match="NoRewrite defines no rewrite"):
        NoRewrite()(_toy())

    @tirx.transform.prim_func_pass(opt_level=0, name="test.NoPrimRewrite")
    class NoPrimRewrite(PrimFuncRewrite):
        pass

    with pytest.raises(Exception, match="NoPrimRewrite defines no rewrite"):
        NoPrimRewrite(LLVM)(tvm.IRModule({"plain": _prim("plain", False)}))


@I.ir_module
class ConcatInNCHW:
    """An NHWC value taken to NCHW, concatenated with itself on the channels and taken back."""

    @R.function
    def main(x: R.Tensor((1, 4, 4, 8), "float32")) -> R.Tensor((1, 4, 4, 16), "float32"):
        with R.dataflow():
            t = R.permute_dims(x, [0, 3, 1, 2])
            c = R.concat((t, t), axis=1)
            out = R.permute_dims(c, [0, 2, 3, 1])
            R.output(out)
        return out


def test_the_module_pass_forms_keep_their_functions_counts() -> None:
    """``NHWCShuffle`` concatenates in NHWC: one permute removed; ``FuseAddQuantize`` finds nothing."""
    mod = ConcatInNCHW
    want, removed = nhwc_shuffle(mod)
    shuffle = NHWCShuffle()
    got = shuffle(mod)
    assert removed == shuffle.count == 1 and shuffle.info.name == "tvm_lowbit.NHWCShuffle"
    tvm.ir.assert_structural_equal(got, want)
    assert _ops(got["main"]) == ["relax.concat"]
    fuse = FuseAddQuantize()
    assert fuse(mod).same_as(mod) and fuse.count == 0  # no quantize_act: nothing to fuse


def _prim(name: str, mark: bool) -> tirx.PrimFunc:
    x = te.placeholder((8,), "float32", name="x")
    y = te.compute((8,), lambda i: x[i] * 2.0, name="y")
    f = te.create_prim_func([x, y]).with_attr("global_symbol", name)
    return f.with_attr("test.mark", 1) if mark else f


@tirx.transform.prim_func_pass(opt_level=0, name="test.TagMarked")
class _TagMarked(PrimFuncRewrite):
    """Marked PrimFuncs get ``test.target`` (the target's kind); the others are kept (None)."""

    def rewrite(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        if "test.mark" not in (func.attrs or {}):
            return None
        return func.with_attr("test.target", str(self.target.kind.name))


def test_prim_func_rewrite_replaces_some_keeps_the_rest_and_leaves_the_input_alone() -> None:
    marked, plain = _prim("marked", True), _prim("plain", False)
    mod = _toy()
    mod["marked"], mod["plain"] = marked, plain
    before = mod.script()
    out = _TagMarked(LLVM)(mod)
    assert _TagMarked(LLVM).info.name == "test.TagMarked"
    assert out["marked"].attrs["test.target"] == "llvm"
    assert out["plain"].same_as(plain)  # None: the very same function
    tvm.ir.assert_structural_equal(out["main"], mod["main"])  # Relax functions are not PrimFuncs
    assert mod.script() == before and "test.target" not in (mod["marked"].attrs or {})


def test_apply_kernel_schedules_is_the_prim_func_pass_and_leaves_its_input_alone() -> None:
    x = te.placeholder((4, 16), "float32", name="x")
    func = kernels.make_prim_func([x], kernels.quantize_act(x, 0.5, 8, True), "quantize_act")
    mod = tvm.IRModule({"quantize_act": func, "plain": _prim("plain", False)})
    out = apply_default_schedules(mod, LLVM)
    assert ApplyKernelSchedules(LLVM).info.name == "tvm_lowbit.ApplyKernelSchedules"
    assert out["quantize_act"].attrs["tirx.is_scheduled"] and int(out["quantize_act"].attrs["op_pattern"]) == 8
    assert out["plain"].same_as(mod["plain"])  # no kernel: kept
    assert mod["quantize_act"].same_as(func)  # the input module is not changed in place
    tvm.ir.assert_structural_equal(apply_default_schedules(out, LLVM), out)  # scheduled ones are left alone
