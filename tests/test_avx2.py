"""The project's AVX2 int8 dot-product intrinsic (vpmaddubsw + vpmaddwd): bit-exact ternary and power-of-two
dense kernels against the numpy integer reference, and the instructions it compiles to."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te

from tvm_lowbit import qmath
from tvm_lowbit.kernels import avx2

AVX2_ONLY = {"kind": "llvm", "mcpu": "znver3", "num-cores": 1}  # AVX2, no AVX-512 / VNNI


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
