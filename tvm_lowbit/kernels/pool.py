"""Max pool and the next layer's input quantizer in one loop nest (``passes.pool_quantize``).

``maxpool_quantize`` is TOPI's ``pool2d`` (the PrimFunc Relax legalizes ``relax.nn.max_pool2d`` into: a
padding stage that writes the lowest float32 outside the image, then a max over the window rows, then the
window columns) followed by :func:`kernels.common.quantize_act` (``clip(nearbyint(v / s), lo, hi)``) of the
pooled value: the same float32 operations, in the same order, as the unfused graph's two calls, so the codes
and the pooled values are the same bits.

Its schedule is what makes it faster than the two calls: the padding stage is inlined into the window's
reads (a select of the same value, no copy of the input), the pool's channel loop is split into vectors
below the window loops (each lane keeps its own max, in the original order), the quantizer runs inside
the pool's loop on the vector just pooled, and the rows run in parallel.  Only NHWC is vectorized (the
channels are contiguous there); NCHW gets the parallel rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import te, topi

from tvm_lowbit.kernels.common import Pick, TargetLike, divisor, quantize_act
from tvm_lowbit.kernels.registry import GENERIC, Kernel, register

NAME = "maxpool_quantize"
LAYOUT_ATTR = "tvm_lowbit.pool_layout"
"""PrimFunc attribute: the pool's layout ("NHWC" or "NCHW"), which the schedule reads."""


def maxpool_quantize(data: te.Tensor, pool_size: Sequence[int], strides: Sequence[int], dilation: Sequence[int],
                     padding: Sequence[int], ceil_mode: bool, layout: str, scale: float, bits: int, signed: bool,
                     keep_pool: bool) -> te.Tensor | list[te.Tensor]:
    """``codes`` (or ``[pooled, codes]`` when ``keep_pool``): ``pooled = max_pool2d(data)`` as Relax's
    legalization computes it, ``codes = quantize_act(pooled)`` in its plain division form."""
    pooled = topi.nn.pool2d(data, kernel=list(pool_size), stride=list(strides), dilation=list(dilation),
                            padding=list(padding), pool_type="max", ceil_mode=bool(ceil_mode), layout=layout)
    codes = quantize_act(pooled, scale, bits, signed)
    return [pooled, codes] if keep_pool else codes


def schedule_maxpool_quantize(sch: tvm.s_tir.Schedule, _target: TargetLike, _pick: Pick | None = None) -> None:
    """Padding inlined, rows parallel, NHWC channels vectorized under the window loops, the quantizer at
    the pooled vector (module docstring)."""
    attrs = sch.mod["main"].attrs or {}
    nhwc = str(attrs.get(LAYOUT_ATTR, "NCHW")) == "NHWC"
    try:
        sch.compute_inline(sch.get_sblock("pad_temp"))
    except (RuntimeError, ValueError):  # no padding: no such stage
        pass
    pool, quant = sch.get_sblock("pool_max"), sch.get_sblock("quantize_act")
    n, a, b, c, rh, rw = sch.get_loops(pool)  # NHWC: n h w c; NCHW: n c h w
    if nhwc:
        channels = int(sch.get(c).extent)
        lanes = divisor(channels, (16, 8, 4))
        rows = sch.fuse(n, a)
        if channels % lanes == 0 and lanes > 1:
            co, ci = sch.split(c, [None, lanes])
            sch.reorder(co, rh, rw, ci)
            at = co
        else:
            ci, at = None, c
        sch.parallel(rows)
        sch.reverse_compute_at(quant, at)
        if ci is not None:
            sch.vectorize(ci)
            sch.vectorize(sch.get_loops(quant)[-1])
        init = sch.decompose_reduction(pool, rh)  # the init out of the window loops (after the loop kinds)
        if ci is not None:
            sch.vectorize(sch.get_loops(init)[-1])
    else:
        rows = sch.fuse(n, a, b)
        sch.parallel(rows)
        sch.reverse_compute_at(quant, rows)
        sch.decompose_reduction(pool, rh)


register(Kernel(NAME, family="activation", op="maxpool_quantize", isa=GENERIC, compute=maxpool_quantize,
                schedule=schedule_maxpool_quantize, tunable=False,
                doc="max pool + the next layer's activation quantizer in one loop (passes.pool_quantize)"))
