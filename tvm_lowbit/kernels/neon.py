"""aarch64 conv kernels with the group alpha folded into int8 weights, so that the inner loop is the dot
product and nothing else: ``sdot`` on +dotprod cores (Cortex-A76, Raspberry Pi 5), widening multiplies on
cores without it (Cortex-A72, Raspberry Pi 4).

The weights are those of :mod:`.vnni` with 8 output-channel lanes: a grouped-ternary layer whose alpha
codes fit 7 bits (FGQ's default) has ``w = alpha_q * t`` in int8; it stays stored as the packed 2-bit codes
and the alpha codes in tile order (``vnni.ternary_tiles``) and is decoded into the int8 tile
``[K/8, taps, C4, 8, 4]`` once per block of output channels, reused by every output pixel (the decode
intrinsic: per 8 code bytes, ``tbl`` per 2-bit field, a byte multiply by the alpha codes, ``st4`` into the
tile order); an int8 per-channel layer (FGQ's stem) stores that tile as it is (:func:`int_tile`; the RGB
stem's kernel columns folded into its channels for the widening kernel).

Activations are int8 in the kernel: unsigned codes (0..255) are shifted by the zero point, ``x - 128``,
in the padded NHWC stage the kernel makes anyway (padding is code 0, i.e. -128), and the output stage
adds ``128 * sum(w[k])``; signed codes are used as they are.  Exact in int32:
``sum w * x = sum w * (x - 128) + 128 * sum w``.

* ``dotprod`` (``sdot``): a register tile of 8 (or 7) output pixels x 8 output channels; per 16 input
  channels one 16-byte activation load per pixel feeds four by-element ``sdot v.4s, w.16b, a.4b[i]``
  (``SDOT_LANE_INTRIN[16]``; ``[8]``, two ``sdot`` per 8-byte load, is :mod:`.a76`'s); channels not a
  multiple of 16 (the stem) take kernels.sdot's plain 4-channel step with a 4-byte broadcast load;
* ``neon`` (no dot product): two steps of 4 channels at once: ``smull`` of the first 8 bytes, ``smlal``
  of the second 8 into int16 (``|x| <= 128`` and ``|w| <= 127`` keep two products in int16), then ``sadalp``
  into int32 -- 16 multiply-adds per widening multiply pair.  The int32 lanes hold, per output channel,
  the sums over channels with ``c % 4 < 2`` and ``c % 4 >= 2`` (``acc[..., k, h]``); the output stage adds
  the two in registers (``addp``, ``ADDP_INTRIN``).  The padded copy holds every 4 channels twice (the
  activation words come broadcast): a shifted, padded row is made first (16 bytes an ``eor``), then its
  words written twice (``zip1``/``zip2``, ``DUP_INTRIN``); the RGB stem's row is its columns and channels
  flattened, so an output column's folded channels are consecutive bytes of it.  The kernel's columns
  and the channel steps are one reduction loop (consecutive in the copy and in the tile).  uint8 codes
  out: ``clip(nearbyint(q), 0, 255)`` is ``fcvtns`` and two saturating narrows (``NARROW_INTRIN``); the
  2-bit decode looks two fields up per 4-bit nibble (``NIBBLE_INTRIN``).

Layouts: input NCHW or NHWC (``in_layout``), output NCHW or NHWC (``out_layout``), so the integer region of
a model runs NHWC end to end (``passes.convert_layout``).  The numpy integer reference is the test
(``tests/test_neon.py`` on the host, ``tests/test_board.py`` on the emulated Pi 4 and Pi 5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

from tvm_lowbit import qmath
from tvm_lowbit.kernels import sdot, vnni
from tvm_lowbit.kernels.common import (KERNEL_ATTR, LayerSpec, OutMode, Pick, TargetLike, check_mode, conv_out_size,
                                       decode_2bit, epilogue, int_epilogue, kernel_attrs, layout_reader, maybe_block,
                                       pair, register_tile, requant_unrounded, round_clip, target_kind,
                                       tensorize_decode, tile)
from tvm_lowbit.kernels.registry import Kernel, Operands
from tvm_lowbit.kernels.registry import register as register_kernel

LANES = 8                 # output channels per weight-tile block (the vnni 8-lane tile order)
ZERO_POINT = 128          # unsigned codes -> int8: x - 128
MAX_WEIGHT = 127          # |w| bound: int8 weights, and two products of the widening kernel fit int16
LAYOUTS = ("NCHW", "NHWC")
LAYOUT_ATTR = "tvm_lowbit.out_layout"
FOLD_ATTR = "tvm_lowbit.fold_channels"  # the folded stem's row copy: the input channels per column
WIDEN_INTRIN = "tvm_lowbit_neon_smull_sadalp_4x8_i8i8s32"
# the by-element sdot step by channels per step (the 8-channel one's name predates it: tuned records name it)
SDOT_LANE_INTRIN = {16: "tvm_lowbit_sdot_lane_4x16_i8i8s32", 8: "tvm_lowbit_a76_sdot_lane_2x8_i8i8s32"}
DECODE_INTRIN = "tvm_lowbit_neon_decode_2bit_8x4_alpha"
DECODE64_INTRIN = "tvm_lowbit_neon_decode_2bit_8x4_alpha_i64"
# the same decode with the fields looked up per 4-bit nibble (the widening kernel's)
NIBBLE_INTRIN = "tvm_lowbit_neon_decode_2bit_8x4_alpha_nibble"
NIBBLE64_INTRIN = "tvm_lowbit_neon_decode_2bit_8x4_alpha_nibble_i64"
ADDP_INTRIN = "tvm_lowbit_neon_addp_4x2_s32"
DUP_INTRIN = {2: "tvm_lowbit_neon_dup_words_2", 4: "tvm_lowbit_neon_dup_words_4"}  # by words per step
NARROW_INTRIN = "tvm_lowbit_neon_fcvtns_narrow_8_u8"


# Each tensor intrinsic is one function: ``impl=False`` gives its description (what the matched block
# computes), ``impl=True`` the NEON code that replaces it; both share the buffers and regions.

# --------------------------------------------------------------------------------------------
# The by-element sdot step (+dotprod): one activation load of 16 (or 8) channels feeds four (or two) sdots
# --------------------------------------------------------------------------------------------

def _sdot_word(acc: tirx.PrimExpr, B: tirx.Buffer, words: tirx.PrimExpr, s: int, steps: int) -> tirx.PrimExpr:
    """``acc`` plus weight row ``B[s]`` times activation word ``s``: ``sdot v.4s, w.16b, a.4b[s]`` (``words``: the
    ``steps`` words of the load, concatenated up to 4 lanes)."""
    word = T.reinterpret("int8x16", T.Shuffle([words] * (4 // steps), [s, s, s, s]))
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, B.vload([s, 0, 0], "int8x16"),
                                   word)


def _sdot_lane(impl: bool, channels: int = 16) -> tirx.PrimFunc:
    """``C[i] += A . B[:, i, :]`` over ``channels`` (16 or 8) input channels, ``B[s, i, q]`` the weight of channel
    ``4 s + q``: one ``channels``-byte activation load, one by-element ``sdot`` per 4 channels."""
    steps = channels // 4

    @T.prim_func(s_tir=True)
    def func(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (channels,), "int8", offset_factor=1)
        sb = T.int32()
        B = T.match_buffer(b, (steps, 4, 4), "int8", offset_factor=1, strides=[sb, 4, 1])
        C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4], A[0:channels], B[0:steps, 0:4, 0:4])
            T.writes(C[0:4])
            if impl:
                words = T.reinterpret(f"int32x{steps}", A.vload([0], f"int8x{channels}"))
                c0 = _sdot_word(C.vload([0], "int32x4"), B, words, 0, steps)
                if steps == 2:
                    C[0:4] = _sdot_word(c0, B, words, 1, steps)
                else:
                    c1 = _sdot_word(c0, B, words, 1, steps)
                    c2 = _sdot_word(c1, B, words, 2, steps)
                    C[0:4] = _sdot_word(c2, B, words, 3, steps)
            else:
                for i, k in T.grid(4, channels):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk // 4, vi, vk % 4])

    return func


# --------------------------------------------------------------------------------------------
# The widening-multiply step (cores without a dot product), the sum of its two partial sums, the rounding
# --------------------------------------------------------------------------------------------

def _widen_step(impl: bool) -> tirx.PrimFunc:
    @T.prim_func(s_tir=True)
    def func(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2, 2, 4), "int8", offset_factor=1)
        sb = T.int32()
        B = T.match_buffer(b, (2, 4, 4), "int8", offset_factor=1, strides=[sb, 4, 1])
        C = T.match_buffer(c, (4, 2), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4, 0:2], A[0:2, 0:2, 0:4], B[0:2, 0:4, 0:4])
            T.writes(C[0:4, 0:2])
            if impl:
                # the padded copy holds every 4 channels twice: two 8-byte loads are the broadcast words
                a0 = T.Cast("int16x8", A.vload([0, 0, 0], "int8x8"))
                a1 = T.Cast("int16x8", A.vload([1, 0, 0], "int8x8"))
                lo = (a0 * T.Cast("int16x8", B.vload([0, 0, 0], "int8x8"))
                      + a1 * T.Cast("int16x8", B.vload([1, 0, 0], "int8x8")))
                hi = (a0 * T.Cast("int16x8", B.vload([0, 2, 0], "int8x8"))
                      + a1 * T.Cast("int16x8", B.vload([1, 2, 0], "int8x8")))
                C.vstore([0, 0], C.vload([0, 0], "int32x4") + T.call_llvm_pure_intrin(
                    "int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", lo))
                C.vstore([2, 0], C.vload([2, 0], "int32x4") + T.call_llvm_pure_intrin(
                    "int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", hi))
            else:
                for i, h, s, q in T.grid(4, 2, 2, 2):
                    with T.sblock("update"):
                        vi, vh, vs, vq = T.axis.remap("SSRR", [i, h, s, q])
                        C[vi, vh] = C[vi, vh] + (T.Cast("int32", A[vs, vh, vh * 2 + vq])
                                                 * T.Cast("int32", B[vs, vi, vh * 2 + vq]))

    return func


def _addp(impl: bool) -> tirx.PrimFunc:
    """The widening kernel's two partial sums per output channel added in registers: one addp per 4."""
    @T.prim_func(s_tir=True)
    def func(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4, 2), "int32", offset_factor=1, scope="local")
        C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4, 0:2])
            T.writes(C[0:4])
            if impl:
                C[0:4] = C.vload([0], "int32x4") + T.call_llvm_pure_intrin(
                    "int32x4", "llvm.aarch64.neon.addp.v4i32", A.vload([0, 0], "int32x4"), A.vload([2, 0], "int32x4"))
            else:
                for i, r in T.grid(4, 2):
                    with T.sblock("update"):
                        vi, vr = T.axis.remap("SR", [i, r])
                        C[vi] = C[vi] + A[vi, vr]

    return func


