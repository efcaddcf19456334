"""The pieces every tvm_lowbit kernel shares: the kernel marker, the output modes and the qmath epilogue,
the 2-bit and 4-bit weight decodes, padding and output-size arithmetic, the integer conv/dense with the
epilogue that the generic kernels of every weight format share, and the tiling helpers of the schedules.

The math is :mod:`tvm_lowbit.qmath`, bit for bit:

* ``acc`` sums ``int32(x) * int32(w)`` exactly in int32;
* the epilogue is ``float32(float64(float32(acc)) * float64(scale) + float64(bias))``, optional ReLU,
  and optionally the requantization ``clip(nearbyint(y / requant_scale), lo, hi)`` in float32
  (``nearbyint`` rounds half to even like ``np.round``; ``tirx.round`` rounds half away from zero).

Every compute takes and returns ``te.Tensor`` so it works both in ``te.create_prim_func`` and in
Relax ``BlockBuilder.emit_te`` (where shapes and index variables may be int64).  The output
compute carries the block annotation ``{"tvm_lowbit.kernel": <name>}``; :func:`make_prim_func`
also sets it as a PrimFunc attribute (pass ``primfunc_attrs=kernel_attrs(name)`` to ``emit_te``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tvm
from tvm import te, tirx

from tvm_lowbit import qmath

KERNEL_ATTR = "tvm_lowbit.kernel"

# TVM 0.27 gives tirx.round, floor, exp ... the TVectorizable attribute but not tirx.nearbyint, so VectorizeLoop
# scalarizes every vectorized loop that rounds with it: per-lane gathers and byte scatters (quantize_act ran 8x
# slower on the x86 host: 0.18 against 0.022 ms of one-thread CPU for 56x56x64).  It lowers to llvm.nearbyint,
# which takes vectors with the same rounding, so the attribute changes the instructions, never a result.
if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
    tvm.ir.Op.get("tirx.nearbyint").set_attr("TVectorizable", True)
OutMode = Literal["acc", "float", "requant"]
OUT_MODES: tuple[str, ...] = ("acc", "float", "requant")
# |w| bound for exact int8 dot products with uint8 activations (AVX2 vpmaddubsw pair sums: 2 * 255 * 64 fits
# int16); the 4-bit power-of-two codes (|w| <= 2^6) and ternary values qualify
MAX_WEIGHT = 64
TargetLike = tvm.target.Target | str | dict | None


@dataclass(frozen=True)
class LayerSpec:
    """What the kernels need to know of a quantized layer to say whether they fit and to build their
    operands (the lowering pass fills it in)."""

    name: str
    op: str                     # "conv2d" | "dense"
    family: str                 # the weight's kernel family (formats.kernel_family): "ternary" | "pow2" | "int"
    weight: Any                 # the decomposed weight (qmath.TernaryWeight | Pow2Weight | IntWeight)
    attrs: Mapping[str, Any]    # weight_shape, and for conv2d strides, padding, dilation, groups
    act_bits: int               # the input activation codes
    act_signed: bool
    act_shape: tuple[int, ...]  # shape of the input activation codes

    @property
    def rows(self) -> int:
        """Activation rows of a dense layer (batch x tokens): every input dimension but the last."""
        return int(np.prod(self.act_shape[:-1]))


def kernel_attrs(name: str) -> dict[str, str]:
    """The PrimFunc attributes that identify a kernel (for ``emit_te(primfunc_attrs=)``)."""
    return {KERNEL_ATTR: name}


def make_prim_func(inputs: Sequence[te.Tensor], out: te.Tensor, name: str) -> tirx.PrimFunc:
    """``te.create_prim_func`` plus the kernel marker and a global symbol named after the kernel."""
    kind = str(out.op.attrs[KERNEL_ATTR])
    return te.create_prim_func([*inputs, out]).with_attr(KERNEL_ATTR, kind).with_attr("global_symbol", name)


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """``v`` as (height, width)."""
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def check_mode(out_mode: str, requant_scale: float | None) -> None:
    """A clear error for an unknown output mode or a "requant" without a positive scale."""
    if out_mode not in OUT_MODES:
        raise ValueError(f"out_mode must be one of {OUT_MODES}, got {out_mode!r}")
    if out_mode == "requant" and (requant_scale is None or not requant_scale > 0):
        raise ValueError(f"out_mode='requant' needs a positive requant_scale, got {requant_scale!r}")


def epilogue(acc: tirx.PrimExpr, scale: tirx.PrimExpr, bias: tirx.PrimExpr, relu: bool, out_mode: str,
             requant_scale: float | None, out_bits: int, out_signed: bool, fma: bool = False,
             recip: bool = False) -> tirx.PrimExpr:
    """qmath.epilogue (+ qmath.quantize_act for "requant") of one int32 accumulator.  ``fma``: ``y`` as one
    float32 fused multiply-add (``llvm.fma``, one rounding), which equals the reference where
    :func:`.requant.fma_unexact` proves it for the layer; the ReLU then merges into the requantization's
    lower clip (``round`` and ``clip`` are monotone: ``clip(round(max(y, 0) / s)) == clip(max(round(y / s),
    0))``).  ``recip``: ``y / requant_scale`` without a division: ``q0 = y * inv``, ``r = fma(-q0, rs, y)``,
    ``q = fma(r, inv, q0)`` (where :func:`.requant.recip_unexact` proves its codes equal the division's)."""
    if out_mode == "float":
        y = _float_y(acc, scale, bias, fma)
        return tirx.max(y, tirx.const(0.0, "float32")) if relu else y
    q, lo, hi = requant_unrounded(acc, scale, bias, relu, requant_scale, out_bits, out_signed, fma, recip)
    return round_clip(q, lo, hi, qmath.act_dtype(out_bits, out_signed))


def _float_y(acc: tirx.PrimExpr, scale: tirx.PrimExpr, bias: tirx.PrimExpr, fma: bool) -> tirx.PrimExpr:
    if fma:
        return tirx.call_llvm_pure_intrin("float32", "llvm.fma", acc.astype("float32"), scale.astype("float32"),
                                          bias.astype("float32"))
    # float32(acc) first: for |acc| > 2^24 this rounding is part of the reference math
    y = acc.astype("float32").astype("float64") * scale.astype("float64") + bias.astype("float64")
    return y.astype("float32")


def requant_unrounded(acc: tirx.PrimExpr, scale: tirx.PrimExpr, bias: tirx.PrimExpr, relu: bool,
                      requant_scale: float | None, out_bits: int, out_signed: bool, fma: bool = False,
                      recip: bool = False) -> tuple[tirx.PrimExpr, int, int]:
    """The requantizing :func:`epilogue` up to its rounding: ``(q, lo, hi)``, the output code being
    ``round_clip(q, lo, hi, dtype)`` (a kernel may round and clip in an instruction of its own)."""
    y = _float_y(acc, scale, bias, fma)
    if relu and not fma:
        y = tirx.max(y, tirx.const(0.0, "float32"))
    lo, hi = qmath.act_range(out_bits, out_signed)
    if relu and fma:
        lo = max(lo, 0)
    if recip:
        return recip_quotient(y, requant_scale), lo, hi
    return y / tirx.const(float(np.float32(requant_scale)), "float32"), lo, hi


def recip_quotient(y: tirx.PrimExpr, divisor: float) -> tirx.PrimExpr:
    """``y / divisor`` without a division, as :func:`.requant.recip_quotient`: ``q0 = y * inv``,
    ``r = fma(-q0, divisor, y)``, ``q = fma(r, inv, q0)`` with ``inv = float32(1 / divisor)``."""
    rs = tirx.const(float(np.float32(divisor)), "float32")
    inv = tirx.const(float(np.float32(1) / np.float32(divisor)), "float32")
    q0 = y * inv
    r = tirx.call_llvm_pure_intrin("float32", "llvm.fma", q0 * tirx.const(-1.0, "float32"), rs, y)
    return tirx.call_llvm_pure_intrin("float32", "llvm.fma", r, inv, q0)


def round_clip(q: tirx.PrimExpr, lo: int, hi: int, dtype: str) -> tirx.PrimExpr:
    """``clip(nearbyint(q), lo, hi)`` as ``dtype``: the last step of the requantizing epilogue."""
    q = tirx.min(tirx.max(tirx.nearbyint(q), tirx.const(float(lo), "float32")), tirx.const(float(hi), "float32"))
    return q.astype(dtype)


def int_epilogue(acc: tirx.PrimExpr, mul: tirx.PrimExpr, add: tirx.PrimExpr, shift: int, out_bits: int,
                 out_signed: bool) -> tirx.PrimExpr:
    """The exact integer form of the requantizing epilogue (:mod:`.requant`) of one int32 accumulator:
    ``clip((int64(acc) * mul + add) >> shift, lo, hi)`` with ``shift >= 32``, written as the high word
    ``(... >> 32)`` (exact in int32: the sum fits int64) shifted by ``shift - 32`` so that aarch64 takes
    ``smull`` + ``addhn`` + ``sshr``; ``mul`` int32, ``add`` int64 per channel."""
    if shift < 32:
        raise ValueError(f"the integer requantization takes a shift >= 32, got {shift}")
    wide = acc.astype("int64") * mul.astype("int64") + add
    g = (wide >> tirx.const(32, "int64")).astype("int32")
    if shift > 32:
        g = g >> tirx.const(shift - 32, "int32")
    lo, hi = qmath.act_range(out_bits, out_signed)
    g = tirx.min(tirx.max(g, tirx.const(lo, "int32")), tirx.const(hi, "int32"))
    return g.astype(qmath.act_dtype(out_bits, out_signed))


def decode_2bit(byte: tirx.PrimExpr, q: tirx.PrimExpr) -> tirx.PrimExpr:
    """The ternary value (int32) of field ``q`` (bits 2q..2q+1) of a code byte of ``qmath.pack_2bit``."""
    code = (byte.astype("int32") >> (q * 2).astype("int32")) & 3
    return (code ^ 2) - 2  # 0b00 -> 0, 0b01 -> 1, 0b11 -> -1: sign extension of the 2-bit field


def pow2_int8(codes: te.Tensor, row: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
    """Element j of a row of 4-bit power-of-two codes as int8 ``sign << e`` (code 0: zero)."""
    c = (codes[row, j // 2].astype("int32") >> ((j % 2) * 4).astype("int32")) & 15
    idx = c & 7
    mag = tirx.if_then_else(idx == 0, 0, tirx.shift_left(tirx.const(1, "int32"), tirx.max(idx - 1, 0)))
    return tirx.if_then_else(c >= 8, 0 - mag, mag).astype("int8")


def layout_reader(data: te.Tensor, layout: str) -> tuple[int, int, int, int, Callable[..., tirx.PrimExpr]]:
    """``(batch, channels, height, width, get)`` of an activation tensor in ``layout`` (``"NCHW"`` or
    ``"NHWC"``); ``get(b, c, h, w)`` reads element (b, c, h, w) in either layout."""
    if layout == "NCHW":
        batch, chans, height, width = (int(v) for v in data.shape)
        return batch, chans, height, width, lambda b, c, h, w: data[b, c, h, w]
    batch, height, width, chans = (int(v) for v in data.shape)
    return batch, chans, height, width, lambda b, c, h, w: data[b, h, w, c]


def conv_out_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Output height (or width) of a convolution with symmetric padding ``pad``."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def pad_codes(data: te.Tensor, kernel: tuple[int, int], strides: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int]) -> tuple[te.Tensor, int, int]:
    """Zero-pad NCHW activation codes (a zero code is a zero activation, so this pads the input) and
    return the padded tensor with the output height and width of the convolution."""
    batch, chans, height, width = data.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, strides, padding, dilation
    oh = conv_out_size(int(height), kh, sh, ph, dh)
    ow = conv_out_size(int(width), kw, sw, pw, dw)
    if not (ph or pw):
        return data, oh, ow
    hp, wp = int(height) + 2 * ph, int(width) + 2 * pw
    xp = te.compute(
        (batch, chans, hp, wp),
        lambda b, c, h, w: tirx.if_then_else(
            tirx.all(h >= ph, h < ph + int(height), w >= pw, w < pw + int(width)),
            data[b, c, h - ph, w - pw], tirx.const(0, data.dtype)),
        name="pad")
    return xp, oh, ow


def conv_dims(data: te.Tensor, weight_shape: Sequence[int], groups: int) -> tuple[int, int, int, int]:
    """(K, Cg, R, S) of a conv weight, checked against the NCHW input and ``groups``."""
    kout, cg, kh, kw = (int(v) for v in weight_shape)
    chans = data.shape[1]
    if int(chans) != cg * groups or kout % groups:
        raise ValueError(f"conv shapes do not match: C={chans}, weight {tuple(weight_shape)}, groups={groups}")
    return kout, cg, kh, kw


def dense_dims(data: te.Tensor, weight_shape: Sequence[int]) -> tuple[int, int]:
    """(K, C) of a linear weight, checked against the input's last dimension."""
    kout, cin = (int(v) for v in weight_shape)
    if int(data.shape[-1]) != cin:
        raise ValueError(f"data has {data.shape[-1]} features, weight {tuple(weight_shape)}")
    return kout, cin


def dot_conv_unsupported(weight_shape: Sequence[int], strides: int | Sequence[int], dilation: int | Sequence[int],
                         groups: int, act_dtype: str, lanes: int = 8) -> str | None:
    """Why the int8 dot-product conv kernels (``lanes`` output channels per step: 8 for AVX2, 4 for sdot)
    cannot run this layer (None: they can); the weight-format checks come on top."""
    kout, cg = int(weight_shape[0]), int(weight_shape[1])
    if str(act_dtype) != "uint8":
        return f"activation codes are {act_dtype}, the dot-product kernels take uint8"
    if groups != 1:
        return f"groups={groups}"
    if pair(dilation) != (1, 1):
        return f"dilation {pair(dilation)}"
    if kout % lanes or cg % 4:
        return f"K={kout}, C={cg}: need K % {lanes} == 0 and C % 4 == 0"
    return None


def int8_dot_unsupported(layer: LayerSpec, lanes: int) -> str | None:
    """Why the int8 dot-product kernels with ``lanes`` output channels per step (AVX2: 8, sdot: 4) cannot
    run ``layer`` exactly (None: they can): uint8 activation codes, 4-bit power-of-two codes
    (|w| <= 2^6 keeps vpmaddubsw's pair sums exact) or ternary groups of a multiple of 4."""
    act = qmath.act_dtype(layer.act_bits, layer.act_signed)
    if act != "uint8":
        return f"activation codes are {act}, the dot-product kernels take uint8"
    tw = layer.weight
    if layer.family == "pow2" and tw.code_bits != 4:
        return f"{tw.code_bits}-bit power-of-two codes: need 4-bit codes (|w| <= {MAX_WEIGHT})"
    if layer.family not in ("ternary", "pow2"):
        return f"no dot-product kernel for {layer.family} weights"
    shape = tuple(layer.attrs["weight_shape"])
    if layer.op == "dense":
        kout, cin = shape
        if kout % lanes or cin % 4:
            return f"K={kout}, C={cin}: need K % {lanes} == 0 and C % 4 == 0"
        if layer.family == "ternary" and tw.layout.group_size % 4:
            return f"ternary groups of {tw.layout.group_size}: need a multiple of 4"
        return None
    why = dot_conv_unsupported(shape, layer.attrs.get("strides", 1), layer.attrs.get("dilation", 1),
                               layer.attrs.get("groups", 1), "uint8", lanes=lanes)
    if why is None and layer.family == "ternary" and (tw.layout.along != "in" or tw.layout.group_size % 4):
        why = (f"ternary groups of {tw.layout.group_size} along the {tw.layout.along!r} axis: need groups along "
               "the input channels, size % 4 == 0")
    return why


def conv_with_epilogue(kind: str, data: te.Tensor, weight_shape: tuple[int, int, int, int],
                       strides: int | Sequence[int], padding: int | Sequence[int], dilation: int | Sequence[int],
                       groups: int, term: Callable[..., tirx.PrimExpr], out_scale: te.Tensor, out_bias: te.Tensor,
                       relu: bool, out_mode: str, requant_scale: float | None, out_bits: int,
                       out_signed: bool) -> te.Tensor:
    """The integer conv every weight format shares: ``acc[b, k, i, j] = sum over (c, r, s) of
    term(int32 code, k, c, r, s)`` exactly in int32 (``term`` is the format's weight contribution), then
    the qmath epilogue; ``out_mode="acc"`` returns the accumulators.  ``padding`` is symmetric (ph, pw)."""
    kout, cg, kh, kw = weight_shape
    (sh, sw), (dh, dw) = pair(strides), pair(dilation)
    batch = data.shape[0]
    xp, oh, ow = pad_codes(data, (kh, kw), (sh, sw), pair(padding), (dh, dw))
    kpg = kout // groups
    rc = te.reduce_axis((0, cg), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (batch, kout, oh, ow),
        lambda b, k, i, j: te.sum(
            term(xp[b, (k // kpg) * cg + rc, i * sh + ry * dh, j * sw + rx * dw].astype("int32"), k, rc, ry, rx),
            axis=[rc, ry, rx]),
        name="acc", attrs=kernel_attrs(kind) if out_mode == "acc" else None)
    if out_mode == "acc":
        return acc
    return te.compute(
        (batch, kout, oh, ow),
        lambda b, k, i, j: epilogue(acc[b, k, i, j], out_scale[k], out_bias[k], relu, out_mode,
                                    requant_scale, out_bits, out_signed),
        name="out", attrs=kernel_attrs(kind))


def dense_with_epilogue(kind: str, data: te.Tensor, kout: int, cin: int, term: Callable[..., tirx.PrimExpr],
                        out_scale: te.Tensor, out_bias: te.Tensor, relu: bool, out_mode: str,
                        requant_scale: float | None, out_bits: int, out_signed: bool) -> te.Tensor:
    """The integer dense every weight format shares: ``acc[..., k] = sum over c of term(int32 code, k, c)``
    exactly in int32, then the qmath epilogue; ``out_mode="acc"`` returns the accumulators."""
    lead = list(data.shape[:-1])
    rc = te.reduce_axis((0, cin), name="rc")
    acc = te.compute(
        (*lead, kout),
        lambda *idx: te.sum(term(data[(*idx[:-1], rc)].astype("int32"), idx[-1], rc), axis=rc),
        name="acc", attrs=kernel_attrs(kind) if out_mode == "acc" else None)
    if out_mode == "acc":
        return acc
    return te.compute(
        (*lead, kout),
        lambda *idx: epilogue(acc[idx], out_scale[idx[-1]], out_bias[idx[-1]], relu, out_mode,
                              requant_scale, out_bits, out_signed),
        name="out", attrs=kernel_attrs(kind))


def quantize_act(x: te.Tensor, scale: float, bits: int, signed: bool,
                 recip_clamp: tuple[float, float] | None = None) -> te.Tensor:
    """float32 -> activation codes: ``clip(nearbyint(x / scale), lo, hi)`` in float32 (qmath.quantize_act_np).
    ``recip_clamp``: ``(L, H)`` of ``requant.quantize_clamp``: ``x`` clamped to it instead of the codes to
    ``[lo, hi]``, and the division as :func:`recip_quotient` (where ``requant.quantize_recip_unexact`` proves
    the codes equal)."""
    lo, hi = qmath.act_range(bits, signed)
    s = tirx.const(float(np.float32(scale)), "float32")

    def f(*idx):
        if recip_clamp is not None:
            low, high = (tirx.const(float(np.float32(v)), "float32") for v in recip_clamp)
            q = tirx.nearbyint(recip_quotient(tirx.min(tirx.max(x[idx].astype("float32"), low), high), scale))
            return q.astype(qmath.act_dtype(bits, signed))
        return round_clip(x[idx].astype("float32") / s, lo, hi, qmath.act_dtype(bits, signed))

    return te.compute(x.shape, f, name="quantize_act", attrs=kernel_attrs("quantize_act"))


# --------------------------------------------------------------------------------------------
# Schedule helpers
# --------------------------------------------------------------------------------------------

def target_kind(target: TargetLike) -> str:
    """"x86", "aarch64" or "armv7": decides the register tile (AVX2 16 ymm / A64 32 q / A32 16 q)."""
    if target is None:
        return "x86"
    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    triple = str(t.attrs.get("mtriple", ""))
    if triple.startswith("aarch64") or triple.startswith("arm64"):
        return "aarch64"
    if triple.startswith("arm"):
        return "armv7"
    return "x86"


def divisor(n: int, prefer: Sequence[int]) -> int:
    """The first of ``prefer`` that divides n (so that loops split without tail predicates)."""
    for d in prefer:
        if n % d == 0:
            return d
    return 1


# A tile-size chooser: given the candidate factors (the default first), return one of them. The default
# schedules take the first; the tuner (tvm_lowbit.tune) passes a MetaSchedule sample_categorical.
Pick = Callable[[list[int]], object]


def tile(n: int, prefer: Sequence[int], pick: Pick | None) -> object:
    """A tile factor of ``n`` from ``prefer``: the first divisor, or the one ``pick`` samples."""
    if pick is None:
        return divisor(n, prefer)
    return pick([d for d in prefer if n % d == 0] or [1])


def maybe_block(sch: tvm.s_tir.Schedule, name: str) -> tvm.s_tir.schedule.SBlockRV | None:
    """The block called ``name``, or None when the kernel has none."""
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - get_sblock raises a ScheduleError subclass when the block is absent
        return None


def kernel_name(func: tirx.PrimFunc) -> str | None:
    """The kernel marker: a PrimFunc attribute, else the annotation of the output block."""
    if func.attrs is not None and KERNEL_ATTR in func.attrs:
        return str(func.attrs[KERNEL_ATTR])
    sch = tvm.s_tir.Schedule(func)
    for name in ("out", "acc", "quantize_act"):  # the blocks our computes mark
        blk = maybe_block(sch, name)
        if blk is not None and KERNEL_ATTR in sch.get(blk).annotations:
            return str(sch.get(blk).annotations[KERNEL_ATTR])
    return None


def weight_blocks(sch: tvm.s_tir.Schedule, name: str) -> list:
    """The weight-decode block(s): ``name``, or ``name_v0, name_v1, ...`` for a multi-output TE stage."""
    blk = maybe_block(sch, name)
    if blk is not None:
        return [blk]
    out, i = [], 0
    while (blk := maybe_block(sch, f"{name}_v{i}")) is not None:
        out.append(blk)
        i += 1
    if not out:
        raise ValueError(f"kernel has no weight stage {name!r}")
    return out


def accumulate_locally(sch: tvm.s_tir.Schedule, acc, loop) -> None:
    """Keep the int32 accumulator tile under ``loop`` in a local buffer (registers after unrolling)."""
    out = maybe_block(sch, "out")
    if out is not None:  # the epilogue consumes acc tile by tile
        sch.reverse_compute_at(out, loop, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
    else:  # out_mode="acc": accumulate locally, then copy the tile out
        copy = sch.cache_write(acc, 0, "local")
        sch.reverse_compute_at(copy, loop, preserve_unit_loops=True)


def tensorize_decode(sch: tvm.s_tir.Schedule, block: tvm.s_tir.schedule.SBlockRV, intrin: str, intrin64: str) -> None:
    """Tensorize a weight-decode block's last two loops with ``intrin``, or with ``intrin64`` (the same decode
    in int64 index arithmetic) where the loops are int64 (Relax's ``emit_te`` widens the decode's math)."""
    loop = sch.get_loops(block)[-2]
    sch.tensorize(loop, intrin64 if str(sch.get(loop).loop_var.ty) == "int64" else intrin)


def register_tile(sch: tvm.s_tir.Schedule, acc: tvm.s_tir.schedule.SBlockRV, *, out_at: tvm.s_tir.schedule.LoopRV,
                  red_at: tvm.s_tir.schedule.LoopRV, no: tvm.s_tir.schedule.LoopRV, ni: tvm.s_tir.schedule.LoopRV,
                  step: str, decode: Callable[[tvm.s_tir.Schedule, tvm.s_tir.schedule.SBlockRV], None],
                  unrolled: Sequence[tvm.s_tir.schedule.LoopRV], init_loops: int = 1) -> tvm.s_tir.schedule.SBlockRV:
    """The shared tail of the register-tiled dot-product schedules (:mod:`.vnni`, :mod:`.neon`, :mod:`.a76`),
    once the accumulator's loops are in order: the output stage under ``out_at``, the accumulators in
    registers, the weight tile ``w_int`` (where the kernel decodes one) made under ``no``, the block of output
    channels (once per block, reused by every output pixel) by ``decode``, ``no`` parallel, the reduction's init
    split off at ``red_at`` with its last ``init_loops`` loops fused and vectorized, the step ``ni``
    tensorized with ``step``, the ``unrolled`` loops (the register tile) unrolled; returns the output block."""
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, out_at, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    wb = maybe_block(sch, "w_int")
    if wb is not None:
        sch.compute_at(wb, no, preserve_unit_loops=True)
        decode(sch, wb)
    sch.parallel(no)
    init = sch.decompose_reduction(acc, red_at)
    il = sch.get_loops(init)
    sch.vectorize(sch.fuse(*il[-init_loops:]) if init_loops > 1 else il[-1])
    sch.tensorize(ni, step)
    for loop in unrolled:
        sch.unroll(loop)
    return out


def schedule_elementwise(sch: tvm.s_tir.Schedule, block_name: str) -> None:
    """Parallel over the outer loops, vectorized over the innermost."""
    blk = sch.get_sblock(block_name)
    lps = sch.get_loops(blk)
    if len(lps) > 1:
        sch.parallel(sch.fuse(*lps[:-1]))
    inner = lps[-1]
    extent = int(sch.get(inner).extent)
    if extent >= 8:
        _, vi = sch.split(inner, [None, divisor(extent, (16, 8, 4, 2))])
        sch.vectorize(vi)
