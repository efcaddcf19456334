"""Default schedules of the generic kernels (every target): the integer conv/dense of
``common.conv_with_epilogue`` / ``dense_with_epilogue`` whose weight is decoded in a separate stage
("w_int" for ternary and k-bit integer weights, "w_dec" for power-of-two), computed once per block of
output channels, outside the multiply-accumulate loop."""

from __future__ import annotations

from collections.abc import Callable

import tvm

from tvm_lowbit.kernels.common import (Pick, TargetLike, accumulate_locally, maybe_block, quantize_act,
                                       schedule_elementwise, target_kind, tile, weight_blocks)
from tvm_lowbit.kernels.registry import GENERIC, Kernel, register

Schedule = Callable[[tvm.s_tir.Schedule, TargetLike, Pick | None], None]


def schedule_conv2d_aarch64(sch: tvm.s_tir.Schedule, weight_block: str, pick: Pick | None = None) -> None:
    """NEON tile: kb output channels as int32 lanes x owi output columns, unrolled. The generic schedule
    vectorizes over columns, and widths like 28, 14 and 7 give 7-lane vectors that LLVM legalizes into scalar
    moves around every multiply-accumulate (about 5x the instructions on ResNet-20). Output channels come in
    multiples of 8; with the decoded weights and the accumulator tile made channel-innermost, each MAC step
    is one weight vector times a broadcast activation (smlal/smlal2, or vector shifts for power-of-two)."""
    acc = sch.get_sblock("acc")
    b, k, i, j, rc, ry, rx = sch.get_loops(acc)
    kout, ow = (int(sch.get(lp).extent) for lp in (k, j))
    kb = tile(kout, (8, 4, 2), pick)
    owi = tile(ow, (7, 8, 4, 6, 5, 3, 2), pick)  # 2*owi accumulator registers of the 32
    ko, ki = sch.split(k, [None, kb])
    jo, ji = sch.split(j, [None, owi])
    sch.reorder(ko, b, i, jo, ry, rx, rc, ji, ki)
    out = maybe_block(sch, "out")
    copy = None if out is not None else sch.cache_write(acc, 0, "local")  # out_mode="acc": acc is the output
    # channel-innermost accumulator tile (never the function's output buffer, whose layout is the interface)
    sch.transform_layout(acc, ("write", 0), lambda bb, kk, ii, jj: (bb, ii, jj, kk))
    if out is not None:
        sch.reverse_compute_at(out, jo, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
    else:
        sch.reverse_compute_at(copy, jo, preserve_unit_loops=True)
    for wb in weight_blocks(sch, weight_block):
        for n in range(len(sch.get(wb).writes)):
            sch.transform_layout(wb, ("write", n), lambda kk, *pos: (*pos, kk))
        sch.compute_at(wb, ko, preserve_unit_loops=True)
    sch.parallel(ko)
    sch.unroll(ji)
    sch.vectorize(ki)
    sch.decompose_reduction(acc, ry)
    init = maybe_block(sch, "acc_init")
    if init is not None:
        lps = sch.get_loops(init)
        sch.vectorize(lps[-1])
        sch.unroll(lps[-2])
    tail = maybe_block(sch, "out") or maybe_block(sch, "acc_local")
    if tail is not None:
        sch.unroll(sch.get_loops(tail)[-1])
    pad = maybe_block(sch, "pad")
    if pad is not None:
        lps = sch.get_loops(pad)
        sch.parallel(sch.fuse(lps[0], lps[1]))


def schedule_conv2d(sch: tvm.s_tir.Schedule, target: TargetLike, weight_block: str = "w_int",
                    pick: Pick | None = None) -> None:
    """Register tile of output channels x output columns, the weight decoded once per block of channels."""
    kind = target_kind(target)
    if kind == "aarch64":
        schedule_conv2d_aarch64(sch, weight_block, pick)
        return
    acc = sch.get_sblock("acc")
    b, k, i, j, rc, ry, rx = sch.get_loops(acc)
    kout, ow = (int(sch.get(lp).extent) for lp in (k, j))
    # register tile of kb output channels x owi output columns (int32 lanes, vectorized over owi)
    kb = tile(kout, (4, 2) if kind == "armv7" else (8, 4, 2), pick)
    owi = tile(ow, (8, 16, 7, 14, 12, 6, 10, 4, 5, 3, 2), pick)
    ko, ki = sch.split(k, [None, kb])
    jo, ji = sch.split(j, [None, owi])
    sch.reorder(ko, b, i, jo, ry, rx, rc, ki, ji)
    accumulate_locally(sch, acc, jo)
    # the weight of kb channels is expanded once per ko, next to the MACs that use it
    for wb in weight_blocks(sch, weight_block):
        sch.compute_at(wb, ko, preserve_unit_loops=True)
    sch.parallel(ko)
    sch.unroll(ki)
    sch.vectorize(ji)
    sch.decompose_reduction(acc, ry)  # above the outermost reduction loop
    tail = maybe_block(sch, "out") or maybe_block(sch, "acc_local")
    for blk in (tail, maybe_block(sch, "acc_init")):
        if blk is not None:
            lps = sch.get_loops(blk)
            sch.vectorize(lps[-1])
            sch.unroll(lps[-2])
    pad = maybe_block(sch, "pad")
    if pad is not None:
        lps = sch.get_loops(pad)
        sch.parallel(sch.fuse(lps[0], lps[1]))


def schedule_dense(sch: tvm.s_tir.Schedule, target: TargetLike, weight_block: str = "w_int",
                   pick: Pick | None = None) -> None:
    """Register tile of output channels; the int32 dot-product reduction stays innermost (LLVM vectorizes it)."""
    kind = target_kind(target)
    acc = sch.get_sblock("acc")
    lps = sch.get_loops(acc)
    lead, k, rc = lps[:-2], lps[-2], lps[-1]
    kout = int(sch.get(k).extent)
    kb = tile(kout, (4, 2) if kind == "armv7" else (8, 4, 2, 16), pick)
    ko, ki = sch.split(k, [None, kb])
    m = sch.fuse(*lead) if len(lead) > 1 else (lead[0] if lead else None)
    sch.reorder(*([ko, m] if m is not None else [ko]), ki, rc)
    # rc stays innermost: LLVM vectorizes the int32 dot-product reduction over it
    accumulate_locally(sch, acc, m if m is not None else ko)
    for wb in weight_blocks(sch, weight_block):
        sch.compute_at(wb, ko, preserve_unit_loops=True)
    sch.parallel(ko)
    sch.unroll(ki)


def conv2d_schedule(weight_block: str) -> Schedule:
    """The registry's ``schedule`` of a generic conv kernel whose weight stage is ``weight_block``."""
    def schedule(sch: tvm.s_tir.Schedule, target: TargetLike, pick: Pick | None = None) -> None:
        schedule_conv2d(sch, target, weight_block, pick)
    return schedule


def dense_schedule(weight_block: str) -> Schedule:
    """The registry's ``schedule`` of a generic dense kernel whose weight stage is ``weight_block``."""
    def schedule(sch: tvm.s_tir.Schedule, target: TargetLike, pick: Pick | None = None) -> None:
        schedule_dense(sch, target, weight_block, pick)
    return schedule


def schedule_quantize_act(sch: tvm.s_tir.Schedule, _target: TargetLike, _pick: Pick | None = None) -> None:
    """The activation quantizer: elementwise."""
    schedule_elementwise(sch, "quantize_act")


register(Kernel("quantize_act", family="activation", op="quantize", isa=GENERIC, compute=quantize_act,
                schedule=schedule_quantize_act, doc="float32 -> activation codes (every quantized region's entry)"))
