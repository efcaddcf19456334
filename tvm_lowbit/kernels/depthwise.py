"""Integer depthwise conv kernels (``groups == channels == output channels``), vectorized over channels,
for x86 (AVX2 / AVX-512) and aarch64 (NEON).

A depthwise layer has one filter of ``kh x kw`` taps per channel, so the reduction is only the taps (9 or
25): the dot-product kernels of the other ISA modules (reductions over input channels) do not fit it, and
the generic kernel vectorizes over output columns of an NCHW layout (7-wide rows at the end of a network).
Here the channels are the vector lanes: in NHWC the activations of one pixel are contiguous channels, and
so are the weights of one tap once laid out ``[taps, C]``.

* Weights: the layer's integer weight ``w_int`` (``int8`` per channel: the codes; grouped ternary: ``alpha_q
  * t``, grouped along the taps; ``int4`` in groups: ``scale_q * c``) as ``int16 [kh * kw, C]``.  A
  depthwise filter is ``9 * C`` values, so the decoded weight is the stored one (no decode stage).
* Accumulation: ``acc[b, i, j, c] = sum over taps of int32(x) * int32(w)``, exact in int32 for 8-bit codes
  and int16 weights.  The schedule keeps a register tile of ``tj`` output columns x ``lanes`` channels of
  int32 accumulators; each tap loads one weight vector, reused by the ``tj`` columns.  LLVM selects the
  multiply-accumulate: ``smlal`` / ``smlal2`` (int16 x int16 -> int32, 4 + 4 lanes) on aarch64 from the
  16-bit operands, ``vpmulld`` + ``vpaddd`` on x86 (16 int32 lanes with AVX-512, 8 with AVX2).
* Padding: a padded NHWC copy of the codes (code 0 is activation 0) is made once, in the activation dtype;
  on aarch64 the copy is int16, so the taps' loads feed ``smlal`` without a widening step each.
* Epilogue: :func:`kernels.common.epilogue` per output element, fused into the output tile.

Layouts: input NCHW or NHWC (``in_layout``), output NCHW or NHWC (``out_layout``, written to the block's
``tvm_lowbit.out_layout`` annotation), so the integer region runs NHWC end to end.  The numpy integer
reference (``qmath.conv2d_int_np``) is the test: ``tests/test_depthwise.py`` on the host,
``tests/test_board.py`` on the emulated Pi 4 and Pi 5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tvm
from tvm import te, tirx
from tvm.target.codegen import target_has_features

from tvm_lowbit.kernels.common import (LayerSpec, OutMode, Pick, TargetLike, check_mode, conv_out_size, epilogue,
                                       kernel_attrs, layout_reader, pair, target_kind, tile)
from tvm_lowbit.kernels.registry import Kernel, Operands
from tvm_lowbit.kernels.registry import register as register_kernel

LAYOUTS = ("NCHW", "NHWC")
LAYOUT_ATTR = "tvm_lowbit.out_layout"
MAX_WEIGHT = (1 << 15) - 1   # |w_int| bound: the weights are int16
MIN_LANES = 8                # channels are padded to a multiple of the narrowest vector (8 int32 / int16 lanes)
KERNEL_SIZES = ((3, 3), (5, 5))


def is_depthwise(weight_shape: Sequence[int], groups: int) -> bool:
    """Whether a conv weight ``(K, Cg, R, S)`` with ``groups`` is depthwise (one filter per channel)."""
    kout, cg = int(weight_shape[0]), int(weight_shape[1])
    return cg == 1 and groups == kout and groups > 1


# --------------------------------------------------------------------------------------------
# Compute definition
# --------------------------------------------------------------------------------------------

def dwconv2d(data: te.Tensor, w: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, *,
             weight_shape: Sequence[int], strides: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
             dilation: int | Sequence[int] = 1, groups: int, in_layout: str = "NCHW", out_layout: str = "NCHW",
             wide_input: bool = False, relu: bool = False, out_mode: OutMode = "float",
             requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False,
             kind: str = "int_dwconv2d") -> te.Tensor:
    """Depthwise conv of 8-bit activation codes (``uint8``/``int8``, ``in_layout``) with the integer
    weight ``w`` (``int16 [R * S, C']``, C rounded up to ``MIN_LANES``: :func:`weight_taps`), exact in int32, then the qmath epilogue
    (``out_mode="acc"``: the accumulators).  ``wide_input``: the padded copy of the codes is int16 (the
    aarch64 schedule's form).  Output ``[B, C, OH, OW]`` or ``[B, OH, OW, C]`` (``out_layout``)."""
    check_mode(out_mode, requant_scale)
    if in_layout not in LAYOUTS or out_layout not in LAYOUTS:
        raise ValueError(f"layouts must be one of {LAYOUTS}, got in {in_layout!r}, out {out_layout!r}")
    dtype = str(data.dtype)
    if dtype not in ("uint8", "int8"):
        raise ValueError(f"the depthwise kernels take 8-bit activation codes (uint8 or int8), got {dtype}")
    kout, cg, kh, kw = (int(v) for v in weight_shape)
    batch, chans, height, width, get = layout_reader(data, in_layout)
    if not is_depthwise(weight_shape, groups) or chans != kout:
        raise ValueError(f"not a depthwise conv: C={chans}, weight {tuple(weight_shape)}, groups={groups} "
                         "(need groups == C == K and one input channel per filter)")
    if pair(dilation) != (1, 1):
        raise ValueError(f"the depthwise kernels take dilation 1, got {dilation}")
    cpad = padded_channels(kout)
    if tuple(int(v) for v in w.shape) != (kh * kw, cpad) or str(w.dtype) != "int16":
        raise ValueError(f"depthwise weight must be int16 [{kh * kw}, {cpad}] (weight_taps), got "
                         f"{w.dtype} {tuple(int(v) for v in w.shape)}")
    (sh, sw), (ph, pw) = pair(strides), pair(padding)
    oh, ow = conv_out_size(height, kh, sh, ph), conv_out_size(width, kw, sw, pw)
    hp, wp = height + 2 * ph, width + 2 * pw
    pad_dtype = "int16" if wide_input else dtype
    xp = te.compute(  # channels padded to a whole vector with code 0 (their weights are 0 too)
        (batch, hp, wp, cpad),
        lambda b, h, x, c: tirx.if_then_else(
            tirx.all(h >= ph, h < ph + height, x >= pw, x < pw + width, c < chans),
            get(b, c, h - ph, x - pw).astype(pad_dtype), tirx.const(0, pad_dtype)),
        name="x_pad")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (batch, oh, ow, cpad),
        lambda b, i, j, c: te.sum(xp[b, i * sh + ry, j * sw + rx, c].astype("int32")
                                  * w[ry * kw + rx, c].astype("int32"), axis=[ry, rx]),
        name="acc")

    def body(b, i, j, c):
        a = acc[b, i, j, c]
        if out_mode == "acc":
            return a
        return epilogue(a, out_scale[c], out_bias[c], relu, out_mode, requant_scale, out_bits, out_signed)

    attrs = dict(kernel_attrs(kind), **{LAYOUT_ATTR: out_layout})
    if out_layout == "NCHW":
        return te.compute((batch, chans, oh, ow), lambda b, c, i, j: body(b, i, j, c), name="out", attrs=attrs)
    return te.compute((batch, oh, ow, chans), body, name="out", attrs=attrs)


def _compute(kind: str) -> Callable[..., te.Tensor]:
    def compute(data: te.Tensor, w: te.Tensor, out_scale: te.Tensor, out_bias: te.Tensor, **kw: object) -> te.Tensor:
        return dwconv2d(data, w, out_scale, out_bias, kind=kind, **kw)  # type: ignore[arg-type]

    compute.__doc__ = f"{dwconv2d.__doc__} (kernel {kind!r})"
    return compute


# --------------------------------------------------------------------------------------------
# Operands (compile time, numpy)
# --------------------------------------------------------------------------------------------

def padded_channels(chans: int) -> int:
    """Channels rounded up to a whole number of the narrowest vectors (``MIN_LANES``)."""
    return -(-chans // MIN_LANES) * MIN_LANES


def weight_taps(w_int: np.ndarray) -> np.ndarray:
    """The integer weight ``[C, 1, R, S]`` as ``int16 [R * S, C']`` (tap-major, channels contiguous; C' = C
    rounded up to ``MIN_LANES`` with zero weights, :func:`padded_channels`)."""
    w = np.asarray(w_int)
    if w.ndim != 4 or w.shape[1] != 1:
        raise ValueError(f"depthwise weight must be [C, 1, R, S], got {w.shape}")
    if np.abs(w.astype(np.int64)).max(initial=0) > MAX_WEIGHT:
        raise ValueError(f"depthwise integer weights up to {np.abs(w).max()} do not fit int16")
    taps = np.zeros((w.shape[2] * w.shape[3], padded_channels(w.shape[0])), np.int16)
    taps[:, :w.shape[0]] = w.reshape(w.shape[0], -1).T
    return taps


def _wide(isa: str) -> bool:
    return isa == NEON


def _operands(isa: str) -> Callable[[LayerSpec], Operands]:
    def operands(layer: LayerSpec) -> Operands:
        return [weight_taps(layer.weight.w_int.numpy())], {"wide_input": _wide(isa)}

    return operands


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------

def schedule_dwconv2d(sch: tvm.s_tir.Schedule, target: TargetLike, pick: Pick | None = None) -> None:
    """Register tile of ``tj`` output columns x ``lanes`` channels (int32 vectors) under the taps, unrolled;
    the output stage (epilogue) per tile; the padded NHWC codes made once, parallel over rows."""
    kind = target_kind(target)
    t = target if isinstance(target, tvm.target.Target) or target is None else tvm.target.Target(target)
    wide512 = kind == "x86" and t is not None and bool(target_has_features("avx512f", t))
    acc = sch.get_sblock("acc")
    b, i, j, c, ry, rx = sch.get_loops(acc)
    ow, chans = (int(sch.get(lp).extent) for lp in (j, c))
    # int32 accumulators: x86 AVX-512 16 lanes (32 zmm), AVX2 8 (16 ymm), aarch64 8 (two q registers)
    # columns per tile: x86 7 (7 zmm accumulators + the 9 weight vectors held across the row); aarch64 4
    # (8 q accumulators: 7 columns spill, about 10 % more instructions per output, measured on the asm)
    lanes = tile(chans, (16, 8) if wide512 else (8, 16), pick)
    tj = tile(ow, (4, 7, 6, 5, 3, 2) if kind == "aarch64" else (7, 8, 4, 6, 5, 3, 2), pick)
    co, ci = sch.split(c, [None, lanes])
    jo, ji = sch.split(j, [None, tj])
    sch.reorder(b, i, co, jo, ry, rx, ji, ci)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, jo, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    sch.parallel(sch.fuse(b, i))
    sch.vectorize(ci)
    sch.unroll(ji)
    sch.unroll(rx)
    sch.unroll(ry)
    init = sch.decompose_reduction(acc, ry)
    il = sch.get_loops(init)
    sch.vectorize(il[-1])
    sch.unroll(il[-2])
    ol = sch.get_loops(out)
    nhwc = str(sch.get(out).annotations.get(LAYOUT_ATTR, "NCHW")) == "NHWC"
    if nhwc:  # (..., ji, ci): the channels are the vector
        sch.vectorize(ol[-1])
        sch.unroll(ol[-2])
    else:  # (..., ci, ji): columns contiguous in NCHW
        sch.unroll(ol[-1])
    xl = sch.get_loops(sch.get_sblock("x_pad"))
    sch.parallel(sch.fuse(xl[0], xl[1]))
    if chans % 8 == 0:
        _, xi = sch.split(xl[-1], [None, 8])
        sch.vectorize(xi)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

X86, NEON = "dw_avx2", "dw_neon"   # ISA keys (the other conv kernels hold "avx2" / "neon" of these families)


def has_vector_unit(isa: str, target: tvm.target.Target | None) -> str | None:
    """None when ``target`` has the vector unit of ``isa``, else why not."""
    if target is None or str(target.kind.name) != "llvm":
        return "no LLVM target"
    kind = target_kind(target)
    if isa == NEON:
        if kind != "aarch64":
            return "the target is not aarch64"
        return None if target_has_features("neon", target) else "the target has no NEON"
    if kind != "x86":
        return "the target is not x86"
    return None if target_has_features("avx2", target) else "the target has no AVX2"


def _fits(isa: str) -> Callable[[LayerSpec, tvm.target.Target | None], str | None]:
    def fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
        why = has_vector_unit(isa, target)
        if why is not None:
            return why
        if layer.op != "conv2d":
            return f"no depthwise kernel for {layer.op}"
        shape = tuple(int(v) for v in layer.attrs["weight_shape"])
        groups = int(layer.attrs.get("groups", 1))
        if not is_depthwise(shape, groups):
            return f"not depthwise (weight {shape}, groups={groups})"
        if layer.act_bits > 8:
            return f"{layer.act_bits}-bit activation codes"
        if shape[2:] not in KERNEL_SIZES:
            return f"{shape[2]}x{shape[3]} filters: the depthwise kernels take 3x3 and 5x5"
        if pair(layer.attrs.get("strides", 1)) not in ((1, 1), (2, 2)):
            return f"strides {pair(layer.attrs.get('strides', 1))}: need 1 or 2"
        if pair(layer.attrs.get("dilation", 1)) != (1, 1):
            return f"dilation {pair(layer.attrs.get('dilation', 1))}"
        top = int(layer.weight.w_int.abs().max()) if layer.weight.w_int.numel() else 0
        if top > MAX_WEIGHT:
            return f"integer weights up to {top} do not fit int16"
        return None

    return fits


def _schedule(sch: tvm.s_tir.Schedule, target: TargetLike, pick: Pick | None = None) -> None:
    schedule_dwconv2d(sch, target, pick)


# above the generic kernels (0), the only others that take depthwise layers; below the ISA conv kernels, so a
# regular conv's reason does not list these, and a depthwise layer's lists why each ISA kernel refused it
PREFERENCE = 10
FAMILIES = ("ternary", "int")
for _isa in (X86, NEON):
    for _family in FAMILIES:
        _name = f"{_family}_dwconv2d_{'avx' if _isa == X86 else 'neon'}"
        register_kernel(Kernel(_name, family=_family, op="conv2d", isa=_isa, compute=_compute(_name),
                               schedule=_schedule, operands=_operands(_isa), fits=_fits(_isa),
                               preference=PREFERENCE, layouts=LAYOUTS,
                               doc="depthwise conv, channels as vector lanes"))
