"""x86 VNNI (``vpdpbusd``: AVX-512 VNNI on zmm, AVX-VNNI on ymm) int8 dot-product kernels whose inner loop
is the dot product and nothing else.

``vpdpbusd`` adds the four u8 x s8 products of each 32-bit lane into an int32 lane with no intermediate
saturation, so any int8 weight is exact (unlike AVX2's ``vpmaddubsw``).  The kernels therefore fold
everything into the int8 weight before the loop:

* grouped ternary: ``w = alpha_q * t`` (one int8 when the layer's alpha codes fit 7 bits, ``alpha_q <=
  127``; an 8-bit-alpha layer whose codes all fit takes this kernel too, the others keep the AVX2 kernel,
  which applies alpha with ``vpmaddwd``).  The weight stays stored as the packed 2-bit codes and the
  alpha codes, reordered at compile time into the kernel's tile order (same bytes); the int8 tile
  ``[K/L, taps, C/4, L, 4]`` is decoded once per block of output channels and reused by every output
  pixel (conv) or activation row (dense);
* int8 per output channel (``int8`` format: FGQ's first conv): the codes are the int8 weight, stored
  in tile order.

Signed activation codes (the stem's input image) are shifted to unsigned (``x + 128``) and the epilogue
subtracts ``128 * sum(w[k])`` (a per-channel int32 constant): exact in int32.

Layouts: conv input NCHW or NHWC (``in_layout``), padded into an NHWC stage with the channels rounded up
to a multiple of 4; the accumulators are NHWC; the output is NCHW or NHWC (``out_layout``).  The tensor
intrinsic computes ``C[L] += A[4] . B[L, 4]`` with the accumulator tile in registers (TVM's own
``dot_16x4_vnni`` declares a global-scope accumulator).  Exact: the numpy integer reference is the test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

from tvm_lowbit import qmath
from tvm_lowbit.kernels.common import (KERNEL_ATTR, LayerSpec, OutMode, Pick, TargetLike, check_mode, conv_out_size,
                                       decode_2bit, epilogue, kernel_attrs, layout_reader, maybe_block, pair,
                                       register_tile, tensorize_decode, tile)
from tvm_lowbit.kernels.registry import Kernel, Operands
from tvm_lowbit.kernels.registry import register as register_kernel

VNNI_INTRIN = {16: "tvm_lowbit_vnni_16x4_u8i8s32", 8: "tvm_lowbit_vnni_8x4_u8i8s32"}
_LLVM_INTRIN = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}
ZERO_POINT = 128   # signed activation codes are shifted by this into u8
MAX_ALPHA = 127    # alpha_q * t must be an int8
LAYOUTS = ("NCHW", "NHWC")
LAYOUT_ATTR = "tvm_lowbit.out_layout"  # the conv output block's layout (read by the schedule)


def _intrin(lanes: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    vec = f"int32x{lanes}"
    nbytes = f"int8x{4 * lanes}"
    llvm = _LLVM_INTRIN[lanes]

    def make(vector: bool) -> tirx.PrimFunc:
        @T.prim_func(s_tir=True)
        def dot(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
            B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
            C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                if vector:
                    a_word = T.reinterpret("int32", A.vload([0], "uint8x4"))
                    # LLVM 20+ declares the byte operands as <4L x i8>
                    C[0:lanes] = T.call_llvm_pure_intrin(vec, llvm, C.vload([0], vec),
                                                         T.reinterpret(nbytes, T.broadcast(a_word, lanes)),
                                                         B.vload([0, 0], nbytes))
                else:
                    for i, k in T.grid(lanes, 4):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

        return dot

    desc, impl = make(False), make(True)
    return desc, impl


def _decode_intrin(lanes: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """``W[i, q] = int8(t(C[i], q) * A[i])`` for ``lanes`` code bytes: each code byte and alpha code spread
    to the four bytes of its int32 lane (one byte shuffle each, ``vpermb`` on AVX-512 VBMI), the two bits of
    field q tested byte-wise (``vptestmb``), then alpha, -alpha or 0 by masked byte moves: no multiply.
    Exact for ``A <= 127`` and the ternary codes 0, 1, 3 that ``qmath.pack_2bit`` writes (the unused code 2
    decodes to 0 here)."""
    u8, u8x4, i8 = f"uint8x{lanes}", f"uint8x{4 * lanes}", f"int8x{4 * lanes}"
    spread = [i // 4 for i in range(4 * lanes)]
    zero = T.broadcast(T.uint8(0), 4 * lanes)

    @T.prim_func(s_tir=True)
    def desc(c: T.handle, a: T.handle, w: T.handle) -> None:
        C = T.match_buffer(c, (lanes,), "uint8", offset_factor=1)
        A = T.match_buffer(a, (lanes,), "uint8", offset_factor=1)
        W = T.match_buffer(w, (lanes, 4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes])
            T.writes(W[0:lanes, 0:4])
            for i, q in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vq = T.axis.remap("SS", [i, q])
                    W[vi, vq] = T.Cast("int8", (T.bitwise_xor(T.shift_right(T.Cast("int32", C[vi]), vq * 2) & 3, 2)
                                                - 2) * T.Cast("int32", A[vi]))

    # the same in the int64 index arithmetic of Relax-emitted kernels (emit_te widens the decode's int32 math)
    @T.prim_func(s_tir=True)
    def desc64(c: T.handle, a: T.handle, w: T.handle) -> None:
        C = T.match_buffer(c, (T.int64(lanes),), "uint8", offset_factor=1)
        A = T.match_buffer(a, (T.int64(lanes),), "uint8", offset_factor=1)
        W = T.match_buffer(w, (T.int64(lanes), T.int64(4)), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:T.int64(lanes)], A[0:T.int64(lanes)])
            T.writes(W[0:T.int64(lanes), 0:T.int64(4)])
            for i, q in T.grid(T.int64(lanes), T.int64(4)):
                with T.sblock("update"):
                    vi, vq = T.axis.remap("SS", [i, q])
                    W[vi, vq] = T.Cast("int8", (T.bitwise_xor(
                        T.shift_right(T.Cast("int64", T.Cast("int32", C[vi])), vq * T.int64(2)) & T.int64(3),
                        T.int64(2)) - T.int64(2)) * T.Cast("int64", T.Cast("int32", A[vi])))

    @T.prim_func(s_tir=True)
    def impl(c: T.handle, a: T.handle, w: T.handle) -> None:
        C = T.match_buffer(c, (lanes,), "uint8", offset_factor=1)
        A = T.match_buffer(a, (lanes,), "uint8", offset_factor=1)
        W = T.match_buffer(w, (lanes, 4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes])
            T.writes(W[0:lanes, 0:4])
            # byte 4i + q of the tile takes code byte i and alpha code i (one byte shuffle each)
            cb = T.Shuffle([C.vload([0], u8)] * 4, spread)
            ab = T.reinterpret(i8, T.Shuffle([A.vload([0], u8)] * 4, spread))
            # field q of byte 4i + q: bit 2q (|t| = 1) and bit 2q + 1 (t = -1), tested byte-wise (vptestmb)
            nonzero = T.bitwise_and(cb, T.reinterpret(u8x4, T.broadcast(T.uint32(0x40100401), lanes))) != zero
            negative = T.bitwise_and(cb, T.reinterpret(u8x4, T.broadcast(T.uint32(0x80200802), lanes))) != zero
            W.vstore([0, 0], T.Select(nonzero, T.Select(negative, T.broadcast(T.int8(0), 4 * lanes) - ab, ab),
                                      T.broadcast(T.int8(0), 4 * lanes)))

    return desc, desc64, impl


DECODE_INTRIN = {16: "tvm_lowbit_decode_2bit_16x4_alpha", 8: "tvm_lowbit_decode_2bit_8x4_alpha"}
DECODE64_INTRIN = {16: "tvm_lowbit_decode_2bit_16x4_alpha_i64", 8: "tvm_lowbit_decode_2bit_8x4_alpha_i64"}


def register() -> tuple[str, ...]:
    """Register the 16-lane (zmm) and 8-lane (ymm) dot-product and 2-bit decode intrinsics (idempotent);
    returns their names."""
    for lanes in VNNI_INTRIN:
        desc, desc64, impl = _decode_intrin(lanes)
        for name, pair_ in ((VNNI_INTRIN[lanes], _intrin(lanes)), (DECODE_INTRIN[lanes], (desc, impl)),
                            (DECODE64_INTRIN[lanes], (desc64, impl))):
            if tvm.s_tir.TensorIntrin.get(name, allow_missing=True) is None:
                tvm.s_tir.TensorIntrin.register(name, *pair_)
    return (*VNNI_INTRIN.values(), *DECODE_INTRIN.values(), *DECODE64_INTRIN.values())


def vnni_lanes(target: tvm.target.Target | None) -> int:
    """int32 lanes of the target's ``vpdpbusd``: 16 with AVX-512 VNNI, 8 with AVX-VNNI, 0 without VNNI."""
    if target is None or str(target.kind.name) != "llvm" \
            or str(target.attrs.get("mtriple", "x86_64")).startswith(("aarch64", "arm")):
        return 0
    if target_has_features("avx512vnni", target) and target_has_features("avx512bw", target):
        return 16
    if target_has_features("avxvnni", target):
        return 8
    return 0


