"""The kernel registry: which kernel fits a layer on a target and why, a toy ISA kernel registered from
this file and compiled into a model, and the package's import hygiene (no private names across modules,
no import cycles) for the kernels and passes."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, te
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_lowbit import kernels, qmath
from tvm_lowbit.kernels.common import OutMode, Pick, TargetLike, conv_dims, conv_with_epilogue
from tvm_lowbit.kernels.generic import schedule_conv2d
from tvm_lowbit.kernels.ternary import expand_weight, grouped_element, ternary_operands
from tvm_lowbit.passes import LayerInfo, run_pipeline, weight_key

X86 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})
PI5 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
PLAIN = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # no AVX2
TOY = tvm.target.Target({"kind": "llvm", "keys": ["toy", "cpu"]})


def _spec(op: str, shape: tuple[int, ...], act_shape: tuple[int, ...], group_size: int = 4, bits: int = 8,
          signed: bool = False, **attrs: object) -> kernels.LayerSpec:
    tw = qmath.ternarize_weight(torch.randn(*shape), group_size)
    return kernels.LayerSpec("layer", op, "ternary", tw, {"weight_shape": shape, **attrs}, bits, signed, act_shape)


@pytest.mark.parametrize("rows, dense_kernel", [(1, "ternary_dense_lut"), (2, "ternary_dense_lut"),
                                                (4, "ternary_dense"), (15, "ternary_dense"),
                                                (16, "ternary_dense_avx2"), (64, "ternary_dense_avx2")])
def test_select_keeps_the_measured_dense_rules(rows: int, dense_kernel: str) -> None:
    torch.manual_seed(0)
    kernel, reason = kernels.select(_spec("dense", (16, 64), (rows, 64)), X86)
    assert kernel is not None and kernel.name == dense_kernel, reason
    assert reason.startswith(f"{dense_kernel} fits")
    if dense_kernel == "ternary_dense":  # the reason names the preferred kernels that did not fit, and why
        assert f"not ternary_dense_lut: {rows} activation rows > LUT_MAX_ROWS" in reason
        assert f"not ternary_dense_avx2: {rows} activation rows < DENSE_MIN_ROWS" in reason
    kernel, reason = kernels.select(_spec("dense", (16, 64), (rows, 64)), PLAIN)
    assert kernel is not None and kernel.name == "ternary_dense" and "the target has no AVX2" in reason


def test_select_conv_per_target() -> None:
    torch.manual_seed(0)
    conv = dict(strides=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    spec = _spec("conv2d", (16, 16, 3, 3), (1, 16, 8, 8), **conv)
    assert kernels.select(spec, X86).kernel.name == "ternary_conv2d_avx2"
    assert kernels.select(spec, PI5).kernel.name == "ternary_conv2d_sdot"
    assert kernels.select(spec, None).kernel.name == "ternary_conv2d"
    signed = _spec("conv2d", (16, 16, 3, 3), (1, 16, 8, 8), signed=True, **conv)
    kernel, reason = kernels.select(signed, X86)
    assert kernel.name == "ternary_conv2d" and "activation codes are int8" in reason


def test_register_refuses_a_taken_key() -> None:
    clash = kernels.Kernel("another_ternary_conv2d", "ternary", "conv2d", "avx2", compute=lambda *a, **k: None,
                           schedule=lambda *a: None)
    with pytest.raises(ValueError, match="already registered by kernel 'ternary_conv2d_avx2'"):
        kernels.register(clash)
    with pytest.raises(ValueError, match="no kernel registered as 'nope'"):
        kernels.get("nope")


def test_register_intrinsics_iterates_the_registry() -> None:
    names = kernels.register_intrinsics()
    assert {"tvm_lowbit_dot_8x4_u8i8s32_avx2", "tvm_lowbit_sdot_4x4_i8i8s32_scaled",
            "tvm_lowbit_sdot_4x4_i8i8s32"} <= set(names)
    for n in names:
        assert tvm.s_tir.TensorIntrin.get(n, allow_missing=True) is not None


# --------------------------------------------------------------------------------------------
# A toy ISA, registered from here: a copy of the generic ternary conv, taken on targets with the key "toy"
# --------------------------------------------------------------------------------------------

TOY_KERNEL = "ternary_conv2d_toy"


def toy_conv2d(data: te.Tensor, codes: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor,
               *, weight_shape: Sequence[int], strides: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
               dilation: int | Sequence[int] = 1, groups: int = 1, group_size: int, relu: bool = False,
               out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
               out_signed: bool = False) -> te.Tensor:
    kout, cg, kh, kw = conv_dims(data, weight_shape, groups)
    lay = qmath.group_layout((kout, cg, kh, kw), group_size)
    wq = expand_weight(codes, alpha_q, lay)
    seg = lay.groups_per_segment * lay.group_size
    return conv_with_epilogue(
        TOY_KERNEL, data, (kout, cg, kh, kw), strides, padding, dilation, groups,
        lambda xv, k, c, r, s: xv * grouped_element(wq, k, (r * kw + s) * seg + c), out_scale, out_bias, relu,
        out_mode, requant_scale, out_bits, out_signed)


def toy_fits(layer: kernels.LayerSpec, target: tvm.target.Target | None) -> str | None:
    if target is None or "toy" not in list(target.keys):
        return "the target has no 'toy' key"
    return None if layer.weight.layout.along == "in" else "groups along the taps"


def toy_schedule(sch: tvm.s_tir.Schedule, target: TargetLike, pick: Pick | None = None) -> None:
    schedule_conv2d(sch, target, "w_int", pick)


@pytest.fixture
def toy_kernel():
    kernel = kernels.register(kernels.Kernel(TOY_KERNEL, family="ternary", op="conv2d", isa="toy",
                                             compute=toy_conv2d, schedule=toy_schedule, operands=ternary_operands,
                                             fits=toy_fits, preference=50))
    yield kernel
    kernels.unregister(TOY_KERNEL)


@I.ir_module
class ConvRelu:
    """A fake-quant 3x3 conv (unsigned 8-bit codes) with the qmath epilogue and ReLU."""

    @R.function
    def main(x: R.Tensor((1, 8, 6, 6), "float32"), w: R.Tensor((8, 8, 3, 3), "float32"),
             s: R.Tensor((1, 8, 1, 1), "float64"), b: R.Tensor((1, 8, 1, 1), "float64")
             ) -> R.Tensor((1, 8, 6, 6), "float32"):
        with R.dataflow():
            q = R.clip(R.round(R.divide(x, R.const(0.02, "float32"))), 0, 255)
            acc = R.nn.conv2d(q, w, padding=(1, 1))
            y = R.astype(R.add(R.multiply(R.astype(acc, "float64"), s), b), "float32")
            h = R.nn.relu(y)
            R.output(h)
        return h


def _run(mod: tvm.IRModule, target: tvm.target.Target, x: np.ndarray) -> list[np.ndarray]:
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    outs = vm["main"](tvm.runtime.tensor(x))
    return [o.numpy() for o in outs]


def test_toy_isa_kernel_compiles_bit_exact(toy_kernel: kernels.Kernel) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tw = qmath.ternarize_weight(torch.randn(8, 8, 3, 3), 4)
    w_int = tw.w_int.numpy()
    mod = relax.transform.BindParams("main", {
        "w": tvm.runtime.tensor(w_int.astype(np.float32)),
        "s": tvm.runtime.tensor(rng.random((1, 8, 1, 1))), "b": tvm.runtime.tensor(rng.random((1, 8, 1, 1)) - 0.5),
    })(ConvRelu)
    infos = {weight_key(w_int): LayerInfo("conv", 4)}
    x = rng.random((1, 8, 6, 6)).astype(np.float32) * 5

    toy_mod, toy_report = run_pipeline(mod, TOY, infos, expose_acc=True)
    assert toy_report.kernel_names == {"conv": TOY_KERNEL} and toy_report.fast_kernels == {"conv": "toy"}
    assert toy_report.kernel_reasons["conv"] == f"{TOY_KERNEL} fits"
    assert any(str(f.attrs.get(kernels.KERNEL_ATTR, "")) == TOY_KERNEL
               for _, f in toy_mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    gen_mod, gen_report = run_pipeline(mod, PLAIN, infos, expose_acc=True)
    assert gen_report.kernel_names == {"conv": "ternary_conv2d"} and not gen_report.fast_kernels
    assert "not ternary_conv2d_toy: the target has no 'toy' key" in gen_report.kernel_reasons["conv"]

    toy_out, toy_acc = _run(toy_mod, TOY, x)
    gen_out, gen_acc = _run(gen_mod, PLAIN, x)
    np.testing.assert_array_equal(toy_acc, gen_acc)
    np.testing.assert_array_equal(toy_out, gen_out)
    # and both against the numpy integer reference
    codes = qmath.quantize_act_np(x, 0.02, 8, False).astype(np.int64)
    np.testing.assert_array_equal(toy_acc.astype(np.int64), qmath.conv2d_int_np(codes, w_int.astype(np.int64),
                                                                                 (1, 1), (1, 1), (1, 1), 1))
    assert kernels.select(kernels.LayerSpec("l", "conv2d", "ternary", tw, {"weight_shape": (8, 8, 3, 3)}, 8, False,
                                            (1, 8, 6, 6)), TOY).kernel is toy_kernel


def test_unregister_restores_the_choice() -> None:
    assert kernels.lookup("ternary", "conv2d", "toy") is None
    assert kernels.lookup("ternary", "conv2d").name == "ternary_conv2d"


# --------------------------------------------------------------------------------------------
# Import hygiene of the modules this layer owns
# --------------------------------------------------------------------------------------------

PKG = Path(__file__).resolve().parents[1] / "tvm_lowbit"
CHECKED = [*sorted((PKG / "kernels").glob("*.py")), *sorted((PKG / "passes").glob("*.py")), PKG / "onnx_quant.py"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, imported names, at module level) of every ``tvm_lowbit`` import in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tvm_lowbit"):
            out.append((node.module, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names if a.name.startswith("tvm_lowbit")]
    return out


def test_no_private_name_crosses_a_module() -> None:
    bad = [f"{p.name}: {m}.{n}" for p in CHECKED for m, names, _ in _imports(p) for n in names if n.startswith("_")]
    assert not bad, bad


def test_kernels_and_passes_import_at_module_level_without_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for p in CHECKED:
        name = _module_name(p)
        deps = set()
        for m, names, at_top in _imports(p):
            if p.parent.name in ("kernels", "passes"):
                assert at_top, f"{name} imports {m} inside a function"
            for n in names:  # ``from tvm_lowbit.kernels import avx2`` imports the module kernels.avx2
                deps.add(f"{m}.{n}" if (PKG.parent / f"{m}.{n}".replace(".", "/")).with_suffix(".py").exists() else m)
            if not names:
                deps.add(m)
        graph[name] = deps

    def visit(node: str, stack: list[str]) -> None:
        for dep in graph.get(node, ()):
            assert dep not in stack, f"import cycle: {' -> '.join(stack[stack.index(dep):] + [dep])}"
            visit(dep, [*stack, dep])

    for mod in graph:
        visit(mod, [mod])
