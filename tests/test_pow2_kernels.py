"""The power-of-two (shift) TE kernels: bit-exact against the qmath NumPy references, and shifts
(no integer multiplies) in the multiply-accumulate loop of the generated code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm import te  # noqa: E402

from tvm_lowbit import qmath  # noqa: E402
from tvm_lowbit.kernels import make_prim_func, pow2_conv2d, pow2_dense, schedule_default  # noqa: E402
from test_kernels import A72, ARMV7, CONV_CASES, DENSE_CASES, HOST, MODES, ConvCase, _act, _assert_same, _reference, _run  # noqa: E402


def _pow2_weight(seed: int, shape: tuple[int, ...], bits: int) -> qmath.Pow2Weight:
    torch.manual_seed(seed)
    return qmath.pow2_quantize_weight(torch.randn(shape), bits)


def _conv(case: ConvCase, mode: str, relu: bool, bits: int, seed: int = 0, rq: float = 0.37, out_signed: bool = False):
    rng = np.random.default_rng(seed)
    cg = case.c // case.groups
    pw = _pow2_weight(seed, (case.k, cg, *case.rs), bits)
    x = _act(rng, (case.batch, case.c, *case.hw), case.bits, case.signed)
    codes = pw.packed_codes()
    scale = (rng.standard_normal(case.k) * 1e-3).astype(np.float32)
    bias = rng.standard_normal(case.k).astype(np.float32)
    ph = [te.placeholder(a.shape, str(a.dtype), nm) for a, nm in ((x, "x"), (codes, "codes"), (scale, "scale"), (bias, "bias"))]
    out = pow2_conv2d(*ph, weight_shape=(case.k, cg, *case.rs), code_bits=pw.code_bits, strides=case.stride,
                      padding=case.pad, dilation=case.dil, groups=case.groups, relu=relu, out_mode=mode,
                      requant_scale=rq, out_bits=8, out_signed=out_signed)
    func = make_prim_func(ph, out, "pow2_conv2d")
    acc = qmath.conv2d_int_np(x, pw.w_int.numpy(), case.stride, case.pad, case.dil, case.groups)
    ref = _reference(acc, scale, bias, relu, mode, rq, 8, out_signed, 1)
    return func, [x, codes, scale, bias], ref


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", MODES)
def test_pow2_conv2d_exact(case: ConvCase, mode: str) -> None:
    # alternate 5-bit (8-bit codes, |w_int| up to 128) and 3-bit (nibble codes) weights over the cases
    bits = 5 if CONV_CASES.index(case) % 2 == 0 else 3
    func, args, ref = _conv(case, mode, relu=mode != "acc", bits=bits, out_signed=case.signed)
    _assert_same(_run(func, args, ref.shape, str(ref.dtype)), ref)


def test_pow2_conv2d_unscheduled_matches() -> None:
    func, args, ref = _conv(CONV_CASES[3], "requant", True, bits=4)
    _assert_same(_run(func, args, ref.shape, str(ref.dtype), schedule=False), ref)


def _dense(shape, k, bits, signed, mode, w_bits, seed=7):
    rng = np.random.default_rng(seed)
    pw = _pow2_weight(seed, (k, shape[-1]), w_bits)
    x = _act(rng, shape, bits, signed)
    codes = pw.packed_codes()
    scale = (rng.standard_normal(k) * 1e-3).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    ph = [te.placeholder(a.shape, str(a.dtype)) for a in (x, codes, scale, bias)]
    relu = mode == "requant"
    out = pow2_dense(*ph, weight_shape=(k, shape[-1]), code_bits=pw.code_bits, relu=relu, out_mode=mode,
                     requant_scale=0.11, out_bits=bits, out_signed=signed)
    acc = qmath.dense_int_np(x, pw.w_int.numpy())
    ref = _reference(acc, scale, bias, relu, mode, 0.11, bits, signed, -1)
    return make_prim_func(ph, out, "pow2_dense"), [x, codes, scale, bias], ref


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("mode", MODES)
def test_pow2_dense_exact(case: tuple, mode: str) -> None:
    _, shape, k, _n, bits, signed = case
    w_bits = 5 if DENSE_CASES.index(case) % 2 == 0 else 2
    func, args, ref = _dense(shape, k, bits, signed, mode, w_bits)
    _assert_same(_run(func, args, ref.shape, str(ref.dtype)), ref)


def test_pow2_kernel_rejects_bad_codes() -> None:
    x = te.placeholder((2, 16), "int8")
    with pytest.raises(ValueError, match="codes shape"):
        pow2_dense(x, te.placeholder((4, 16), "uint8"), te.placeholder((4,), "float32"),
                   te.placeholder((4,), "float32"), weight_shape=(4, 16), code_bits=4)
    with pytest.raises(ValueError, match="code_bits"):
        pow2_dense(x, te.placeholder((4, 16), "uint8"), te.placeholder((4,), "float32"),
                   te.placeholder((4,), "float32"), weight_shape=(4, 16), code_bits=2)


# --------------------------------------------------------------------------------------------
# generated code: shifts, no integer multiply in the MAC loop
# --------------------------------------------------------------------------------------------

def _mac_loop_ir(ll: str) -> list[str]:
    """The LLVM IR basic blocks of the multiply-accumulate loop.

    How the loop is isolated: split the IR into basic blocks (a label line or ``define`` starts a
    block) and keep those holding all three marks of the MAC term ``(((x & nz) << e) ^ neg) - neg``
    plus the accumulation: a shift by a *variable* amount (``shl .. %a, %b``; the decode stage only
    shifts by constants or shifts right, the epilogue does not shift), an ``xor`` of two variables
    (the conditional negate; runtime helpers such as float16 conversion xor with constants) and an
    i32 ``add``.  Index arithmetic may use ``mul .. i64``; any ``mul`` on i8/i16/i32 (scalar or
    vector) in those blocks would be a weight multiply."""
    blocks, cur = [], []
    for line in ll.splitlines():
        if re.match(r"^[\w.\-]+:", line) or line.startswith("define "):
            if cur:
                blocks.append("\n".join(cur))
            cur = []
        cur.append(line)
    if cur:
        blocks.append("\n".join(cur))
    var_shl = re.compile(r"= shl (?:nuw |nsw )*(<\d+ x i32>|i32) %[\w.]+, %[\w.]+")
    var_xor = re.compile(r"= xor (<\d+ x i32>|i32) %[\w.]+, %[\w.]+")
    add = re.compile(r"= add (?:nuw |nsw )*(<\d+ x i32>|i32)")
    return [b for b in blocks if var_shl.search(b) and var_xor.search(b) and add.search(b)]


_INT_MUL = re.compile(r"= mul (?:nuw |nsw )*(<\d+ x i32>|i32|<\d+ x i16>|i16|<\d+ x i8>|i8) ")


@pytest.mark.parametrize("target,asm_shift", [(HOST, r"\bvpsll[v]?d\b|\bpslld\b"), (A72, r"\b[us]shl\b|\bshl\s+v")],
                         ids=["x86", "aarch64-a72"])
def test_mac_loop_uses_shifts_not_multiplies(target, asm_shift: str) -> None:
    conv, _, _ = _conv(CONV_CASES[0], "requant", True, bits=4)
    dense, _, _ = _dense((3, 64), 16, 8, True, "float", 4)
    for func in (conv, dense):
        mod = tvm.compile(schedule_default(func, target), target=tvm.target.Target(target)).mod
        ll, asm = mod.inspect_source("ll"), mod.inspect_source("asm")
        macs = _mac_loop_ir(ll)
        assert macs, "no MAC loop (variable shift + accumulate) found in the LLVM IR"
        for b in macs:
            assert not _INT_MUL.search(b), f"integer multiply in the MAC loop:\n{b}"
        assert any(re.search(r"= shl (?:nuw |nsw )*<\d+ x i32>", b) for b in macs), "MAC loop is not vectorized"
        assert re.search(asm_shift, asm), "no vector shift instruction in the asm"
        assert not re.search(r"\b(vpmulld|pmulld)\b|^\s+(mul|mla)\s+v\d+\.4s", asm, re.M), "vector integer multiply in the asm"


def test_cross_compile_armv7() -> None:
    func, _, _ = _dense((3, 64), 16, 8, True, "float", 4)
    asm = tvm.compile(schedule_default(func, ARMV7), target=tvm.target.Target(ARMV7)).mod.inspect_source("asm")
    assert re.search(r"\bvshl\.[us]32\b", asm)


# --------------------------------------------------------------------------------------------
# LowerIntegerLayers picks the power-of-two kernel
# --------------------------------------------------------------------------------------------

def test_lower_picks_pow2_kernel_by_format_and_by_value() -> None:
    from test_passes import TwoLinear, _bind

    from tvm_lowbit.passes import LayerInfo, lower_integer_layers, weight_key

    rng = np.random.default_rng(0)
    w1 = (rng.choice([-1, 1], (8, 6)) * 2.0 ** rng.integers(0, 8, (8, 6))).astype(np.float32)  # 8 magnitudes
    w1[0, :] = [3, 1, 1, 1, 1, 1]                                                   # not ternary in a group
    w1[0, 0] = 4
    w2 = np.array([[1, -1, 0, 1]] * 6, np.float32)                                  # ternary (N = 6)
    params = {"w1": w1, "s1": np.ones(6), "b1": np.zeros(6), "w2": w2, "s2": np.ones(4), "b2": np.zeros(4)}
    # without layer infos: ternary is tried first (w2), power-of-two second (w1)
    _, report = lower_integer_layers(_bind(TwoLinear, params))
    assert report.lowered == ["linear 'acc'", "linear 'acc2'"]
    assert report.kernels == {"linear 'acc'": "pow2", "linear 'acc2'": "ternary"}
    assert "1 power-of-two, 1 grouped-ternary" in report.text() or "1 grouped-ternary, 1 power-of-two" in report.text()
    # with infos: the declared format decides; a non-power-of-two integer weight falls back with the reason
    bad = w1.copy()
    bad[1, 1] = 3
    infos = {weight_key(bad.T): LayerInfo("fc1", 0, "pow2"), weight_key(w2.T): LayerInfo("fc2", 6, "ternary")}
    after, report = lower_integer_layers(_bind(TwoLinear, dict(params, w1=bad)), infos)
    assert [n for n, _ in report.fallback] == ["fc1"] and "not power-of-two" in report.fallback[0][1]
    assert report.kernels == {"fc2": "ternary"}
    infos = {weight_key(w1.T): LayerInfo("fc1", 0, "int3")}
    _, report = lower_integer_layers(_bind(TwoLinear, params), infos)
    assert report.fallback[0][0] == "fc1" and "no integer kernel for weight format 'int3'" in report.fallback[0][1]
