"""Before/after tests of the Relax and TIR passes (TVMScript + tvm.ir.assert_structural_equal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_lowbit import kernels, qmath
from tvm_lowbit.passes import (LayerInfo, apply_default_schedules, fold_requantize, lower_integer_layers, lowering_passes,
                               weight_key)


@I.ir_module
class TwoLinear:
    """Fake-quant linear -> ReLU -> fake-quant linear, as torch.export + FoldConstant produce it."""

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), w1: R.Tensor((8, 6), "float32"), s1: R.Tensor((6,), "float64"),
             b1: R.Tensor((6,), "float64"), w2: R.Tensor((6, 4), "float32"), s2: R.Tensor((4,), "float64"),
             b2: R.Tensor((4,), "float64")) -> R.Tensor((2, 4), "float32"):
        with R.dataflow():
            q = R.clip(R.round(R.divide(x, R.const(0.5, "float32"))), -127, 127)
            acc = R.matmul(q, w1)
            y = R.astype(R.add(R.multiply(R.astype(acc, "float64"), s1), b1), "float32")
            h = R.nn.relu(y)
            q2 = R.clip(R.round(R.divide(h, R.const(0.25, "float32"))), 0, 255)
            acc2 = R.matmul(q2, w2)
            out = R.astype(R.add(R.multiply(R.astype(acc2, "float64"), s2), b2), "float32")
            R.output(out)
        return out


@I.ir_module
class TwoLinearLowered:
    """Activations quantized once; the first layer writes the second layer's uint8 codes (fused requant)."""

    @T.prim_func(private=True)
    def quantize_act(x: T.Buffer((2, 8), "float32"), q: T.Buffer((2, 8), "int8")):
        T.evaluate(0)

    @T.prim_func(private=True)
    def ternary_dense(q: T.Buffer((2, 8), "int8"), c: T.Buffer((6, 2), "uint8"), a: T.Buffer((6, 2), "uint8"),
                      s: T.Buffer((6,), "float32"), b: T.Buffer((6,), "float32"), o: T.Buffer((2, 6), "uint8")):
        T.evaluate(0)

    @T.prim_func(private=True)
    def ternary_dense1(q: T.Buffer((2, 6), "uint8"), c: T.Buffer((4, 2), "uint8"), a: T.Buffer((4, 2), "uint8"),
                       s: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32"), o: T.Buffer((2, 4), "float32")):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), c1: R.Tensor((6, 2), "uint8"), a1: R.Tensor((6, 2), "uint8"),
             s1: R.Tensor((6,), "float32"), b1: R.Tensor((6,), "float32"), c2: R.Tensor((4, 2), "uint8"),
             a2: R.Tensor((4, 2), "uint8"), s2: R.Tensor((4,), "float32"), b2: R.Tensor((4,), "float32")
             ) -> R.Tensor((2, 4), "float32"):
        cls = TwoLinearLowered
        with R.dataflow():
            lv = R.call_tir(cls.quantize_act, (x,), out_ty=R.Tensor((2, 8), "int8"))
            lv1 = R.call_tir(cls.ternary_dense, (lv, c1, a1, s1, b1), out_ty=R.Tensor((2, 6), "uint8"))
            lv2 = R.call_tir(cls.ternary_dense1, (lv1, c2, a2, s2, b2), out_ty=R.Tensor((2, 4), "float32"))
            gv = lv2
            R.output(gv)
        return gv


def _bind(mod: tvm.IRModule, params: dict[str, np.ndarray]) -> tvm.IRModule:
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


