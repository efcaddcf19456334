"""Cortex-A76 (Raspberry Pi 5, +dotprod) conv kernels: :mod:`.neon`'s folded-alpha ``sdot`` conv (its compute,
:func:`.neon.conv2d_neon_tiled`, with ``widen=False``) with the parts that cost cycles on the A76 redone.

* the 2-bit decode runs on 16-byte vectors (16 code bytes, 64 weights a step, where the layer's groups are
  4 channels long and its channels a multiple of 8), the fields sign-extended by two shifts
  (``(c << (6 - 2q)) >> 6`` as int8: 0, 1, -2, -1 for the field values 0..3, exactly ``decode_2bit``) instead of
  masks and table lookups; other layers take :mod:`.neon`'s 8-byte decode;
* a layer with few input channels that are not a multiple of 4 (the RGB stem) reads its kernel columns as
  channels straight from a padded copy whose rows are ``(w, c)`` flattened: output column ``j`` reads the
  ``kw * C`` bytes from ``j * stride * C`` on (the weights of the 3 bytes beyond them are zero), no per-column
  copy; the 7x7 stem takes 7 x 3 steps of 8 channels (two by-element ``sdot`` per 8-byte load) instead of 49
  4-channel steps, each with its own broadcast load.

The numpy integer reference is the test (``tests/test_a76.py`` on the host, ``tests/test_board.py`` on the
emulated Pi 5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from tvm_lowbit import qmath
from tvm_lowbit.kernels import neon, sdot
from tvm_lowbit.kernels.common import (LayerSpec, OutMode, Pick, TargetLike, check_mode, conv_out_size, decode_2bit,
                                       epilogue, int_epilogue, kernel_attrs, layout_reader, pair, register_tile,
                                       tensorize_decode, tile)
from tvm_lowbit.kernels.registry import Kernel, Operands, lookup
from tvm_lowbit.kernels.registry import register as register_kernel

ISA = "a76"
DECODE16_INTRIN = "tvm_lowbit_a76_decode_2bit_16x4_alpha"
DECODE16_64_INTRIN = "tvm_lowbit_a76_decode_2bit_16x4_alpha_i64"
LANES = neon.LANES


# --------------------------------------------------------------------------------------------
# The 2-bit decode with the alpha folded in, 16 code bytes (two 4-channel steps of 8 lanes) at once:
# W[s, i, q] = int8(t(C[s, i], q) * A[s, i])
# --------------------------------------------------------------------------------------------

def _decode16_intrin(form: str) -> tirx.PrimFunc:
    """``form``: "desc", "desc64" (the description in the int64 index arithmetic of Relax-emitted kernels, as
    neon's DECODE64_INTRIN) or "impl" (the fields sign-extended by two shifts, 16 bytes at once)."""
    n2, n8, n4 = (T.int64(2), T.int64(8), T.int64(4)) if form == "desc64" else (2, 8, 4)

    @T.prim_func(s_tir=True)
    def func(c: T.handle, a: T.handle, w: T.handle) -> None:
        C = T.match_buffer(c, (n2, n8), "uint8", offset_factor=1)
        A = T.match_buffer(a, (n2, n8), "uint8", offset_factor=1)
        W = T.match_buffer(w, (n2, n8, n4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:n2, 0:n8], A[0:n2, 0:n8])
            T.writes(W[0:n2, 0:n8, 0:n4])
            if form == "desc":
                for s, i, q in T.grid(2, 8, 4):
                    with T.sblock("update"):
                        vs, vi, vq = T.axis.remap("SSS", [s, i, q])
                        W[vs, vi, vq] = T.Cast("int8", (T.bitwise_xor(
                            T.shift_right(T.Cast("int32", C[vs, vi]), vq * 2) & 3, 2) - 2) * T.Cast("int32", A[vs, vi]))
            elif form == "desc64":
                for s, i, q in T.grid(T.int64(2), T.int64(8), T.int64(4)):
                    with T.sblock("update"):
                        vs, vi, vq = T.axis.remap("SSS", [s, i, q])
                        W[vs, vi, vq] = T.Cast("int8", (T.bitwise_xor(
                            T.shift_right(T.Cast("int64", T.Cast("int32", C[vs, vi])), vq * T.int64(2)) & T.int64(3),
                            T.int64(2)) - T.int64(2)) * T.Cast("int64", T.Cast("int32", A[vs, vi])))
            else:
                codes = T.reinterpret("int8x16", C.vload([0, 0], "uint8x16"))
                alpha = T.reinterpret("int8x16", A.vload([0, 0], "uint8x16"))
                six = T.broadcast(T.int8(6), 16)
                # field q sign-extended: shift it to the top two bits, arithmetic shift right by 6
                t0 = T.shift_right(T.shift_left(codes, six), six)
                t1 = T.shift_right(T.shift_left(codes, T.broadcast(T.int8(4), 16)), six)
                t2 = T.shift_right(T.shift_left(codes, T.broadcast(T.int8(2), 16)), six)
                t3 = T.shift_right(codes, six)
                # byte-wise products (int8 wrap, as the description's cast), stored interleaved: W[s, i, q] (st4)
                W.vstore([0, 0, 0], T.Shuffle([t0 * alpha, t1 * alpha, t2 * alpha, t3 * alpha],
                                              [q * 16 + j for j in range(16) for q in range(4)]))

    return func


def register() -> tuple[str, ...]:
    """Register the 16-byte decode and the intrinsics borrowed from :mod:`.neon` (its by-element sdot steps of
    16 and 8 channels among them); idempotent."""
    for name, desc in ((DECODE16_INTRIN, "desc"), (DECODE16_64_INTRIN, "desc64")):
        if tvm.s_tir.TensorIntrin.get(name, allow_missing=True) is None:
            tvm.s_tir.TensorIntrin.register(name, _decode16_intrin(desc), _decode16_intrin("impl"))
    return (DECODE16_INTRIN, DECODE16_64_INTRIN, *neon.register())


# --------------------------------------------------------------------------------------------
# Compute definitions
# --------------------------------------------------------------------------------------------

def _ternary_w8(codes_t: te.Tensor, alpha_t: te.Tensor, seg: int, group_size: int) -> te.Tensor:
    """The int8 tile ``alpha_q * t`` ``[K/8, taps, C4, 8, 4]`` of the tile-ordered codes and alpha codes; the
    group index ``tap * (seg / N) + 4 cb / N`` stays affine, so a 16-byte step reads 16 alpha bytes."""
    nkb, taps, c4, lanes = (int(v) for v in codes_t.shape)
    per_tap = seg // group_size

    def f(nb, tap, cb, i, q):
        return (decode_2bit(codes_t[nb, tap, cb, i], q)
                * alpha_t[nb, tap * per_tap + (cb * 4) // group_size, i].astype("int32")).astype("int8")

    return te.compute((nkb, taps, c4, lanes, 4), f, name="w_int")


def ternary_conv2d_a76(data: te.Tensor, codes_t: te.Tensor, alpha_t: te.Tensor, out_scale: te.Tensor,
                       out_bias: te.Tensor, *, weight_shape: Sequence[int], strides: int | Sequence[int] = 1,
                       padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                       group_size: int, zp: te.Tensor | None = None, in_layout: str = "NCHW",
                       out_layout: str = "NCHW", relu: bool = False, out_mode: OutMode = "float",
                       requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False,
                       rq_mul: te.Tensor | None = None, rq_add: te.Tensor | None = None, rq_shift: int = 0,
                       fma_epilogue: bool = False, recip_requant: bool = False) -> te.Tensor:
    """``neon.ternary_conv2d_dotprod`` (same inputs, same result) with the A76 decode."""
    if groups != 1 or pair(dilation) != (1, 1):
        raise ValueError(f"the A76 conv takes groups=1, dilation 1; got groups={groups}, dilation={dilation}")
    kout, cg, kh, kw = (int(v) for v in weight_shape)
    lay = qmath.group_layout((kout, cg, kh, kw), group_size)
    w8 = _ternary_w8(codes_t, alpha_t, lay.groups_per_segment * lay.group_size, lay.group_size)
    return neon.conv2d_neon_tiled(
        TERNARY_NAME, data, w8, zp, out_scale, out_bias, kernel=(kh, kw), strides=strides, padding=padding,
        in_layout=in_layout, out_layout=out_layout, widen=False, relu=relu, out_mode=out_mode,
        requant_scale=requant_scale, out_bits=out_bits, out_signed=out_signed,
        int_rq=None if rq_mul is None or rq_add is None else (rq_mul, rq_add, int(rq_shift)),
        fma=fma_epilogue, recip=recip_requant)


def int_conv2d_a76(data: te.Tensor, w8: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
                   weight_shape: Sequence[int], strides: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                   dilation: int | Sequence[int] = 1, groups: int = 1, zp: te.Tensor | None = None,
                   in_layout: str = "NCHW", out_layout: str = "NCHW", relu: bool = False,
                   out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                   out_signed: bool = False, fold_width: bool = False, rq_mul: te.Tensor | None = None,
                   rq_add: te.Tensor | None = None, rq_shift: int = 0, fma_epilogue: bool = False,
                   recip_requant: bool = False) -> te.Tensor:
    """``neon.int_conv2d_dotprod`` (same result): ``w8`` from ``neon.int_tile(w, False, fold_width)``;
    ``fold_width``: the kernel columns read as channels of the flattened padded rows (:func:`folds_width`)."""
    if groups != 1 or pair(dilation) != (1, 1):
        raise ValueError(f"the A76 conv takes groups=1, dilation 1; got groups={groups}, dilation={dilation}")
    _, _, kh, kw = (int(v) for v in weight_shape)
    int_rq = None if rq_mul is None or rq_add is None else (rq_mul, rq_add, int(rq_shift))
    if not fold_width:
        return neon.conv2d_neon_tiled(
            INT_NAME, data, w8, zp, out_scale, out_bias, kernel=(kh, kw), strides=strides, padding=padding,
            in_layout=in_layout, out_layout=out_layout, widen=False, relu=relu, out_mode=out_mode,
            requant_scale=requant_scale, out_bits=out_bits, out_signed=out_signed, int_rq=int_rq,
            fma=fma_epilogue, recip=recip_requant)
    check_mode(out_mode, requant_scale)
    signed = str(data.dtype) == "int8"
    if signed != (zp is None):
        raise ValueError("unsigned activation codes need the zero-point term zp (int32 [K]), signed ones none")
    batch, cin, height, width, get = layout_reader(data, in_layout)
    nkb, taps, c4, lanes, _ = (int(v) for v in w8.shape)
    if taps != kh or lanes != LANES or not 0 <= 4 * c4 - kw * cin < 4:
        raise ValueError(f"weight tile {tuple(w8.shape)} is not the folded tile of a {kh}x{kw} kernel over {cin} "
                         "channels (neon.int_tile(w, False, True))")
    (sh, sw), (ph, pw) = pair(strides), pair(padding)
    oh, ow = conv_out_size(height, kh, sh, ph), conv_out_size(width, kw, sw, pw)
    # row h of the copy: the padded input row, (w, c) flattened; output column j reads 4 c4 bytes from j sw C on
    row = max((width + 2 * pw) * cin, (ow - 1) * sw * cin + 4 * c4)
    pad_code = tirx.const(0 if signed else -neon.ZERO_POINT, "int8")

    def value(b, h, p):
        inside = tirx.all(h >= ph, h < ph + height, p >= pw * cin, p < (pw + width) * cin)
        v = get(b, p % cin, h - ph, p // cin - pw)
        return tirx.if_then_else(inside, v if signed else (v.astype("int32") - neon.ZERO_POINT).astype("int8"),
                                 pad_code)

    x = te.compute((batch, height + 2 * ph, row), value, name="x_nhwc")
    ry, rc = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, 4 * c4), name="rc")
    acc = te.compute((batch, oh, ow, nkb * lanes),
                     lambda b, i, j, k: te.sum(x[b, i * sh + ry, j * sw * cin + rc].astype("int32")
                                               * w8[k // lanes, ry, rc // 4, k % lanes, rc % 4].astype("int32"),
                                               axis=[ry, rc]), name="acc")

    def body(b, i, j, k):
        if out_mode == "requant" and int_rq is not None:  # zp is folded into the integer offset
            return int_epilogue(acc[b, i, j, k], int_rq[0][k], int_rq[1][k], int_rq[2], out_bits, out_signed)
        a = acc[b, i, j, k] if zp is None else acc[b, i, j, k] + zp[k]
        if out_mode == "acc":
            return a
        return epilogue(a, out_scale[k], out_bias[k], relu, out_mode, requant_scale, out_bits, out_signed,
                        fma=fma_epilogue, recip=recip_requant)

    attrs = dict(kernel_attrs(INT_NAME), **{neon.LAYOUT_ATTR: out_layout})
    if out_layout == "NCHW":
        return te.compute((batch, nkb * lanes, oh, ow), lambda b, k, i, j: body(b, i, j, k), name="out", attrs=attrs)
    return te.compute((batch, oh, ow, nkb * lanes), body, name="out", attrs=attrs)


# --------------------------------------------------------------------------------------------
# Operands (compile time, numpy)
# --------------------------------------------------------------------------------------------

def folds_width(weight_shape: Sequence[int]) -> bool:
    """Whether :func:`int_conv2d_a76` reads the kernel columns as channels: few input channels (at most
    ``neon.FOLD_MAX_CHANNELS`` folded) and fewer sdots per kernel row (``ceil(kw C / 4)`` instead of
    ``kw ceil(C / 4)``)."""
    _, cin, _, kw = (int(v) for v in weight_shape)
    return kw > 1 and kw * cin <= neon.FOLD_MAX_CHANNELS and -(-kw * cin // 4) < kw * -(-cin // 4)


def int_operands(layer: LayerSpec) -> Operands:
    """The int8 weight tile (kernel columns folded into the channels where :func:`folds_width`) and the
    zero-point term for unsigned codes."""
    w = layer.weight.w_int.numpy()
    fold = folds_width(w.shape)
    return [neon.int_tile(w, False, fold)], {**({} if layer.act_signed else {"zp": neon.zero_point_term(w)}),
                                             **({"fold_width": True} if fold else {})}


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------

def _decode16(sch: tvm.s_tir.Schedule, wb: tvm.s_tir.schedule.SBlockRV) -> bool:
    """Tensorize the weight decode 16 code bytes a step where the channel steps pair up and one step reads
    one alpha row per lane; False where it cannot (the caller takes neon's 8-byte decode)."""
    loops = sch.get_loops(wb)
    cb = loops[-3]
    if int(sch.get(cb).extent) % 2:
        return False
    wide = str(sch.get(cb).loop_var.ty) == "int64"
    _, inner = sch.split(cb, [None, 2])
    try:
        sch.tensorize(inner, DECODE16_64_INTRIN if wide else DECODE16_INTRIN)
    except Exception:  # noqa: BLE001 - tensorize raises a ScheduleError subclass where the regions do not match
        return False
    return True


def _decode(sch: tvm.s_tir.Schedule, wb: tvm.s_tir.schedule.SBlockRV) -> None:
    """The 16-byte decode where it fits, else neon's 8-byte one."""
    if not _decode16(sch, wb):
        tensorize_decode(sch, wb, neon.DECODE_INTRIN, neon.DECODE64_INTRIN)


def schedule_conv2d_a76(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """Register tile of ``mb`` output columns x 8 (or 16) output channels (int32x4 accumulators) under the
    reduction over (r, s, channel steps), the step tensorized: 16 or 8 channels by element (one activation load,
    four or two ``sdot``) where the channels allow, else sdot's 4-channel step; the int8 weight tile of a block
    of channels is decoded once and reused by every output pixel; the padded, shifted input is made once."""
    register()
    acc = sch.get_sblock("acc")
    b, i, j, k, *red = sch.get_loops(acc)  # red: (ry, rx, rc), or (ry, rc) where the columns are folded
    ow, kout, chans = (int(sch.get(lp).extent) for lp in (j, k, red[-1]))
    step = 16 if chans % 16 == 0 else 8 if chans % 8 == 0 else 4
    mb = tile(ow, (8, 7, 4, 2, 1) if step > 4 else (4, 8, 7, 2, 14, 1), pick)
    nb = tile(kout // LANES, (1,) if step > 4 else (2, 1), pick)
    jo, ji = sch.split(j, [None, mb])
    no, nm, nh, ni = sch.split(k, [None, nb, 2, 4])
    co, ci = sch.split(red[-1], [None, step])
    sch.reorder(no, b, i, jo, *red[:-1], co, ji, nm, nh, ni, ci)
    out = register_tile(sch, acc, out_at=jo, red_at=red[0], no=no, ni=ni,
                        step=neon.SDOT_LANE_INTRIN[step] if step > 4 else sdot.register()[1], decode=_decode,
                        unrolled=(ji, nm, nh))
    ol = sch.get_loops(out)
    nchw = str(sch.get(out).annotations.get(neon.LAYOUT_ATTR, "NCHW")) == "NCHW"
    sch.unroll(ol[-1] if nchw else ol[-2])
    if not nchw:
        sch.vectorize(ol[-1])
    xl = sch.get_loops(sch.get_sblock("x_nhwc"))
    sch.parallel(sch.fuse(xl[0], xl[1]))
    if int(sch.get(xl[-1]).extent) % 8 == 0:
        sch.vectorize(xl[-1])


def _schedule(sch: tvm.s_tir.Schedule, _target: TargetLike, pick: Pick | None = None) -> None:
    schedule_conv2d_a76(sch, pick)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def _fits(family: str) -> Callable[[LayerSpec, tvm.target.Target | None], str | None]:
    def fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
        dotprod = lookup(family, "conv2d", "dotprod")  # the same layers as neon's dotprod kernel
        if dotprod is None:
            return "kernels.neon's dotprod kernels are not registered"
        return dotprod.fits(layer, target)

    return fits


TERNARY_NAME, INT_NAME = "ternary_conv2d_a76", "int_conv2d_a76"
PREFERENCE = neon.PREFERENCE + 2  # before neon's dotprod kernels (preference 31) on the same layers
TERNARY_CONV2D_A76 = register_kernel(Kernel(TERNARY_NAME, family="ternary", op="conv2d", isa=ISA,
                                            compute=ternary_conv2d_a76, schedule=_schedule,
                                            operands=neon.ternary_operands, fits=_fits("ternary"),
                                            preference=PREFERENCE, intrinsics=register, layouts=neon.LAYOUTS,
                                            cheap_epilogues=True))
INT_CONV2D_A76 = register_kernel(Kernel(INT_NAME, family="int", op="conv2d", isa=ISA, compute=int_conv2d_a76,
                                        schedule=_schedule, operands=int_operands, fits=_fits("int"),
                                        preference=PREFERENCE, intrinsics=register, layouts=neon.LAYOUTS,
                                        cheap_epilogues=True))