def _dup(impl: bool, words: int = 4) -> tirx.PrimFunc:
    """The widening kernel's activation copy: ``words`` 4-byte words, each written twice (zip1/zip2)."""
    @T.prim_func(s_tir=True)
    def func(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (words * 4,), "int8", offset_factor=1)
        C = T.match_buffer(c, (words, 2, 4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:words * 4])
            T.writes(C[0:words, 0:2, 0:4])
            if impl:
                v = A.vload([0], f"int8x{words * 4}")
                C.vstore([0, 0, 0], T.Shuffle([v, v], [w * 4 + q for w in range(words) for _ in range(2)
                                                       for q in range(4)]))
            else:
                for w, d, q in T.grid(words, 2, 4):
                    with T.sblock("update"):
                        vw, vd, vq = T.axis.remap("SSS", [w, d, q])
                        C[vw, vd, vq] = A[vw * 4 + vq]

    return func


def _narrow(impl: bool) -> tirx.PrimFunc:
    """The requantizing epilogue's last step for uint8 codes, ``clip(nearbyint(q), 0, 255)``, 8 at a time:
    fcvtns rounds to the nearest, ties to even (nearbyint in the default rounding mode), saturating to int32;
    sqxtun clips to 0..65535, uqxtn to 0..255."""
    @T.prim_func(s_tir=True)
    def func(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (8,), "float32", offset_factor=1, scope="local")
        C = T.match_buffer(c, (8,), "uint8", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:8])
            T.writes(C[0:8])
            if impl:
                lo = T.call_llvm_pure_intrin("int16x4", "llvm.aarch64.neon.sqxtun.v4i16", T.call_llvm_pure_intrin(
                    "int32x4", "llvm.aarch64.neon.fcvtns.v4i32.v4f32", A.vload([0], "float32x4")))
                hi = T.call_llvm_pure_intrin("int16x4", "llvm.aarch64.neon.sqxtun.v4i16", T.call_llvm_pure_intrin(
                    "int32x4", "llvm.aarch64.neon.fcvtns.v4i32.v4f32", A.vload([4], "float32x4")))
                C.vstore([0], T.reinterpret("uint8x8", T.call_llvm_pure_intrin(
                    "int8x8", "llvm.aarch64.neon.uqxtn.v8i8", T.Shuffle([lo, hi], list(range(8))))))
            else:
                for i in T.serial(8):
                    with T.sblock("update"):
                        vi = T.axis.remap("S", [i])
                        C[vi] = T.Cast("uint8", T.min(T.max(T.nearbyint(A[vi]), T.float32(0.0)), T.float32(255.0)))

    return func