def test_lower_ternary_two_linear_layers() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tw1, tw2 = qmath.ternarize_weight(torch.randn(6, 8), 4), qmath.ternarize_weight(torch.randn(4, 6), 4)
    s1, b1, s2, b2 = (rng.random(n).astype(np.float32).astype(np.float64) for n in (6, 6, 4, 4))
    before = _bind(TwoLinear, {"w1": tw1.w_int.numpy().T.astype(np.float32), "s1": s1, "b1": b1,
                               "w2": tw2.w_int.numpy().T.astype(np.float32), "s2": s2, "b2": b2})
    infos = {weight_key(tw1.w_int.numpy()): LayerInfo("fc1", 4), weight_key(tw2.w_int.numpy()): LayerInfo("fc2", 4)}
    after, report = lower_integer_layers(before, infos)
    assert report.lowered == ["fc1", "fc2"] and report.requant_fused == ["fc1"] and not report.fallback
    relax.analysis.well_formed(after)  # raises if malformed

    # the expected graph, with the constants the packer must produce (computed here from qmath directly)
    expected = _bind(TwoLinearLowered, {
        "c1": qmath.pack_2bit(tw1.t.reshape(6, -1).numpy()), "a1": tw1.alpha_q.numpy().astype(np.uint8),
        "s1": s1.astype(np.float32), "b1": b1.astype(np.float32),
        "c2": qmath.pack_2bit(tw2.t.reshape(4, -1).numpy()), "a2": tw2.alpha_q.numpy().astype(np.uint8),
        "s2": s2.astype(np.float32), "b2": b2.astype(np.float32)})
    # the kernels' bodies are tested in test_kernels.py: compare the graph with the real PrimFuncs in place
    for name in ("quantize_act", "ternary_dense", "ternary_dense1"):
        kind = after[name].attrs[kernels.KERNEL_ATTR]
        assert kind == name.rstrip("1")
        expected[expected.get_global_var(name)] = after[name]
    tvm.ir.assert_structural_equal(after, expected)


def test_lower_ternary_leaves_float_graph_alone() -> None:
    @I.ir_module
    class Float:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w: R.Tensor((8, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, w))
                R.output(y)
            return y

    before = _bind(Float, {"w": np.ones((8, 4), np.float32)})
    after = tvm.transform.Sequential(lowering_passes(None))(before)
    tvm.ir.assert_structural_equal(after, relax.transform.FoldConstant()(before))


def test_lower_ternary_reports_non_ternary_weight() -> None:
    w = np.arange(48, dtype=np.float32).reshape(8, 6)  # integers, but not alpha_q * t in any group
    before = _bind(TwoLinear, {"w1": w, "s1": np.ones(6), "b1": np.zeros(6),
                               "w2": np.zeros((6, 4), np.float32), "s2": np.ones(4), "b2": np.zeros(4)})
    after, report = lower_integer_layers(before, {weight_key(w.T): LayerInfo("fc1", 4)})
    assert [n for n, _ in report.fallback] == ["fc1"]
    assert "not grouped-ternary with group size 4" in report.fallback[0][1]
    assert report.lowered == ["linear 'acc2'"]  # the all-zero second weight is (trivially) ternary
    relax.analysis.well_formed(after)  # raises if malformed


def test_apply_default_schedules() -> None:
    x = tvm.te.placeholder((4, 16), "float32", name="x")
    func = kernels.make_prim_func([x], kernels.quantize_act(x, 0.5, 8, True), "quantize_act")
    target = tvm.target.Target({"kind": "llvm"})
    before = tvm.IRModule({"quantize_act": func})
    after = apply_default_schedules(before, target)
    expected = tvm.IRModule({"quantize_act": kernels.schedule_default(func, target).with_attr("op_pattern", 8)})
    tvm.ir.assert_structural_equal(after, expected)
    assert after["quantize_act"].attrs["tirx.is_scheduled"]
    # already scheduled functions are left alone (idempotent)
    tvm.ir.assert_structural_equal(apply_default_schedules(after, target), expected)


