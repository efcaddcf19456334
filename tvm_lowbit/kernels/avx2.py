"""An x86 AVX2 int8 dot-product tensor intrinsic (``vpmaddubsw`` + ``vpmaddwd``) and the grouped-ternary
and power-of-two dense kernels tensorized with it.

TVM ships x86 dot-product intrinsics for AVX-512 and VNNI only. This one is the AVX2 form, with the
per-output scale folded into the second instruction:

    C[i] += alpha[i] * sum_{k<4} A[k] * B[i, k]          i < 8   (u8 A, i8 B, i16 alpha, i32 C)

* ``vpmaddubsw`` multiplies the 4 broadcast activation bytes with 8 rows of 4 weight bytes and adds
  adjacent pairs into 16 int16 lanes; the pair sums are exact while ``2 * 255 * |B| <= 32767``, i.e.
  ``|B| <= 64``: ternary values (|t| = 1) and the 4-bit power-of-two weights (|w| <= 2^6) qualify,
  general int8 weights do not (``vpmaddubsw`` saturates);
* ``vpmaddwd`` against ``alpha`` (each value twice, one per int16 pair) multiplies both pair sums by the
  row's scale and adds them into 8 int32 lanes; for ternary weights ``alpha`` is the group's ``alpha_q``
  (so ``alpha * t`` never has to fit in int8), for power-of-two weights it is 1.

The kernels unpack the packed codes to int8 once per block of 8 output channels (an L1-resident tile
reused by every activation row) and multiply in 8 x 4 tiles; they accept unsigned activation codes only
(``vpmaddubsw``'s first operand is unsigned) and are exact: the numpy integer reference is the test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm import te, tirx
from tvm.target.codegen import target_has_features
from tvm.script import tirx as T

from tvm_lowbit import qmath
from tvm_lowbit.kernels.common import (KERNEL_ATTR, MAX_WEIGHT, LayerSpec, OutMode, Pick, TargetLike, check_mode,
                                       conv_dims, conv_out_size, decode_2bit, dense_dims, dense_with_epilogue,
                                       dot_conv_unsupported, epilogue, int8_dot_unsupported, kernel_attrs,
                                       layout_reader, maybe_block, pair, pow2_int8, tile)
from tvm_lowbit.kernels.pow2 import pow2_operands
from tvm_lowbit.kernels.registry import Kernel
from tvm_lowbit.kernels.registry import register as register_kernel
from tvm_lowbit.kernels.ternary import ternary_operands

AVX2_DOT_8x4_INTRIN = "tvm_lowbit_dot_8x4_u8i8s32_avx2"
# the dense kernels decode the whole weight to int8 on every call (the ``w_int`` stage), a cost that only
# enough activation rows amortize: below this many rows LowerIntegerLayers keeps a dense layer on the default
# kernel (or the LUT one), measured with scripts/bench_gemm.py --shapes
DENSE_MIN_ROWS = 16


def _dot_8x4(vector: bool) -> tirx.PrimFunc:
    """The intrinsic's description (``vector=False``: the scalar loop tensorize matches) or its
    implementation (``vpmaddubsw`` then ``vpmaddwd`` by the int16 scales); the same buffers either way."""

    @T.prim_func(s_tir=True)
    def dot(a: T.handle, b: T.handle, s: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
        S = T.match_buffer(s, (8, 2), "int16", offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4], S[0:8, 0:2])
            T.writes(C[0:8])
            if vector:
                a_word = T.reinterpret("int32", A.vload([0], "uint8x4"))
                a_u8 = T.reinterpret("uint8x32", T.broadcast(a_word, 8))
                pairs = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", a_u8,
                                                B.vload([0, 0], "int8x32"))
                C[0:8] = C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
                    "int32x8", "llvm.x86.avx2.pmadd.wd", pairs, S.vload([0, 0], "int16x16"))
            else:
                for i, k in T.grid(8, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk]) \
                            * T.Cast("int32", S[vi, vk % 2])

    return dot


def register() -> str:
    """Register the intrinsic (idempotent); returns its name for ``Schedule.tensorize``."""
    if tvm.s_tir.TensorIntrin.get(AVX2_DOT_8x4_INTRIN, allow_missing=True) is None:
        tvm.s_tir.TensorIntrin.register(AVX2_DOT_8x4_INTRIN, _dot_8x4(False), _dot_8x4(True))
    return AVX2_DOT_8x4_INTRIN


def has_avx2(target: tvm.target.Target) -> bool:
    """Whether ``target`` is an x86 LLVM target with AVX2."""
    return str(target.kind.name) == "llvm" and not str(target.attrs.get("mtriple", "x86_64")).startswith(("aarch64", "arm")) \
        and bool(target_has_features("avx2", target))


# --------------------------------------------------------------------------------------------
# Compute definitions in the intrinsic's layout
# --------------------------------------------------------------------------------------------

def _dense_avx2(kind: str, data: te.Tensor, w8: te.Tensor, scale2: te.Tensor, kout: int, cin: int,
                out_scale: te.Tensor, out_bias: te.Tensor, relu: bool, out_mode: str, requant_scale: float | None,
                out_bits: int, out_signed: bool) -> te.Tensor:
    """acc[..., n] = sum_c x[..., c] * w8[n//8, c//4, n%8, c%4] * scale2[n//8, c//4, n%8, c%2] (exact int32)."""
    if str(data.dtype) != "uint8":
        raise ValueError(f"the AVX2 kernels take unsigned 8-bit activation codes, got {data.dtype}")
    def term(x: tirx.PrimExpr, n: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
        # the intrinsic's description multiplies in this order: x * w8 * scale
        w = w8[n // 8, c // 4, n % 8, c % 4].astype("int32")
        return x * w * scale2[n // 8, c // 4, n % 8, c % 2].astype("int32")

    return dense_with_epilogue(kind, data, kout, cin, term, out_scale, out_bias, relu, out_mode, requant_scale,
                               out_bits, out_signed)


def _check_tiles(kout: int, cin: int) -> None:
    if kout % 8 or cin % 4:
        raise ValueError(f"the AVX2 kernels need output channels % 8 == 0 and input channels % 4 == 0, "
                         f"got K={kout}, C={cin}; use the default kernel (kernels.ternary_dense) for this layer")


def ternary_dense_avx2(data: te.Tensor, codes: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor,
                       out_bias: te.Tensor, *, weight_shape: tuple[int, int], group_size: int, relu: bool = False,
                       out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                       out_signed: bool = False) -> te.Tensor:
    """``kernels.ternary_dense`` (same inputs, same result) for the AVX2 intrinsic: ``group_size % 4 == 0``."""
    check_mode(out_mode, requant_scale)
    kout, cin = dense_dims(data, weight_shape)
    _check_tiles(kout, cin)
    lay = qmath.group_layout((kout, cin), group_size)
    if lay.group_size % 4:
        raise ValueError(f"the AVX2 ternary kernel needs group_size % 4 == 0 (one group per 4-byte step), got "
                         f"{lay.group_size}")
    if tuple(int(v) for v in codes.shape) != (kout, -(-lay.row_len // 4)):
        raise ValueError(f"codes shape {codes.shape} != ({kout}, ceil({lay.row_len}/4))")

    def t8(nb, cb, i, q):  # code byte (n, cb) holds elements 4cb..4cb+3, element q in bits 2q..2q+1
        return decode_2bit(codes[nb * 8 + i, cb], q).astype("int8")

    def s2(nb, cb, i, _p):
        return alpha_q[nb * 8 + i, (cb * 4) // lay.group_size].astype("int16")

    shape = (kout // 8, cin // 4, 8, 4)
    w8 = te.compute(shape, t8, name="w_int")
    scale2 = te.compute((kout // 8, cin // 4, 8, 2), s2, name="w_scale")
    return _dense_avx2("ternary_dense_avx2", data, w8, scale2, kout, cin, out_scale, out_bias, relu, out_mode,
                       requant_scale, out_bits, out_signed)


def pow2_dense_avx2(data: te.Tensor, codes: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
                    weight_shape: tuple[int, int], code_bits: int = 4, relu: bool = False,
                    out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                    out_signed: bool = False) -> te.Tensor:
    """``kernels.pow2_dense`` for the AVX2 intrinsic: 4-bit codes (|w| <= 2^6), decoded to int8 ``sign << e``."""
    check_mode(out_mode, requant_scale)
    kout, cin = dense_dims(data, weight_shape)
    _check_tiles(kout, cin)
    if code_bits != 4:
        raise ValueError(f"the AVX2 power-of-two kernel takes 4-bit codes (|w| <= {MAX_WEIGHT}), got {code_bits}-bit")
    if tuple(int(v) for v in codes.shape) != (kout, -(-cin // 2)):
        raise ValueError(f"codes shape {tuple(codes.shape)} != ({kout}, {-(-cin // 2)})")

    w8 = te.compute((kout // 8, cin // 4, 8, 4), lambda nb, cb, i, q: pow2_int8(codes, nb * 8 + i, cb * 4 + q),
                    name="w_int")
    one = te.compute((kout // 8, cin // 4, 8, 2), lambda *_: tirx.const(1, "int16"), name="w_scale")
    return _dense_avx2("pow2_dense_avx2", data, w8, one, kout, cin, out_scale, out_bias, relu, out_mode,
                       requant_scale, out_bits, out_signed)


def _conv_avx2(kind: str, data: te.Tensor, w8: te.Tensor, scale2: te.Tensor, weight_shape: tuple[int, int, int, int],
               strides: int | Sequence[int], padding: int | Sequence[int], out_scale: te.Tensor,
               out_bias: te.Tensor, relu: bool, out_mode: str, requant_scale: float | None, out_bits: int,
               out_signed: bool, in_layout: str = "NCHW", out_layout: str = "NCHW") -> te.Tensor:
    """NCHW conv in the intrinsic's layout: the input codes are copied once into a zero-padded NHWC
    stage ``x_nhwc`` (four input channels contiguous), ``acc[b, i, j, k]`` sums over (r, s, c) with
    ``w8[k//8, r*S+s, c//4, k%8, c%4]`` and ``scale2[k//8, r*S+s, c//4, k%8, c%2]`` (exact int32), and
    ``out`` writes NCHW: the epilogue, or the accumulators themselves for ``out_mode="acc"``."""
    if str(data.dtype) != "uint8":
        raise ValueError(f"the AVX2 kernels take unsigned 8-bit activation codes, got {data.dtype}")
    kout, cin, kh, kw = weight_shape
    if in_layout not in CONV_LAYOUTS or out_layout not in CONV_LAYOUTS:
        raise ValueError(f"layouts must be one of {CONV_LAYOUTS}, got in {in_layout!r}, out {out_layout!r}")
    batch, _, height, width, get = layout_reader(data, in_layout)
    (sh, sw), (ph, pw) = pair(strides), pair(padding)
    oh, ow = conv_out_size(height, kh, sh, ph), conv_out_size(width, kw, sw, pw)
    x = te.compute(
        (batch, height + 2 * ph, width + 2 * pw, cin),
        lambda b, h, w, c: tirx.if_then_else(
            tirx.all(h >= ph, h < ph + height, w >= pw, w < pw + width),
            get(b, c, h - ph, w - pw), tirx.const(0, "uint8")),
        name="x_nhwc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, cin), name="rc")

    def term(b, i, j, k):  # the intrinsic's description multiplies in this order: x * w8 * scale
        tap = ry * kw + rx
        return (x[b, i * sh + ry, j * sw + rx, rc].astype("int32") * w8[k // 8, tap, rc // 4, k % 8, rc % 4]
                .astype("int32") * scale2[k // 8, tap, rc // 4, k % 8, rc % 2].astype("int32"))

    acc = te.compute((batch, oh, ow, kout), lambda b, i, j, k: te.sum(term(b, i, j, k), axis=[ry, rx, rc]),
                     name="acc")

    def body(b, i, j, k):
        if out_mode == "acc":
            return acc[b, i, j, k]
        return epilogue(acc[b, i, j, k], out_scale[k], out_bias[k], relu, out_mode, requant_scale, out_bits,
                        out_signed)

    if out_layout == "NHWC":
        return te.compute((batch, oh, ow, kout), body, name="out", attrs=kernel_attrs(kind))
    return te.compute((batch, kout, oh, ow), lambda b, k, i, j: body(b, i, j, k), name="out",
                      attrs=kernel_attrs(kind))


CONV_LAYOUTS = ("NCHW", "NHWC")  # the conv kernels read and write either (in_layout= / out_layout=)
conv_unsupported = dot_conv_unsupported  # the public name tests and kernels.sdot knew it by


def _conv_dims(data: te.Tensor, weight_shape: Sequence[int], groups: int, layout: str) -> tuple[int, int, int, int]:
    """``common.conv_dims`` for an NCHW or NHWC input."""
    kout, cg, kh, kw = (int(v) for v in weight_shape)
    chans = int(data.shape[1 if layout == "NCHW" else 3])
    if chans != cg * groups or kout % groups:
        raise ValueError(f"conv shapes do not match: C={chans} ({layout}), weight {tuple(weight_shape)}, "
                         f"groups={groups}")
    return kout, cg, kh, kw


def ternary_conv2d_avx2(data: te.Tensor, codes: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor,
                        out_bias: te.Tensor, *, weight_shape: Sequence[int], strides: int | Sequence[int] = 1,
                        padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                        group_size: int, relu: bool = False, out_mode: OutMode = "float",
                        requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False,
                        in_layout: str = "NCHW", out_layout: str = "NCHW") -> te.Tensor:
    """``kernels.ternary_conv2d`` (same inputs, same result) on the AVX2 intrinsic: groups=1, dilation 1,
    K % 8 == 0, C % 4 == 0 and ``group_size % 4 == 0`` along the channels of each tap."""
    check_mode(out_mode, requant_scale)
    kout, cg, kh, kw = _conv_dims(data, weight_shape, groups, in_layout)
    why = conv_unsupported(weight_shape, strides, dilation, groups, str(data.dtype))
    lay = qmath.group_layout((kout, cg, kh, kw), group_size)
    if why is None and (lay.along != "in" or lay.group_size % 4):
        why = f"groups of {lay.group_size} along the {lay.along!r} axis: need groups along input channels, size % 4 == 0"
    if why is not None:
        raise ValueError(f"the AVX2 ternary conv cannot run this layer ({why}); use kernels.ternary_conv2d")
    if tuple(int(v) for v in codes.shape) != (kout, -(-lay.row_len // 4)):
        raise ValueError(f"codes shape {codes.shape} != ({kout}, ceil({lay.row_len}/4))")
    seg = lay.groups_per_segment * lay.group_size  # padded length of one tap's channel segment

    def t8(nb, tap, cb, i, q):  # code byte (k, (tap*seg + 4cb) / 4) holds channels 4cb..4cb+3 of the tap
        return decode_2bit(codes[nb * 8 + i, (tap * seg) // 4 + cb], q).astype("int8")

    def s2(nb, tap, cb, i, _p):
        return alpha_q[nb * 8 + i, (tap * seg + cb * 4) // lay.group_size].astype("int16")

    shape = (kout // 8, kh * kw, cg // 4, 8)
    w8 = te.compute((*shape, 4), t8, name="w_int")
    scale2 = te.compute((*shape, 2), s2, name="w_scale")
    return _conv_avx2("ternary_conv2d_avx2", data, w8, scale2, (kout, cg, kh, kw), strides, padding, out_scale,
                      out_bias, relu, out_mode, requant_scale, out_bits, out_signed, in_layout, out_layout)


def pow2_conv2d_avx2(data: te.Tensor, codes: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
                     weight_shape: Sequence[int], code_bits: int = 4, strides: int | Sequence[int] = 1,
                     padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                     relu: bool = False, out_mode: OutMode = "float", requant_scale: float | None = None,
                     out_bits: int = 8, out_signed: bool = False, in_layout: str = "NCHW",
                     out_layout: str = "NCHW") -> te.Tensor:
    """``kernels.pow2_conv2d`` on the AVX2 intrinsic: 4-bit codes (|w| <= 2^6), decoded to int8."""
    check_mode(out_mode, requant_scale)
    kout, cg, kh, kw = _conv_dims(data, weight_shape, groups, in_layout)
    why = conv_unsupported(weight_shape, strides, dilation, groups, str(data.dtype))
    if why is None and code_bits != 4:
        why = f"{code_bits}-bit codes: need 4-bit codes (|w| <= {MAX_WEIGHT})"
    if why is not None:
        raise ValueError(f"the AVX2 power-of-two conv cannot run this layer ({why}); use kernels.pow2_conv2d")
    length = kh * kw * cg  # qmath.pow2_flat: (r, s, c) order, c innermost
    if tuple(int(v) for v in codes.shape) != (kout, -(-length // 2)):
        raise ValueError(f"codes shape {tuple(codes.shape)} != ({kout}, {-(-length // 2)})")
    shape = (kout // 8, kh * kw, cg // 4, 8)
    w8 = te.compute((*shape, 4), lambda nb, tap, cb, i, q: pow2_int8(codes, nb * 8 + i, tap * cg + cb * 4 + q),
                    name="w_int")
    one = te.compute((*shape, 2), lambda *_: tirx.const(1, "int16"), name="w_scale")
    return _conv_avx2("pow2_conv2d_avx2", data, w8, one, (kout, cg, kh, kw), strides, padding, out_scale, out_bias,
                      relu, out_mode, requant_scale, out_bits, out_signed, in_layout, out_layout)


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------

def schedule_dense_avx2(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """Register tile of ``mb`` rows x ``nb`` blocks of 8 output channels (int32 ymm accumulators), the
    4-byte reduction step tensorized; the int8 weight tile of each channel block is unpacked once."""
    register()
    acc = sch.get_sblock("acc")
    lps = sch.get_loops(acc)
    lead, n, c = lps[:-2], lps[-2], lps[-1]
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    rows, kout = (int(sch.get(lp).extent) for lp in (m, n))
    mb = tile(rows, (4, 2, 8, 1), pick)
    nb = tile(kout // 8, (2, 4, 1), pick)
    mo, mi = sch.split(m, [None, mb])
    no, nm, ni = sch.split(n, [None, nb, 8])
    co, ci = sch.split(c, [None, 4])
    sch.reorder(no, mo, co, mi, nm, ni, ci)
    out = [b for b in ("out",) if maybe_block(sch, b) is not None]
    if out:
        sch.reverse_compute_at(sch.get_sblock("out"), mo, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
    else:
        copy = sch.cache_write(acc, 0, "local")
        sch.reverse_compute_at(copy, mo, preserve_unit_loops=True)
    for wb in ("w_int", "w_scale"):
        blk = sch.get_sblock(wb)
        sch.compute_at(blk, no, preserve_unit_loops=True)
        sch.vectorize(sch.fuse(*sch.get_loops(blk)[-2:]))
    sch.parallel(no)
    init = sch.decompose_reduction(acc, co)
    ilps = sch.get_loops(init)
    sch.vectorize(ilps[-1])
    sch.tensorize(ni, AVX2_DOT_8x4_INTRIN)
    sch.unroll(mi)
    sch.unroll(nm)
    tail = sch.get_sblock("out") if out else sch.get_sblock("acc_local")
    tl = sch.get_loops(tail)
    sch.vectorize(tl[-1])


def schedule_conv2d_avx2(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """Register tile of ``mb`` output columns x ``nb`` blocks of 8 output channels (int32 ymm accumulators)
    under the reduction over (r, s, 4-channel steps), the step tensorized; the int8 weight tile of each block
    of channels is unpacked once and the padded NHWC input copy is made once, in parallel over rows."""
    register()
    acc = sch.get_sblock("acc")
    b, i, j, k, ry, rx, rc = sch.get_loops(acc)
    ow, kout = (int(sch.get(lp).extent) for lp in (j, k))
    mb = tile(ow, (4, 7, 8, 2, 14, 1), pick)  # a divisor of the row: the NCHW write-back stays a box
    nb = tile(kout // 8, (2, 4, 1), pick)
    jo, ji = sch.split(j, [None, mb])
    no, nm, ni = sch.split(k, [None, nb, 8])
    co, ci = sch.split(rc, [None, 4])
    sch.reorder(no, b, i, jo, ry, rx, co, ji, nm, ni, ci)
    sch.reverse_compute_at(sch.get_sblock("out"), jo, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    for wb in ("w_int", "w_scale"):
        blk = sch.get_sblock(wb)
        sch.compute_at(blk, no, preserve_unit_loops=True)
        sch.vectorize(sch.fuse(*sch.get_loops(blk)[-2:]))
    sch.parallel(no)
    init = sch.decompose_reduction(acc, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ni, AVX2_DOT_8x4_INTRIN)
    sch.unroll(ji)
    sch.unroll(nm)
    sch.unroll(sch.get_loops(sch.get_sblock("out"))[-1])
    xb = sch.get_sblock("x_nhwc")
    xl = sch.get_loops(xb)
    sch.parallel(sch.fuse(xl[0], xl[1]))


def build_dense(kind: str, m: int, kout: int, cin: int, *, group_size: int = 4, out_mode: OutMode = "acc",
                target: str | dict = "llvm -mcpu=x86-64-v3", pick=None) -> tuple[object, list[str]]:
    """A standalone tensorized dense kernel (for tests and ``scripts/bench_gemm.py``): returns the compiled
    function and its argument order."""
    data = te.placeholder((m, cin), "uint8", name="x")
    scale = te.placeholder((kout,), "float32", name="out_scale")
    bias = te.placeholder((kout,), "float32", name="out_bias")
    if kind == "ternary":
        lay = qmath.group_layout((kout, cin), group_size)
        codes = te.placeholder((kout, -(-lay.row_len // 4)), "uint8", name="codes")
        alpha = te.placeholder((kout, lay.groups_per_row), "int16", name="alpha_q")
        out = ternary_dense_avx2(data, codes, alpha, scale, bias, weight_shape=(kout, cin), group_size=group_size,
                                 out_mode=out_mode)
        args = [data, codes, alpha, scale, bias]
    elif kind == "pow2":
        codes = te.placeholder((kout, -(-cin // 2)), "uint8", name="codes")
        out = pow2_dense_avx2(data, codes, scale, bias, weight_shape=(kout, cin), out_mode=out_mode)
        args = [data, codes, scale, bias]
    else:
        raise ValueError(f"kind must be 'ternary' or 'pow2', got {kind!r}")
    func = te.create_prim_func([*args, out]).with_attr(KERNEL_ATTR, f"{kind}_dense_avx2")
    sch = tvm.s_tir.Schedule(func)
    schedule_dense_avx2(sch, pick)
    tgt = tvm.target.Target(target)
    return tvm.compile(sch.mod, target=tgt), [a.name for a in args]


def reference_ternary(x: np.ndarray, codes: np.ndarray, alpha_q: np.ndarray, kout: int, cin: int,
                      group_size: int) -> np.ndarray:
    """The int64 accumulators by the numpy reference (qmath): w_int = alpha_q * t, then x @ w_int.T."""
    lay = qmath.group_layout((kout, cin), group_size)
    t = qmath.unpack_2bit(codes, lay.row_len).astype(np.int64)
    w = (t.reshape(kout, lay.groups_per_row, lay.group_size) * alpha_q.astype(np.int64)[:, :, None])
    return qmath.dense_int_np(x, w.reshape(kout, -1)[:, :cin])


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def avx2_conv_fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
    """The AVX2 conv kernels take a layer on an AVX2 target that the int8 dot product runs exactly."""
    if target is None or not has_avx2(target):
        return "the target has no AVX2"
    return int8_dot_unsupported(layer, lanes=8)


def avx2_dense_fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
    """As :func:`avx2_conv_fits`, from ``DENSE_MIN_ROWS`` activation rows (measured: below, the default
    kernel is faster)."""
    if target is None or not has_avx2(target):
        return "the target has no AVX2"
    if layer.rows < DENSE_MIN_ROWS:
        return f"{layer.rows} activation rows < DENSE_MIN_ROWS={DENSE_MIN_ROWS}"
    return int8_dot_unsupported(layer, lanes=8)


def _conv_schedule(sch: tvm.s_tir.Schedule, _target: TargetLike, pick: Pick | None = None) -> None:
    schedule_conv2d_avx2(sch, pick)


def _dense_schedule(sch: tvm.s_tir.Schedule, _target: TargetLike, pick: Pick | None = None) -> None:
    schedule_dense_avx2(sch, pick)


PREFERENCE = 20  # measured: faster than the generic kernels wherever it fits
for _family, _op, _compute, _operands in (("ternary", "conv2d", ternary_conv2d_avx2, ternary_operands),
                                          ("ternary", "dense", ternary_dense_avx2, ternary_operands),
                                          ("pow2", "conv2d", pow2_conv2d_avx2, pow2_operands),
                                          ("pow2", "dense", pow2_dense_avx2, pow2_operands)):
    register_kernel(Kernel(f"{_family}_{_op}_avx2", family=_family, op=_op, isa="avx2", compute=_compute,
                           schedule=_conv_schedule if _op == "conv2d" else _dense_schedule, operands=_operands,
                           fits=avx2_conv_fits if _op == "conv2d" else avx2_dense_fits, preference=PREFERENCE,
                           intrinsics=register, layouts=CONV_LAYOUTS if _op == "conv2d" else ("NCHW",)))