# --------------------------------------------------------------------------------------------
# The 2-bit decode with the alpha folded in: W[i, q] = int8(t(C[i], q) * A[i]) for 8 code bytes
# --------------------------------------------------------------------------------------------

def _decode(form: str) -> tirx.PrimFunc:
    """``form``: "desc", "desc64" (the description in the int64 index arithmetic of Relax-emitted kernels:
    emit_te widens the decode's int32 math), "tbl" (a tbl per 2-bit field) or "nibble" (two tbls per 4-bit
    nibble: one mask and one shift for four fields)."""
    wide = form == "desc64"
    n8, n4 = (T.int64(8), T.int64(4)) if wide else (8, 4)

    @T.prim_func(s_tir=True)
    def func(c: T.handle, a: T.handle, w: T.handle) -> None:
        C = T.match_buffer(c, (n8,), "uint8", offset_factor=1)
        A = T.match_buffer(a, (n8,), "uint8", offset_factor=1)
        W = T.match_buffer(w, (n8, n4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:n8], A[0:n8])
            T.writes(W[0:n8, 0:n4])
            if form == "desc":
                for i, q in T.grid(8, 4):
                    with T.sblock("update"):
                        vi, vq = T.axis.remap("SS", [i, q])
                        W[vi, vq] = T.Cast("int8", (T.bitwise_xor(T.shift_right(T.Cast("int32", C[vi]), vq * 2) & 3, 2)
                                                    - 2) * T.Cast("int32", A[vi]))
            elif form == "desc64":
                for i, q in T.grid(T.int64(8), T.int64(4)):
                    with T.sblock("update"):
                        vi, vq = T.axis.remap("SS", [i, q])
                        W[vi, vq] = T.Cast("int8", (T.bitwise_xor(
                            T.shift_right(T.Cast("int64", T.Cast("int32", C[vi])), vq * T.int64(2)) & T.int64(3),
                            T.int64(2)) - T.int64(2)) * T.Cast("int64", T.Cast("int32", A[vi])))
            else:
                codes = C.vload([0], "uint8x8")
                alpha = T.reinterpret("int8x8", A.vload([0], "uint8x8"))
                if form == "tbl":
                    # field value -> t, the bytes 0, 1, -2, -1 of decode_2bit (2 is never written by pack_2bit)
                    table = T.reinterpret("int8x16", T.broadcast(T.int32(-130816), 4))
                    t0 = T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.tbl1.v8i8", table,
                                                 T.reinterpret("int8x8", codes & T.broadcast(T.uint8(3), 8)))
                    t1 = T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.tbl1.v8i8", table, T.reinterpret(
                        "int8x8", T.shift_right(codes, T.broadcast(T.uint8(2), 8)) & T.broadcast(T.uint8(3), 8)))
                    t2 = T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.tbl1.v8i8", table, T.reinterpret(
                        "int8x8", T.shift_right(codes, T.broadcast(T.uint8(4), 8)) & T.broadcast(T.uint8(3), 8)))
                    t3 = T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.tbl1.v8i8", table, T.reinterpret(
                        "int8x8", T.shift_right(codes, T.broadcast(T.uint8(6), 8))))
                    # byte-wise products (int8 wrap, as the description's cast), stored interleaved (st4)
                    W.vstore([0, 0], T.Shuffle([t0 * alpha, t1 * alpha, t2 * alpha, t3 * alpha],
                                               [q * 8 + i for i in range(8) for q in range(4)]))
                else:
                    # nibble n: tbl(low, n) = t(n & 3), tbl(high, n) = t(n >> 2) (decode_2bit, constant-folded)
                    nib = T.Ramp(T.int8(0), T.int8(1), 16)
                    two = T.broadcast(T.int8(2), 16)
                    low = T.bitwise_xor(nib & T.broadcast(T.int8(3), 16), two) - two
                    high = T.bitwise_xor(T.shift_right(nib, two), two) - two
                    n0 = T.reinterpret("int8x8", codes & T.broadcast(T.uint8(15), 8))
                    n1 = T.reinterpret("int8x8", T.shift_right(codes, T.broadcast(T.uint8(4), 8)))
                    t0 = T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.tbl1.v8i8", low, n0)
                    t1 = T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.tbl1.v8i8", high, n0)
                    t2 = T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.tbl1.v8i8", low, n1)
                    t3 = T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.tbl1.v8i8", high, n1)
                    W.vstore([0, 0], T.Shuffle([t0 * alpha, t1 * alpha, t2 * alpha, t3 * alpha],
                                               [q * 8 + i for i in range(8) for q in range(4)]))

    return func


