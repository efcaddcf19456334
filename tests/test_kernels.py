"""Bit-exactness of the ternary TE kernels (scheduled with schedule_default) against the qmath NumPy references."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm import relax, te  # noqa: E402

from tvm_lowbit import qmath  # noqa: E402
from tvm_lowbit.kernels import (  # noqa: E402
    KERNEL_ATTR, kernel_attrs, make_prim_func, quantize_act, schedule_default, ternary_conv2d, ternary_dense)

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
X86_AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})  # compiled, not run: the asm is checked
A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}
A76 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]}
ARMV7 = {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mattr": ["+neon"]}
MODES = ("acc", "float", "requant")


def _act(rng: np.random.Generator, shape: tuple[int, ...], bits: int, signed: bool) -> np.ndarray:
    lo, hi = qmath.act_range(bits, signed)
    return rng.integers(lo, hi + 1, shape).astype(qmath.act_dtype(bits, signed))


def _weight(seed: int, shape: tuple[int, ...], n: int) -> qmath.TernaryWeight:
    torch.manual_seed(seed)
    return qmath.ternarize_weight(torch.randn(shape), n)


def _run(func, args: list[np.ndarray], out_shape: tuple[int, ...], out_dtype: str, target=HOST,
         schedule: bool = True) -> np.ndarray:
    if schedule:
        func = schedule_default(func, target)
        assert bool(func.attrs["tirx.is_scheduled"])
    ex = tvm.compile(func.with_attr("global_symbol", "k"), target=target)
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    ex["k"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def _reference(acc: np.ndarray, scale: np.ndarray, bias: np.ndarray, relu: bool, mode: str, rq: float,
               out_bits: int, out_signed: bool, channel_dim: int) -> np.ndarray:
    if mode == "acc":
        return acc.astype(np.int32)
    y = qmath.epilogue_np(acc, scale, bias, relu, channel_dim)
    if mode == "float":
        return y
    return qmath.quantize_act_np(y, rq, out_bits, out_signed).astype(qmath.act_dtype(out_bits, out_signed))


def _assert_same(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if got.dtype.kind == "f":  # bit for bit, not just numerically equal
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    else:
        np.testing.assert_array_equal(got, ref)


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvCase:
    name: str
    batch: int
    c: int
    k: int
    hw: tuple[int, int]
    rs: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dil: tuple[int, int]
    groups: int
    n: int
    bits: int
    signed: bool


CONV_CASES = [
    ConvCase("3x3_s1_p1_n4_u8_b2", 2, 8, 16, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1), 1, 4, 8, False),
    ConvCase("3x3_s2_p1_n64_i8", 1, 20, 8, (11, 9), (3, 3), (2, 2), (1, 1), (1, 1), 1, 64, 8, True),
    ConvCase("3x3_dil2_n1_u4", 1, 6, 8, (12, 12), (3, 3), (1, 1), (2, 2), (2, 2), 1, 1, 4, False),
    ConvCase("groups2_ragged_cg6_n4_i4", 2, 12, 8, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 2, 4, 4, True),
    ConvCase("depthwise_n4_u8", 1, 8, 8, (10, 10), (3, 3), (1, 1), (1, 1), (1, 1), 8, 4, 8, False),
    ConvCase("1x1_s2_ragged_cg10_n4_i8", 2, 10, 24, (9, 9), (1, 1), (2, 2), (0, 0), (1, 1), 1, 4, 8, True),
    ConvCase("1x3_ragged_cg5_n64_u8", 1, 5, 6, (7, 16), (1, 3), (1, 2), (0, 1), (1, 1), 1, 64, 8, False),
]


def _conv(case: ConvCase, mode: str, relu: bool, seed: int = 0, target=HOST, rq: float = 0.37,
          out_bits: int = 8, out_signed: bool = False):
    rng = np.random.default_rng(seed)
    cg = case.c // case.groups
    tw = _weight(seed, (case.k, cg, *case.rs), case.n)
    x = _act(rng, (case.batch, case.c, *case.hw), case.bits, case.signed)
    codes, aq = tw.packed_codes(), tw.alpha_q.numpy().astype(np.uint8)
    scale = (rng.standard_normal(case.k) * 1e-2).astype(np.float32)
    bias = rng.standard_normal(case.k).astype(np.float32)
    ph = [te.placeholder(a.shape, str(a.dtype), nm) for a, nm in
          ((x, "x"), (codes, "codes"), (aq, "alpha_q"), (scale, "scale"), (bias, "bias"))]
    out = ternary_conv2d(*ph, weight_shape=(case.k, cg, *case.rs), strides=case.stride, padding=case.pad,
                         dilation=case.dil, groups=case.groups, group_size=case.n, relu=relu, out_mode=mode,
                         requant_scale=rq, out_bits=out_bits, out_signed=out_signed)
    func = make_prim_func(ph, out, "ternary_conv2d")
    acc = qmath.conv2d_int_np(x, tw.w_int.numpy(), case.stride, case.pad, case.dil, case.groups)
    ref = _reference(acc, scale, bias, relu, mode, rq, out_bits, out_signed, 1)
    return func, [x, codes, aq, scale, bias], ref


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", MODES)
def test_conv2d_exact(case: ConvCase, mode: str) -> None:
    relu = mode != "acc" and case.n != 1
    func, args, ref = _conv(case, mode, relu, out_signed=case.signed)
    _assert_same(_run(func, args, ref.shape, str(ref.dtype)), ref)


def test_conv2d_unscheduled_matches() -> None:
    func, args, ref = _conv(CONV_CASES[3], "requant", True)
    _assert_same(_run(func, args, ref.shape, str(ref.dtype), schedule=False), ref)


def test_conv2d_large_acc_float32_rounding() -> None:
    """|acc| > 2^24: the epilogue must round acc to float32 before the float64 multiply."""
    k, c = 4, 64
    w = torch.ones(k, c, 3, 3)
    w[1] *= -1
    tw = qmath.ternarize_weight(w, 4)
    assert int(tw.alpha_q.max()) == 255
    rng = np.random.default_rng(1)
    x = rng.integers(200, 256, (1, c, 5, 5)).astype(np.uint8)
    acc = qmath.conv2d_int_np(x, tw.w_int.numpy(), (1, 1), (0, 0), (1, 1), 1)
    assert np.abs(acc).max() > 2 ** 24 and (acc.astype(np.float32).astype(np.int64) != acc).any()
    scale = np.array([1.0000001, 3.3e-7, 1.5, 0.1], np.float32)
    bias = np.array([0.25, -1.0, 3.0, 7.0], np.float32)
    codes, aq = tw.packed_codes(), tw.alpha_q.numpy().astype(np.uint8)
    ph = [te.placeholder(a.shape, str(a.dtype)) for a in (x, codes, aq, scale, bias)]
    out = ternary_conv2d(*ph, weight_shape=(k, c, 3, 3), group_size=4, out_mode="float")
    got = _run(make_prim_func(ph, out, "conv"), [x, codes, aq, scale, bias], acc.shape, "float32")
    _assert_same(got, qmath.epilogue_np(acc, scale, bias, False, 1))


@pytest.mark.parametrize("out_signed", [False, True])
def test_conv2d_requant_ties_half_to_even(out_signed: bool) -> None:
    """scale 1, bias 0.5 (or -0.5), requant scale 1: every output is an exact .5 tie."""
    case = ConvCase("ties", 1, 8, 8, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, 4, 4, True)
    rng = np.random.default_rng(3)
    tw = _weight(3, (8, 8, 3, 3), 4)
    x = _act(rng, (1, 8, 6, 6), 4, True)
    codes, aq = tw.packed_codes(), tw.alpha_q.numpy().astype(np.uint8)
    # small alpha range keeps the accumulators inside the output range, where ties matter
    aq = np.minimum(aq, 1).astype(np.uint8)
    tw = qmath.TernaryWeight(tw.layout, tw.t, torch.from_numpy(aq.astype(np.int64)), tw.w_scale)
    scale = np.ones(8, np.float32)
    bias = np.where(np.arange(8) % 2 == 0, 0.5, -0.5).astype(np.float32)
    ph = [te.placeholder(a.shape, str(a.dtype)) for a in (x, codes, aq, scale, bias)]
    out = ternary_conv2d(*ph, weight_shape=(8, 8, 3, 3), padding=1, group_size=case.n, out_mode="requant",
                         requant_scale=1.0, out_bits=8, out_signed=out_signed)
    acc = qmath.conv2d_int_np(x, tw.w_int.numpy(), (1, 1), (1, 1), (1, 1), 1)
    ref = _reference(acc, scale, bias, False, "requant", 1.0, 8, out_signed, 1)
    lo, hi = qmath.act_range(8, out_signed)
    y = qmath.epilogue_np(acc, scale, bias, False, 1)
    inside = (y > lo) & (y < hi)
    assert inside.sum() > 20 and (np.abs(y - np.round(y)) == 0.5).all()
    # half-away-from-zero would differ on the ties with an even lower neighbour
    assert (np.floor(y + 0.5)[inside] != ref[inside]).any() or (np.ceil(y - 0.5)[inside] != ref[inside]).any()
    got = _run(make_prim_func(ph, out, "conv"), [x, codes, aq, scale, bias], ref.shape, str(ref.dtype))
    _assert_same(got, ref)


# --------------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------------

DENSE_CASES = [  # (name, data shape, K, N, bits, signed)
    ("2d_ragged_c37_n8_i8", (5, 37), 12, 8, 8, True),
    ("3d_n64_u8", (2, 3, 64), 16, 64, 8, False),
    ("2d_n1_u4", (3, 20), 10, 1, 4, False),
    ("3d_ragged_c70_n64_i4", (2, 5, 70), 9, 64, 4, True),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("mode", MODES)
def test_dense_exact(case: tuple, mode: str) -> None:
    _, shape, k, n, bits, signed = case
    rng = np.random.default_rng(7)
    tw = _weight(7, (k, shape[-1]), n)
    x = _act(rng, shape, bits, signed)
    codes, aq = tw.packed_codes(), tw.alpha_q.numpy().astype(np.uint8)
    scale = (rng.standard_normal(k) * 1e-2).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    ph = [te.placeholder(a.shape, str(a.dtype)) for a in (x, codes, aq, scale, bias)]
    relu = mode == "requant"
    out = ternary_dense(*ph, weight_shape=(k, shape[-1]), group_size=n, relu=relu, out_mode=mode,
                        requant_scale=0.11, out_bits=bits, out_signed=signed)
    acc = qmath.dense_int_np(x, tw.w_int.numpy())
    ref = _reference(acc, scale, bias, relu, mode, 0.11, bits, signed, -1)
    got = _run(make_prim_func(ph, out, "dense"), [x, codes, aq, scale, bias], ref.shape, str(ref.dtype))
    _assert_same(got, ref)


# --------------------------------------------------------------------------------------------
# quantize_act
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (4, True)])
def test_quantize_act_ties(bits: int, signed: bool) -> None:
    scale = 0.25
    x = (np.arange(-600, 600, dtype=np.float32) * np.float32(0.125)).reshape(2, 3, 200)  # many exact .5 ties
    ref = qmath.quantize_act_np(x, scale, bits, signed).astype(qmath.act_dtype(bits, signed))
    xp = te.placeholder(x.shape, "float32")
    out = quantize_act(xp, scale, bits, signed)
    got = _run(make_prim_func([xp], out, "quant"), [x], x.shape, str(ref.dtype))
    _assert_same(got, ref)


def test_quantize_act_vectorized_on_x86() -> None:
    """Its default x86 schedule vectorizes the rounding (tirx.nearbyint marked TVectorizable in kernels.common):
    whole-vector loads, rounds and stores, no per-lane gathers or byte extracts, and still exact at ties."""
    scale = 0.25
    x = (np.arange(-2048, 2048, dtype=np.float32) * np.float32(0.125)).reshape(1, 4, 16, 64)
    ref = qmath.quantize_act_np(x, scale, 8, False).astype(np.uint8)
    xp = te.placeholder(x.shape, "float32")
    func = schedule_default(make_prim_func([xp], quantize_act(xp, scale, 8, False), "quant"), X86_AVX512)
    asm = tvm.compile(func.with_attr("global_symbol", "k"), target=X86_AVX512).mod.inspect_source("asm")
    assert "vrndscaleps" in asm and "gather" not in asm and "vpextrb" not in asm
    _assert_same(_run(make_prim_func([xp], quantize_act(xp, scale, 8, False), "quant"), [x], x.shape, "uint8"), ref)


# --------------------------------------------------------------------------------------------
# Relax emit_te (int64 shapes), markers, cross-compilation
# --------------------------------------------------------------------------------------------

def test_emit_te_relax_and_schedule() -> None:
    case = CONV_CASES[1]
    func, args, ref = _conv(case, "requant", True)
    x, codes, aq, scale, bias = args
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, str(x.dtype)))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_te(ternary_conv2d, xv, relax.const(codes), relax.const(aq), relax.const(scale),
                           relax.const(bias), weight_shape=(case.k, case.c, 3, 3), strides=2, padding=1,
                           group_size=case.n, relu=True, out_mode="requant", requant_scale=0.37,
                           primfunc_name_hint="ternary_conv2d", primfunc_attrs=kernel_attrs("ternary_conv2d"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    found = 0
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and KERNEL_ATTR in f.attrs:
            mod[gv] = schedule_default(f, HOST)
            found += 1
    assert found == 1
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    _assert_same(vm["main"](tvm.runtime.tensor(x)).numpy(), ref)


def test_schedule_default_rejects_unmarked() -> None:
    a = te.placeholder((4,), "float32")
    b = te.compute((4,), lambda i: a[i] + 1.0)
    with pytest.raises(ValueError, match="not a tvm_lowbit kernel"):
        schedule_default(te.create_prim_func([a, b]), HOST)


_NEON = {
    "aarch64": re.compile(r"^\s+(smlal2?|umlal2?|mla|mul|sdot|udot|smull2?|addv)\s+v\d+\.\d+[bhs]", re.M),
    "armv7": re.compile(r"^\s+(vmla|vmlal|vmul|vmull|vadd)\.[iu]\d+\s+q\d+", re.M),
}


@pytest.mark.parametrize("target,arch", [(A72, "aarch64"), (A76, "aarch64"), (ARMV7, "armv7")],
                         ids=["cortex-a72", "cortex-a76-dotprod", "armv7-neon"])
def test_cross_compile_neon(target: dict, arch: str) -> None:
    conv, _, _ = _conv(CONV_CASES[0], "requant", True)
    x = te.placeholder((3, 64), "int8")
    tw = _weight(0, (16, 64), 16)
    ph = [x, te.placeholder(tw.packed_codes().shape, "uint8"), te.placeholder((16, 4), "uint8"),
          te.placeholder((16,), "float32"), te.placeholder((16,), "float32")]
    dense = make_prim_func(ph, ternary_dense(*ph, weight_shape=(16, 64), group_size=16, out_mode="float"), "d")
    for func in (conv, dense):
        asm = tvm.compile(schedule_default(func, target), target=tvm.target.Target(target)).mod.inspect_source("asm")
        hits = _NEON[arch].findall(asm)
        assert len(hits) >= 4, f"no NEON vector MACs in the {arch} asm ({len(asm)} chars)"