@pytest.mark.parametrize("bits,signed", [(8, False), (4, True)])
def test_quantizer_bounds_are_recognised(bits: int, signed: bool) -> None:
    lo, hi = qmath.act_range(bits, signed)

    @I.ir_module
    class One:
        @R.function
        def main(x: R.Tensor((1, 4), "float32"), w: R.Tensor((4, 4), "float32"), s: R.Tensor((4,), "float64"),
                 b: R.Tensor((4,), "float64")) -> R.Tensor((1, 4), "float32"):
            with R.dataflow():
                q = R.clip(R.round(R.divide(x, R.const(0.1, "float32"))), lo, hi)
                y = R.astype(R.add(R.multiply(R.astype(R.matmul(q, w), "float64"), s), b), "float32")
                R.output(y)
            return y

    tw = qmath.ternarize_weight(torch.randn(4, 4), 2)
    mod = _bind(One, {"w": tw.w_int.numpy().T.astype(np.float32), "s": np.ones(4), "b": np.zeros(4)})
    after, report = lower_integer_layers(mod)
    assert len(report.lowered) == 1
    first = after["main"].body.blocks[0].bindings[0]  # the call to quantize_act
    assert first.value.args[0].name_hint == "quantize_act"
    assert first.var.ty.dtype == qmath.act_dtype(bits, signed)


@I.ir_module
class DoubleQuant:
    """A PACT-style exported clip (codes * s) feeding a quantizer with the same scale, plus a float user."""

    @R.function
    def main(x: R.Tensor((2, 8), "float32")) -> R.Tuple(R.Tensor((2, 8), "float32"), R.Tensor((2, 8), "float32")):
        with R.dataflow():
            c1 = R.clip(R.round(R.divide(x, R.const(0.1374, "float32"))), 0, 15)
            y = R.multiply(c1, R.const(0.1374, "float32"))
            c2 = R.clip(R.round(R.divide(y, R.const(0.1374, "float32"))), 0, 255)
            z = R.add(c2, y)
            out = (z, y)
            R.output(out)
        return out


@I.ir_module
class DoubleQuantFolded:
    @R.function
    def main(x: R.Tensor((2, 8), "float32")) -> R.Tuple(R.Tensor((2, 8), "float32"), R.Tensor((2, 8), "float32")):
        with R.dataflow():
            c1 = R.clip(R.round(R.divide(x, R.const(0.1374, "float32"))), 0, 15)
            y = R.multiply(c1, R.const(0.1374, "float32"))
            z = R.add(c1, y)
            out = (z, y)
            R.output(out)
        return out


def test_fold_requantize_before_after() -> None:
    after, n = fold_requantize(DoubleQuant)
    assert n == 1
    tvm.ir.assert_structural_equal(after["main"], DoubleQuantFolded["main"])


@pytest.mark.parametrize("scale2, lo2, hi2", [(0.1375, 0, 255), (0.1374, 0, 7), (0.1374, 1, 255)])
def test_fold_requantize_keeps_inexact_pairs(scale2: float, lo2: int, hi2: int) -> None:
    """A different scale, or a range that does not contain the first one, changes the codes: no fold."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c1 = bb.emit(relax.op.clip(relax.op.round(relax.op.divide(x, relax.const(0.1374, "float32"))), 0, 15))
            y = bb.emit(relax.op.multiply(c1, relax.const(0.1374, "float32")))
            c2 = bb.emit(relax.op.clip(relax.op.round(relax.op.divide(y, relax.const(scale2, "float32"))), lo2, hi2))
            out = bb.emit_output(c2)
        bb.emit_func_output(out)
    mod = bb.get()
    after, n = fold_requantize(mod)
    assert n == 0
    tvm.ir.assert_structural_equal(after, mod)


def test_fold_requantize_is_exact_for_every_code() -> None:
    """(c * s) / s rounds back to c in float32 for every 8-bit code and a spread of scales."""
    codes = np.arange(-128, 256, dtype=np.float32)
    for s in np.float32(np.geomspace(1e-6, 1e4, 2001)):
        back = np.round((codes * s).astype(np.float32) / s)
        assert np.array_equal(back, codes), s