# --------------------------------------------------------------------------------------------
# Compute definitions
# --------------------------------------------------------------------------------------------

def _shift(v: tirx.PrimExpr, signed: bool) -> tirx.PrimExpr:
    """An activation code as the u8 that ``vpdpbusd`` multiplies (signed codes + 128)."""
    if not signed:
        return v.astype("uint8")
    return (v.astype("int32") + ZERO_POINT).astype("uint8")


def _act_dtype_check(data: te.Tensor) -> bool:
    if str(data.dtype) not in ("uint8", "int8"):
        raise ValueError(f"the VNNI kernels take 8-bit activation codes (uint8 or int8), got {data.dtype}")
    return str(data.dtype) == "int8"


def _finish(kind: str, acc: te.Tensor, zp: te.Tensor | None, shape: tuple, index, out_scale: te.Tensor,
            out_bias: te.Tensor, relu: bool, out_mode: str, requant_scale: float | None, out_bits: int,
            out_signed: bool, layout: str = "") -> te.Tensor:
    """The output stage: ``index(*out_idx) -> (acc indices, channel)``; adds the zero-point term, then the
    epilogue (or the accumulators for ``out_mode="acc"``)."""
    def body(*idx):
        at, k = index(*idx)
        a = acc[at] if zp is None else acc[at] + zp[k]
        if out_mode == "acc":
            return a
        return epilogue(a, out_scale[k], out_bias[k], relu, out_mode, requant_scale, out_bits, out_signed)

    attrs = dict(kernel_attrs(kind), **({LAYOUT_ATTR: layout} if layout else {}))
    return te.compute(shape, body, name="out", attrs=attrs)


