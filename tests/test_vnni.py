"""The VNNI (vpdpbusd) kernels with the group alpha folded into int8 weights: bit-exact against the numpy
integer references (conv and dense, unsigned and signed activation codes, NCHW and NHWC, 16 and 8 lanes,
ternary and int8 per channel), the registry's choice, and the instructions they compile to."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from tvm_lowbit import kernels, qmath
from tvm_lowbit.kernels import LayerSpec, vnni

AVX512_VNNI = {"kind": "llvm", "mcpu": "znver4", "num-cores": 1}   # zmm vpdpbusd
AVX_VNNI = {"kind": "llvm", "mcpu": "alderlake", "num-cores": 1}  # ymm vpdpbusd (AVX-VNNI), no AVX-512
AVX2_ONLY = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 1}
HOST_VNNI = "avx512_vnni" in open("/proc/cpuinfo").read()
needs_vnni = pytest.mark.skipif(not HOST_VNNI, reason="this host has no AVX-512 VNNI to run the kernels")


def _conv(kind: str, k: int, c: int, hw: int, r: int, stride: int, pad: int, signed: bool, lanes: int = 16,
          n: int = 4, in_layout: str = "NCHW", out_layout: str = "NCHW", out_mode: str = "acc", groups: int = 1) -> tuple:
    rng = np.random.default_rng(k * c + r + stride + signed)
    w = torch.randn(k, c // groups, r, r, generator=torch.Generator().manual_seed(k + c))
    zp = te.placeholder((k,), "int32", name="zp") if signed else None
    dt = "int8" if signed else "uint8"
    x = te.placeholder((1, c, hw, hw) if in_layout == "NCHW" else (1, hw, hw, c), dt, name="x")
    sc, bi = te.placeholder((k,), "float32", name="s"), te.placeholder((k,), "float32", name="b")
    mode = dict(out_mode=out_mode, requant_scale=0.5 if out_mode == "requant" else None, relu=out_mode != "acc")
    if kind == "ternary":
        tw = qmath.ternarize_weight(w, n, alpha_bits=7)
        wint = tw.w_int.numpy()
        vals = list(vnni.ternary_tiles(tw.packed_codes(), tw.alpha_q.numpy().reshape(k, -1), tw.layout, lanes))
        ph = [te.placeholder(v.shape, "uint8", name=f"w{i}") for i, v in enumerate(vals)]
        out = vnni.ternary_conv2d_vnni(x, *ph, sc, bi, weight_shape=(k, c // groups, r, r), strides=stride,
                                       padding=pad, group_size=n, zp=zp, in_layout=in_layout, out_layout=out_layout,
                                       groups=groups, **mode)
    else:
        wint = qmath.int_quantize_weight(w, 8).w_int.numpy()
        vals = [vnni.int8_tiles(wint, lanes)]
        ph = [te.placeholder(vals[0].shape, "int8", name="w8")]
        out = vnni.int_conv2d_vnni(x, *ph, sc, bi, weight_shape=(k, c // groups, r, r), strides=stride, padding=pad,
                                   zp=zp, in_layout=in_layout, out_layout=out_layout, groups=groups, **mode)
    ins = [x, *ph, sc, bi, *([zp] if signed else [])]
    sch = tvm.s_tir.Schedule(kernels.make_prim_func(ins, out, "main"))
    vnni.schedule_conv2d_vnni(sch)
    xv = (rng.integers(-128, 128, (1, c, hw, hw)) if signed else rng.integers(0, 256, (1, c, hw, hw))).astype(dt)
    scale = (rng.random(k) * 1e-3).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    args = [xv if in_layout == "NCHW" else np.ascontiguousarray(xv.transpose(0, 2, 3, 1)), *vals, scale, bias,
            *([vnni.zero_point_term(wint)] if signed else [])]
    ref = qmath.conv2d_int_np(xv.astype(np.int64), wint.astype(np.int64), (stride, stride), (pad, pad), (1, 1),
                              groups)
    return sch.mod, args, [int(v) for v in out.shape], str(out.dtype), ref, scale, bias


def _call(mod, target, args, shape, dtype) -> np.ndarray:
    f = tvm.compile(mod, target=tvm.target.Target(target))
    t = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros(shape, dtype))]
    f["main"](*t)
    return t[-1].numpy()


@needs_vnni
@pytest.mark.parametrize("kind,k,c,hw,r,stride,pad,signed,lanes,n,lay", [
    ("ternary", 32, 16, 8, 3, 1, 1, False, 16, 4, "NCHW"),
    ("ternary", 32, 16, 9, 3, 2, 1, True, 16, 4, "NCHW"),
    ("ternary", 32, 64, 6, 3, 1, 1, False, 16, 64, "NCHW"),
    ("ternary", 32, 16, 8, 1, 1, 0, False, 16, 4, "NHWC"),
    ("ternary", 16, 8, 6, 3, 1, 1, False, 8, 4, "NCHW"),
    ("int", 64, 3, 16, 7, 2, 3, True, 16, 0, "NCHW"),
    ("int", 16, 5, 7, 3, 1, 1, False, 8, 0, "NHWC"),
    ("ternary", 24, 16, 7, 1, 1, 0, True, 8, 4, "NHWC"),   # K % 16 == 8: the ymm form on an AVX-512 host
    # K no multiple of 8: the tile padded with zero weights (ShuffleNet's 58, the squeeze-excitation convs)
    ("ternary", 58, 16, 7, 1, 1, 0, False, 8, 4, "NHWC"),
    ("ternary", 6, 12, 5, 3, 2, 1, True, 8, 4, "NCHW"),
    ("int", 20, 5, 7, 3, 1, 1, True, 8, 0, "NHWC"),
])
def test_conv_vnni_bit_exact(kind, k, c, hw, r, stride, pad, signed, lanes, n, lay) -> None:
    mod, args, shape, dtype, ref, _, _ = _conv(kind, k, c, hw, r, stride, pad, signed, lanes, n, lay, lay)
    got = _call(mod, AVX512_VNNI, args, shape, dtype)
    if lay == "NHWC":
        got = got.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got.astype(np.int64), ref)


@needs_vnni
@pytest.mark.parametrize("kind,k,c,groups,lanes,stride,lay", [
    ("ternary", 64, 64, 4, 16, 1, "NHWC"),    # RegNetX: 16 channels per group
    ("ternary", 96, 48, 3, 16, 2, "NCHW"),    # K/groups = 32 (two lane blocks per group), C/groups = 16
    ("int", 32, 32, 2, 8, 1, "NHWC"),
    ("ternary", 48, 24, 6, 8, 2, "NHWC"),     # C/groups = 4
])
def test_grouped_conv_vnni_bit_exact(kind, k, c, groups, lanes, stride, lay) -> None:
    mod, args, shape, dtype, ref, _, _ = _conv(kind, k, c, 9, 3, stride, 1, kind == "int", lanes, 4, lay, lay,
                                               groups=groups)
    got = _call(mod, AVX512_VNNI, args, shape, dtype)
    if lay == "NHWC":
        got = got.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got.astype(np.int64), ref)


@needs_vnni
def test_conv_vnni_requant_epilogue() -> None:
    mod, args, shape, dtype, ref, scale, bias = _conv("ternary", 32, 16, 8, 3, 1, 1, True, out_mode="requant",
                                                      out_layout="NHWC")
    got = _call(mod, AVX512_VNNI, args, shape, dtype).transpose(0, 3, 1, 2)
    y = qmath.epilogue_np(ref.astype(np.int32), scale, bias, True, 1)
    np.testing.assert_array_equal(got, qmath.quantize_act_np(y, 0.5, 8, False))


@needs_vnni
@pytest.mark.parametrize("m,n,k,gs,signed,batch,lanes", [(1, 64, 256, 4, False, 0, 16), (5, 32, 64, 8, True, 0, 16),
                                                         (20, 32, 128, 4, False, 0, 16),
                                                         # batch x tokens inputs [B, T, C] (a transformer's linears)
                                                         (5, 32, 64, 8, True, 2, 16), (12, 64, 128, 4, False, 3, 16),
                                                         # K padded to the 8-lane tile
                                                         (5, 28, 64, 4, True, 0, 8), (1, 10, 32, 4, False, 0, 8)])
def test_dense_vnni_bit_exact(m: int, n: int, k: int, gs: int, signed: bool, batch: int, lanes: int) -> None:
    rng = np.random.default_rng(m + n + k + batch)
    t = rng.integers(-1, 2, (n, k))
    alpha = rng.integers(0, 128, (n, k // gs))
    lay = qmath.group_layout((n, k), gs)
    ct, at = vnni.ternary_tiles(qmath.pack_2bit(t), alpha, lay, lanes)
    f, names = vnni.build_dense(m, n, k, group_size=gs, signed=signed, target=AVX512_VNNI, batch=batch, lanes=lanes)
    assert names[:3] == ["x", "codes_t", "alpha_t"]
    lead = (batch, m) if batch else (m,)
    x = (rng.integers(-128, 128, (*lead, k)) if signed else rng.integers(0, 256, (*lead, k))).astype(
        "int8" if signed else "uint8")
    w = t * np.repeat(alpha, gs, axis=1)
    args = [x, ct, at, np.ones(n, np.float32), np.zeros(n, np.float32)]
    if signed:
        args.append(vnni.zero_point_term(w))
    t_out = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros((*lead, n), np.int32))]
    f["main"](*t_out)
    want = qmath.dense_int_np(x.reshape(-1, k).astype(np.int64), w).reshape(*lead, n)
    np.testing.assert_array_equal(t_out[-1].numpy().astype(np.int64), want)


def test_vnni_dense_takes_batch_by_tokens_inputs() -> None:
    """[B, T, C] activations (two leading dims above 1) are no reason to leave the VNNI kernel."""
    tgt = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 1})  # VNNI, no VBMI (no vlut)
    spec = dataclasses.replace(_spec(127, op="dense"), act_shape=(2, 7, 16))
    assert kernels.select(spec, tgt).kernel.name == "ternary_dense_vnni"


def test_vnni_instructions() -> None:
    """AVX-512 VNNI builds use zmm vpdpbusd; AVX-VNNI (no AVX-512) builds the ymm form; no vpmaddubsw."""
    mod, *_ = _conv("ternary", 32, 16, 8, 3, 1, 1, False)
    asm = tvm.compile(mod, target=tvm.target.Target(AVX512_VNNI)).mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "zmm" in asm and "vpmaddubsw" not in asm
    mod, *_ = _conv("ternary", 16, 8, 6, 3, 1, 1, False, lanes=8)
    asm = tvm.compile(mod, target=tvm.target.Target(AVX_VNNI)).mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "zmm" not in asm


def _spec(alpha_max: int, op: str = "conv2d", act_signed: bool = False) -> LayerSpec:
    w = torch.randn(32, 16, 3, 3) if op == "conv2d" else torch.randn(32, 16)
    tw = qmath.ternarize_weight(w, 4, alpha_bits=8)
    tw.alpha_q = tw.alpha_q.clamp(max=alpha_max)
    attrs = dict(weight_shape=tuple(w.shape), strides=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    shape = (1, 16, 8, 8) if op == "conv2d" else (1, 16)
    return LayerSpec("l", op, "ternary", tw, attrs if op == "conv2d" else {"weight_shape": (32, 16)}, 8, act_signed,
                     shape)


def test_registry_picks_vnni_by_alpha_width() -> None:
    tgt = tvm.target.Target(AVX512_VNNI)
    choice = kernels.select(_spec(127), tgt)
    assert choice.kernel.name == "ternary_conv2d_vnni", choice.reason
    choice = kernels.select(_spec(255), tgt)
    assert choice.kernel.name == "ternary_conv2d_avx2"
    assert "alpha codes up to 255 > 127" in choice.reason
    assert kernels.select(_spec(127), tvm.target.Target(AVX2_ONLY)).kernel.name == "ternary_conv2d_avx2"
    assert kernels.select(_spec(127), tvm.target.Target(AVX_VNNI)).kernel.name == "ternary_conv2d_avxvnni"
    # signed activation codes: only the VNNI kernel (zero-point shift) takes them on x86
    assert kernels.select(_spec(127, act_signed=True), tgt).kernel.name == "ternary_conv2d_vnni"


def test_k_of_8_mod_16_takes_the_ymm_vnni_kernel_on_avx512() -> None:
    """K % 16 == 8 (MobileNetV3's 24, 40, 72, 88 channels): the 8-lane vpdpbusd (EVEX ymm, AVX-512 VL) instead
    of the AVX2 kernel."""
    tgt = tvm.target.Target(AVX512_VNNI)
    for op in ("conv2d",):
        spec = _spec(127, op=op)
        shape = (24, *spec.attrs["weight_shape"][1:])
        tw = qmath.ternarize_weight(torch.randn(shape), 4, alpha_bits=7)
        spec = dataclasses.replace(spec, weight=tw, attrs={**spec.attrs, "weight_shape": shape})
        choice = kernels.select(spec, tgt)
        assert choice.kernel.name == f"ternary_{op}_avxvnni", choice.reason
        assert "K=24: need K % 16 == 0" in choice.reason
        shape = (58, *shape[1:])  # no multiple of 8: padded
        spec = dataclasses.replace(spec, weight=qmath.ternarize_weight(torch.randn(shape), 4, alpha_bits=7),
                                   attrs={**spec.attrs, "weight_shape": shape})
        assert kernels.select(spec, tgt).kernel.name == f"ternary_{op}_avxvnni"
    assert not vnni.has_lanes(tvm.target.Target(AVX2_ONLY), 8)
    assert vnni.has_lanes(tvm.target.Target(AVX_VNNI), 8) and not vnni.has_lanes(tvm.target.Target(AVX_VNNI), 16)


def test_batch1_dense_rule_on_vnni() -> None:
    """A batch-1 ternary dense layer: the decode-free vpermb LUT kernel (kernels.vlut) on a target with
    AVX-512 VBMI + VNNI (any 8-bit alpha); without VBMI the folded VNNI kernel where its 7-bit alpha fits
    (measured faster than the LUT kernel), else the LUT kernel; the LUT kernel on AVX2 only."""
    tgt = tvm.target.Target(AVX512_VNNI)
    assert kernels.select(_spec(127, op="dense"), tgt).kernel.name == "ternary_dense_vlut"
    assert kernels.select(_spec(255, op="dense"), tgt).kernel.name == "ternary_dense_vlut"
    no_vbmi = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 1})  # AVX-512 VNNI, no VBMI
    assert kernels.select(_spec(127, op="dense"), no_vbmi).kernel.name == "ternary_dense_vnni"
    assert kernels.select(_spec(255, op="dense"), no_vbmi).kernel.name == "ternary_dense_lut"
    assert kernels.select(_spec(127, op="dense"), tvm.target.Target(AVX2_ONLY)).kernel.name == "ternary_dense_lut"
