"""TE compute definitions of the grouped-ternary conv2d / dense layers (the generic kernels, every target).

The 2-bit codes (grouped layout, four per byte) and the per-group ``alpha_q`` are expanded into integer
weights ``w_int = alpha_q * t`` (int16) in a separate ``w_int`` stage, so that a schedule can keep the
decode outside the multiply-accumulate loop (decoding inside it is ~5x slower); the accumulation and the
epilogue are ``common.conv_with_epilogue`` / ``dense_with_epilogue``, bit for bit :mod:`tvm_lowbit.qmath`.
Default schedules: :mod:`tvm_lowbit.kernels.generic`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tvm import te, tirx

from tvm_lowbit import qmath
from tvm_lowbit.kernels.common import (OutMode, check_mode, conv_dims, conv_with_epilogue, decode_2bit,
                                       dense_dims, dense_with_epilogue)
from tvm_lowbit.kernels.generic import conv2d_schedule, dense_schedule
from tvm_lowbit.kernels.registry import GENERIC, Kernel, LayerSpec, Operands, register


def expand_weight(codes: te.Tensor, alpha_q: te.Tensor, lay: qmath.GroupLayout) -> te.Tensor:
    """``w_int = alpha_q * t`` (int16) of the grouped layout, as ``[K, ceil(L/4), 4]``: one row of 4 per
    code byte, so the decode walks the bytes in order and needs no division by 4 (it vectorizes)."""
    n, n_groups = lay.group_size, lay.groups_per_row

    def f(k, jb, q):
        t = decode_2bit(codes[k, jb], q)
        # the padding after L decodes to t = 0; clamp its group index to stay inside alpha_q
        g = tirx.min((jb * 4 + q) // n, n_groups - 1)
        return (alpha_q[k, g].astype("int32") * t).astype("int16")

    return te.compute((lay.out_channels, int(codes.shape[1]), 4), f, name="w_int")


def grouped_element(wq: te.Tensor, k: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
    """Element ``j`` of row ``k`` of the grouped layout (flattens to the contiguous index k*L4*4 + j)."""
    return wq[k, j // 4, j % 4].astype("int32")


def check_ternary_operands(codes: te.Tensor, alpha_q: te.Tensor, lay: qmath.GroupLayout) -> None:
    """A clear error when ``codes`` / ``alpha_q`` do not have the shapes of the grouped layout."""
    kout = lay.out_channels
    if tuple(int(v) for v in codes.shape) != (kout, -(-lay.row_len // 4)):
        raise ValueError(f"codes shape {codes.shape} != ({kout}, ceil({lay.row_len}/4))")
    if tuple(int(v) for v in alpha_q.shape) != (kout, lay.groups_per_row):
        raise ValueError(f"alpha_q shape {alpha_q.shape} != ({kout}, {lay.groups_per_row})")


def ternary_conv2d(data: te.Tensor, codes: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor,
                   out_bias: te.Tensor, *, weight_shape: Sequence[int], strides: int | Sequence[int] = 1,
                   padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                   group_size: int, relu: bool = False, out_mode: OutMode = "float",
                   requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False) -> te.Tensor:
    """NCHW conv of activation codes with an FGQ-ternary weight; output ``[B, K, OH, OW]``.

    ``padding`` is symmetric (ph, pw).  ``codes``/``alpha_q`` are ``TernaryWeight.packed_codes()`` /
    ``alpha_q`` of a weight of shape ``weight_shape = (K, Cg, R, S)``.
    """
    check_mode(out_mode, requant_scale)
    kout, cg, kh, kw = conv_dims(data, weight_shape, groups)
    lay = qmath.group_layout((kout, cg, kh, kw), group_size)
    check_ternary_operands(codes, alpha_q, lay)
    seg_pad = lay.groups_per_segment * lay.group_size  # padded length of one (r, s) segment of channels

    wq = expand_weight(codes, alpha_q, lay)

    def w_at(k, c, r, s):  # grouped-layout position of weight element (k, c, r, s)
        tap = r * kw + s
        if lay.along == "taps":  # depthwise: one segment over the R*S taps
            return grouped_element(wq, k, tap)
        return grouped_element(wq, k, tap * seg_pad + c)  # channels innermost, one padded segment per tap

    return conv_with_epilogue(
        "ternary_conv2d", data, (kout, cg, kh, kw), strides, padding, dilation, groups,
        lambda xv, k, c, r, s: xv * w_at(k, c, r, s), out_scale, out_bias, relu, out_mode, requant_scale,
        out_bits, out_signed)


def ternary_dense(data: te.Tensor, codes: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor,
                  out_bias: te.Tensor, *, weight_shape: Sequence[int], group_size: int, relu: bool = False,
                  out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                  out_signed: bool = False) -> te.Tensor:
    """``data[..., C]`` times an FGQ-ternary weight ``[K, C]`` (transposed) -> ``[..., K]``."""
    check_mode(out_mode, requant_scale)
    kout, cin = dense_dims(data, weight_shape)
    lay = qmath.group_layout((kout, cin), group_size)
    check_ternary_operands(codes, alpha_q, lay)
    wq = expand_weight(codes, alpha_q, lay)  # a linear row is one segment: element c is position c
    return dense_with_epilogue("ternary_dense", data, kout, cin, lambda xv, k, c: xv * grouped_element(wq, k, c),
                               out_scale, out_bias, relu, out_mode, requant_scale, out_bits, out_signed)


def ternary_operands(layer: LayerSpec) -> Operands:
    """The packed 2-bit codes and the uint8 ``alpha_q`` [K, groups] of a ternary layer, and its group size."""
    tw = layer.weight
    k = tw.layout.out_channels
    return ([tw.packed_codes(), tw.alpha_q.numpy().astype(np.uint8).reshape(k, -1)],
            {"group_size": tw.layout.group_size})


TERNARY_CONV2D = register(Kernel("ternary_conv2d", family="ternary", op="conv2d", isa=GENERIC, compute=ternary_conv2d,
                                 schedule=conv2d_schedule("w_int"), operands=ternary_operands))
TERNARY_DENSE = register(Kernel("ternary_dense", family="ternary", op="dense", isa=GENERIC, compute=ternary_dense,
                                schedule=dense_schedule("w_int"), operands=ternary_operands))
