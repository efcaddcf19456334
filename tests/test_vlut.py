"""The decode-free vpermb LUT dense kernel (kernels.vlut): bit-exact against the numpy integer reference
(random and extreme codes, 8-bit alpha, several rows, one and several threads), its target rule, its
instructions, and its operand layout."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from tvm_lowbit import qmath
from tvm_lowbit.kernels import vlut

AVX512_VBMI_VNNI = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
HOST_OK = all(f in open("/proc/cpuinfo").read() for f in ("avx512_vnni", "avx512vbmi", "avx512bw"))
needs_host = pytest.mark.skipif(not HOST_OK, reason="this host lacks AVX-512 VBMI/VNNI to run the kernel")


def _run(x: np.ndarray, t: np.ndarray, alpha: np.ndarray, parallel: bool = True) -> np.ndarray:
    m, k = x.shape
    n = t.shape[0]
    f = vlut.build_dense(m, n, k, parallel=parallel, target=AVX512_VBMI_VNNI)
    cv, av = vlut.vlut_tiles(qmath.pack_2bit(t), alpha)
    args = [tvm.runtime.tensor(v) for v in (x, cv, av, np.zeros((m, n), np.int32))]
    f["main"](*args)
    return args[-1].numpy().astype(np.int64)


def _reference(x: np.ndarray, t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    w = t.astype(np.int64) * np.repeat(alpha.astype(np.int64), 4, axis=1)  # one alpha per 4 input channels
    return qmath.dense_int_np(x.astype(np.int64), w)


@needs_host
@pytest.mark.parametrize("m,n,k,parallel", [(1, 64, 64, True), (3, 128, 256, True), (2, 64, 512, False)])
def test_vlut_bit_exact(m: int, n: int, k: int, parallel: bool) -> None:
    rng = np.random.default_rng(m * n + k)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    t = rng.integers(-1, 2, (n, k))
    alpha = rng.integers(0, 256, (n, k // 4)).astype(np.int16)  # 8-bit alpha codes: no 7-bit limit here
    np.testing.assert_array_equal(_run(x, t, alpha, parallel), _reference(x, t, alpha))


@needs_host
def test_vlut_extremes() -> None:
    """Largest group sums (|P| = 4 * 255 split into nibble sums of 60) with the largest alpha codes."""
    n, k = 64, 128
    x = np.full((1, k), 255, np.uint8)
    t = np.ones((n, k), np.int64)
    t[1::2] = -1
    t[2::4, ::3] = 0
    alpha = np.full((n, k // 4), 255, np.int16)
    got = _run(x, t, alpha)
    np.testing.assert_array_equal(got, _reference(x, t, alpha))
    assert got[0, 0] == 255 * 255 * k and got[0, 1] == -255 * 255 * k


def test_vlut_target_rule_and_instructions() -> None:
    assert vlut.has_vlut(tvm.target.Target(AVX512_VBMI_VNNI))
    for mcpu in ("x86-64-v3", "alderlake", "cascadelake"):  # no AVX-512; AVX-VNNI only; VNNI without VBMI
        assert not vlut.has_vlut(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})), mcpu
    with pytest.raises(ValueError, match="lacks AVX-512"):
        vlut.build_dense(1, 64, 64, target={"kind": "llvm", "mcpu": "x86-64-v3"})
    asm = vlut.build_dense(1, 64, 64, target=AVX512_VBMI_VNNI).mod.inspect_source("asm")
    assert "vpermb" in asm and "vpdpbusd" in asm and "vpmulld" not in asm


def test_vlut_tiles_are_the_same_bytes() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (32, 8)).astype(np.uint8)
    alpha = rng.integers(0, 256, (32, 8)).astype(np.int16)
    cv, av = vlut.vlut_tiles(codes, alpha)
    assert cv.shape == av.shape == (2, 2, 64)
    assert sorted(cv.ravel().tolist()) == sorted(codes.ravel().tolist())
    assert cv[1, 1, 4 * 3 + 2] == codes[16 + 3, 4 + 2] and av[1, 1, 4 * 3 + 2] == alpha[16 + 3, 4 + 2]
    with pytest.raises(ValueError, match="K % 16"):
        vlut.vlut_tiles(codes[:20], alpha[:20])
