"""The lookup-table ternary dense kernel (kernels.lut): bit-exact against the numpy integer reference, and
picked for few-row dense layers on x86."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from tvm_lowbit import qmath
from tvm_lowbit.kernels import avx2, lut

HOST = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 1}  # AVX2: the gathers vectorize


def _build(m: int, n: int, k: int, gs: int, out_mode: str):
    x = te.placeholder((m, k), "uint8", name="x")
    codes = te.placeholder((n, k // 4), "uint8", name="codes3")
    alpha = te.placeholder((n, -(-k // gs)), "uint8", name="alpha_q")
    sc, bi = te.placeholder((n,), "float32", name="s"), te.placeholder((n,), "float32", name="b")
    out = lut.ternary_dense_lut(x, codes, alpha, sc, bi, weight_shape=(n, k), group_size=gs, out_mode=out_mode,
                                requant_scale=0.05 if out_mode == "requant" else None, relu=True)
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, codes, alpha, sc, bi, out]))
    lut.schedule_dense_lut(sch)
    return tvm.compile(sch.mod, target=tvm.target.Target(HOST)), out


@pytest.mark.parametrize("m,n,k,gs", [(1, 10, 64, 4), (3, 24, 96, 8), (2, 16, 40, 20)])
def test_lut_dense_bit_exact(m: int, n: int, k: int, gs: int) -> None:
    rng = np.random.default_rng(m * 100 + k)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    t = rng.integers(-1, 2, (n, k))
    alpha = rng.integers(0, 256, (n, -(-k // gs))).astype(np.uint8)
    ref = avx2.reference_ternary(x, qmath.pack_2bit(t), alpha, n, k, gs)
    scale = (rng.random(n) * 1e-4).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    for mode in ("acc", "float", "requant"):
        f, out = _build(m, n, k, gs, mode)
        args = [tvm.runtime.tensor(a) for a in (x, lut.base3_codes(t), alpha, scale, bias,
                                                np.zeros((m, n), str(out.dtype)))]
        f["main"](*args)
        got = args[-1].numpy()
        if mode == "acc":
            np.testing.assert_array_equal(got.astype(np.int64), ref)
        else:
            y = qmath.epilogue_np(ref, scale, bias, relu=True, channel_dim=1)
            want = y if mode == "float" else qmath.quantize_act_np(y, 0.05, 8, False)
            np.testing.assert_array_equal(got, want)


def test_base3_codes_round_trip_and_bad_input() -> None:
    t = np.array([[-1, 0, 1, 1, 0, 0, 0, -1]])
    c = lut.base3_codes(t)
    assert c.shape == (1, 2) and c.dtype == np.uint8
    digits = [(int(c[0, s]) // 3 ** q) % 3 - 1 for s in range(2) for q in range(4)]
    assert digits == t[0].tolist()
    with pytest.raises(ValueError, match="C % 4 == 0"):
        lut.base3_codes(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="base-3 codes"):
        lut.ternary_dense_lut(te.placeholder((1, 16), "uint8"), te.placeholder((4, 8), "uint8"),
                              te.placeholder((4, 4), "uint8"), te.placeholder((4,)), te.placeholder((4,)),
                              weight_shape=(4, 16), group_size=4)
