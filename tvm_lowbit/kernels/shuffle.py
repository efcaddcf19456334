"""ShuffleNet's concat + channel shuffle + split in one pass, with the next layer's quantizer fused
(``passes.shuffle_quantize``).

In NHWC (``passes.nhwc_shuffle``) a ShuffleNetV2 block ends with ``s = shuffle(concat(parts, axis=3), g)``,
``s[..., c] = concat[..., (c % g) * (C / g) + c // g]``, and the next block splits ``s`` along the channels and
quantizes one half.  Relax runs that as one loop nest per op (a concat copy, two reshape copies and a
transpose, the split's copies, then ``quantize_act``).  ``channel_shuffle`` computes each wanted channel
range ("piece") of ``s`` straight from the parts: a float32 copy, or its activation codes through
:func:`kernels.common.quantize_act` (the plain division form) of that copy, with the copy inlined.  Only
data moves before the quantizer, and the quantizer is the same expression on the same value, so every
output is the same bits as the unfused graph's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
from tvm import te, tirx

from tvm_lowbit.kernels.common import Pick, TargetLike, divisor, quantize_act
from tvm_lowbit.kernels.registry import GENERIC, Kernel, register

NAME = "channel_shuffle"
PARALLEL_MIN = 1 << 14  # elements below which one core does it (a fork-join costs a few µs)

Piece = tuple[int, int, tuple[float, int, bool] | None]
"""A channel range ``[lo, hi)`` of the shuffled tensor and its quantizer ``(scale, bits, signed)`` (None:
the float32 values)."""


def channel_shuffle(*parts: te.Tensor, groups: int, pieces: Sequence[Piece]) -> te.Tensor | list[te.Tensor]:
    """The ``pieces`` of ``shuffle(concat(parts, axis=-1), groups)`` (module docstring), in order."""
    widths = [int(p.shape[-1]) for p in parts]
    total = sum(widths)
    per_group = total // groups
    starts = [sum(widths[:i]) for i in range(len(parts))]

    def shuffled(lead: list[tirx.PrimExpr], c: tirx.PrimExpr) -> tirx.PrimExpr:
        src = tirx.floormod(c, groups) * per_group + tirx.floordiv(c, groups)
        value = None
        for part, start, width in reversed(list(zip(parts, starts, widths))):
            # every load stays inside its part (a select evaluates both sides)
            idx = tirx.max(tirx.min(src - start, width - 1), 0)
            load = part[(*lead, idx)]
            value = load if value is None else tirx.Select(src < start + width, load, value)
        return value

    def channels_from(lo: int) -> Callable[..., tirx.PrimExpr]:
        return lambda *i: shuffled(list(i[:-1]), i[-1] + lo)

    outs = []
    for k, (lo, hi, quant) in enumerate(pieces):
        piece = te.compute((*parts[0].shape[:-1], hi - lo), channels_from(lo), name=f"piece{k}")
        outs.append(piece if quant is None else quantize_act(piece, *quant))
    return outs[0] if len(outs) == 1 else outs


def schedule_channel_shuffle(sch: tvm.s_tir.Schedule, _target: TargetLike, _pick: Pick | None = None) -> None:
    """The copies a quantizer reads inlined into it; every output block parallel over its rows and
    vectorized over the channels."""
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        if any(sch.get(block).writes[0].source.same_as(b) for b in sch.get(root).alloc_buffers):
            sch.compute_inline(block)  # a copy only a quantizer reads
    for block in sch.get_child_blocks(root):
        loops = sch.get_loops(block)
        extents = [int(sch.get(lp).extent) for lp in loops]
        inner = loops[-1]
        lanes = divisor(extents[-1], (16, 8, 4))
        if len(loops) > 1:
            rows = sch.fuse(*loops[:-1])
            total = 1
            for e in extents:
                total *= e
            if total >= PARALLEL_MIN:
                sch.parallel(rows)
        if lanes > 1:
            _, vec = sch.split(inner, [None, lanes])
            sch.vectorize(vec)


register(Kernel(NAME, family="activation", op="channel_shuffle", isa=GENERIC, compute=channel_shuffle,
                schedule=schedule_channel_shuffle, tunable=False,
                doc="concat + channel shuffle + split (+ the next quantizer) in one pass (passes.shuffle_quantize)"))