def conv2d_vnni_tiled(kind: str, data: te.Tensor, w8: te.Tensor, zp: te.Tensor | None, out_scale: te.Tensor,
                      out_bias: te.Tensor, *, kernel: tuple[int, int], strides: int | Sequence[int],
                      padding: int | Sequence[int], in_layout: str, out_layout: str, relu: bool, out_mode: str,
                      requant_scale: float | None, out_bits: int, out_signed: bool, kout: int | None = None,
                      groups: int = 1) -> te.Tensor:
    """The conv on an int8 weight tile ``w8[K/L, taps, C4, L, 4]`` (a tensor or a decode stage):
    ``acc[b, i, j, k] = sum x_u8 * w8`` over (r, s, channels), exact in int32.  ``kout``: the layer's output
    channels when the tile is padded with zero weights to a multiple of L (the output has ``kout``).
    ``groups`` > 1: a grouped conv, the tile's channels those of one group (C/groups, a multiple of 4), each
    block of L output channels inside one group (K/groups a multiple of L)."""
    signed = _act_dtype_check(data)
    if in_layout not in LAYOUTS or out_layout not in LAYOUTS:
        raise ValueError(f"layouts must be one of {LAYOUTS}, got in {in_layout!r}, out {out_layout!r}")
    nkb, taps, c4, lanes, _ = (int(v) for v in w8.shape)
    kh, kw = kernel
    if taps != kh * kw:
        raise ValueError(f"weight tile has {taps} taps for a {kh}x{kw} kernel")
    kpad = nkb * lanes
    kout = kpad if kout is None else kout
    if not kpad - lanes < kout <= kpad:
        raise ValueError(f"{kout} output channels do not fit a weight tile of {kpad} (padded to {lanes} lanes)")
    batch, cin, height, width, get = layout_reader(data, in_layout)
    if groups > 1:
        kg, cg = kout // groups, cin // groups
        if kout % groups or cin % groups or kg % lanes or cg % 4 or cg != 4 * c4:
            raise ValueError(f"grouped VNNI conv: K={kout}, C={cin}, groups={groups}, weight tile of {4 * c4} "
                             f"channels, {lanes} lanes: need C/groups = the tile's channels, a multiple of 4, and "
                             f"K/groups a multiple of {lanes}")
    elif -(-cin // 4) != c4:
        raise ValueError(f"input has {cin} channels, the weight tile {4 * c4} (channels rounded up to 4)")
    (sh, sw), (ph, pw) = pair(strides), pair(padding)
    oh, ow = conv_out_size(height, kh, sh, ph), conv_out_size(width, kw, sw, pw)
    pad_code = tirx.const(ZERO_POINT if signed else 0, "uint8")  # a zero activation, shifted
    x = te.compute(
        (batch, height + 2 * ph, width + 2 * pw, cin if groups > 1 else 4 * c4),
        lambda b, h, w, c: tirx.if_then_else(
            tirx.all(h >= ph, h < ph + height, w >= pw, w < pw + width, c < cin),
            _shift(get(b, c, h - ph, w - pw), signed), pad_code),
        name="x_nhwc")
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, 4 * c4), name="rc")

    def channel(k: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:  # input channel c of output channel k's group
        return c if groups == 1 else (k // (kout // groups)) * (cin // groups) + c

    acc = te.compute(
        (batch, oh, ow, kpad),
        lambda b, i, j, k: te.sum(x[b, i * sh + ry, j * sw + rx, channel(k, rc)].astype("int32")
                                  * w8[k // lanes, ry * kw + rx, rc // 4, k % lanes, rc % 4].astype("int32"),
                                  axis=[ry, rx, rc]),
        name="acc")
    if out_layout == "NCHW":
        return _finish(kind, acc, zp, (batch, kout, oh, ow), lambda b, k, i, j: ((b, i, j, k), k), out_scale,
                       out_bias, relu, out_mode, requant_scale, out_bits, out_signed, "NCHW")
    return _finish(kind, acc, zp, (batch, oh, ow, kout), lambda b, i, j, k: ((b, i, j, k), k), out_scale,
                   out_bias, relu, out_mode, requant_scale, out_bits, out_signed, "NHWC")


def dense_vnni_tiled(kind: str, data: te.Tensor, w8: te.Tensor, zp: te.Tensor | None, out_scale: te.Tensor,
                     out_bias: te.Tensor, *, relu: bool, out_mode: str, requant_scale: float | None, out_bits: int,
                     out_signed: bool, kout: int | None = None) -> te.Tensor:
    """``data[..., C]`` times the int8 weight tile ``w8[K/L, C/4, L, 4]`` -> ``[..., K]`` (C % 4 == 0);
    ``kout`` as in :func:`conv2d_vnni_tiled`."""
    signed = _act_dtype_check(data)
    nkb, c4, lanes, _ = (int(v) for v in w8.shape)
    kpad, cin = nkb * lanes, int(data.shape[-1])
    kout = kpad if kout is None else kout
    if not kpad - lanes < kout <= kpad:
        raise ValueError(f"{kout} output channels do not fit a weight tile of {kpad} (padded to {lanes} lanes)")
    if cin != 4 * c4:
        raise ValueError(f"data has {cin} features, the weight tile {4 * c4}")
    lead = [int(v) for v in data.shape[:-1]]
    x = data
    if signed:
        x = te.compute(data.shape, lambda *i: _shift(data[i], True), name="x_u8")
    rc = te.reduce_axis((0, cin), name="rc")
    acc = te.compute((*lead, kpad),
                     lambda *i: te.sum(x[(*i[:-1], rc)].astype("int32")
                                       * w8[i[-1] // lanes, rc // 4, i[-1] % lanes, rc % 4].astype("int32"), axis=rc),
                     name="acc")
    return _finish(kind, acc, zp, (*lead, kout), lambda *i: (i, i[-1]), out_scale, out_bias, relu, out_mode,
                   requant_scale, out_bits, out_signed)


def _ternary_w8(codes_t: te.Tensor, alpha_t: te.Tensor, seg: int, group_size: int, tapped: bool) -> te.Tensor:
    """The int8 tile ``alpha_q * t`` decoded from the tile-ordered 2-bit codes ``codes_t[K/L, (taps,) C4, L]``
    and alpha codes ``alpha_t[K/L, G, L]``."""
    if tapped:
        nkb, taps, c4, lanes = (int(v) for v in codes_t.shape)

        def f(nb, tap, cb, i, q):
            g = (tap * seg + cb * 4) // group_size
            return (decode_2bit(codes_t[nb, tap, cb, i], q) * alpha_t[nb, g, i].astype("int32")).astype("int8")

        return te.compute((nkb, taps, c4, lanes, 4), f, name="w_int")
    nkb, c4, lanes = (int(v) for v in codes_t.shape)

    def h(nb, cb, i, q):
        g = (cb * 4) // group_size
        return (decode_2bit(codes_t[nb, cb, i], q) * alpha_t[nb, g, i].astype("int32")).astype("int8")

    return te.compute((nkb, c4, lanes, 4), h, name="w_int")


def _check_modes(out_mode: str, requant_scale: float | None, zp: te.Tensor | None, data: te.Tensor) -> None:
    check_mode(out_mode, requant_scale)
    if (str(data.dtype) == "int8") != (zp is not None):
        raise ValueError("signed activation codes need the zero-point term zp (int32 [K]) and unsigned ones none")


def ternary_conv2d_vnni(data: te.Tensor, codes_t: te.Tensor, alpha_t: te.Tensor, out_scale: te.Tensor,
                        out_bias: te.Tensor, *, weight_shape: Sequence[int], strides: int | Sequence[int] = 1,
                        padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                        group_size: int, zp: te.Tensor | None = None, in_layout: str = "NCHW",
                        out_layout: str = "NCHW", relu: bool = False, out_mode: OutMode = "float",
                        requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False) -> te.Tensor:
    """``kernels.ternary_conv2d`` (same result) on ``vpdpbusd`` with alpha folded into the int8 weight:
    ``codes_t`` / ``alpha_t`` from :func:`ternary_tiles`; dilation 1, groups of a multiple of 4 along the
    input channels, every alpha code <= 127; ``groups`` > 1 as :func:`conv2d_vnni_tiled` takes them."""
    _check_modes(out_mode, requant_scale, zp, data)
    kout, cg, kh, kw = (int(v) for v in weight_shape)
    if pair(dilation) != (1, 1):
        raise ValueError(f"the VNNI conv takes dilation 1; got dilation={dilation}")
    lay = qmath.group_layout((kout, cg, kh, kw), group_size)
    w8 = _ternary_w8(codes_t, alpha_t, lay.groups_per_segment * lay.group_size, lay.group_size, True)
    return conv2d_vnni_tiled(f"ternary_conv2d_{SUFFIX[int(codes_t.shape[-1])]}", data, w8, zp, out_scale, out_bias, kernel=(kh, kw),
                             strides=strides, padding=padding, in_layout=in_layout, out_layout=out_layout, relu=relu,
                             out_mode=out_mode, requant_scale=requant_scale, out_bits=out_bits, out_signed=out_signed,
                             kout=kout, groups=groups)


def ternary_dense_vnni(data: te.Tensor, codes_t: te.Tensor, alpha_t: te.Tensor, out_scale: te.Tensor,
                       out_bias: te.Tensor, *, weight_shape: Sequence[int], group_size: int,
                       zp: te.Tensor | None = None, relu: bool = False, out_mode: OutMode = "float",
                       requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False) -> te.Tensor:
    """``kernels.ternary_dense`` (same result) on ``vpdpbusd`` with alpha folded (see the conv)."""
    _check_modes(out_mode, requant_scale, zp, data)
    kout, cin = (int(v) for v in weight_shape)
    lay = qmath.group_layout((kout, cin), group_size)
    w8 = _ternary_w8(codes_t, alpha_t, lay.row_len, lay.group_size, False)
    return dense_vnni_tiled(f"ternary_dense_{SUFFIX[int(codes_t.shape[-1])]}", data, w8, zp, out_scale, out_bias, relu=relu, out_mode=out_mode,
                            requant_scale=requant_scale, out_bits=out_bits, out_signed=out_signed, kout=kout)


def int_conv2d_vnni(data: te.Tensor, w8: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
                    weight_shape: Sequence[int], strides: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                    dilation: int | Sequence[int] = 1, groups: int = 1, zp: te.Tensor | None = None,
                    in_layout: str = "NCHW", out_layout: str = "NCHW", relu: bool = False,
                    out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                    out_signed: bool = False) -> te.Tensor:
    """``kernels.int_conv2d`` for per-channel int8 (or int4) weights on ``vpdpbusd``: ``w8`` from
    :func:`int8_tiles` (any number of input channels: rounded up to 4 with zero weights)."""
    _check_modes(out_mode, requant_scale, zp, data)
    kout, _, kh, kw = (int(v) for v in weight_shape)
    if pair(dilation) != (1, 1):
        raise ValueError(f"the VNNI conv takes dilation 1; got dilation={dilation}")
    return conv2d_vnni_tiled(f"int_conv2d_{SUFFIX[int(w8.shape[-2])]}", data, w8, zp, out_scale, out_bias, kernel=(kh, kw), strides=strides,
                             padding=padding, in_layout=in_layout, out_layout=out_layout, relu=relu,
                             out_mode=out_mode, requant_scale=requant_scale, out_bits=out_bits, out_signed=out_signed,
                             kout=kout, groups=groups)


def int_dense_vnni(data: te.Tensor, w8: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
                   weight_shape: Sequence[int], zp: te.Tensor | None = None, relu: bool = False,
                   out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                   out_signed: bool = False) -> te.Tensor:
    """``kernels.int_dense`` for per-channel int8 (or int4) weights on ``vpdpbusd``."""
    _check_modes(out_mode, requant_scale, zp, data)
    return dense_vnni_tiled(f"int_dense_{SUFFIX[int(w8.shape[-2])]}", data, w8, zp, out_scale, out_bias, relu=relu, out_mode=out_mode,
                            requant_scale=requant_scale, out_bits=out_bits, out_signed=out_signed,
                            kout=int(weight_shape[0]))


# --------------------------------------------------------------------------------------------
# Operands: the stored weights in tile order (compile time, numpy)
# --------------------------------------------------------------------------------------------

def padded_k(kout: int, lanes: int) -> int:
    """Output channels rounded up to whole blocks of ``lanes`` (the extra ones have zero weights)."""
    return -(-kout // lanes) * lanes


def ternary_tiles(codes: np.ndarray, alpha_q: np.ndarray, lay: qmath.GroupLayout, lanes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The packed 2-bit codes [K, ceil(L/4)] and alpha codes [K, G] of a grouped-ternary weight in the
    kernel's tile order: ``codes_t[K'/L, (taps,) C4, L]`` (byte (k, tap, cb): channels 4cb..4cb+3 of the tap)
    and ``alpha_t[K'/L, G, L]`` (uint8; the same bytes, reordered); K' = K rounded up to L (:func:`padded_k`),
    the extra rows code 0 (t = 0) with alpha 0."""
    kout = lay.out_channels
    if lay.along != "in" or lay.group_size % 4:
        raise ValueError(f"ternary tiles need groups along the input channels of a multiple of 4, got "
                         f"{lay.along!r} groups of {lay.group_size}, K={kout}")
    kpad = padded_k(kout, lanes)
    codes = np.concatenate([codes, np.zeros((kpad - kout, *codes.shape[1:]), codes.dtype)])
    alpha_q = np.concatenate([alpha_q, np.zeros((kpad - kout, *alpha_q.shape[1:]), alpha_q.dtype)])
    seg4 = lay.groups_per_segment * lay.group_size // 4  # code bytes per tap segment
    c4 = -(-lay.seg_len // 4)
    taps = lay.segments
    idx = (np.arange(taps)[:, None] * seg4 + np.arange(c4)[None, :]).reshape(-1)
    ct = codes[:, idx].reshape(kpad // lanes, lanes, taps, c4).transpose(0, 2, 3, 1)
    if len(lay.shape) == 2:
        ct = ct[:, 0]
    at = alpha_q.reshape(kpad // lanes, lanes, -1).transpose(0, 2, 1)
    return np.ascontiguousarray(ct, np.uint8), np.ascontiguousarray(at, np.uint8)


def int8_tiles(w_int: np.ndarray, lanes: int) -> np.ndarray:
    """An int8 weight [K, C(, R, S)] as the tile ``[K'/L, (taps,) C4, L, 4]`` (channels rounded up to 4 and K
    to K' = :func:`padded_k` with zero weights)."""
    w = np.asarray(w_int)
    if np.abs(w).max(initial=0) > 127 or w.min(initial=0) < -128:
        raise ValueError("int8_tiles takes weights in int8 range")
    kout, cin = w.shape[:2]
    kpad = padded_k(kout, lanes)
    c4 = -(-cin // 4)
    if w.ndim == 2:
        w = w[:, :, None, None]
    taps = w.shape[2] * w.shape[3]
    wp = np.zeros((kpad, 4 * c4, taps), np.int8)
    wp[:kout, :cin] = w.reshape(kout, cin, taps)
    t = wp.reshape(kpad // lanes, lanes, c4, 4, taps).transpose(0, 4, 2, 1, 3)
    if w_int.ndim == 2:
        t = t[:, 0]
    return np.ascontiguousarray(t)


def zero_point_term(w_int: np.ndarray) -> np.ndarray:
    """``-128 * sum(w[k])`` (int32 [K]): added to the accumulators of signed activation codes."""
    w = np.asarray(w_int, np.int64).reshape(w_int.shape[0], -1)
    return (-ZERO_POINT * w.sum(1)).astype(np.int32)


def _zp(layer: LayerSpec, w_int: np.ndarray) -> dict:
    return {"zp": zero_point_term(w_int)} if layer.act_signed else {}


def ternary_vnni_operands(lanes: int) -> Callable[[LayerSpec], Operands]:
    """The operands of the ternary kernels with ``lanes`` int32 lanes: the tile-ordered codes and alpha codes,
    the group size, and the zero-point term for signed activation codes."""
    def operands(layer: LayerSpec) -> Operands:
        tw = layer.weight
        k = tw.layout.out_channels
        ct, at = ternary_tiles(tw.packed_codes(), tw.alpha_q.numpy().reshape(k, -1), tw.layout, lanes)
        return [ct, at], {"group_size": tw.layout.group_size, **_zp(layer, tw.w_int.numpy())}

    return operands


def int_vnni_operands(lanes: int) -> Callable[[LayerSpec], Operands]:
    """The operands of the per-channel integer kernels: the int8 tile and the zero-point term."""
    def operands(layer: LayerSpec) -> Operands:
        w = layer.weight.w_int.numpy()
        return [int8_tiles(w, lanes)], _zp(layer, w)

    return operands


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

def _lanes_of_sch(sch: tvm.s_tir.Schedule) -> int:
    acc = sch.get(sch.get_sblock("acc"))
    buf = [r.source for r in acc.reads if str(r.source.dtype) == "int8"]
    return int(buf[0].shape[-2])


def _decoder(lanes: int) -> Callable[[tvm.s_tir.Schedule, tvm.s_tir.schedule.SBlockRV], None]:
    """The 2-bit decode stage: ``lanes`` code bytes -> ``lanes`` int8 words at a time (the decode intrinsic)."""
    def decode(sch: tvm.s_tir.Schedule, wb: tvm.s_tir.schedule.SBlockRV) -> None:
        tensorize_decode(sch, wb, DECODE_INTRIN[lanes], DECODE64_INTRIN[lanes])

    return decode


def schedule_conv2d_vnni(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """Register tile of ``mb`` output columns x ``nb`` blocks of L output channels (int32 accumulators) under
    the reduction over (r, s, 4-channel steps), the step tensorized; the int8 weight tile of a block of
    channels is decoded once and reused by every output pixel; the padded NHWC input is made once."""
    register()
    lanes = _lanes_of_sch(sch)
    acc = sch.get_sblock("acc")
    b, i, j, k, ry, rx, rc = sch.get_loops(acc)
    ow, kout = (int(sch.get(lp).extent) for lp in (j, k))
    mb = tile(ow, (7, 8, 4, 14, 2, 1), pick)
    nb = tile(kout // lanes, (2, 4, 1), pick)
    jo, ji = sch.split(j, [None, mb])
    no, nm, ni = sch.split(k, [None, nb, lanes])
    co, ci = sch.split(rc, [None, 4])
    sch.reorder(no, b, i, jo, ry, rx, co, ji, nm, ni, ci)
    out = register_tile(sch, acc, out_at=jo, red_at=ry, no=no, ni=ni, step=VNNI_INTRIN[lanes], decode=_decoder(lanes),
                        unrolled=(ji, nm))
    ol = sch.get_loops(out)
    sch.unroll(ol[-1] if _out_is_nchw(sch) else ol[-2])
    if not _out_is_nchw(sch):
        sch.vectorize(ol[-1])
    xl = sch.get_loops(sch.get_sblock("x_nhwc"))
    sch.parallel(sch.fuse(xl[0], xl[1]))
    if int(sch.get(xl[-1]).extent) % 16 == 0:
        # 16 channels a vector, never the whole row of channels: from an NCHW input each lane is a strided
        # load, and LLVM's x86 backend takes minutes on one 672- or 1152-lane gather (EfficientNet-Lite0's 1x1s)
        sch.vectorize(sch.split(xl[-1], [None, 16])[1])


def _out_is_nchw(sch: tvm.s_tir.Schedule) -> bool:
    """Whether the conv's output block writes NCHW (its annotation)."""
    ann = sch.get(sch.get_sblock("out")).annotations
    return str(ann.get(LAYOUT_ATTR, "NCHW")) == "NCHW"


def schedule_dense_vnni(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """Register tile of ``mb`` rows x ``nb`` blocks of L output channels.  Many rows: the int8 tile of a
    block of channels is decoded once and reused by every row; few rows (memory-bound): the reduction is
    cut into chunks whose tile is decoded into L1 just before it is used.  Two or more leading dims above
    1 (batch x tokens): the row tile splits the last one only, the others stay whole loops outside it
    (splitting a fusion of two non-unit loops leaves bindings that tensorize cannot blockize)."""
    register()
    lanes = _lanes_of_sch(sch)
    acc = sch.get_sblock("acc")
    lps = sch.get_loops(acc)
    lead, n, c = lps[:-2], lps[-2], lps[-1]
    if sum(int(sch.get(lp).extent) > 1 for lp in lead) > 1:
        _schedule_dense_vnni_batched(sch, pick, lanes, acc, lead, n, c)
        return
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    rows, kout, cin = (int(sch.get(lp).extent) for lp in (m, n, c))
    mb = tile(rows, (4, 2, 8, 1), pick)
    nb = tile(kout // lanes, (2, 4, 1), pick)
    mo, mi = sch.split(m, [None, mb])
    no, nm, ni = sch.split(n, [None, nb, lanes])
    wb = maybe_block(sch, "w_int")
    out = sch.get_sblock("out")
    if rows <= 8 and wb is not None:
        chunk = tile(cin // 4, (64, 32, 16, 8, 4, 2, 1), pick)
        cq, co, ci = sch.split(c, [None, chunk, 4])
        sch.reorder(no, cq, mo, co, mi, nm, ni, ci)
        sch.reverse_compute_at(out, no, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
        sch.compute_at(wb, cq, preserve_unit_loops=True)
        red_at = cq
    else:
        co, ci = sch.split(c, [None, 4])
        sch.reorder(no, mo, co, mi, nm, ni, ci)
        sch.reverse_compute_at(out, mo, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
        if wb is not None:
            sch.compute_at(wb, no, preserve_unit_loops=True)
        red_at = co
    if wb is not None:
        tensorize_decode(sch, wb, DECODE_INTRIN[lanes], DECODE64_INTRIN[lanes])
    sch.parallel(no)
    init = sch.decompose_reduction(acc, red_at)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ni, VNNI_INTRIN[lanes])
    sch.unroll(mi)
    sch.unroll(nm)
    sch.vectorize(sch.get_loops(out)[-1])
    xb = maybe_block(sch, "x_u8")
    if xb is not None:
        sch.vectorize(sch.get_loops(xb)[-1])


def _schedule_dense_vnni_batched(sch: tvm.s_tir.Schedule, pick: Pick | None, lanes: int, acc, lead, n, c) -> None:
    """``schedule_dense_vnni``'s many-rows form for ``[..., B, T, C]`` inputs: the outer leading loops
    fused (never split), the last one tiled by ``mb`` rows."""
    outer = sch.fuse(*lead[:-1]) if len(lead) > 2 else lead[0]
    m = lead[-1]
    rows, kout = (int(sch.get(lp).extent) for lp in (m, n))
    mb = tile(rows, (4, 2, 8, 1), pick)
    nb = tile(kout // lanes, (2, 4, 1), pick)
    mo, mi = sch.split(m, [None, mb])
    no, nm, ni = sch.split(n, [None, nb, lanes])
    co, ci = sch.split(c, [None, 4])
    sch.reorder(no, outer, mo, co, mi, nm, ni, ci)
    out = register_tile(sch, acc, out_at=mo, red_at=co, no=no, ni=ni, step=VNNI_INTRIN[lanes], decode=_decoder(lanes),
                        unrolled=(mi, nm))
    sch.vectorize(sch.get_loops(out)[-1])
    xb = maybe_block(sch, "x_u8")
    if xb is not None:
        sch.vectorize(sch.get_loops(xb)[-1])


def _conv_schedule(sch: tvm.s_tir.Schedule, _target: TargetLike, pick: Pick | None = None) -> None:
    schedule_conv2d_vnni(sch, pick)


def _dense_schedule(sch: tvm.s_tir.Schedule, _target: TargetLike, pick: Pick | None = None) -> None:
    schedule_dense_vnni(sch, pick)


def build_dense(m: int, kout: int, cin: int, *, group_size: int = 4, lanes: int = 16, signed: bool = False,
                out_mode: OutMode = "acc", target: TargetLike = None, batch: int = 0) -> tuple[object, list[str]]:
    """A standalone ternary dense kernel on ``vpdpbusd`` (for tests and ``scripts/bench_gemm.py``): returns the
    compiled function and its argument order (``x, codes_t, alpha_t, out_scale, out_bias[, zp]``; the
    weights from :func:`ternary_tiles`).  ``x`` is ``[m, cin]``, or ``[batch, m, cin]`` when ``batch`` > 0."""
    lay = qmath.group_layout((kout, cin), group_size)
    data = te.placeholder((batch, m, cin) if batch else (m, cin), "int8" if signed else "uint8", name="x")
    codes = te.placeholder((padded_k(kout, lanes) // lanes, -(-cin // 4), lanes), "uint8", name="codes_t")
    alpha = te.placeholder((padded_k(kout, lanes) // lanes, lay.groups_per_row, lanes), "uint8", name="alpha_t")
    scale = te.placeholder((kout,), "float32", name="out_scale")
    bias = te.placeholder((kout,), "float32", name="out_bias")
    zp = te.placeholder((kout,), "int32", name="zp") if signed else None
    out = ternary_dense_vnni(data, codes, alpha, scale, bias, weight_shape=(kout, cin), group_size=group_size, zp=zp,
                             out_mode=out_mode, requant_scale=1.0 if out_mode == "requant" else None)
    args = [data, codes, alpha, scale, bias, *([zp] if zp is not None else [])]
    sch = tvm.s_tir.Schedule(te.create_prim_func([*args, out]).with_attr(KERNEL_ATTR, f"ternary_dense_{SUFFIX[lanes]}"))
    schedule_dense_vnni(sch)
    tgt = tvm.target.Target(target if target is not None else {"kind": "llvm", "mcpu": "znver4"})
    return tvm.compile(sch.mod, target=tgt), [a.name for a in args]


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def has_lanes(target: tvm.target.Target | None, lanes: int) -> bool:
    """Whether the target runs ``vpdpbusd`` on ``lanes`` int32 lanes: 16 (zmm) with AVX-512 VNNI; 8 (ymm)
    with AVX-VNNI, or with AVX-512 VNNI + VL (the EVEX ymm form), for layers whose K is no multiple of 16."""
    have = vnni_lanes(target)
    if have == lanes or not have:
        return bool(have)
    return lanes == 8 and have == 16 and bool(target_has_features("avx512vl", target))


def _common_unfit(layer: LayerSpec, target: tvm.target.Target | None, lanes: int) -> str | None:
    if not has_lanes(target, lanes):
        have = vnni_lanes(target)
        return ("the target has no VNNI (avx512vnni or avxvnni)" if not have else
                f"the target's vpdpbusd has {have} lanes, this kernel {lanes}")
    if layer.act_bits > 8:
        return f"{layer.act_bits}-bit activation codes"
    shape = tuple(int(v) for v in layer.attrs["weight_shape"])
    if shape[0] % lanes and lanes != PADDED_LANES:
        return f"K={shape[0]}: need K % {lanes} == 0"
    if layer.op == "conv2d":
        groups = int(layer.attrs.get("groups", 1))
        if groups != 1 and (shape[1] % 4 or (shape[0] // groups) % lanes or shape[1] == 1):
            return (f"groups={groups}: a grouped conv needs C/groups % 4 == 0 and K/groups % {lanes} == 0 "
                    f"(C/groups={shape[1]}, K/groups={shape[0] // groups})")
        if pair(layer.attrs.get("dilation", 1)) != (1, 1):
            return f"dilation {pair(layer.attrs.get('dilation', 1))}"
    elif shape[1] % 4:
        return f"C={shape[1]}: need C % 4 == 0"
    return None


def ternary_vnni_fits(lanes: int) -> Callable[[LayerSpec, tvm.target.Target | None], str | None]:
    """A grouped-ternary layer whose alpha codes all fit 7 bits (``alpha_q * t`` is an int8), with groups of
    a multiple of 4 along the input channels, on a target with ``lanes``-lane VNNI."""
    def fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
        why = _common_unfit(layer, target, lanes)
        if why is not None:
            return why
        tw = layer.weight
        if tw.layout.along != "in" or tw.layout.group_size % 4:
            return (f"ternary groups of {tw.layout.group_size} along {tw.layout.along!r}: need input channels, "
                    "size % 4 == 0")
        top = int(tw.alpha_q.max()) if tw.alpha_q.numel() else 0
        if top > MAX_ALPHA:
            return f"alpha codes up to {top} > {MAX_ALPHA}: alpha * t is no int8 (quantize with alpha_bits=7)"
        return None

    return fits


def int_vnni_fits(lanes: int) -> Callable[[LayerSpec, tvm.target.Target | None], str | None]:
    """An int8 (or int4) layer with one scale per output channel on a target with ``lanes``-lane VNNI."""
    def fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
        why = _common_unfit(layer, target, lanes)
        if why is not None:
            return why
        if layer.weight.group_size != 0:
            return (f"int{layer.weight.bits} groups of {layer.weight.group_size}: the VNNI kernel takes "
                    "per-channel scales")
        k = int(layer.attrs["weight_shape"][0])
        if layer.weight.bits < 8 and (k % lanes or vnni_lanes(target) != lanes):
            # the tile stores one byte per weight: where the packed generic kernel was the only choice before
            # (K not whole zmm/ymm blocks of this host), keep the int4 codes packed
            return f"int{layer.weight.bits} weights with K={k} would be stored as int8 in a padded/ymm tile"
        return None

    return fits


# measured (scripts/bench_gemm.py, bench_speed.py): faster than the AVX2 kernels wherever both fit; the
# 512-bit form first on AVX-512 VNNI hosts
PREFERENCE = {16: 26, 8: 25}
# the ymm kernels take any K, padded to a multiple of 8 with zero weights (at most 7 wasted channels): layers
# whose K is no multiple of 16 (ShuffleNet's 58 and 116, the squeeze-excitation convs) stay on vpdpbusd
PADDED_LANES = 8
ISA = {16: "avx512vnni", 8: "avxvnni"}
SUFFIX = {16: "vnni", 8: "avxvnni"}
for _lanes in (16, 8):
    for _family, _op, _compute, _operands, _fits in (
            ("ternary", "conv2d", ternary_conv2d_vnni, ternary_vnni_operands, ternary_vnni_fits),
            ("ternary", "dense", ternary_dense_vnni, ternary_vnni_operands, ternary_vnni_fits),
            ("int", "conv2d", int_conv2d_vnni, int_vnni_operands, int_vnni_fits),
            ("int", "dense", int_dense_vnni, int_vnni_operands, int_vnni_fits)):
        register_kernel(Kernel(f"{_family}_{_op}_{SUFFIX[_lanes]}", family=_family, op=_op, isa=ISA[_lanes],
                               compute=_compute, schedule=_conv_schedule if _op == "conv2d" else _dense_schedule,
                               operands=_operands(_lanes), fits=_fits(_lanes), preference=PREFERENCE[_lanes],
                               intrinsics=register, layouts=LAYOUTS if _op == "conv2d" else ("NCHW",)))