def register() -> tuple[str, ...]:
    """Register the widening step and the intrinsics this module borrows (sdot's plain step, vnni's
    8-lane 2-bit decode); idempotent.  Returns their names."""
    intrinsics = {WIDEN_INTRIN: (_widen_step, False, True), ADDP_INTRIN: (_addp, False, True),
                  NARROW_INTRIN: (_narrow, False, True),
                  SDOT_LANE_INTRIN[16]: (_sdot_lane, False, True),
                  SDOT_LANE_INTRIN[8]: (lambda impl: _sdot_lane(impl, 8), False, True),
                  DUP_INTRIN[2]: (lambda impl: _dup(impl, 2), False, True),
                  DUP_INTRIN[4]: (lambda impl: _dup(impl, 4), False, True),
                  DECODE_INTRIN: (_decode, "desc", "tbl"), DECODE64_INTRIN: (_decode, "desc64", "tbl"),
                  NIBBLE_INTRIN: (_decode, "desc", "nibble"), NIBBLE64_INTRIN: (_decode, "desc64", "nibble")}
    for name, (make, desc, impl) in intrinsics.items():
        if tvm.s_tir.TensorIntrin.get(name, allow_missing=True) is None:
            tvm.s_tir.TensorIntrin.register(name, make(desc), make(impl))
    _, plain = sdot.register()
    return (*intrinsics, plain)


def is_aarch64(target: tvm.target.Target | None) -> bool:
    """Whether ``target`` is an aarch64 LLVM target."""
    return target is not None and str(target.kind.name) == "llvm" and target_kind(target) == "aarch64"


# --------------------------------------------------------------------------------------------
# Compute definitions
# --------------------------------------------------------------------------------------------

def _to_int8(v: tirx.PrimExpr, signed: bool) -> tirx.PrimExpr:
    """An activation code as the int8 the dot product multiplies (unsigned codes - 128)."""
    if signed:
        return v.astype("int8")
    return (v.astype("int32") - ZERO_POINT).astype("int8")


