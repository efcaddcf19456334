"""Cortex-A76 (Raspberry Pi 5, +dotprod) conv kernels: :mod:`.neon`'s folded-alpha ``sdot`` conv (its compute,
:func:`.neon.conv2d_neon_tiled`, with ``widen=False``) with the parts that cost cycles on the A76 redone.

* the 2-bit decode runs on 16-byte vectors (16 code bytes, 64 weights a step, where the layer's groups are
  4 channels long and its channels a multiple of 8), the fields sign-extended by two shifts
  (``(c << (6 - 2q)) >> 6`` as int8: 0, 1, -2, -1 for the field values 0..3, exactly ``decode_2bit``) instead of
  masks and table lookups; other layers take :mod:`.neon`'s 8-byte decode;

The numpy integer reference is the test (``tests/test_a76.py`` on the host, ``tests/test_board.py`` on the
emulated Pi 5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
from tvm import te
from tvm.script import tirx as T

from tvm_lowbit import qmath
from tvm_lowbit.kernels import neon, sdot
from tvm_lowbit.kernels.common import LayerSpec, OutMode, Pick, TargetLike, decode_2bit, maybe_block, pair, tile
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

@T.prim_func(s_tir=True)
def _decode16_desc(c: T.handle, a: T.handle, w: T.handle) -> None:
    C = T.match_buffer(c, (2, 8), "uint8", offset_factor=1)
    A = T.match_buffer(a, (2, 8), "uint8", offset_factor=1)
    W = T.match_buffer(w, (2, 8, 4), "int8", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:2, 0:8], A[0:2, 0:8])
        T.writes(W[0:2, 0:8, 0:4])
        for s, i, q in T.grid(2, 8, 4):
            with T.sblock("update"):
                vs, vi, vq = T.axis.remap("SSS", [s, i, q])
                W[vs, vi, vq] = T.Cast("int8", (T.bitwise_xor(T.shift_right(T.Cast("int32", C[vs, vi]), vq * 2) & 3, 2)
                                                - 2) * T.Cast("int32", A[vs, vi]))


# the same in the int64 index arithmetic of Relax-emitted kernels (as neon's DECODE64_INTRIN)
@T.prim_func(s_tir=True)
def _decode16_desc64(c: T.handle, a: T.handle, w: T.handle) -> None:
    C = T.match_buffer(c, (T.int64(2), T.int64(8)), "uint8", offset_factor=1)
    A = T.match_buffer(a, (T.int64(2), T.int64(8)), "uint8", offset_factor=1)
    W = T.match_buffer(w, (T.int64(2), T.int64(8), T.int64(4)), "int8", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:T.int64(2), 0:T.int64(8)], A[0:T.int64(2), 0:T.int64(8)])
        T.writes(W[0:T.int64(2), 0:T.int64(8), 0:T.int64(4)])
        for s, i, q in T.grid(T.int64(2), T.int64(8), T.int64(4)):
            with T.sblock("update"):
                vs, vi, vq = T.axis.remap("SSS", [s, i, q])
                W[vs, vi, vq] = T.Cast("int8", (T.bitwise_xor(
                    T.shift_right(T.Cast("int64", T.Cast("int32", C[vs, vi])), vq * T.int64(2)) & T.int64(3),
                    T.int64(2)) - T.int64(2)) * T.Cast("int64", T.Cast("int32", A[vs, vi])))


@T.prim_func(s_tir=True)
def _decode16_impl(c: T.handle, a: T.handle, w: T.handle) -> None:
    C = T.match_buffer(c, (2, 8), "uint8", offset_factor=1)
    A = T.match_buffer(a, (2, 8), "uint8", offset_factor=1)
    W = T.match_buffer(w, (2, 8, 4), "int8", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:2, 0:8], A[0:2, 0:8])
        T.writes(W[0:2, 0:8, 0:4])
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


def register() -> tuple[str, ...]:
    """Register the 16-byte decode and the intrinsics borrowed from :mod:`.neon` (idempotent)."""
    for name, desc in ((DECODE16_INTRIN, _decode16_desc), (DECODE16_64_INTRIN, _decode16_desc64)):
        if tvm.s_tir.TensorIntrin.get(name, allow_missing=True) is None:
            tvm.s_tir.TensorIntrin.register(name, desc, _decode16_impl)
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
                   out_signed: bool = False, rq_mul: te.Tensor | None = None,
                   rq_add: te.Tensor | None = None, rq_shift: int = 0, fma_epilogue: bool = False,
                   recip_requant: bool = False) -> te.Tensor:
    """``neon.int_conv2d_dotprod`` (same result): ``w8`` from ``neon.int_tile(w, False)``."""
    if groups != 1 or pair(dilation) != (1, 1):
        raise ValueError(f"the A76 conv takes groups=1, dilation 1; got groups={groups}, dilation={dilation}")
    _, _, kh, kw = (int(v) for v in weight_shape)
    return neon.conv2d_neon_tiled(
        INT_NAME, data, w8, zp, out_scale, out_bias, kernel=(kh, kw), strides=strides, padding=padding,
        in_layout=in_layout, out_layout=out_layout, widen=False, relu=relu, out_mode=out_mode,
        requant_scale=requant_scale, out_bits=out_bits, out_signed=out_signed,
        int_rq=None if rq_mul is None or rq_add is None else (rq_mul, rq_add, int(rq_shift)),
        fma=fma_epilogue, recip=recip_requant)


# --------------------------------------------------------------------------------------------
# Operands (compile time, numpy)
# --------------------------------------------------------------------------------------------

def int_operands(layer: LayerSpec) -> Operands:
    """The int8 weight tile and the zero-point term for unsigned codes."""
    w = layer.weight.w_int.numpy()
    return [neon.int_tile(w, False)], {} if layer.act_signed else {"zp": neon.zero_point_term(w)}


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


def schedule_conv2d_a76(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """Register tile of ``mb`` output columns x 8 (or 16) output channels (int32x4 accumulators) under the
    reduction over (r, s, channel steps), the step tensorized: 16 channels by element (one activation load,
    four ``sdot``) where the channels allow, else sdot's 4-channel step; the int8 weight tile of a block of
    channels is decoded once and reused by every output pixel; the padded, shifted NHWC input is made once."""
    register()
    acc = sch.get_sblock("acc")
    b, i, j, k, ry, rx, rc = sch.get_loops(acc)
    ow, kout = (int(sch.get(lp).extent) for lp in (j, k))
    lane_step = int(sch.get(rc).extent) % 16 == 0
    mb = tile(ow, (8, 7, 4, 2, 1) if lane_step else (4, 8, 7, 2, 14, 1), pick)
    nb = tile(kout // LANES, (1,) if lane_step else (2, 1), pick)
    jo, ji = sch.split(j, [None, mb])
    no, nm, nh, ni = sch.split(k, [None, nb, 2, 4])
    co, ci = sch.split(rc, [None, 16 if lane_step else 4])
    sch.reorder(no, b, i, jo, ry, rx, co, ji, nm, nh, ni, ci)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, jo, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    wb = maybe_block(sch, "w_int")
    if wb is not None:
        sch.compute_at(wb, no, preserve_unit_loops=True)
        if not _decode16(sch, wb):
            loop = sch.get_loops(wb)[-2]
            wide = str(sch.get(loop).loop_var.ty) == "int64"
            sch.tensorize(loop, neon.DECODE64_INTRIN if wide else neon.DECODE_INTRIN)
    sch.parallel(no)
    init = sch.decompose_reduction(acc, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ni, neon.SDOT_LANE_INTRIN if lane_step else sdot.register()[1])
    sch.unroll(ji)
    sch.unroll(nm)
    sch.unroll(nh)
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
