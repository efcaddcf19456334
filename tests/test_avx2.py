"""The project's AVX2 int8 dot-product intrinsic (vpmaddubsw + vpmaddwd): bit-exact ternary and power-of-two
dense kernels against the numpy integer reference, and the instructions it compiles to."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from tvm_lowbit import qmath
from tvm_lowbit.kernels import avx2

AVX2_ONLY = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 1}  # AVX2, no AVX-512 / VNNI


def _run(f, *arrays, out_shape, out_dtype="int32") -> np.ndarray:
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    mod = f.mod if hasattr(f, "mod") else f
    mod["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize("m,n,k,gs", [(5, 16, 32, 4), (8, 24, 64, 8), (4, 8, 48, 16)])
def test_ternary_avx2_bit_exact(m: int, n: int, k: int, gs: int) -> None:
    rng = np.random.default_rng(m * n + k)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)  # full uint8 range: the int16 pair sums are exact
    codes = qmath.pack_2bit(rng.integers(-1, 2, (n, k)))
    alpha = rng.integers(0, 256, (n, k // gs)).astype(np.int16)
    f, names = avx2.build_dense("ternary", m, n, k, group_size=gs, target=AVX2_ONLY)
    assert names == ["x", "codes", "alpha_q", "out_scale", "out_bias"]
    acc = _run(f, x, codes, alpha, np.ones(n, np.float32), np.zeros(n, np.float32), out_shape=(m, n))
    np.testing.assert_array_equal(acc.astype(np.int64), avx2.reference_ternary(x, codes, alpha, n, k, gs))


def test_pow2_avx2_bit_exact() -> None:
    m, n, k = 6, 16, 40
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    e = rng.integers(0, 7, (n, k))
    w = np.where(rng.random((n, k)) < 0.2, 0, (1 << e) * rng.choice([-1, 1], (n, k))).astype(np.int64)
    packed = qmath.pack_pow2(qmath.pow2_codes(w, 4), 4)
    f, _ = avx2.build_dense("pow2", m, n, k, target=AVX2_ONLY)
    acc = _run(f, x, packed, np.ones(n, np.float32), np.zeros(n, np.float32), out_shape=(m, n))
    np.testing.assert_array_equal(acc.astype(np.int64), qmath.dense_int_np(x, w))


def test_float_epilogue_matches_reference() -> None:
    m, n, k, gs = 3, 8, 16, 4
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    codes = qmath.pack_2bit(rng.integers(-1, 2, (n, k)))
    alpha = rng.integers(0, 256, (n, k // gs)).astype(np.int16)
    scale = rng.random(n).astype(np.float32) * 1e-3
    bias = rng.standard_normal(n).astype(np.float32)
    f, _ = avx2.build_dense("ternary", m, n, k, group_size=gs, out_mode="float", target=AVX2_ONLY)
    y = _run(f, x, codes, alpha, scale, bias, out_shape=(m, n), out_dtype="float32")
    acc = avx2.reference_ternary(x, codes, alpha, n, k, gs)
    np.testing.assert_array_equal(y, qmath.epilogue_np(acc, scale, bias, relu=False, channel_dim=1))


def test_compiles_to_avx2_dot_instructions() -> None:
    f, _ = avx2.build_dense("ternary", 8, 16, 64, target=AVX2_ONLY)
    asm = (f.mod if hasattr(f, "mod") else f).inspect_source("asm")
    ops = re.findall(r"^\s+(v[a-z0-9]+)\s", asm, re.M)
    assert ops.count("vpmaddubsw") >= 16 and ops.count("vpmaddwd") >= 16
    assert not any("zmm" in line for line in asm.splitlines() if "vpmadd" in line)


def test_bad_inputs_are_explained() -> None:
    x = te.placeholder((4, 30), "uint8")
    codes = te.placeholder((8, 8), "uint8")
    alpha = te.placeholder((8, 8), "int16")
    s = te.placeholder((8,), "float32")
    with pytest.raises(ValueError, match="input channels % 4"):
        avx2.ternary_dense_avx2(x, codes, alpha, s, s, weight_shape=(8, 30), group_size=4)
    xs = te.placeholder((4, 32), "int8")
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        avx2.ternary_dense_avx2(xs, codes, alpha, s, s, weight_shape=(8, 32), group_size=4)
    with pytest.raises(ValueError, match="group_size % 4"):
        avx2.ternary_dense_avx2(te.placeholder((4, 32), "uint8"), codes, te.placeholder((8, 11), "int16"), s, s,
                                weight_shape=(8, 32), group_size=3)
    with pytest.raises(ValueError, match="4-bit codes"):
        avx2.pow2_dense_avx2(te.placeholder((4, 32), "uint8"), te.placeholder((8, 32), "uint8"), s, s,
                             weight_shape=(8, 32), code_bits=8)


def _build_conv(kind: str, shape: tuple[int, int, int, int], weight_shape: tuple[int, int, int, int], stride: int,
                pad: int, gs: int = 4, out_mode: str = "acc"):
    k, c, r, s = weight_shape
    x = te.placeholder(shape, "uint8", name="x")
    scale, bias = te.placeholder((k,), "float32", name="s"), te.placeholder((k,), "float32", name="b")
    if kind == "ternary":
        lay = qmath.group_layout(weight_shape, gs)
        codes = te.placeholder((k, -(-lay.row_len // 4)), "uint8", name="codes")
        alpha = te.placeholder((k, lay.groups_per_row), "uint8", name="alpha_q")
        out = avx2.ternary_conv2d_avx2(x, codes, alpha, scale, bias, weight_shape=weight_shape, strides=stride,
                                       padding=pad, group_size=gs, out_mode=out_mode)
        args = [x, codes, alpha, scale, bias, out]
    else:
        codes = te.placeholder((k, -(-r * s * c // 2)), "uint8", name="codes")
        out = avx2.pow2_conv2d_avx2(x, codes, scale, bias, weight_shape=weight_shape, strides=stride, padding=pad,
                                    out_mode=out_mode)
        args = [x, codes, scale, bias, out]
    sch = tvm.s_tir.Schedule(te.create_prim_func(args))
    avx2.schedule_conv2d_avx2(sch)
    return tvm.compile(sch.mod, target=tvm.target.Target(AVX2_ONLY))


@pytest.mark.parametrize("shape,weight_shape,stride,pad,gs", [
    ((1, 16, 9, 9), (16, 16, 3, 3), 1, 1, 4),
    ((2, 8, 7, 7), (24, 8, 3, 3), 2, 1, 8),
    ((1, 32, 6, 6), (8, 32, 1, 1), 2, 0, 16),
    ((1, 12, 5, 5), (8, 12, 3, 3), 1, 1, 8),   # 12 channels in groups of 8: a padded segment per tap
])
def test_ternary_conv_avx2_bit_exact(shape, weight_shape, stride: int, pad: int, gs: int) -> None:
    rng = np.random.default_rng(sum(shape) + gs)
    lay = qmath.group_layout(weight_shape, gs)
    k = weight_shape[0]
    t = rng.integers(-1, 2, (k, lay.groups_per_row, lay.group_size)) * qmath.group_mask(lay).numpy()
    alpha = rng.integers(0, 256, (k, lay.groups_per_row)).astype(np.uint8)
    w_int = qmath.from_grouped(torch.from_numpy(t * alpha[:, :, None].astype(np.int64)), lay).numpy()
    x = rng.integers(0, 256, shape).astype(np.uint8)
    ref = qmath.conv2d_int_np(x, w_int, (stride, stride), (pad, pad), (1, 1), 1)
    f = _build_conv("ternary", shape, weight_shape, stride, pad, gs)
    acc = _run(f, x, qmath.pack_2bit(t.reshape(k, -1)), alpha, np.ones(k, np.float32), np.zeros(k, np.float32),
               out_shape=ref.shape)
    np.testing.assert_array_equal(acc.astype(np.int64), ref)


def test_pow2_conv_avx2_bit_exact_with_requant_epilogue() -> None:
    shape, weight_shape = (1, 8, 8, 8), (16, 8, 3, 3)
    rng = np.random.default_rng(3)
    e = rng.integers(0, 7, weight_shape)
    w = np.where(rng.random(weight_shape) < 0.2, 0, (1 << e) * rng.choice([-1, 1], weight_shape)).astype(np.int64)
    x = rng.integers(0, 256, shape).astype(np.uint8)
    ref = qmath.conv2d_int_np(x, w, (1, 1), (1, 1), (1, 1), 1)
    packed = qmath.pack_pow2(qmath.pow2_codes(qmath.pow2_flat(w), 4), 4)
    f = _build_conv("pow2", shape, weight_shape, 1, 1)
    acc = _run(f, x, packed, np.ones(16, np.float32), np.zeros(16, np.float32), out_shape=ref.shape)
    np.testing.assert_array_equal(acc.astype(np.int64), ref)


def test_bad_conv_inputs_are_explained() -> None:
    s = te.placeholder((8,), "float32")
    codes = te.placeholder((8, 9), "uint8")
    alpha = te.placeholder((8, 9), "uint8")
    with pytest.raises(ValueError, match=r"K=8, C=6.*C % 4 == 0.*use kernels.ternary_conv2d"):
        avx2.ternary_conv2d_avx2(te.placeholder((1, 6, 4, 4), "uint8"), te.placeholder((8, 14), "uint8"), alpha, s, s,
                                 weight_shape=(8, 6, 3, 3), group_size=4)
    with pytest.raises(ValueError, match="groups=2"):
        avx2.ternary_conv2d_avx2(te.placeholder((1, 8, 4, 4), "uint8"), codes, alpha, s, s, weight_shape=(8, 4, 3, 3),
                                 groups=2, group_size=4)
    with pytest.raises(ValueError, match="group.* of 2 along"):
        avx2.ternary_conv2d_avx2(te.placeholder((1, 8, 4, 4), "uint8"), te.placeholder((8, 18), "uint8"),
                                 te.placeholder((8, 36), "uint8"), s, s, weight_shape=(8, 8, 3, 3), group_size=2)
    with pytest.raises(ValueError, match="8-bit codes"):
        avx2.pow2_conv2d_avx2(te.placeholder((1, 8, 4, 4), "uint8"), te.placeholder((8, 72), "uint8"), s, s,
                              weight_shape=(8, 8, 3, 3), code_bits=8)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_ternary_conv_avx2_layouts_bit_exact(layout: str) -> None:
    """The AVX2 conv reads and writes NCHW or NHWC codes (the NHWC integer region of passes.convert_layout)."""
    from tvm_lowbit import kernels

    k, c, h, r = 16, 8, 6, 3
    rng = np.random.default_rng(5)
    tw = qmath.ternarize_weight(torch.randn(k, c, r, r, generator=torch.Generator().manual_seed(5)), 4)
    codes, al = tw.packed_codes(), tw.alpha_q.numpy().reshape(k, -1).astype(np.uint8)
    x = te.placeholder((1, c, h, h) if layout == "NCHW" else (1, h, h, c), "uint8", name="x")
    ph = [te.placeholder(v.shape, "uint8", name=n) for n, v in (("codes", codes), ("alpha", al))]
    sc, bi = te.placeholder((k,), "float32", name="s"), te.placeholder((k,), "float32", name="b")
    out = avx2.ternary_conv2d_avx2(x, *ph, sc, bi, weight_shape=(k, c, r, r), padding=1, group_size=4, out_mode="acc",
                                   in_layout=layout, out_layout=layout)
    sch = tvm.s_tir.Schedule(kernels.make_prim_func([x, *ph, sc, bi], out, "main"))
    avx2.schedule_conv2d_avx2(sch)
    xv = rng.integers(0, 256, (1, c, h, h)).astype(np.uint8)
    got = _run(tvm.compile(sch.mod, target=tvm.target.Target(AVX2_ONLY)),
               xv if layout == "NCHW" else np.ascontiguousarray(xv.transpose(0, 2, 3, 1)), codes, al,
               np.ones(k, np.float32), np.zeros(k, np.float32), out_shape=[int(v) for v in out.shape])
    if layout == "NHWC":
        got = got.transpose(0, 3, 1, 2)
    ref = qmath.conv2d_int_np(xv.astype(np.int64), tw.w_int.numpy().astype(np.int64), (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_array_equal(got.astype(np.int64), ref)