def conv2d_neon_tiled(kind: str, data: te.Tensor, w8: te.Tensor, zp: te.Tensor | None, out_scale: te.Tensor,
                      out_bias: te.Tensor, *, kernel: tuple[int, int], strides: int | Sequence[int],
                      padding: int | Sequence[int], in_layout: str, out_layout: str, widen: bool, relu: bool,
                      out_mode: str, requant_scale: float | None, out_bits: int, out_signed: bool,
                      fold_width: bool = False, int_rq: tuple[te.Tensor, te.Tensor, int] | None = None,
                      fma: bool = False, recip: bool = False) -> te.Tensor:
    """The conv on an int8 weight tile ``w8[K/8, taps, C4, 8, 4]`` (a tensor or a decode stage), int8
    activations, exact in int32; ``zp[k]`` (``128 * sum w[k]``, unsigned codes) added in the output stage.
    ``widen``: the accumulators are split by ``h = (c % 4) // 2`` (the widening kernel's lanes).
    ``fold_width``: the kernel's columns are folded into the channels (a layer with few input channels, the
    RGB stem): the padded copy holds, per output column, the ``kw * C`` inputs it reads (channel
    ``s * C + c``: column s, channel c), and the conv is ``kh x 1`` over them, so a step of 8 channels is
    not mostly padding; the tile then has ``kh`` taps of ``kw * C`` channels (:func:`int_tile`).
    ``int_rq``: ``(mul, add, shift)`` of :func:`.requant.solve` with the zero-point term folded into ``add``
    (``offset=zp``): "requant" outputs take the exact integer epilogue instead of the float one.  ``fma``: the
    float epilogue's ``y`` as one float32 fused multiply-add (where :func:`.requant.fma_unexact` proves it
    exact for the layer); ``recip``: with it, the requantization's division as a multiply by the reciprocal
    and one fused correction step (where :func:`.requant.recip_unexact` proves it exact)."""
    dtype = str(data.dtype)
    if dtype not in ("uint8", "int8"):
        raise ValueError(f"the NEON conv kernels take 8-bit activation codes (uint8 or int8), got {dtype}")
    signed = dtype == "int8"
    if signed != (zp is None):
        raise ValueError("unsigned activation codes need the zero-point term zp (int32 [K]), signed ones none")
    if in_layout not in LAYOUTS or out_layout not in LAYOUTS:
        raise ValueError(f"layouts must be one of {LAYOUTS}, got in {in_layout!r}, out {out_layout!r}")
    nkb, taps, c4, lanes, _ = (int(v) for v in w8.shape)
    kh, kw = kernel
    if taps != (kh if fold_width else kh * kw) or lanes != LANES:
        raise ValueError(f"weight tile {tuple(w8.shape)} does not fit a {kh}x{kw} kernel with {LANES} lanes")
    kout = nkb * lanes
    batch, cin, height, width, get = layout_reader(data, in_layout)
    step = 8 if widen else 4  # channels per step: the widening step takes 8
    ctile = kw * cin if fold_width else cin  # the channels of the tile
    if not 0 <= 4 * c4 - ctile < step or (4 * c4) % step:
        raise ValueError(f"input has {ctile} channels, the weight tile {4 * c4}: need the channels rounded up to "
                         f"a multiple of {step}")
    cpad = 4 * c4
    (sh, sw), (ph, pw) = pair(strides), pair(padding)
    oh, ow = conv_out_size(height, kh, sh, ph), conv_out_size(width, kw, sw, pw)
    pad_code = tirx.const(0 if signed else -ZERO_POINT, "int8")  # a zero activation, shifted
    if fold_width:
        # the padded, shifted input rows with the columns and channels flattened (element w * C + c): output
        # column j reads the kw * C consecutive elements from j * sw * C on, so the folded copy's 4-channel
        # words are 4 consecutive bytes of a row (the channels past kw * C: the next column's, weight 0)
        flat = max((width + 2 * pw) * cin, (ow - 1) * sw * cin + cpad)

        def row(b, h, f):
            w = f // cin - pw
            return tirx.if_then_else(tirx.all(h >= ph, h < ph + height, w >= 0, w < width),
                                     _to_int8(get(b, f % cin, h - ph, w), signed), pad_code)

        xrow = te.compute((batch, height + 2 * ph, flat), row, name="x_row", attrs={FOLD_ATTR: cin})
        stride_w = sw * cin

        def folded(b, h, j, q):
            return xrow[b, h, j * stride_w + q]

        value, xshape = folded, (batch, height + 2 * ph, ow, cpad)
        kw, sw = 1, 1  # the conv over the folded copy
    else:
        def value(b, h, w, c):
            return tirx.if_then_else(tirx.all(h >= ph, h < ph + height, w >= pw, w < pw + width, c < cin),
                                     _to_int8(get(b, c, h - ph, w - pw), signed), pad_code)

        xshape = (batch, height + 2 * ph, max(width + 2 * pw, (ow - 1) * sw + kw), cpad)
        if widen:  # the padded, shifted copy first; the duplicated words are a copy of it (DUP_INTRIN)
            xpad = te.compute(xshape, value, name="x_pad")
            value = lambda b, h, w, c: xpad[b, h, w, c]  # noqa: E731
    if widen:  # every 4 channels twice: the widening step's activation words come duplicated, no dup
        x = te.compute((*xshape[:3], cpad // 4, 2, 4), lambda b, h, w, c4, d, q: value(b, h, w, c4 * 4 + q),
                       name="x_nhwc")
    else:
        x = te.compute(xshape, value, name="x_nhwc")
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")

    if not widen:
        rc = te.reduce_axis((0, cpad), name="rc")
        acc = te.compute(
            (batch, oh, ow, kout),
            lambda b, i, j, k: te.sum(x[b, i * sh + ry, j * sw + rx, rc].astype("int32")
                                      * w8[k // lanes, ry * kw + rx, rc // 4, k % lanes, rc % 4].astype("int32"),
                                      axis=[ry, rx, rc]),
            name="acc")
        at = lambda b, i, j, k: acc[b, i, j, k]  # noqa: E731
    else:
        # the kernel columns and the 8-channel steps as one reduction: for a row of the kernel, the copy's
        # (column, channel) and the tile's (tap, channel) are both consecutive, so it is one loop of steps
        nc8 = cpad // 8
        c8 = te.reduce_axis((0, kw * nc8), name="c8")
        rs = te.reduce_axis((0, 2), name="rs")
        rq = te.reduce_axis((0, 2), name="rq")

        def part(b, i, j, k, h):
            # copy h of channels (c8 % nc8) * 8 + rs * 4 + (0..3) of column c8 // nc8: the same values, read
            # whole by the step
            rx8, cb = c8 // nc8, (c8 % nc8) * 2 + rs
            return te.sum(x[b, i * sh + ry, j * sw + rx8, cb, h, h * 2 + rq].astype("int32")
                          * w8[k // lanes, ry * kw + rx8, cb, k % lanes, h * 2 + rq].astype("int32"),
                          axis=[ry, c8, rs, rq])

        part_acc = te.compute((batch, oh, ow, kout, 2), part, name="acc")
        rh = te.reduce_axis((0, 2), name="rh")
        acc = te.compute((batch, oh, ow, kout), lambda b, i, j, k: te.sum(part_acc[b, i, j, k, rh], axis=rh),
                         name="acc_sum")
        at = lambda b, i, j, k: acc[b, i, j, k]  # noqa: E731

    def body(b, i, j, k):
        if out_mode == "requant" and int_rq is not None:  # zp is folded into the integer offset
            mul, add, shift = int_rq
            return int_epilogue(at(b, i, j, k), mul[k], add[k], shift, out_bits, out_signed)
        a = at(b, i, j, k) if zp is None else at(b, i, j, k) + zp[k]
        if out_mode == "acc":
            return a
        return epilogue(a, out_scale[k], out_bias[k], relu, out_mode, requant_scale, out_bits, out_signed, fma=fma,
                        recip=recip)

    attrs = dict(kernel_attrs(kind), **{LAYOUT_ATTR: out_layout})
    if out_layout == "NCHW":
        return te.compute((batch, kout, oh, ow), lambda b, k, i, j: body(b, i, j, k), name="out", attrs=attrs)
    if widen and out_mode == "requant" and int_rq is None and qmath.act_dtype(out_bits, out_signed) == "uint8":
        # uint8 codes: the rounding and clip of a stage of their own, one fcvtns and two saturating narrows
        # per 8 codes (NARROW_INTRIN) instead of round, max, min and convert on each 4 floats
        clip = []

        def unrounded(b, i, j, k):
            a = at(b, i, j, k) if zp is None else at(b, i, j, k) + zp[k]
            q, lo, hi = requant_unrounded(a, out_scale[k], out_bias[k], relu, requant_scale, out_bits, out_signed,
                                          fma=fma, recip=recip)
            clip.append((lo, hi))
            return q

        q = te.compute((batch, oh, ow, kout), unrounded, name="out_q")
        if clip[0] == (0, 255):
            return te.compute((batch, oh, ow, kout), lambda b, i, j, k: round_clip(q[b, i, j, k], 0, 255, "uint8"),
                              name="out", attrs=attrs)
    return te.compute((batch, oh, ow, kout), body, name="out", attrs=attrs)


def _ternary_w8(codes_t: te.Tensor, alpha_t: te.Tensor, seg: int, group_size: int) -> te.Tensor:
    """The int8 tile ``alpha_q * t`` from ``vnni.ternary_tiles(..., 8)`` codes and alpha codes."""
    nkb, taps, c4, lanes = (int(v) for v in codes_t.shape)

    def f(nb, tap, cb, i, q):
        g = (tap * seg + cb * 4) // group_size
        return (decode_2bit(codes_t[nb, tap, cb, i], q) * alpha_t[nb, g, i].astype("int32")).astype("int8")

    return te.compute((nkb, taps, c4, lanes, 4), f, name="w_int")


def _check(out_mode: str, requant_scale: float | None, groups: int, dilation: int | Sequence[int]) -> None:
    check_mode(out_mode, requant_scale)
    if groups != 1 or pair(dilation) != (1, 1):
        raise ValueError(f"the NEON conv takes groups=1, dilation 1; got groups={groups}, dilation={dilation}")


def _rq(mul: te.Tensor | None, add: te.Tensor | None, shift: int) -> tuple[te.Tensor, te.Tensor, int] | None:
    """The integer requantization operands (``rq_mul`` int32 [K], ``rq_add`` int64 [K], ``rq_shift``), if given."""
    if (mul is None) != (add is None):
        raise ValueError("the integer requantization needs both rq_mul and rq_add")
    return None if mul is None else (mul, add, int(shift))


def _kind(family: str, widen: bool) -> str:
    return f"{family}_conv2d_{'neon' if widen else 'dotprod'}"


def _ternary_conv(widen: bool) -> Callable[..., te.Tensor]:
    def compute(data: te.Tensor, codes_t: te.Tensor, alpha_t: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor,
                *, weight_shape: Sequence[int], strides: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                dilation: int | Sequence[int] = 1, groups: int = 1, group_size: int, zp: te.Tensor | None = None,
                in_layout: str = "NCHW", out_layout: str = "NCHW", relu: bool = False, out_mode: OutMode = "float",
                requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False,
                rq_mul: te.Tensor | None = None, rq_add: te.Tensor | None = None, rq_shift: int = 0,
                fma_epilogue: bool = False, recip_requant: bool = False) -> te.Tensor:
        """``kernels.ternary_conv2d`` (same result) with alpha folded into int8 weights: ``codes_t`` /
        ``alpha_t`` from ``vnni.ternary_tiles(..., 8)``; alpha codes <= 127, groups of a multiple of 4 along
        the input channels, groups=1, dilation 1."""
        _check(out_mode, requant_scale, groups, dilation)
        kout, cg, kh, kw = (int(v) for v in weight_shape)
        lay = qmath.group_layout((kout, cg, kh, kw), group_size)
        w8 = _ternary_w8(codes_t, alpha_t, lay.groups_per_segment * lay.group_size, lay.group_size)
        return conv2d_neon_tiled(_kind("ternary", widen), data, w8, zp, out_scale, out_bias, kernel=(kh, kw),
                                 strides=strides, padding=padding, in_layout=in_layout, out_layout=out_layout,
                                 widen=widen, relu=relu, out_mode=out_mode, requant_scale=requant_scale,
                                 out_bits=out_bits, out_signed=out_signed, int_rq=_rq(rq_mul, rq_add, rq_shift),
                                 fma=fma_epilogue, recip=recip_requant)

    return compute


def _int_conv(widen: bool) -> Callable[..., te.Tensor]:
    def compute(data: te.Tensor, w8: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
                weight_shape: Sequence[int], strides: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                dilation: int | Sequence[int] = 1, groups: int = 1, zp: te.Tensor | None = None,
                in_layout: str = "NCHW", out_layout: str = "NCHW", relu: bool = False, out_mode: OutMode = "float",
                requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False,
                fold_width: bool = False, rq_mul: te.Tensor | None = None, rq_add: te.Tensor | None = None,
                rq_shift: int = 0, fma_epilogue: bool = False, recip_requant: bool = False) -> te.Tensor:
        """``kernels.int_conv2d`` for per-channel int8 weights (|w| <= 127): ``w8`` from
        :func:`int_tile` (any number of input channels, rounded up with zero weights; ``fold_width``: the
        kernel columns folded into the channels)."""
        _check(out_mode, requant_scale, groups, dilation)
        _, _, kh, kw = (int(v) for v in weight_shape)
        return conv2d_neon_tiled(_kind("int", widen), data, w8, zp, out_scale, out_bias, kernel=(kh, kw),
                                 strides=strides, padding=padding, in_layout=in_layout, out_layout=out_layout,
                                 widen=widen, relu=relu, out_mode=out_mode, requant_scale=requant_scale,
                                 out_bits=out_bits, out_signed=out_signed, fold_width=fold_width,
                                 int_rq=_rq(rq_mul, rq_add, rq_shift), fma=fma_epilogue,
                                 recip=recip_requant)

    return compute


ternary_conv2d_dotprod = _ternary_conv(False)
ternary_conv2d_neon = _ternary_conv(True)
int_conv2d_dotprod = _int_conv(False)
int_conv2d_neon = _int_conv(True)
COMPUTE = {("ternary", False): ternary_conv2d_dotprod, ("ternary", True): ternary_conv2d_neon,
           ("int", False): int_conv2d_dotprod, ("int", True): int_conv2d_neon}


# --------------------------------------------------------------------------------------------
# Operands (compile time, numpy)
# --------------------------------------------------------------------------------------------

def zero_point_term(w_int: np.ndarray) -> np.ndarray:
    """``128 * sum(w[k])`` (int32 [K]): added to the accumulators of unsigned codes shifted to int8."""
    w = np.asarray(w_int, np.int64).reshape(w_int.shape[0], -1)
    return (ZERO_POINT * w.sum(1)).astype(np.int32)


def _zp(layer: LayerSpec, w_int: np.ndarray) -> dict:
    return {} if layer.act_signed else {"zp": zero_point_term(w_int)}


def ternary_operands(layer: LayerSpec) -> Operands:
    """The tile-ordered 2-bit codes and alpha codes (the stored bytes, reordered), the group size, and the
    zero-point term for unsigned codes."""
    tw = layer.weight
    k = tw.layout.out_channels
    ct, at = vnni.ternary_tiles(tw.packed_codes(), tw.alpha_q.numpy().reshape(k, -1), tw.layout, LANES)
    return [ct, at], {"group_size": tw.layout.group_size, **_zp(layer, tw.w_int.numpy())}


FOLD_MAX_CHANNELS = 32  # fold the kernel columns into the channels when kw * C is at most this


def folds_width(weight_shape: Sequence[int], widen: bool) -> bool:
    """Whether the widening kernel folds a layer's kernel columns into its channels: few input channels
    that are not a multiple of 8 (the RGB stem: 3 x 7 columns = 21 of 24 channels instead of 3 of 8)."""
    _, cin, _, kw = (int(v) for v in weight_shape)
    return widen and kw > 1 and cin % 8 != 0 and kw * cin <= FOLD_MAX_CHANNELS


def int_tile(w_int: np.ndarray, widen: bool, fold_width: bool = False) -> np.ndarray:
    """``vnni.int8_tiles(w, 8)``; for the widening kernel with the input channels rounded up to 8 (zeros);
    ``fold_width``: the weight as ``[K, kw * C, kh, 1]`` (channel ``s * C + c``) first."""
    w = np.asarray(w_int)
    if fold_width:
        k, c, kh, kw = w.shape
        w = np.ascontiguousarray(w.transpose(0, 3, 1, 2)).reshape(k, kw * c, kh, 1)
    step = 8 if widen else 4
    pad = -w.shape[1] % step
    if pad:
        w = np.concatenate([w, np.zeros((w.shape[0], pad, *w.shape[2:]), w.dtype)], axis=1)
    return vnni.int8_tiles(w, LANES)


def int_operands(widen: bool) -> Callable[[LayerSpec], Operands]:
    """The int8 weight tile and the zero-point term for unsigned codes."""
    def operands(layer: LayerSpec) -> Operands:
        w = layer.weight.w_int.numpy()
        fold = folds_width(w.shape, widen)
        return [int_tile(w, widen, fold)], {**_zp(layer, w), **({"fold_width": True} if fold else {})}

    return operands


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------

def _tbl_decode(sch: tvm.s_tir.Schedule, wb: tvm.s_tir.schedule.SBlockRV) -> None:
    tensorize_decode(sch, wb, DECODE_INTRIN, DECODE64_INTRIN)


def _nibble_decode(sch: tvm.s_tir.Schedule, wb: tvm.s_tir.schedule.SBlockRV) -> None:
    tensorize_decode(sch, wb, NIBBLE_INTRIN, NIBBLE64_INTRIN)


def _widened(sch: tvm.s_tir.Schedule) -> bool:
    return maybe_block(sch, "acc_sum") is not None


def schedule_conv2d_neon(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """Register tile of ``mb`` output columns x ``nb`` blocks of 4 output channels (int32x4 accumulators in
    registers) under the reduction over (r, s, channel steps), the step tensorized (``sdot``, or the
    widening pair over 8 channels); the int8 weight tile of a block of channels is decoded once and
    reused by every output pixel; the padded, shifted NHWC input is made once."""
    register()
    widen = _widened(sch)
    acc = sch.get_sblock("acc")
    lps = sch.get_loops(acc)
    if widen:
        b, i, j, k, h, ry, c8, rs, rq = lps
    else:
        b, i, j, k, ry, rx, rc = lps
    ow, kout = (int(sch.get(lp).extent) for lp in (j, k))
    lane_step = not widen and int(sch.get(rc).extent) % 16 == 0
    # accumulators + the weights of a step + activations within the 32 q registers
    mb = tile(ow, (2, 1) if widen else (8, 7, 4, 2, 1) if lane_step else (4, 8, 7, 2, 14, 1), pick)
    # blocks of 8 channels; the widening kernel's 1-pixel tile (odd widths) takes 16 channels, so that the
    # activation loads and the loop are shared by twice the multiplies (it is bound by the multiplies again)
    if widen and pick is None and mb == 1 and (kout // LANES) % 2 == 0:
        nb = 2
    else:
        nb = tile(kout // LANES, (2, 1) if not widen and not lane_step else (1,), pick)
    jo, ji = sch.split(j, [None, mb])
    no, nm, nh, ni = sch.split(k, [None, nb, 2, 4])
    if widen:  # two 8-channel steps an iteration where the channels allow (half the loop control)
        c8o, c8i = sch.split(c8, [None, 2 if int(sch.get(c8).extent) % 2 == 0 else 1])
        sch.reorder(no, b, i, jo, ry, c8o, c8i, ji, nm, nh, ni, h, rs, rq)
        sch.unroll(c8i)
    elif lane_step:  # 16 channels a step: one activation load, four by-element sdots
        co, ci = sch.split(rc, [None, 16])
        sch.reorder(no, b, i, jo, ry, rx, co, ji, nm, nh, ni, ci)
    else:
        co, ci = sch.split(rc, [None, 4])
        sch.reorder(no, b, i, jo, ry, rx, co, ji, nm, nh, ni, ci)
    out = sch.get_sblock("out")
    acc_sum = maybe_block(sch, "acc_sum")
    if acc_sum is not None:  # the widening kernel's two partial sums per channel
        sch.reverse_compute_at(acc_sum, jo, preserve_unit_loops=True)
        sch.set_scope(acc_sum, 0, "local")
    out_q = maybe_block(sch, "out_q")
    if out_q is not None:  # the uint8 epilogue's floats before the rounding, in registers
        sch.reverse_compute_at(out_q, jo, preserve_unit_loops=True)
        sch.set_scope(out_q, 0, "local")
    register_tile(sch, acc, out_at=jo, red_at=ry, no=no, ni=ni,
                  step=WIDEN_INTRIN if widen else SDOT_LANE_INTRIN[16] if lane_step else sdot.register()[1],
                  decode=_nibble_decode if widen else _tbl_decode, unrolled=(ji, nm, nh), init_loops=2 if widen else 1)
    if acc_sum is not None:  # one addp per 4 channels
        sl = sch.get_loops(acc_sum)
        ko, ki = sch.split(sl[-2], [None, 4])
        sch.unroll(sl[-3])
        sch.unroll(ko)
        sum_init = sch.decompose_reduction(acc_sum, ki)
        sch.vectorize(sch.get_loops(sum_init)[-1])
        sch.tensorize(ki, ADDP_INTRIN)
    ol = sch.get_loops(out)
    nchw = str(sch.get(out).annotations.get(LAYOUT_ATTR, "NCHW")) == "NCHW"
    sch.unroll(ol[-1] if nchw else ol[-2])
    if out_q is not None:
        ql = sch.get_loops(out_q)
        sch.unroll(ql[-2])
        sch.vectorize(ql[-1])
        ko, ki = sch.split(ol[-1], [None, 8])
        sch.unroll(ko)
        sch.tensorize(ki, NARROW_INTRIN)
    elif not nchw:
        sch.vectorize(ol[-1])
    xl = sch.get_loops(sch.get_sblock("x_nhwc"))
    rows = sch.fuse(xl[0], xl[1])
    sch.parallel(rows)
    if widen:  # one padded, shifted row at a time, then its words twice: 4 (or 2) words a step
        src = maybe_block(sch, "x_row") or maybe_block(sch, "x_pad")
        sch.compute_at(src, rows, preserve_unit_loops=True)
        sl = sch.get_loops(src)
        if str(sch.get(src).name_hint) == "x_row":  # the folded stem: a column's channels together
            cin = int(sch.get(src).annotations[FOLD_ATTR])
            sch.unroll(sch.split(sl[-1], [None, cin])[1])
        elif int(sch.get(sl[-1]).extent) % 16 == 0:
            sch.vectorize(sch.split(sl[-1], [None, 16])[1])
        words = 4 if int(sch.get(xl[-3]).extent) % 4 == 0 else 2
        sch.tensorize(sch.split(xl[-3], [None, words])[1], DUP_INTRIN[words])
    elif int(sch.get(xl[-1]).extent) % 8 == 0:
        sch.vectorize(xl[-1])


def _schedule(sch: tvm.s_tir.Schedule, _target: TargetLike, pick: Pick | None = None) -> None:
    schedule_conv2d_neon(sch, pick)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def has_dotprod(target: tvm.target.Target | None) -> bool:
    """An aarch64 target with the dot-product extension (+dotprod)."""
    return is_aarch64(target) and bool(target_has_features("dotprod", target))


def _fits(widen: bool) -> Callable[[LayerSpec, tvm.target.Target | None], str | None]:
    def fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
        if not is_aarch64(target):
            return "the target is not aarch64"
        if not widen and not has_dotprod(target):
            return "the target has no aarch64 dot product (+dotprod)"
        if layer.op != "conv2d":
            return f"no NEON kernel for {layer.op}"
        if layer.act_bits > 8:
            return f"{layer.act_bits}-bit activation codes"
        shape = tuple(int(v) for v in layer.attrs["weight_shape"])
        if shape[0] % LANES:
            return f"K={shape[0]}: need K % {LANES} == 0"
        if int(layer.attrs.get("groups", 1)) != 1:
            return f"groups={layer.attrs.get('groups')}"
        if pair(layer.attrs.get("dilation", 1)) != (1, 1):
            return f"dilation {pair(layer.attrs.get('dilation', 1))}"
        if layer.family == "ternary":
            tw = layer.weight
            if tw.layout.along != "in" or tw.layout.group_size % 4:
                return (f"ternary groups of {tw.layout.group_size} along {tw.layout.along!r}: need input channels,"
                        " size % 4 == 0")
            if widen and shape[1] % 8:
                return f"C={shape[1]}: the widening kernel takes ternary layers with C % 8 == 0"
            top = int(tw.alpha_q.max()) if tw.alpha_q.numel() else 0
            if top > MAX_WEIGHT:
                return f"alpha codes up to {top} > {MAX_WEIGHT}: alpha * t is no int8 (quantize with alpha_bits=7)"
            return None
        if layer.weight.group_size != 0:
            return f"int{layer.weight.bits} groups of {layer.weight.group_size}: need one scale per output channel"
        w = layer.weight.w_int
        if int(w.abs().max()) > MAX_WEIGHT:
            return f"int weights up to {int(w.abs().max())}: need |w| <= {MAX_WEIGHT}"
        return None

    return fits


# measured on the emulated Pi 5 / Pi 4 (scripts/bench_arm.py): before kernels.sdot and the generic kernels
PREFERENCE = 30
for _widen, _isa in ((False, "dotprod"), (True, "neon")):
    for _family, _operands in (("ternary", ternary_operands), ("int", int_operands(_widen))):
        register_kernel(Kernel(_kind(_family, _widen), family=_family, op="conv2d", isa=_isa,
                               compute=COMPUTE[(_family, _widen)],
                               schedule=_schedule, operands=_operands, fits=_fits(_widen),
                               preference=PREFERENCE + (0 if _widen else 1), intrinsics=register, layouts=LAYOUTS,
                               cheap_epilogues=True))
