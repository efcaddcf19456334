"""The dataflow patterns (passes.patterns), FoldRequantize as a pass of the pipeline, and the pipeline
itself: named passes, and the same module as the function forms."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_lowbit import qmath
from tvm_lowbit.passes import (FoldRequantize, LayerInfo, apply_default_schedules, lower_integer_layers, lowering_pipeline,
                               run_pipeline, weight_key)
from tvm_lowbit.passes import patterns as P
from tvm_lowbit.passes.convert_layout import integer_layout

X86 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})


@I.ir_module
class Quantizers:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), s: R.Tensor((), "float32")) -> R.Tensor((2, 8), "float32"):
        with R.dataflow():
            d = R.divide(x, R.const(0.25, "float32"))
            r = R.round(d)
            q = R.clip(r, 0, 255)                               # an activation quantizer
            n = R.clip(R.round(x), 0, 255)                      # no divide: not one
            v = R.clip(R.round(R.divide(x, s)), 0, 255)         # a scale that is not a constant
            y = R.add(R.add(q, n), v)
            R.output(y)
        return y


def _bindings(mod: tvm.IRModule) -> dict[str, relax.Var]:
    return {b.var.name: b.var for block in mod["main"].body.blocks for b in block.bindings}


def test_quantizer_pattern() -> None:
    values, v = P.var2val(Quantizers["main"]), _bindings(Quantizers)
    m = P.match_quantizer(v["q"], values)
    assert m is not None and m.source.same_as(Quantizers["main"].params[0])
    assert float(m.scale) == 0.25 and (m.lo, m.hi) == (0.0, 255.0)
    assert [e.name for e in m.chain] == ["d", "r", "q"]
    assert P.match_quantizer(v["n"], values) is None  # clip(round(x)) without the divide
    got = P.match_quantizer(v["v"], values)
    assert got is not None and got.scale is None  # the pattern matches; the constant check is the caller's
    assert P.match_quantizer(v["y"], values) is None
    assert P.bound_call(P.ADD, v["y"], values) is not None and P.bound_call(P.MULTIPLY, v["y"], values) is None


@I.ir_module
class DoubleQuant:
    @R.function
    def main(x: R.Tensor((2, 8), "float32")) -> R.Tensor((2, 8), "float32"):
        with R.dataflow():
            c1 = R.clip(R.round(R.divide(x, R.const(0.5, "float32"))), 0, 15)
            y = R.multiply(c1, R.const(0.5, "float32"))
            c2 = R.clip(R.round(R.divide(y, R.const(0.5, "float32"))), 0, 255)
            z = R.add(c2, c2)
            R.output(z)
        return z


@I.ir_module
class DoubleQuantFolded:
    @R.function
    def main(x: R.Tensor((2, 8), "float32")) -> R.Tensor((2, 8), "float32"):
        with R.dataflow():
            c1 = R.clip(R.round(R.divide(x, R.const(0.5, "float32"))), 0, 15)
            z = R.add(c1, c1)
            R.output(z)
        return z


def test_fold_requantize_pass_before_after() -> None:
    fold = FoldRequantize()
    after = fold(DoubleQuant)
    assert fold.folded == 1
    tvm.ir.assert_structural_equal(after, DoubleQuantFolded)
    assert fold(DoubleQuantFolded) is not None and fold.folded == 0


@I.ir_module
class TwoLinear:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), w1: R.Tensor((8, 16), "float32"), s1: R.Tensor((16,), "float64"),
             b1: R.Tensor((16,), "float64"), w2: R.Tensor((16, 8), "float32"), s2: R.Tensor((8,), "float64"),
             b2: R.Tensor((8,), "float64")) -> R.Tensor((2, 8), "float32"):
        with R.dataflow():
            q = R.clip(R.round(R.divide(x, R.const(0.5, "float32"))), 0, 255)
            acc = R.matmul(q, w1)
            y = R.astype(R.add(R.multiply(R.astype(acc, "float64"), s1), b1), "float32")
            h = R.nn.relu(y)
            q2 = R.clip(R.round(R.divide(h, R.const(0.25, "float32"))), 0, 255)
            acc2 = R.matmul(q2, w2)
            out = R.astype(R.add(R.multiply(R.astype(acc2, "float64"), s2), b2), "float32")
            R.output(out)
        return out


def _two_linear() -> tuple[tvm.IRModule, dict[str, LayerInfo]]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tw1, tw2 = qmath.ternarize_weight(torch.randn(16, 8), 4), qmath.ternarize_weight(torch.randn(8, 16), 4)
    params = {"w1": tw1.w_int.numpy().T.astype(np.float32), "s1": rng.random(16), "b1": rng.random(16),
              "w2": tw2.w_int.numpy().T.astype(np.float32), "s2": rng.random(8), "b2": rng.random(8)}
    mod = relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(TwoLinear)
    infos = {weight_key(tw1.w_int.numpy()): LayerInfo("fc1", 4), weight_key(tw2.w_int.numpy()): LayerInfo("fc2", 4)}
    return mod, infos


def test_pipeline_has_named_passes() -> None:
    seq = lowering_pipeline(X86)
    assert seq.info.name == "tvm_lowbit.LoweringPipeline"
    nhwc = ["ConvertLayout", "tvm_lowbit.SinkPermutes", "CanonicalizeBindings", "DeadCodeElimination"]
    assert integer_layout(X86) == "NHWC"  # an x86 target with AVX2: the integer region runs in NHWC
    assert [p.info.name for p in seq.passes] == [
        "tvm_lowbit.NormalizeTake", "tvm_lowbit.TorchSiLU", "tvm_lowbit.TorchSigmoid", "tvm_lowbit.TorchMean",
        "CanonicalizeBindings", "DeadCodeElimination", *nhwc,
        "FoldConstant",
        "tvm_lowbit.Relu6Quantizer",
        "tvm_lowbit.FoldRequantize",
        "tvm_lowbit.LowerEmbeddings",
        "tvm_lowbit.LowerIntegerLayers", "tvm_lowbit.ApplyKernelSchedules"]
    assert "tvm_lowbit.LowerIntegerLayers" in str(seq)


def test_pipeline_description_names_the_tuned_database_step() -> None:
    from tvm_lowbit.compiler import TUNED_STEP, pipeline_description

    steps = pipeline_description("x86-host").split(" -> ")
    assert steps.index("tvm_lowbit.LowerIntegerLayers") < steps.index(TUNED_STEP) \
        < steps.index("tvm_lowbit.ApplyKernelSchedules")


def test_run_pipeline_is_lowering_then_default_schedules() -> None:
    mod, infos = _two_linear()
    got, report = run_pipeline(mod, X86, infos)
    lowered, ref_report = lower_integer_layers(mod, infos, target=X86)
    tvm.ir.assert_structural_equal(got, apply_default_schedules(lowered, X86))
    assert report == ref_report
    assert report.lowered == ["fc1", "fc2"] and report.requant_fused == ["fc1"]
    assert report.kernel_names == {"fc1": "ternary_dense_lut", "fc2": "ternary_dense_lut"}  # 2 rows on AVX2
    assert report.fast_kernels == {"fc1": "lut", "fc2": "lut"}
    assert all(r.startswith("ternary_dense_lut fits") for r in report.kernel_reasons.values())
