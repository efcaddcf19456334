"""aarch64 dot-product (``sdot``, Armv8.2 +dotprod: Cortex-A76 / Raspberry Pi 5) conv kernels for the
grouped-ternary and power-of-two layers.

``sdot`` multiplies signed bytes, and the activation codes are unsigned (0..255), so the kernels shift
them by the zero point 128 into int8 (``x - 128``, with the padding as code 0, i.e. -128) and add
``128 * sum(w_int[k])`` back per output channel before the epilogue -- exact in int32:

    sum w * x = sum w * (x - 128) + 128 * sum w

* power-of-two weights (4-bit codes, ``|w| <= 2^6``) are int8 as they are: one ``sdot``
  (``C[4] += A[4] . B[4, 4]``) does the whole step -- the form of TVM's ``dot_4x4_i8i8s32_sdot``, registered
  here again because TVM's declares a global-scope accumulator and ours live in registers (local scope);
* ternary weights are ``alpha_q * t`` with 8-bit ``alpha_q``, which does not fit int8, so the step
  takes ``t`` and scales by the group's alpha: this module's intrinsic
  ``C[i] += alpha[i] * (A[4] . B[i, 4])`` is one ``sdot`` into a zeroed register and one ``mla``
  (groups of a multiple of 4 along the input channels, so the 4 bytes of a step share one alpha).

The layouts are those of ``kernels.avx2`` with 4 output lanes instead of 8: a zero-point-shifted NHWC
input copy inside the kernel, weights ``[K/4, taps, C/4, 4, 4]`` unpacked once per block of channels,
accumulators channel-innermost, output NCHW.  The numpy integer reference is the test (on the emulated
Pi 5 board).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
from tvm import te, tirx
from tvm.target.codegen import target_has_features
from tvm.script import tirx as T

from tvm_lowbit import qmath
from tvm_lowbit.kernels.common import (MAX_WEIGHT, LayerSpec, OutMode, Pick, TargetLike, check_mode, conv_dims,
                                       conv_out_size, decode_2bit, dot_conv_unsupported, epilogue,
                                       int8_dot_unsupported, kernel_attrs, layout_reader, maybe_block, pair, pow2_int8,
                                       tile)
from tvm_lowbit.kernels.pow2 import pow2_operands
from tvm_lowbit.kernels.registry import Kernel
from tvm_lowbit.kernels.registry import register as register_kernel
from tvm_lowbit.kernels.ternary import ternary_operands

SDOT_SCALED_4x4_INTRIN = "tvm_lowbit_sdot_4x4_i8i8s32_scaled"
SDOT_4x4_INTRIN = "tvm_lowbit_sdot_4x4_i8i8s32"
ZERO_POINT = 128
LAYOUTS = ("NCHW", "NHWC")  # activation layouts of the conv input and output (in_layout / out_layout)


@T.prim_func(s_tir=True)
def _sdot_scaled_desc(a: T.handle, b: T.handle, s: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    S = T.match_buffer(s, (4,), "int32", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4], S[0:4])
        T.writes(C[0:4])
        for i, k in T.grid(4, 4):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk]) * S[vi]


@T.prim_func(s_tir=True)
def _sdot_scaled_impl(a: T.handle, b: T.handle, s: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    S = T.match_buffer(s, (4,), "int32", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4], S[0:4])
        T.writes(C[0:4])
        a16 = T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", A.vload([0], "int8x4")), 4))
        dot = T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", T.broadcast(0, 4), a16,
                                      B.vload([0, 0], "int8x16"))
        C[0:4] = C.vload([0], "int32x4") + dot * S.vload([0], "int32x4")


@T.prim_func(s_tir=True)
def _sdot_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i, k in T.grid(4, 4):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])


@T.prim_func(s_tir=True)
def _sdot_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a16 = T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", A.vload([0], "int8x4")), 4))
        C[0:4] = T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", C.vload([0], "int32x4"),
                                         a16, B.vload([0, 0], "int8x16"))


def register() -> tuple[str, str]:
    """Register this module's intrinsics (idempotent); returns the (scaled, plain) names for tensorize."""
    for name, desc, impl in ((SDOT_SCALED_4x4_INTRIN, _sdot_scaled_desc, _sdot_scaled_impl),
                             (SDOT_4x4_INTRIN, _sdot_desc, _sdot_impl)):
        if tvm.s_tir.TensorIntrin.get(name, allow_missing=True) is None:
            tvm.s_tir.TensorIntrin.register(name, desc, impl)
    return SDOT_SCALED_4x4_INTRIN, SDOT_4x4_INTRIN


