"""TE compute definitions of the grouped-ternary conv2d / dense layers and of activation quantization.

The math is :mod:`tvm_lowbit.qmath`, bit for bit:

* the 2-bit codes (grouped layout, four per byte) and the per-group ``alpha_q`` are expanded into
  integer weights ``w_int = alpha_q * t`` (int16) in a separate ``w_int`` stage, so that a schedule can
  keep the decode outside the multiply-accumulate loop (decoding inside it is ~5x slower);
* ``acc`` sums ``int32(x) * int32(w_int)`` exactly in int32;
* the epilogue is ``float32(float64(float32(acc)) * float64(scale) + float64(bias))``, optional ReLU,
  and optionally the requantization ``clip(nearbyint(y / requant_scale), lo, hi)`` in float32
  (``nearbyint`` rounds half to even like ``np.round``; ``tirx.round`` rounds half away from zero).

Every function takes and returns ``te.Tensor`` so it works both in ``te.create_prim_func`` and in
Relax ``BlockBuilder.emit_te`` (where shapes and index variables may be int64).  The output
compute carries the block annotation ``{"tvm_lowbit.kernel": <name>}``; :func:`make_prim_func`
also sets it as a PrimFunc attribute (pass ``primfunc_attrs=kernel_attrs(name)`` to ``emit_te``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import tvm
from tvm import te, tirx

from tvm_lowbit import qmath

KERNEL_ATTR = "tvm_lowbit.kernel"
OutMode = Literal["acc", "float", "requant"]
OUT_MODES: tuple[str, ...] = ("acc", "float", "requant")


def kernel_attrs(name: str) -> dict[str, str]:
    """The PrimFunc attributes that identify a kernel of this module (for ``emit_te(primfunc_attrs=)``)."""
    return {KERNEL_ATTR: name}


def make_prim_func(inputs: Sequence[te.Tensor], out: te.Tensor, name: str) -> tirx.PrimFunc:
    """``te.create_prim_func`` plus the kernel marker and a global symbol named after the kernel."""
    kind = str(out.op.attrs[KERNEL_ATTR])
    return te.create_prim_func([*inputs, out]).with_attr(KERNEL_ATTR, kind).with_attr("global_symbol", name)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def _expand_weight(codes: te.Tensor, alpha_q: te.Tensor, lay: qmath.GroupLayout) -> te.Tensor:
    """``w_int = alpha_q * t`` (int16) of the grouped layout, as ``[K, ceil(L/4), 4]``: one row of 4 per
    code byte, so the decode walks the bytes in order and needs no division by 4 (it vectorizes)."""
    n, n_groups = lay.group_size, lay.groups_per_row

    def f(k, jb, q):
        code = (codes[k, jb].astype("int32") >> (q * 2).astype("int32")) & 3
        t = (code ^ 2) - 2  # 0b00 -> 0, 0b01 -> 1, 0b11 -> -1: sign extension of the 2-bit field
        # the padding after L decodes to t = 0; clamp its group index to stay inside alpha_q
        g = tirx.min((jb * 4 + q) // n, n_groups - 1)
        return (alpha_q[k, g].astype("int32") * t).astype("int16")

    return te.compute((lay.out_channels, int(codes.shape[1]), 4), f, name="w_int")


def _w(wq: te.Tensor, k: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
    """Element ``j`` of row ``k`` of the grouped layout (flattens to the contiguous index k*L4*4 + j)."""
    return wq[k, j // 4, j % 4].astype("int32")


def _check_mode(out_mode: str, requant_scale: float | None) -> None:
    if out_mode not in OUT_MODES:
        raise ValueError(f"out_mode must be one of {OUT_MODES}, got {out_mode!r}")
    if out_mode == "requant" and (requant_scale is None or not requant_scale > 0):
        raise ValueError(f"out_mode='requant' needs a positive requant_scale, got {requant_scale!r}")


def _epilogue(acc: tirx.PrimExpr, scale: tirx.PrimExpr, bias: tirx.PrimExpr, relu: bool, out_mode: str,
              requant_scale: float | None, out_bits: int, out_signed: bool) -> tirx.PrimExpr:
    """qmath.epilogue (+ qmath.quantize_act for "requant") of one int32 accumulator."""
    # float32(acc) first: for |acc| > 2^24 this rounding is part of the reference math
    y = acc.astype("float32").astype("float64") * scale.astype("float64") + bias.astype("float64")
    y = y.astype("float32")
    if relu:
        y = tirx.max(y, tirx.const(0.0, "float32"))
    if out_mode == "float":
        return y
    lo, hi = qmath.act_range(out_bits, out_signed)
    q = tirx.nearbyint(y / tirx.const(float(np.float32(requant_scale)), "float32"))
    q = tirx.min(tirx.max(q, tirx.const(float(lo), "float32")), tirx.const(float(hi), "float32"))
    return q.astype(qmath.act_dtype(out_bits, out_signed))


def pad_codes(data: te.Tensor, kernel: tuple[int, int], strides: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int]) -> tuple[te.Tensor, int, int]:
    """Zero-pad NCHW activation codes (a zero code is a zero activation, so this pads the input) and
    return the padded tensor with the output height and width of the convolution."""
    batch, chans, height, width = data.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, strides, padding, dilation
    oh = (int(height) + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (int(width) + 2 * pw - dw * (kw - 1) - 1) // sw + 1
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


def conv_with_epilogue(kind: str, data: te.Tensor, weight_shape: tuple[int, int, int, int],
                       strides: int | Sequence[int], padding: int | Sequence[int], dilation: int | Sequence[int],
                       groups: int, term: Callable[..., tirx.PrimExpr], out_scale: te.Tensor, out_bias: te.Tensor,
                       relu: bool, out_mode: str, requant_scale: float | None, out_bits: int,
                       out_signed: bool) -> te.Tensor:
    """The integer conv every weight format shares: ``acc[b, k, i, j] = sum over (c, r, s) of
    term(int32 code, k, c, r, s)`` exactly in int32 (``term`` is the format's weight contribution), then
    the qmath epilogue; ``out_mode="acc"`` returns the accumulators.  ``padding`` is symmetric (ph, pw)."""
    kout, cg, kh, kw = weight_shape
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilation)
    batch = data.shape[0]
    xp, oh, ow = pad_codes(data, (kh, kw), (sh, sw), _pair(padding), (dh, dw))
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
        lambda b, k, i, j: _epilogue(acc[b, k, i, j], out_scale[k], out_bias[k], relu, out_mode,
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
        lambda *idx: _epilogue(acc[idx], out_scale[idx[-1]], out_bias[idx[-1]], relu, out_mode,
                               requant_scale, out_bits, out_signed),
        name="out", attrs=kernel_attrs(kind))


def ternary_conv2d(data: te.Tensor, codes: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor,
                   out_bias: te.Tensor, *, weight_shape: Sequence[int], strides: int | Sequence[int] = 1,
                   padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                   group_size: int, relu: bool = False, out_mode: OutMode = "float",
                   requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False) -> te.Tensor:
    """NCHW conv of activation codes with an FGQ-ternary weight; output ``[B, K, OH, OW]``.

    ``padding`` is symmetric (ph, pw).  ``codes``/``alpha_q`` are ``TernaryWeight.packed_codes()`` /
    ``alpha_q`` of a weight of shape ``weight_shape = (K, Cg, R, S)``.
    """
    _check_mode(out_mode, requant_scale)
    kout, cg, kh, kw = conv_dims(data, weight_shape, groups)
    lay = qmath.group_layout((kout, cg, kh, kw), group_size)
    if tuple(int(v) for v in codes.shape) != (kout, -(-lay.row_len // 4)):
        raise ValueError(f"codes shape {codes.shape} != ({kout}, ceil({lay.row_len}/4))")
    if tuple(int(v) for v in alpha_q.shape) != (kout, lay.groups_per_row):
        raise ValueError(f"alpha_q shape {alpha_q.shape} != ({kout}, {lay.groups_per_row})")
    seg_pad = lay.groups_per_segment * lay.group_size  # padded length of one (r, s) segment of channels

    wq = _expand_weight(codes, alpha_q, lay)

    def w_at(k, c, r, s):  # grouped-layout position of weight element (k, c, r, s)
        tap = r * kw + s
        if lay.along == "taps":  # depthwise: one segment over the R*S taps
            return _w(wq, k, tap)
        return _w(wq, k, tap * seg_pad + c)  # channels innermost, one padded segment per tap

    return conv_with_epilogue(
        "ternary_conv2d", data, (kout, cg, kh, kw), strides, padding, dilation, groups,
        lambda xv, k, c, r, s: xv * w_at(k, c, r, s), out_scale, out_bias, relu, out_mode, requant_scale,
        out_bits, out_signed)


def ternary_dense(data: te.Tensor, codes: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor,
                  out_bias: te.Tensor, *, weight_shape: Sequence[int], group_size: int, relu: bool = False,
                  out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                  out_signed: bool = False) -> te.Tensor:
    """``data[..., C]`` times an FGQ-ternary weight ``[K, C]`` (transposed) -> ``[..., K]``."""
    _check_mode(out_mode, requant_scale)
    kout, cin = dense_dims(data, weight_shape)
    lay = qmath.group_layout((kout, cin), group_size)
    if tuple(int(v) for v in codes.shape) != (kout, -(-lay.row_len // 4)):
        raise ValueError(f"codes shape {codes.shape} != ({kout}, ceil({lay.row_len}/4))")
    if tuple(int(v) for v in alpha_q.shape) != (kout, lay.groups_per_row):
        raise ValueError(f"alpha_q shape {alpha_q.shape} != ({kout}, {lay.groups_per_row})")
    wq = _expand_weight(codes, alpha_q, lay)  # a linear row is one segment: element c is position c
    return dense_with_epilogue("ternary_dense", data, kout, cin, lambda xv, k, c: xv * _w(wq, k, c), out_scale,
                               out_bias, relu, out_mode, requant_scale, out_bits, out_signed)


def quantize_act(x: te.Tensor, scale: float, bits: int, signed: bool) -> te.Tensor:
    """float32 -> activation codes: ``clip(nearbyint(x / scale), lo, hi)`` in float32 (qmath.quantize_act_np)."""
    lo, hi = qmath.act_range(bits, signed)
    s = tirx.const(float(np.float32(scale)), "float32")

    def f(*idx):
        q = tirx.nearbyint(x[idx].astype("float32") / s)
        q = tirx.min(tirx.max(q, tirx.const(float(lo), "float32")), tirx.const(float(hi), "float32"))
        return q.astype(qmath.act_dtype(bits, signed))

    return te.compute(x.shape, f, name="quantize_act", attrs=kernel_attrs("quantize_act"))


# --------------------------------------------------------------------------------------------
# Default (untuned) schedules
# --------------------------------------------------------------------------------------------

def _target_kind(target: tvm.target.Target | str | dict | None) -> str:
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


def _divisor(n: int, prefer: Sequence[int]) -> int:
    """The first of ``prefer`` that divides n (so that loops split without tail predicates)."""
    for d in prefer:
        if n % d == 0:
            return d
    return 1


# A tile-size chooser: given the candidate factors (the default first), return one of them. The default
# schedules take the first; the tuner (tvm_lowbit.tune) passes a MetaSchedule sample_categorical.
Pick = Callable[[list[int]], object]


def _tile(n: int, prefer: Sequence[int], pick: Pick | None) -> object:
    if pick is None:
        return _divisor(n, prefer)
    return pick([d for d in prefer if n % d == 0] or [1])


def _kernel_kind(func: tirx.PrimFunc) -> str | None:
    """The kernel marker: a PrimFunc attribute, else the annotation of the output block."""
    if func.attrs is not None and KERNEL_ATTR in func.attrs:
        return str(func.attrs[KERNEL_ATTR])
    sch = tvm.s_tir.Schedule(func)
    for name in ("out", "acc", "quantize_act"):  # the blocks our computes mark
        blk = _maybe_block(sch, name)
        if blk is not None and KERNEL_ATTR in sch.get(blk).annotations:
            return str(sch.get(blk).annotations[KERNEL_ATTR])
    return None


def _maybe_block(sch: tvm.s_tir.Schedule, name: str) -> tvm.s_tir.schedule.SBlockRV | None:
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - get_sblock raises a ScheduleError subclass when the block is absent
        return None


def _weight_blocks(sch: tvm.s_tir.Schedule, name: str) -> list:
    """The weight-decode block(s): ``name``, or ``name_v0, name_v1, ...`` for a multi-output TE stage."""
    blk = _maybe_block(sch, name)
    if blk is not None:
        return [blk]
    out, i = [], 0
    while (blk := _maybe_block(sch, f"{name}_v{i}")) is not None:
        out.append(blk)
        i += 1
    if not out:
        raise ValueError(f"kernel has no weight stage {name!r}")
    return out


def _accumulate_locally(sch: tvm.s_tir.Schedule, acc, loop) -> None:
    """Keep the int32 accumulator tile under ``loop`` in a local buffer (registers after unrolling)."""
    out = _maybe_block(sch, "out")
    if out is not None:  # the epilogue consumes acc tile by tile
        sch.reverse_compute_at(out, loop, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
    else:  # out_mode="acc": accumulate locally, then copy the tile out
        copy = sch.cache_write(acc, 0, "local")
        sch.reverse_compute_at(copy, loop, preserve_unit_loops=True)


def _schedule_conv2d_aarch64(sch: tvm.s_tir.Schedule, weight_block: str, pick: Pick | None = None) -> None:
    """NEON tile: kb output channels as int32 lanes x owi output columns, unrolled. The generic schedule
    vectorizes over columns, and widths like 28, 14 and 7 give 7-lane vectors that LLVM legalizes into scalar
    moves around every multiply-accumulate (about 5x the instructions on ResNet-20). Output channels come in
    multiples of 8; with the decoded weights and the accumulator tile made channel-innermost, each MAC step
    is one weight vector times a broadcast activation (smlal/smlal2, or vector shifts for power-of-two)."""
    acc = sch.get_sblock("acc")
    b, k, i, j, rc, ry, rx = sch.get_loops(acc)
    kout, ow = (int(sch.get(lp).extent) for lp in (k, j))
    kb = _tile(kout, (8, 4, 2), pick)
    owi = _tile(ow, (7, 8, 4, 6, 5, 3, 2), pick)  # 2*owi accumulator registers of the 32
    ko, ki = sch.split(k, [None, kb])
    jo, ji = sch.split(j, [None, owi])
    sch.reorder(ko, b, i, jo, ry, rx, rc, ji, ki)
    out = _maybe_block(sch, "out")
    copy = None if out is not None else sch.cache_write(acc, 0, "local")  # out_mode="acc": acc is the output
    # channel-innermost accumulator tile (never the function's output buffer, whose layout is the interface)
    sch.transform_layout(acc, ("write", 0), lambda bb, kk, ii, jj: (bb, ii, jj, kk))
    if out is not None:
        sch.reverse_compute_at(out, jo, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
    else:
        sch.reverse_compute_at(copy, jo, preserve_unit_loops=True)
    for wb in _weight_blocks(sch, weight_block):
        for n in range(len(sch.get(wb).writes)):
            sch.transform_layout(wb, ("write", n), lambda kk, *pos: (*pos, kk))
        sch.compute_at(wb, ko, preserve_unit_loops=True)
    sch.parallel(ko)
    sch.unroll(ji)
    sch.vectorize(ki)
    sch.decompose_reduction(acc, ry)
    init = _maybe_block(sch, "acc_init")
    if init is not None:
        lps = sch.get_loops(init)
        sch.vectorize(lps[-1])
        sch.unroll(lps[-2])
    tail = _maybe_block(sch, "out") or _maybe_block(sch, "acc_local")
    if tail is not None:
        sch.unroll(sch.get_loops(tail)[-1])
    pad = _maybe_block(sch, "pad")
    if pad is not None:
        lps = sch.get_loops(pad)
        sch.parallel(sch.fuse(lps[0], lps[1]))


def _schedule_conv2d(sch: tvm.s_tir.Schedule, kind: str, weight_block: str = "w_int", pick: Pick | None = None
                     ) -> None:
    if kind == "aarch64":
        _schedule_conv2d_aarch64(sch, weight_block, pick)
        return
    acc = sch.get_sblock("acc")
    b, k, i, j, rc, ry, rx = sch.get_loops(acc)
    kout, ow = (int(sch.get(lp).extent) for lp in (k, j))
    # register tile of kb output channels x owi output columns (int32 lanes, vectorized over owi)
    kb = _tile(kout, (4, 2) if kind == "armv7" else (8, 4, 2), pick)
    owi = _tile(ow, (8, 16, 7, 14, 12, 6, 10, 4, 5, 3, 2), pick)
    ko, ki = sch.split(k, [None, kb])
    jo, ji = sch.split(j, [None, owi])
    sch.reorder(ko, b, i, jo, ry, rx, rc, ki, ji)
    _accumulate_locally(sch, acc, jo)
    # the weight of kb channels is expanded once per ko, next to the MACs that use it
    for wb in _weight_blocks(sch, weight_block):
        sch.compute_at(wb, ko, preserve_unit_loops=True)
    sch.parallel(ko)
    sch.unroll(ki)
    sch.vectorize(ji)
    sch.decompose_reduction(acc, ry)  # above the outermost reduction loop
    tail = _maybe_block(sch, "out") or _maybe_block(sch, "acc_local")
    for blk in (tail, _maybe_block(sch, "acc_init")):
        if blk is not None:
            lps = sch.get_loops(blk)
            sch.vectorize(lps[-1])
            sch.unroll(lps[-2])
    pad = _maybe_block(sch, "pad")
    if pad is not None:
        lps = sch.get_loops(pad)
        sch.parallel(sch.fuse(lps[0], lps[1]))


def _schedule_dense(sch: tvm.s_tir.Schedule, kind: str, weight_block: str = "w_int", pick: Pick | None = None
                    ) -> None:
    acc = sch.get_sblock("acc")
    lps = sch.get_loops(acc)
    lead, k, rc = lps[:-2], lps[-2], lps[-1]
    kout = int(sch.get(k).extent)
    kb = _tile(kout, (4, 2) if kind == "armv7" else (8, 4, 2, 16), pick)
    ko, ki = sch.split(k, [None, kb])
    m = sch.fuse(*lead) if len(lead) > 1 else (lead[0] if lead else None)
    sch.reorder(*([ko, m] if m is not None else [ko]), ki, rc)
    # rc stays innermost: LLVM vectorizes the int32 dot-product reduction over it
    _accumulate_locally(sch, acc, m if m is not None else ko)
    for wb in _weight_blocks(sch, weight_block):
        sch.compute_at(wb, ko, preserve_unit_loops=True)
    sch.parallel(ko)
    sch.unroll(ki)


def _schedule_elementwise(sch: tvm.s_tir.Schedule, block_name: str) -> None:
    blk = sch.get_sblock(block_name)
    lps = sch.get_loops(blk)
    if len(lps) > 1:
        sch.parallel(sch.fuse(*lps[:-1]))
    inner = lps[-1]
    extent = int(sch.get(inner).extent)
    if extent >= 8:
        _, vi = sch.split(inner, [None, _divisor(extent, (16, 8, 4, 2))])
        sch.vectorize(vi)


def schedule_default(mod_or_func: tvm.IRModule | tirx.PrimFunc, target: tvm.target.Target | str | dict | None = None
                     ) -> tirx.PrimFunc:
    """Schedule one kernel of this module (found by its marker) for ``target``; returns the PrimFunc
    with ``tirx.is_scheduled`` set so that later passes (dlight, MetaSchedule) leave it alone."""
    if isinstance(mod_or_func, tvm.IRModule):
        funcs = [f for _, f in mod_or_func.functions_items() if isinstance(f, tirx.PrimFunc)]
        if len(funcs) != 1:
            raise ValueError(f"expected an IRModule with one PrimFunc, got {len(funcs)}")
        func = funcs[0]
    else:
        func = mod_or_func
    kind = _kernel_kind(func)
    if kind is None:
        raise ValueError("not a tvm_lowbit kernel (no 'tvm_lowbit.kernel' marker)")
    sch = tvm.s_tir.Schedule(func)
    schedule_kernel(sch, kind, target)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(KERNEL_ATTR, kind)


def schedule_kernel(sch: tvm.s_tir.Schedule, kind: str, target: tvm.target.Target | str | dict | None,
                    pick: Pick | None = None) -> None:
    """Apply the schedule of kernel ``kind`` to ``sch`` in place; ``pick`` chooses the tile sizes (default:
    the first candidate; the tuner samples them)."""
    tk = _target_kind(target)
    if kind.endswith("_avx2"):  # kernels.avx2: the intrinsic's own layouts and schedules
        from tvm_lowbit.kernels import avx2

        if kind.endswith("conv2d_avx2"):
            avx2.schedule_conv2d_avx2(sch, pick)
        else:
            avx2.schedule_dense_avx2(sch, pick)
    elif kind == "ternary_dense_lut":  # kernels.lut
        from tvm_lowbit.kernels import lut

        lut.schedule_dense_lut(sch, pick)
    elif kind.endswith("conv2d_sdot"):  # kernels.sdot
        from tvm_lowbit.kernels import sdot

        sdot.schedule_conv2d_sdot(sch, pick)
    elif kind in ("ternary_conv2d", "int_conv2d"):  # kernels.intw: the same tiles and "w_int" decode stage
        _schedule_conv2d(sch, tk, pick=pick)
    elif kind in ("ternary_dense", "int_dense"):
        _schedule_dense(sch, tk, pick=pick)
    elif kind == "pow2_conv2d":  # tvm_lowbit.kernels.pow2: same tiles, the decode stage is "w_dec"
        _schedule_conv2d(sch, tk, "w_dec", pick)
    elif kind == "pow2_dense":
        _schedule_dense(sch, tk, "w_dec", pick)
    elif kind == "quantize_act":
        _schedule_elementwise(sch, "quantize_act")
    else:
        raise ValueError(f"no default schedule for kernel {kind!r}")
