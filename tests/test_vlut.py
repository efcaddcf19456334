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


@needs_host
@pytest.mark.parametrize("signed,out_mode", [(True, "acc"), (False, "float"), (True, "requant")])
def test_vlut_te_compute(signed: bool, out_mode: str) -> None:
    """The registered TE compute: signed codes through the zero-point term, and the epilogues, against the
    numpy reference (the epilogue by the generic ternary kernel's own math: kernels.ternary_dense)."""
    from tvm import te

    from tvm_lowbit import kernels
    from tvm_lowbit.kernels import vnni

    m, n, k = 2, 64, 128
    rng = np.random.default_rng(7)
    dt = "int8" if signed else "uint8"
    xv = (rng.integers(-128, 128, (m, k)) if signed else rng.integers(0, 256, (m, k))).astype(dt)
    t = rng.integers(-1, 2, (n, k))
    alpha = rng.integers(0, 256, (n, k // 4)).astype(np.int16)
    w = t * np.repeat(alpha.astype(np.int64), 4, axis=1)
    cv, av = vlut.vlut_tiles(qmath.pack_2bit(t), alpha)
    x = te.placeholder((m, k), dt, name="x")
    pc, pa = te.placeholder(cv.shape, "uint8", name="cv"), te.placeholder(av.shape, "uint8", name="av")
    sc, bi = te.placeholder((n,), "float32", name="s"), te.placeholder((n,), "float32", name="b")
    zp = te.placeholder((n,), "int32", name="zp") if signed else None
    mode = dict(out_mode=out_mode, requant_scale=0.05 if out_mode == "requant" else None, relu=out_mode != "acc")
    out = vlut.ternary_dense_vlut(x, pc, pa, sc, bi, weight_shape=(n, k), group_size=4, zp=zp, **mode)
    ins = [x, pc, pa, sc, bi, *([zp] if signed else [])]
    sch = tvm.s_tir.Schedule(kernels.make_prim_func(ins, out, "main"))
    vlut.schedule_dense_vlut(sch)
    f = tvm.compile(sch.mod, target=tvm.target.Target(AVX512_VBMI_VNNI))
    scale = (rng.random(n) * 1e-4).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    args = [xv, cv, av, scale, bias, *([vnni.zero_point_term(w)] if signed else [])]
    res = tvm.runtime.tensor(np.zeros([int(v) for v in out.shape], str(out.dtype)))
    f["main"](*[tvm.runtime.tensor(a) for a in args], res)
    acc = qmath.dense_int_np(xv.astype(np.int64), w)
    if out_mode == "acc":
        np.testing.assert_array_equal(res.numpy().astype(np.int64), acc)
        return
    # the generic kernel's epilogue on the same accumulators (ternary_dense's float / requant math)
    codes, gx = te.placeholder((n, k // 4), "uint8", name="codes"), te.placeholder((m, k), dt, name="gx")
    ga = te.placeholder((n, k // 4), "int16", name="ga")
    ref_out = kernels.ternary_dense(gx, codes, ga, sc, bi, weight_shape=(n, k), group_size=4, **mode)
    g = tvm.compile(kernels.schedule_default(kernels.make_prim_func([gx, codes, ga, sc, bi], ref_out, "main"),
                                             AVX512_VBMI_VNNI), target=tvm.target.Target(AVX512_VBMI_VNNI))
    ref = tvm.runtime.tensor(np.zeros(res.shape, str(out.dtype)))
    g["main"](*[tvm.runtime.tensor(a) for a in (xv, qmath.pack_2bit(t), alpha, scale, bias)], ref)
    np.testing.assert_array_equal(res.numpy(), ref.numpy())


@needs_host
def test_vlut_in_a_compiled_model() -> None:
    """LowerIntegerLayers gives the batch-1 ternary dense layers (groups of 4) the vpermb LUT kernel on this
    host, and the compiled model's accumulators and output equal those of the same build without it."""
    import torch
    from torch import nn

    import tvm_lowbit
    from tvm_lowbit import kernels
    from tvm_lowbit.quantizers.fgq import FGQ

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    calib = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    q = tvm_lowbit.quantize(model, FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq"), calib,
                            progress=False)
    x = calib[:1]
    art = tvm_lowbit.compile(q, x, "x86-host", expose_acc=True)
    assert set(art.report.kernel_names.values()) == {vlut.NAME}, art.report.kernel_reasons
    got = art.run_all(x)
    kernels.unregister(vlut.NAME)
    try:
        other = tvm_lowbit.compile(q, x, "x86-host", expose_acc=True)
    finally:
        kernels.register(vlut.TERNARY_DENSE_VLUT)
    assert vlut.NAME not in other.report.kernel_names.values()
    for a, b in zip(got, other.run_all(x), strict=True):
        np.testing.assert_array_equal(a, b)
    # more rows than the measured rule: not this kernel
    art4 = tvm_lowbit.compile(q, calib[:vlut.MAX_ROWS + 1], "x86-host")
    assert vlut.NAME not in art4.report.kernel_names.values()
