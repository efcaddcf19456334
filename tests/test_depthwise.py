"""The depthwise conv kernels (kernels.depthwise): the scheduled kernels bit-exact against the numpy integer
reference on the host (x86 AVX-512 and AVX2 schedules; int8 per channel, grouped ternary and int4 weights,
unsigned and signed codes, NCHW and NHWC, stride 1 and 2, 3x3 and 5x5, every output mode), the
instructions the schedules compile to (x86 and aarch64), and which kernel the registry gives depthwise
layers on x86 / rasp4b / rasp5 and on a target without the vector features.  The aarch64 schedules run
bit-exact on the emulated Pi 4 and Pi 5 in tests/test_depthwise_board.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from tvm_lowbit import kernels, qmath
from tvm_lowbit.kernels import LayerSpec, depthwise
from tvm_lowbit.targets import load_target

HOST = load_target("x86-host").tvm_target()
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})  # AVX2, no AVX-512
PLAIN = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})    # no AVX2


def weight_of(kind: str, c: int, r: int, seed: int) -> object:
    """A depthwise weight ``[C, 1, R, R]`` decomposed as the formats do (``.w_int``, the integer weight)."""
    w = torch.randn(c, 1, r, r, generator=torch.Generator().manual_seed(seed))
    if kind == "ternary":  # FGQ: groups along the taps, 8-bit alpha codes (alpha * t up to 255: int16)
        return qmath.ternarize_weight(w, 4, alpha_bits=8)
    if kind == "int4":
        return qmath.int_quantize_weight(w, 4, group_size=4)
    return qmath.int_quantize_weight(w, 8)


def dw_case(kind: str, c: int, hw: int, r: int, stride: int, signed: bool, in_layout: str, out_layout: str,
            out_mode: str, wide: bool, seed: int = 0) -> tuple:
    """(PrimFunc, its input arrays + output buffer, the expected output)."""
    rng = np.random.default_rng(seed + c * hw + r + stride + signed)
    wint = weight_of(kind, c, r, seed + c + r).w_int.numpy().astype(np.int64)
    dt = "int8" if signed else "uint8"
    xv = (rng.integers(-128, 128, (1, c, hw, hw)) if signed else rng.integers(0, 256, (1, c, hw, hw))).astype(dt)
    x = te.placeholder(xv.shape if in_layout == "NCHW" else (1, hw, hw, c), dt, name="x")
    wp = te.placeholder((r * r, depthwise.padded_channels(c)), "int16", name="w")
    sc, bi = te.placeholder((c,), "float32", name="s"), te.placeholder((c,), "float32", name="b")
    out = depthwise.dwconv2d(x, wp, sc, bi, weight_shape=(c, 1, r, r), strides=stride, padding=r // 2, groups=c,
                             in_layout=in_layout, out_layout=out_layout, wide_input=wide, relu=out_mode != "acc",
                             out_mode=out_mode, requant_scale=0.05 if out_mode == "requant" else None)
    name = f"dw_{kind}_{c}_{hw}_{r}_{stride}_{int(signed)}_{in_layout}_{out_layout}_{out_mode}_{int(wide)}"
    func = kernels.make_prim_func([x, wp, sc, bi], out, name)
    # outputs of a few units, so that requantized codes spread over the range instead of clipping
    scale = (rng.uniform(0.5, 1.5, c) / (20 * r * np.abs(wint).max())).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, c).astype(np.float32)
    acc = qmath.conv2d_int_np(xv.astype(np.int64), wint, (stride, stride), (r // 2, r // 2), (1, 1), c)
    want = acc.astype(np.int32)
    if out_mode != "acc":
        want = qmath.epilogue_np(want, scale, bias, True, 1)
    if out_mode == "requant":
        want = qmath.quantize_act_np(want, 0.05, 8, False).astype(np.uint8)
    if out_layout == "NHWC":
        want = np.ascontiguousarray(want.transpose(0, 2, 3, 1))
    xin = xv if in_layout == "NCHW" else np.ascontiguousarray(xv.transpose(0, 2, 3, 1))
    arrays = [xin, depthwise.weight_taps(wint), scale, bias, np.zeros(want.shape, want.dtype)]
    return func, arrays, want


CASES = [  # kind, C, HW, R, stride, signed, in layout, out layout, out mode
    ("int8", 32, 14, 3, 1, False, "NHWC", "NHWC", "requant"),
    ("ternary", 16, 15, 3, 2, False, "NHWC", "NHWC", "float"),
    ("ternary", 48, 9, 5, 1, False, "NHWC", "NCHW", "acc"),
    ("int8", 24, 10, 5, 2, True, "NCHW", "NHWC", "requant"),
    ("int4", 16, 7, 3, 1, True, "NCHW", "NCHW", "float"),
    ("int8", 8, 12, 3, 2, False, "NHWC", "NHWC", "acc"),
    # channels no multiple of 8 (ShuffleNet's 58 and 116): padded to whole vectors with zero weights
    ("ternary", 58, 9, 3, 2, False, "NHWC", "NHWC", "requant"),
    ("int8", 12, 8, 5, 1, True, "NCHW", "NCHW", "acc"),
]


def run_host(func: tvm.tirx.PrimFunc, arrays: list[np.ndarray], target: tvm.target.Target) -> np.ndarray:
    sch = tvm.s_tir.Schedule(func)
    depthwise.schedule_dwconv2d(sch, target)
    lib = tvm.compile(sch.mod, target=target)
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib[str(func.attrs["global_symbol"])](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["x86-host", "avx2"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "_".join(map(str, c)))
def test_depthwise_is_bit_exact_on_the_host(case: tuple, target: tvm.target.Target) -> None:
    func, arrays, want = dw_case(*case, wide=False)
    got = run_host(func, arrays, target)
    if case[-1] == "requant":
        assert len(np.unique(want)) > 20, "degenerate test data"
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_the_aarch64_form_is_bit_exact_on_the_host() -> None:
    """The int16 padded copy (the aarch64 form) computes the same, scheduled for and run on x86."""
    func, arrays, want = dw_case("ternary", 16, 11, 3, 2, False, "NHWC", "NHWC", "requant", wide=True)
    assert np.array_equal(run_host(func, arrays, HOST), want)


def _asm(target: tvm.target.Target, wide: bool) -> str:
    func, _, _ = dw_case("int8", 32, 14, 3, 1, False, "NHWC", "NHWC", "requant", wide=wide)
    sch = tvm.s_tir.Schedule(func)
    depthwise.schedule_dwconv2d(sch, target)
    return tvm.compile(sch.mod, target=target).mod.inspect_source("asm")


@pytest.mark.parametrize("board", ["rasp4b", "rasp5"])
def test_aarch64_schedule_multiplies_with_smlal(board: str) -> None:
    """The taps' multiply-accumulates are widening ``smull`` / ``smlal`` (low 4 channels) and ``smull2`` /
    ``smlal2`` (high 4) on 16-bit lanes: 36 of each half per tile of 4 columns x 8 channels of a 3x3 filter
    (the first tap of each accumulator a ``smull``)."""
    asm = _asm(load_target(board).tvm_target(), wide=True)
    lo = re.findall(r"^\s+sm(?:ull|lal)\s+v\d+\.4s, v\d+\.4h", asm, re.M)
    hi = re.findall(r"^\s+sm(?:ull|lal)2\s+v\d+\.4s, v\d+\.8h", asm, re.M)
    assert len(lo) >= 36 and len(hi) >= 36, (len(lo), len(hi))


def test_x86_schedule_is_vectorized() -> None:
    """AVX-512 (the host: 16 int32 lanes) and AVX2 (8): vector multiply-adds, no scalar ``imul`` in the taps."""
    for target, reg in ((HOST, "zmm"), (AVX2, "ymm")):
        asm = _asm(target, wide=False)
        madds = re.findall(rf"^\s+(vpdpwssd|vpmaddwd|vpmulld)\s+.*%{reg}", asm, re.M)
        assert len(madds) >= 63, (str(target), len(madds))


def _spec(kind: str, c: int, r: int, stride: int = 1, groups: int | None = None, act_bits: int = 8) -> LayerSpec:
    tw = weight_of(kind, c, r, 0)
    family = "ternary" if kind == "ternary" else "int"
    attrs = dict(weight_shape=(c, 1, r, r), strides=(stride, stride), padding=(r // 2, r // 2), dilation=(1, 1),
                 groups=c if groups is None else groups)
    return LayerSpec("dw", "conv2d", family, tw, attrs, act_bits, False, (1, c, 14, 14))


@pytest.mark.parametrize("board, isa", [("x86-host", "avx"), ("rasp4b", "neon"), ("rasp5", "neon")])
def test_depthwise_layers_get_the_depthwise_kernel(board: str, isa: str) -> None:
    target = load_target(board).tvm_target()
    for kind, family in (("ternary", "ternary"), ("int8", "int"), ("int4", "int")):
        for r, stride in ((3, 1), (3, 2), (5, 1), (5, 2)):
            kernel, reason = kernels.select(_spec(kind, 32, r, stride), target)
            assert kernel is not None and kernel.name == f"{family}_dwconv2d_{isa}", reason
            assert reason.startswith(f"{family}_dwconv2d_{isa} fits")


def test_depthwise_fallbacks_say_why() -> None:
    """A target without the vector features, and layers outside the kernel, take the generic kernel."""
    kernel, reason = kernels.select(_spec("ternary", 32, 3), PLAIN)
    assert kernel.name == "ternary_conv2d" and "not ternary_dwconv2d_avx: the target has no AVX2" in reason
    kernel, reason = kernels.select(_spec("int8", 32, 3), None)
    assert kernel.name == "int_conv2d" and "no LLVM target" in reason
    assert kernels.select(_spec("int8", 12, 3), HOST).kernel.name == "int_dwconv2d_avx"  # padded to 16 channels
    for spec, why in ((_spec("int8", 16, 7), "7x7 filters"),
                      (_spec("int8", 16, 3, stride=3), "strides (3, 3)"),
                      (_spec("int8", 16, 3, act_bits=16), "16-bit activation codes")):
        kernel, reason = kernels.select(spec, HOST)
        assert kernel.name == "int_conv2d" and why in reason, reason
    # a grouped (not depthwise) conv is not the kernel's either
    tw = qmath.int_quantize_weight(torch.randn(32, 2, 3, 3), 8)
    spec = LayerSpec("g", "conv2d", "int", tw, dict(weight_shape=(32, 2, 3, 3), strides=(1, 1), padding=(1, 1),
                                                    dilation=(1, 1), groups=16), 8, False, (1, 32, 8, 8))
    kernel, reason = kernels.select(spec, HOST)
    assert kernel.name == "int_conv2d" and "not depthwise" in reason


def test_operands_are_the_integer_weight_by_tap() -> None:
    spec = _spec("ternary", 16, 3)
    kernel = kernels.get("ternary_dwconv2d_neon")
    (w,), extra = kernel.operands(spec)
    wint = spec.weight.w_int.numpy()
    assert w.dtype == np.int16 and w.shape == (9, 16) and extra == {"wide_input": True}
    assert all(w[ry * 3 + rx, c] == wint[c, 0, ry, rx] for c in range(16) for ry in range(3) for rx in range(3))
    with pytest.raises(ValueError, match="not a depthwise conv"):
        depthwise.dwconv2d(te.placeholder((1, 8, 8, 16), "uint8"), te.placeholder((9, 16), "int16"),
                           te.placeholder((16,), "float32"), te.placeholder((16,), "float32"),
                           weight_shape=(16, 2, 3, 3), groups=8, in_layout="NHWC")