def has_sdot(target: tvm.target.Target) -> bool:
    """Whether ``target`` is an aarch64 LLVM target with the dot-product extension (+dotprod)."""
    return str(target.kind.name) == "llvm" and str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64")) \
        and bool(target_has_features("dotprod", target))


def _dims(data: te.Tensor, weight_shape: Sequence[int], groups: int, in_layout: str) -> tuple[int, int, int, int]:
    """(K, Cg, R, S) of a conv weight, checked against the NCHW or NHWC input and ``groups``."""
    if in_layout != "NHWC":
        return conv_dims(data, weight_shape, groups)
    kout, cg, kh, kw = (int(v) for v in weight_shape)
    chans = int(data.shape[3])
    if chans != cg * groups or kout % groups:
        raise ValueError(f"conv shapes do not match: C={chans} (NHWC), weight {tuple(weight_shape)}, groups={groups}")
    return kout, cg, kh, kw


def _conv_sdot(kind: str, data: te.Tensor, w8: te.Tensor, s4: te.Tensor | None, w_at: Callable[..., tirx.PrimExpr],
               weight_shape: tuple[int, int, int, int],
               strides: int | Sequence[int], padding: int | Sequence[int], out_scale: te.Tensor, out_bias: te.Tensor,
               relu: bool, out_mode: str, requant_scale: float | None, out_bits: int, out_signed: bool,
               in_layout: str = "NCHW", out_layout: str = "NCHW") -> te.Tensor:
    """NCHW conv with ``w8[k//4, r*S+s, c//4, k%4, c%4]`` (times ``s4[k//4, tap, c//4, k%4]`` if given);
    ``w_at(k, tap, c)`` is the int32 weight from the packed inputs, for the zero-point term ``sum w``
    (computed from the inputs, so the weight stages can live per block of channels)."""
    kout, cin, kh, kw = weight_shape
    if in_layout not in LAYOUTS or out_layout not in LAYOUTS:
        raise ValueError(f"layouts must be one of {LAYOUTS}, got in {in_layout!r}, out {out_layout!r}")
    batch, _, height, width, get = layout_reader(data, in_layout)
    (sh, sw), (ph, pw) = pair(strides), pair(padding)
    oh, ow = conv_out_size(height, kh, sh, ph), conv_out_size(width, kw, sw, pw)
    x = te.compute(
        (batch, height + 2 * ph, width + 2 * pw, cin),
        lambda b, h, w, c: (tirx.if_then_else(
            tirx.all(h >= ph, h < ph + height, w >= pw, w < pw + width),
            get(b, c, h - ph, w - pw), tirx.const(0, "uint8")).astype("int32") - ZERO_POINT).astype("int8"),
        name="x_nhwc")
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, cin), name="rc")

    def term(b, i, j, k):  # the intrinsics' descriptions multiply in this order: x * w8 (* scale)
        tap = ry * kw + rx
        v = (x[b, i * sh + ry, j * sw + rx, rc].astype("int32")
             * w8[k // 4, tap, rc // 4, k % 4, rc % 4].astype("int32"))
        return v if s4 is None else v * s4[k // 4, tap, rc // 4, k % 4]

    taps, red = te.reduce_axis((0, kh * kw), name="wt"), te.reduce_axis((0, cin), name="wc")
    zp_term = te.compute((kout,), lambda k: te.sum(w_at(k, taps, red) * ZERO_POINT, axis=[taps, red]), name="w_sum")
    acc = te.compute((batch, oh, ow, kout), lambda b, i, j, k: te.sum(term(b, i, j, k), axis=[ry, rx, rc]), name="acc")

    def body(b, k, i, j):
        a = acc[b, i, j, k] + zp_term[k]
        if out_mode == "acc":
            return a
        return epilogue(a, out_scale[k], out_bias[k], relu, out_mode, requant_scale, out_bits, out_signed)

    if out_layout == "NHWC":
        return te.compute((batch, oh, ow, kout), lambda b, i, j, k: body(b, k, i, j), name="out",
                          attrs=kernel_attrs(kind))
    return te.compute((batch, kout, oh, ow), body, name="out", attrs=kernel_attrs(kind))


def ternary_conv2d_sdot(data: te.Tensor, codes: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor,
                        out_bias: te.Tensor, *, weight_shape: Sequence[int], strides: int | Sequence[int] = 1,
                        padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                        group_size: int, relu: bool = False, out_mode: OutMode = "float",
                        requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False,
                        in_layout: str = "NCHW", out_layout: str = "NCHW") -> te.Tensor:
    """``kernels.ternary_conv2d`` (same inputs, same result) on ``sdot``: uint8 codes, groups=1, dilation 1,
    K % 4 == 0, C % 4 == 0, ternary groups of a multiple of 4 along the input channels."""
    check_mode(out_mode, requant_scale)
    kout, cg, kh, kw = _dims(data, weight_shape, groups, in_layout)
    why = dot_conv_unsupported(weight_shape, strides, dilation, groups, str(data.dtype), lanes=4)
    lay = qmath.group_layout((kout, cg, kh, kw), group_size)
    if why is None and (lay.along != "in" or lay.group_size % 4):
        why = f"groups of {lay.group_size} along the {lay.along!r} axis: need groups along input channels, size % 4 == 0"
    if why is not None:
        raise ValueError(f"the sdot ternary conv cannot run this layer ({why}); use kernels.ternary_conv2d")
    if tuple(int(v) for v in codes.shape) != (kout, -(-lay.row_len // 4)):
        raise ValueError(f"codes shape {codes.shape} != ({kout}, ceil({lay.row_len}/4))")
    seg = lay.groups_per_segment * lay.group_size

    def t8(nb, tap, cb, i, q):
        return decode_2bit(codes[nb * 4 + i, (tap * seg) // 4 + cb], q).astype("int8")

    def alpha(k, tap, c):
        return alpha_q[k, (tap * seg + c) // lay.group_size].astype("int32")

    def w_at(k, tap, c):
        return decode_2bit(codes[k, (tap * seg + c) // 4], c % 4) * alpha(k, tap, c)

    shape = (kout // 4, kh * kw, cg // 4, 4)
    w8 = te.compute((*shape, 4), t8, name="w_int")
    s4 = te.compute(shape, lambda nb, tap, cb, i: alpha(nb * 4 + i, tap, cb * 4), name="w_scale")
    return _conv_sdot("ternary_conv2d_sdot", data, w8, s4, w_at, (kout, cg, kh, kw), strides, padding, out_scale, out_bias,
                      relu, out_mode, requant_scale, out_bits, out_signed, in_layout, out_layout)


def pow2_conv2d_sdot(data: te.Tensor, codes: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
                     weight_shape: Sequence[int], code_bits: int = 4, strides: int | Sequence[int] = 1,
                     padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                     relu: bool = False, out_mode: OutMode = "float", requant_scale: float | None = None,
                     out_bits: int = 8, out_signed: bool = False, in_layout: str = "NCHW",
                     out_layout: str = "NCHW") -> te.Tensor:
    """``kernels.pow2_conv2d`` on ``sdot``: 4-bit codes (|w| <= 2^6), decoded to int8 ``sign << e``."""
    check_mode(out_mode, requant_scale)
    kout, cg, kh, kw = _dims(data, weight_shape, groups, in_layout)
    why = dot_conv_unsupported(weight_shape, strides, dilation, groups, str(data.dtype), lanes=4)
    if why is None and code_bits != 4:
        why = f"{code_bits}-bit codes: need 4-bit codes (|w| <= {MAX_WEIGHT})"
    if why is not None:
        raise ValueError(f"the sdot power-of-two conv cannot run this layer ({why}); use kernels.pow2_conv2d")
    length = kh * kw * cg
    if tuple(int(v) for v in codes.shape) != (kout, -(-length // 2)):
        raise ValueError(f"codes shape {tuple(codes.shape)} != ({kout}, {-(-length // 2)})")
    w8 = te.compute((kout // 4, kh * kw, cg // 4, 4, 4),
                    lambda nb, tap, cb, i, q: pow2_int8(codes, nb * 4 + i, tap * cg + cb * 4 + q), name="w_int")
    return _conv_sdot("pow2_conv2d_sdot", data, w8, None,
                      lambda k, tap, c: pow2_int8(codes, k, tap * cg + c).astype("int32"), (kout, cg, kh, kw),
                      strides, padding, out_scale, out_bias, relu, out_mode, requant_scale, out_bits, out_signed,
                      in_layout, out_layout)


def schedule_conv2d_sdot(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """Register tile of ``mb`` output columns x ``nb`` blocks of 4 output channels (int32x4 accumulators, of
    the 32 q registers) under the reduction over (r, s, 4-channel steps), the step tensorized."""
    scaled, plain = register()
    acc = sch.get_sblock("acc")
    b, i, j, k, ry, rx, rc = sch.get_loops(acc)
    ow, kout = (int(sch.get(lp).extent) for lp in (j, k))
    mb = tile(ow, (4, 7, 8, 2, 14, 1), pick)
    nb = tile(kout // 4, (4, 2, 1), pick)
    jo, ji = sch.split(j, [None, mb])
    no, nm, ni = sch.split(k, [None, nb, 4])
    co, ci = sch.split(rc, [None, 4])
    sch.reorder(no, b, i, jo, ry, rx, co, ji, nm, ni, ci)
    weights = [n for n in ("w_int", "w_scale") if maybe_block(sch, n) is not None]
    for wb in weights:
        blk = sch.get_sblock(wb)
        sch.compute_at(blk, no, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(blk)[-1])
    ws = sch.get_loops(sch.get_sblock("w_sum"))
    sch.parallel(ws[0])
    # the accumulator tile lives in registers and is written to an NHWC int32 buffer; the output stage adds
    # the zero-point term and writes NCHW (a pass over K x OH x OW, small next to the R*S*C-deep reduction)
    sch.reverse_compute_at(sch.cache_write(acc, 0, "local"), jo, preserve_unit_loops=True)
    out = sch.get_sblock("out")
    ol = sch.get_loops(out)
    sch.parallel(sch.fuse(ol[0], ol[1]))
    sch.parallel(no)
    init = sch.decompose_reduction(acc, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ni, scaled if "w_scale" in weights else plain)
    sch.unroll(ji)
    sch.unroll(nm)
    tail = sch.get_loops(sch.get_sblock("acc_local"))
    sch.vectorize(tail[-1])
    xl = sch.get_loops(sch.get_sblock("x_nhwc"))
    sch.parallel(sch.fuse(xl[0], xl[1]))


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def sdot_conv_fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
    """The sdot conv kernels take a layer on an aarch64 +dotprod target that the int8 dot product runs exactly."""
    if target is None or not has_sdot(target):
        return "the target has no aarch64 dot product (+dotprod)"
    return int8_dot_unsupported(layer, lanes=4)


def _conv_schedule(sch: tvm.s_tir.Schedule, _target: TargetLike, pick: Pick | None = None) -> None:
    schedule_conv2d_sdot(sch, pick)


PREFERENCE = 20  # faster than the generic kernels wherever it fits (instruction counts on the emulated Pi 5)
TERNARY_CONV2D_SDOT = register_kernel(Kernel("ternary_conv2d_sdot", family="ternary", op="conv2d", isa="sdot",
                                             compute=ternary_conv2d_sdot, schedule=_conv_schedule,
                                             operands=ternary_operands, fits=sdot_conv_fits, preference=PREFERENCE,
                                             intrinsics=register, layouts=LAYOUTS))
POW2_CONV2D_SDOT = register_kernel(Kernel("pow2_conv2d_sdot", family="pow2", op="conv2d", isa="sdot",
                                          compute=pow2_conv2d_sdot, schedule=_conv_schedule, operands=pow2_operands,
                                          fits=sdot_conv_fits, preference=PREFERENCE, intrinsics=register,
                                          layouts=LAYOUTS))
