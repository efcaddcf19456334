"""TE compute definitions of the k-bit integer-weight conv2d / dense layers: int8 per output channel and
int4 in groups with 8-bit scale codes (``qmath.IntWeight``), bit for bit:

* the codes (int8: one per byte, as int8; int4: two per byte, low nibble first, two's complement) of
  the grouped layout and, when grouped, the per-group ``scale_q`` are expanded into integer weights
  ``w_int = scale_q * c`` (int16, ``|w_int| <= 255 * 7``) in a ``w_int`` stage that the default
  schedule computes once per block of output channels, outside the multiply-accumulate loop, as for
  the ternary kernels;
* the accumulation, the epilogue and the output modes "acc" / "float" / "requant" are those shared by
  every weight format (``kernels.common.conv_with_epilogue`` / ``dense_with_epilogue``), so a layer
  of this format feeds or consumes the codes of a ternary or power-of-two neighbour unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te, tirx

from tvm_lowbit import qmath
from tvm_lowbit.kernels.common import (OutMode, check_mode, conv_dims, conv_with_epilogue, dense_dims,
                                       dense_with_epilogue)
from tvm_lowbit.kernels.generic import conv2d_schedule, dense_schedule
from tvm_lowbit.kernels.registry import GENERIC, Kernel, LayerSpec, Operands, register


def _layout(weight_shape: tuple[int, ...], group_size: int) -> qmath.GroupLayout:
    return qmath.group_layout(weight_shape, group_size if group_size > 0 else 1 << 30)


def _expand(codes: te.Tensor, scale_codes: te.Tensor | None, lay: qmath.GroupLayout, bits: int) -> te.Tensor:
    """``w_int`` (int16) as ``[K, n_bytes, codes per byte]`` (padding decodes to zero)."""
    if bits not in qmath.INT_BITS:
        raise ValueError(f"integer weight bits must be one of {qmath.INT_BITS}, got {bits}")
    per = 8 // bits
    nbytes = -(-lay.row_len // per)
    want = (lay.out_channels, nbytes)
    if tuple(int(v) for v in codes.shape) != want:
        raise ValueError(f"codes shape {tuple(codes.shape)} != {want} for {lay.row_len} {bits}-bit codes per row")
    if str(codes.dtype) != ("uint8" if bits == 4 else "int8"):
        raise ValueError(f"{bits}-bit codes are stored as {'uint8' if bits == 4 else 'int8'}, got {codes.dtype}")
    if scale_codes is not None and tuple(int(v) for v in scale_codes.shape) != (lay.out_channels, lay.groups_per_row):
        raise ValueError(f"scale codes shape {tuple(scale_codes.shape)} != ({lay.out_channels}, {lay.groups_per_row})")
    n, n_groups = lay.group_size, lay.groups_per_row

    def f(k, jb, q):
        if bits == 8:
            c = codes[k, jb].astype("int32")
        else:
            nib = (codes[k, jb].astype("int32") >> (q * 4).astype("int32")) & 15
            c = (nib ^ 8) - 8  # sign extension of the 4-bit field
        if scale_codes is not None:
            g = tirx.min((jb * per + q) // n, n_groups - 1)  # the padding byte's group index stays in range
            c = scale_codes[k, g].astype("int32") * c
        return c.astype("int16")

    return te.compute((lay.out_channels, nbytes, per), f, name="w_int")


def _w(wq: te.Tensor, k: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
    per = int(wq.shape[2])
    return wq[k, j // per, j % per].astype("int32")


def int_conv2d(data: te.Tensor, codes: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
               weight_shape: Sequence[int], bits: int, group_size: int = 0, scale_codes: te.Tensor | None = None,
               strides: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
               dilation: int | Sequence[int] = 1, groups: int = 1, relu: bool = False,
               out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
               out_signed: bool = False) -> te.Tensor:
    """NCHW conv of activation codes with an ``int{bits}`` weight of shape ``weight_shape = (K, Cg, R, S)``:
    ``codes`` / ``scale_codes`` are ``IntWeight.packed_codes()`` / ``scale_codes()`` (``group_size`` 0 and
    no scale codes: one scale per output channel, kept in the epilogue).  Output ``[B, K, OH, OW]``."""
    check_mode(out_mode, requant_scale)
    if (group_size > 0) != (scale_codes is not None):
        raise ValueError("grouped integer weights need scale_codes and per-channel ones none "
                         f"(group_size={group_size}, scale_codes={'given' if scale_codes is not None else 'None'})")
    kout, cg, kh, kw = conv_dims(data, weight_shape, groups)
    lay = _layout((kout, cg, kh, kw), group_size)
    wq = _expand(codes, scale_codes, lay, bits)
    seg_pad = lay.groups_per_segment * lay.group_size

    def w_at(k, c, r, s):  # grouped-layout position of weight element (k, c, r, s)
        tap = r * kw + s
        return _w(wq, k, tap) if lay.along == "taps" else _w(wq, k, tap * seg_pad + c)

    return conv_with_epilogue(
        "int_conv2d", data, (kout, cg, kh, kw), strides, padding, dilation, groups,
        lambda xv, k, c, r, s: xv * w_at(k, c, r, s), out_scale, out_bias, relu, out_mode, requant_scale,
        out_bits, out_signed)


def int_dense(data: te.Tensor, codes: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
              weight_shape: Sequence[int], bits: int, group_size: int = 0, scale_codes: te.Tensor | None = None,
              relu: bool = False, out_mode: OutMode = "float", requant_scale: float | None = None,
              out_bits: int = 8, out_signed: bool = False) -> te.Tensor:
    """``data[..., C]`` times an ``int{bits}`` weight ``[K, C]`` (transposed) -> ``[..., K]``."""
    check_mode(out_mode, requant_scale)
    if (group_size > 0) != (scale_codes is not None):
        raise ValueError("grouped integer weights need scale_codes and per-channel ones none "
                         f"(group_size={group_size}, scale_codes={'given' if scale_codes is not None else 'None'})")
    kout, cin = dense_dims(data, weight_shape)
    wq = _expand(codes, scale_codes, _layout((kout, cin), group_size), bits)
    return dense_with_epilogue("int_dense", data, kout, cin, lambda xv, k, c: xv * _w(wq, k, c), out_scale,
                               out_bias, relu, out_mode, requant_scale, out_bits, out_signed)


def int_operands(layer: LayerSpec) -> Operands:
    """The packed k-bit codes of an integer layer, its width, group size and scale codes (None per channel)."""
    tw = layer.weight
    return [tw.packed_codes()], {"bits": tw.bits, "group_size": tw.group_size, "scale_codes": tw.scale_codes()}


INT_CONV2D = register(Kernel("int_conv2d", family="int", op="conv2d", isa=GENERIC, compute=int_conv2d,
                             schedule=conv2d_schedule("w_int"), operands=int_operands))
INT_DENSE = register(Kernel("int_dense", family="int", op="dense", isa=GENERIC, compute=int_dense,
                            schedule=dense_schedule("w_int"), operands=int_operands))
