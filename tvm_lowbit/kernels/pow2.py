"""TE compute definitions of the power-of-two (INQ) conv2d / dense layers: shifts and adds, no multiplies.

The math is :mod:`tvm_lowbit.qmath` (``Pow2Weight``, ``pow2_codes``), bit for bit:

* the packed codes (``code_bits`` 4: two per byte, low nibble first; 8: one per byte; 0 = zero,
  else ``e + 1`` in the low bits and the sign in the top bit) are decoded once, outside the
  multiply-accumulate loop, in a three-output ``w_dec`` stage: the shift ``e``, a sign mask
  ``neg`` (0 or -1) and a non-zero mask ``nz`` (0 or -1), all int8;
* ``acc`` sums, exactly in int32, the branchless term ``(((x & nz) << e) ^ neg) - neg``: the zero
  mask, the shift and a conditional two's-complement negate (``(v ^ -1) - (-1) = -v``).  There is
  no Select and no multiply (``0 - x`` is written instead of unary minus, which TIR prints as
  ``x * -1``), so LLVM emits ``shl`` (``vpsllvd``/``vpslld`` on AVX2, ``ushl``/``shl`` on NEON);
* the epilogue and the output modes "acc" / "float" / "requant" are those of the ternary kernels.

The code layout is ``qmath.pow2_flat``: a conv weight [K, Cg, R, S] as [K, R*S*Cg] in (r, s, c)
order, a linear weight [K, C] as is.  Default schedules: :mod:`tvm_lowbit.kernels.generic` (the same
register tiles as the ternary kernels, with ``w_dec`` computed per block of output channels).
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te, tirx

from tvm_lowbit.kernels.common import (OutMode, check_mode, conv_dims, conv_with_epilogue, dense_dims,
                                       dense_with_epilogue)
from tvm_lowbit.kernels.generic import conv2d_schedule, dense_schedule
from tvm_lowbit.kernels.registry import GENERIC, Kernel, LayerSpec, Operands, register


def decode(codes: te.Tensor, code_bits: int, kout: int, length: int) -> list[te.Tensor]:
    """(e, neg, nz) int8 stages of shape [K, n_bytes, 8 // code_bits] (padding decodes to a zero weight)."""
    if code_bits not in (4, 8):
        raise ValueError(f"code_bits must be 4 or 8, got {code_bits}")
    per = 8 // code_bits
    nbytes = -(-length // per)
    if tuple(int(v) for v in codes.shape) != (kout, nbytes):
        raise ValueError(f"codes shape {tuple(codes.shape)} != ({kout}, {nbytes}) for {length} "
                         f"{code_bits}-bit codes per row")
    mask = (1 << code_bits) - 1
    idx_mask = (1 << (code_bits - 1)) - 1

    def f(k, jb, q):
        byte = codes[k, jb].astype("int32")
        c = ((byte >> (q * code_bits).astype("int32")) & mask) if per > 1 else byte
        idx = c & idx_mask
        e = tirx.max(idx - 1, 0)
        neg = 0 - (c >> (code_bits - 1))       # 0 or -1
        nz = 0 - tirx.min(idx, 1)              # 0 for a zero weight, else -1
        return [e.astype("int8"), neg.astype("int8"), nz.astype("int8")]

    return te.compute((kout, nbytes, per), f, name="w_dec")


def shift_term(x: tirx.PrimExpr, dec: list[te.Tensor], k: tirx.PrimExpr, j: tirx.PrimExpr, per: int) -> tirx.PrimExpr:
    """sign * (x << e), or 0: branchless, no multiply."""
    jb, q = (j // per, j % per) if per > 1 else (j, 0)
    e, neg, nz = (t[k, jb, q].astype("int32") for t in dec)
    return ((tirx.shift_left(x & nz, e)) ^ neg) - neg


def pow2_conv2d(data: te.Tensor, codes: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
                weight_shape: Sequence[int], code_bits: int = 4, strides: int | Sequence[int] = 1,
                padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                relu: bool = False, out_mode: OutMode = "float", requant_scale: float | None = None,
                out_bits: int = 8, out_signed: bool = False) -> te.Tensor:
    """NCHW conv of activation codes with a power-of-two weight; output ``[B, K, OH, OW]``.

    ``codes`` is ``Pow2Weight.packed_codes()`` of a weight of shape ``weight_shape = (K, Cg, R, S)``
    and ``code_bits`` its ``Pow2Weight.code_bits``; ``padding`` is symmetric (ph, pw).
    """
    check_mode(out_mode, requant_scale)
    kout, cg, kh, kw = conv_dims(data, weight_shape, groups)
    per = 8 // code_bits if code_bits in (4, 8) else 0
    dec = decode(codes, code_bits, kout, kh * kw * cg)
    return conv_with_epilogue(
        "pow2_conv2d", data, (kout, cg, kh, kw), strides, padding, dilation, groups,
        lambda xv, k, c, r, s: shift_term(xv, dec, k, (r * kw + s) * cg + c, per), out_scale, out_bias, relu,
        out_mode, requant_scale, out_bits, out_signed)


def pow2_dense(data: te.Tensor, codes: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
               weight_shape: Sequence[int], code_bits: int = 4, relu: bool = False,
               out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
               out_signed: bool = False) -> te.Tensor:
    """``data[..., C]`` times a power-of-two weight ``[K, C]`` (transposed) -> ``[..., K]``."""
    check_mode(out_mode, requant_scale)
    kout, cin = dense_dims(data, weight_shape)
    per = 8 // code_bits if code_bits in (4, 8) else 0
    dec = decode(codes, code_bits, kout, cin)
    return dense_with_epilogue("pow2_dense", data, kout, cin, lambda xv, k, c: shift_term(xv, dec, k, c, per),
                               out_scale, out_bias, relu, out_mode, requant_scale, out_bits, out_signed)


def pow2_operands(layer: LayerSpec) -> Operands:
    """The packed sign+exponent codes of a power-of-two layer, and their width."""
    return [layer.weight.packed_codes()], {"code_bits": layer.weight.code_bits}


POW2_CONV2D = register(Kernel("pow2_conv2d", family="pow2", op="conv2d", isa=GENERIC, compute=pow2_conv2d,
                              schedule=conv2d_schedule("w_dec"), operands=pow2_operands))
POW2_DENSE = register(Kernel("pow2_dense", family="pow2", op="dense", isa=GENERIC, compute=pow2_dense,
                             schedule=dense_schedule("w_dec"), operands=pow2_operands))
