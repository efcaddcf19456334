"""A decode-free grouped-ternary dense kernel for few activation rows on AVX-512 VBMI + VNNI (T-MAC style:
``vpermb`` table lookups feeding ``vpdpbusd``).

At batch 1 nothing reuses a decoded weight, so decoding the 2-bit codes into int8 ``alpha * t`` costs more
than the dot product it feeds.  This kernel never decodes a weight.  For groups of 4 weights (FGQ N=4) it
computes, for output channel ``k`` and group ``s`` (inputs ``4s..4s+3``),

    P[k, s] = sum_q t[k, 4s + q] * x[4s + q]          (the group's partial sum)
    acc[k]  = sum_s alpha_q[k, s] * P[k, s]

exactly, by splitting every activation code into nibbles, ``x = xl + 16 xh`` (``xl, xh`` in 0..15):

* a code byte (4 weights) is two nibbles of 2 weights each; for one pair of inputs the 16 possible nibbles
  have partial sums ``t0 * xn0 + t1 * xn1`` in -30..30, so two lookups give a group's ``Pl`` (or ``Ph``) in
  -60..60: an int8;
* one ``vpermb`` looks 64 nibbles up in a 64-byte table: 16 output channels x 4 consecutive groups, the
  table holding the 16 entries of each of the 4 groups (built once per call from the activations: 4 tables
  of 64 bytes per 16 inputs);
* ``vpdpbusd`` multiplies the 4 groups' alpha codes (u8, up to 255) by their ``Pl`` (s8) and adds the 4
  products into the channel's int32 lane with no saturation; a second accumulator takes ``Ph``, and
  ``acc = accL + 16 * accH``.

Per 256 weights that is one 64-byte load of codes, one of alpha codes, 4 ``vpermb``, 2 byte adds, 2
``vpdpbusd`` and a few masks, against 4 decodes (each 2 shuffles, 2 mask tests, 2 masked moves) and 4
``vpdpbusd`` for the folded kernel (``kernels.vnni``).  The stored weight is the packed 2-bit codes and the
alpha codes, reordered at compile time into the kernel's tile order (the same bytes: :func:`vlut_tiles`).
Exact in int32: the numpy integer reference is the test.

Registered as ``ternary_dense_vlut``: ``LowerIntegerLayers`` gives it the ternary dense layers with groups of
4, K % 16 == 0, C % 16 == 0 and at most :data:`MAX_ROWS` activation rows on targets with AVX-512 BW + VBMI +
VNNI (``target_has_features``), before the VNNI and the LUT kernels (the rule is measured:
``scripts/bench_gemm.py --shapes Mx4096x4096 --kernels vlut-1t,vnni``).  The accumulators are a
``te.extern`` stage whose loops are written with TVM's IRBuilder; the epilogue is an ordinary TE stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as B
from tvm.target.codegen import target_has_features

from tvm_lowbit.kernels.common import (LayerSpec, OutMode, Pick, TargetLike, check_mode, epilogue, kernel_attrs,
                                       maybe_block)
from tvm_lowbit.kernels.registry import Kernel, Operands, register
from tvm_lowbit.kernels.vnni import ZERO_POINT, zero_point_term

LANES = 16        # int32 lanes (output channels) of a zmm vpdpbusd
STEP = 16         # input channels per step: 4 groups of 4
GROUP_SIZE = 4    # the groups this kernel takes (one alpha code per code byte)
_VPERMB = "llvm.x86.avx512.permvar.qi.512"
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def has_vlut(target: tvm.target.Target | None) -> bool:
    """Whether an x86 target has what the kernel needs: AVX-512 BW + VBMI (``vpermb``) + VNNI (``vpdpbusd``)."""
    if target is None or str(target.kind.name) != "llvm" \
            or str(target.attrs.get("mtriple", "x86_64")).startswith(("aarch64", "arm")):
        return False
    return all(target_has_features(f, target) for f in ("avx512bw", "avx512vbmi", "avx512vnni"))


def vlut_tiles(codes: np.ndarray, alpha_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The packed 2-bit codes [K, C/4] (``qmath.pack_2bit``) and alpha codes [K, C/4] (groups of 4) in the
    kernel's tile order ``[K/16, C/16, 64]``: byte (kb, sb, 4 i + p) is group ``4 sb + p`` of channel
    ``16 kb + i`` (the same bytes, reordered)."""
    kout, nbytes = codes.shape
    if alpha_q.shape != codes.shape or kout % LANES or nbytes % 4:
        raise ValueError(f"vlut_tiles takes codes and alpha codes [K, C/4] with K % {LANES} == 0 and C % {STEP} "
                         f"== 0 (groups of {GROUP_SIZE}), got {codes.shape} and {alpha_q.shape}")
    if alpha_q.min(initial=0) < 0 or alpha_q.max(initial=0) > 255:
        raise ValueError("vlut_tiles takes alpha codes in 0..255")

    def order(a: np.ndarray) -> np.ndarray:
        t = a.reshape(kout // LANES, LANES, nbytes // 4, 4).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(t.reshape(kout // LANES, nbytes // 4, 4 * LANES), np.uint8)

    return order(codes), order(alpha_q)


def _table_consts() -> tuple[list[tirx.PrimExpr], list[tirx.PrimExpr]]:
    """For table byte ``e = 16 p + nib`` (int8x64 masks, constants LLVM folds): where the nibble's weight 0 /
    weight 1 has code 1 (t = +1) and code 3 (t = -1)."""
    nib = tirx.Ramp(tirx.const(0, "int8"), tirx.const(1, "int8"), 64) & tirx.Broadcast(tirx.const(15, "int8"), 64)
    ones, zeros = tirx.Broadcast(tirx.const(-1, "int8"), 64), tirx.Broadcast(tirx.const(0, "int8"), 64)

    def mask(w: int, code: int) -> tirx.PrimExpr:
        field = (nib >> tirx.Broadcast(tirx.const(2 * w, "int8"), 64)) & tirx.Broadcast(tirx.const(3, "int8"), 64)
        return tirx.Select(field == tirx.Broadcast(tirx.const(code, "int8"), 64), ones, zeros)

    return [mask(0, 1), mask(1, 1)], [mask(0, 3), mask(1, 3)]


def _lut_stmt(x: tirx.Buffer, codes: tirx.Buffer, alpha: tirx.Buffer, out: tirx.Buffer, nb: int,
              parallel: bool) -> tirx.Stmt:
    """The kernel's loops on the buffers ``x[rows, C]`` (u8), ``codes`` / ``alpha`` ``[K/16, C/16, 64]``
    (:func:`vlut_tiles`) and ``out[rows, K]`` (int32 accumulators): the body of a ``te.extern``."""
    rows, nsb = int(x.shape[0]), int(codes.shape[1])
    nkb = int(codes.shape[0])
    (pos0, pos1), (neg0, neg1) = _table_consts()
    # source byte of every table byte: input 4p + 2h + w of the step (h: which nibble of the code byte)
    src = [[[4 * (e // 16) + 2 * h + w for e in range(64)] for w in (0, 1)] for h in (0, 1)]
    posmask = T.reinterpret("uint8x64", T.broadcast(T.uint32(0x30201000), LANES))  # byte j: 16 * (j % 4)
    low4, four = T.broadcast(T.uint8(15), 64), T.broadcast(T.uint8(4), 64)

    def table(xv: tirx.PrimExpr, h: int) -> tirx.PrimExpr:
        """The 64-byte table of nibble ``h`` of the code bytes for the 16 activation nibbles ``xv``."""
        x0 = tirx.Shuffle([xv, xv, xv, xv], src[h][0])
        x1 = tirx.Shuffle([xv, xv, xv, xv], src[h][1])
        return (x0 & pos0) - (x0 & neg0) + (x1 & pos1) - (x1 & neg1)

    def vpermb(tab: tirx.PrimExpr, idx: tirx.PrimExpr) -> tirx.PrimExpr:
        return T.call_llvm_pure_intrin("int8x64", _VPERMB, tab, idx)

    with IRBuilder() as ib:
        with B.seq_scope():
            # tables [row, step, 4, 64]: (xl | xh) x (low | high nibble of the code byte), 256 bytes per 16 inputs
            tab = B.alloc_buffer((rows, nsb, 4, 64), "int8")
            with B.grid(rows, nsb) as (r, sb):
                xv = x.vload([r, sb * STEP], "uint8x16")
                xl = T.reinterpret("int8x16", xv & T.broadcast(T.uint8(15), 16))
                xh = T.reinterpret("int8x16", xv >> T.broadcast(T.uint8(4), 16))
                for w, (xn, h) in enumerate(((xl, 0), (xl, 1), (xh, 0), (xh, 1))):
                    B.buffer_store(tab, table(xn, h), [r, sb, w, slice(0, 64)])
            with (B.parallel if parallel else B.serial)(0, nkb // nb) as kbo:
                with B.serial(0, rows) as r:
                    acc = B.alloc_buffer((nb, 2, LANES), "int32", scope="local")
                    with B.unroll(0, nb) as j:
                        B.buffer_store(acc, T.broadcast(0, LANES), [j, 0, slice(0, LANES)])
                        B.buffer_store(acc, T.broadcast(0, LANES), [j, 1, slice(0, LANES)])
                    with B.serial(0, nsb) as sb:
                        t = [tab.vload([r, sb, w, 0], "int8x64") for w in range(4)]
                        with B.unroll(0, nb) as j:
                            c = codes.vload([kbo * nb + j, sb, 0], "uint8x64")
                            a = T.reinterpret("int8x64", alpha.vload([kbo * nb + j, sb, 0], "uint8x64"))
                            lo = T.reinterpret("int8x64", (c & low4) | posmask)
                            hi = T.reinterpret("int8x64", (c >> four) | posmask)
                            for half in range(2):  # xl, xh
                                part = vpermb(t[2 * half], lo) + vpermb(t[2 * half + 1], hi)
                                B.buffer_store(acc, T.call_llvm_pure_intrin(
                                    "int32x16", _VPDPBUSD, acc.vload([j, half, 0], "int32x16"), a, part),
                                    [j, half, slice(0, LANES)])
                    with B.unroll(0, nb) as j:
                        B.buffer_store(out, acc.vload([j, 0, 0], "int32x16")
                                       + (acc.vload([j, 1, 0], "int32x16") << T.broadcast(4, LANES)),
                                       [r, slice((kbo * nb + j) * LANES, (kbo * nb + j + 1) * LANES)])
    return ib.get()


def lut_acc(x: te.Tensor, codes_v: te.Tensor, alpha_v: te.Tensor, nb: int = 4, parallel: bool = True) -> te.Tensor:
    """The int32 accumulators ``[rows, K]`` of uint8 activation codes ``x[rows, C]`` by the tiles of
    :func:`vlut_tiles` (a ``te.extern`` stage named ``acc``)."""
    nkb, nsb = (int(v) for v in codes_v.shape[:2])
    rows, cin = (int(v) for v in x.shape)
    if cin != STEP * nsb or nkb % nb or str(x.dtype) != "uint8":
        raise ValueError(f"the vpermb LUT kernel takes uint8 x[rows, {STEP * nsb}] and K % {LANES * nb} == 0, got x "
                         f"{x.dtype}{list(x.shape)}, K={LANES * nkb}")
    return te.extern((rows, LANES * nkb), [x, codes_v, alpha_v],
                     lambda ins, outs: _lut_stmt(*ins, *outs, nb, parallel), dtype="int32", name="acc")


def dense_vlut_func(rows: int, kout: int, cin: int, nb: int = 4, parallel: bool = True) -> tirx.PrimFunc:
    """``acc[m, k] = sum_c x[m, c] * alpha_q[k, c // 4] * t[k, c]`` (int32) for uint8 activation codes
    ``x[rows, cin]`` and the tiles of :func:`vlut_tiles`; ``nb`` blocks of 16 channels share each table load.
    ``parallel``: the blocks of channels over TVM's thread pool (else one thread)."""
    if kout % (LANES * nb) or cin % STEP:
        raise ValueError(f"the vpermb LUT kernel needs K % {LANES * nb} == 0 and C % {STEP} == 0, got K={kout}, "
                         f"C={cin}")
    x = te.placeholder((rows, cin), "uint8", name="x")
    codes = te.placeholder((kout // LANES, cin // STEP, 64), "uint8", name="codes")
    alpha = te.placeholder((kout // LANES, cin // STEP, 64), "uint8", name="alpha")
    acc = lut_acc(x, codes, alpha, nb, parallel)
    return te.create_prim_func([x, codes, alpha, acc]).with_attr("global_symbol", "main")


def build_dense(rows: int, kout: int, cin: int, *, nb: int = 4, parallel: bool = True,
                target: TargetLike = None) -> tvm.runtime.Module:
    """The compiled kernel (arguments ``x, codes_v, alpha_v, out``; the weights from :func:`vlut_tiles`)."""
    tgt = tvm.target.Target(target if target is not None else {"kind": "llvm", "mcpu": "znver4"})
    if not has_vlut(tgt):
        raise ValueError(f"target {tgt} lacks AVX-512 BW/VBMI/VNNI (vpermb, vpdpbusd) for the vpermb LUT kernel")
    return tvm.compile(tvm.IRModule({"main": dense_vlut_func(rows, kout, cin, nb, parallel)}), target=tgt)


# --------------------------------------------------------------------------------------------
# The registered kernel: TE compute (the extern accumulators + the epilogue), operands, rule
# --------------------------------------------------------------------------------------------

# activation rows (batch x tokens) up to which a ternary dense layer takes this kernel on a target that
# has it: measured with scripts/bench_gemm.py --shapes Mx4096x4096 --kernels vlut-1t,vnni (docs/results.md);
# its tables and lookups grow with the rows, while the VNNI kernel's decode is shared by every row
MAX_ROWS = 4
PREFERENCE = 31  # before kernels.lut (30) and the VNNI dense kernel (26) for the rows it takes
NAME = "ternary_dense_vlut"


def _blocks(kout: int) -> int:
    """Blocks of 16 channels that share a table load (4, else 2, else 1)."""
    return next(nb for nb in (4, 2, 1) if kout % (LANES * nb) == 0)


def ternary_dense_vlut(data: te.Tensor, codes_v: te.Tensor, alpha_v: te.Tensor, out_scale: te.Tensor,
                       out_bias: te.Tensor, *, weight_shape: Sequence[int], group_size: int,
                       zp: te.Tensor | None = None, relu: bool = False, out_mode: OutMode = "float",
                       requant_scale: float | None = None, out_bits: int = 8, out_signed: bool = False) -> te.Tensor:
    """``kernels.ternary_dense`` (same result) of 8-bit activation codes ``data[rows, C]`` by the tiles of
    :func:`vlut_tiles`; groups of 4; signed codes are shifted by 128 and ``zp`` (int32 [K],
    ``vnni.zero_point_term``) adds back ``-128 * sum(w[k])``."""
    check_mode(out_mode, requant_scale)
    kout, cin = (int(v) for v in weight_shape)
    if group_size != GROUP_SIZE:
        raise ValueError(f"the vpermb LUT kernel takes groups of {GROUP_SIZE}, got {group_size}")
    if len(data.shape) != 2 or int(data.shape[1]) != cin or str(data.dtype) not in ("uint8", "int8"):
        raise ValueError(f"the vpermb LUT kernel takes 8-bit activation codes [rows, {cin}], got {data.dtype}"
                         f"{[int(v) for v in data.shape]}")
    signed = str(data.dtype) == "int8"
    if signed != (zp is not None):
        raise ValueError("signed activation codes need the zero-point term zp (int32 [K]) and unsigned ones none")
    x = data
    if signed:
        x = te.compute(data.shape, lambda i, c: (data[i, c].astype("int32") + ZERO_POINT).astype("uint8"),
                       name="x_u8")
    acc = lut_acc(x, codes_v, alpha_v, _blocks(kout))

    def body(i, k):
        a = acc[i, k] if zp is None else acc[i, k] + zp[k]
        if out_mode == "acc":
            return a
        return epilogue(a, out_scale[k], out_bias[k], relu, out_mode, requant_scale, out_bits, out_signed)

    return te.compute((int(data.shape[0]), kout), body, name="out", attrs=kernel_attrs(NAME))


def vlut_fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
    """A ternary dense layer with groups of 4 along the input channels, K % 16 == 0, C % 16 == 0, 2-D
    activations of at most :data:`MAX_ROWS` rows and at most 8 bits, on a target with AVX-512 VBMI + VNNI."""
    if not has_vlut(target):
        return "the target lacks AVX-512 BW/VBMI/VNNI (vpermb, vpdpbusd)"
    if layer.act_bits > 8:
        return f"{layer.act_bits}-bit activation codes"
    if len(layer.act_shape) != 2:
        return f"activations of shape {tuple(layer.act_shape)}: takes [rows, C]"
    if layer.rows > MAX_ROWS:
        return f"{layer.rows} activation rows > MAX_ROWS={MAX_ROWS}"
    kout, cin = (int(v) for v in layer.attrs["weight_shape"])
    tw = layer.weight
    if tw.layout.along != "in" or tw.layout.group_size != GROUP_SIZE:
        return f"ternary groups of {tw.layout.group_size} along {tw.layout.along!r}: takes {GROUP_SIZE} along the inputs"
    if kout % LANES or cin % STEP:
        return f"K={kout}, C={cin}: need K % {LANES} == 0 and C % {STEP} == 0"
    return None


def vlut_operands(layer: LayerSpec) -> Operands:
    """The tile-ordered codes and alpha codes, the group size, and the zero-point term of signed codes."""
    tw = layer.weight
    kout, cin = (int(v) for v in layer.attrs["weight_shape"])
    cv, av = vlut_tiles(tw.packed_codes().reshape(kout, -1)[:, :cin // 4], tw.alpha_q.numpy().reshape(kout, -1))
    extra = {"zp": zero_point_term(tw.w_int.numpy())} if layer.act_signed else {}
    return [cv, av], {"group_size": tw.layout.group_size, **extra}


def schedule_dense_vlut(sch: tvm.s_tir.Schedule, _target: TargetLike = None, pick: Pick | None = None) -> None:
    """The accumulators are the extern's own loops; the epilogue (and the shift of signed codes) is
    vectorized over 16 channels."""
    for name in ("out", "x_u8"):
        blk = maybe_block(sch, name)
        if blk is None:
            continue
        inner = sch.get_loops(blk)[-1]
        if int(sch.get(inner).extent) % LANES == 0:
            sch.vectorize(sch.split(inner, [None, LANES])[1])


TERNARY_DENSE_VLUT = register(Kernel(NAME, family="ternary", op="dense", isa="vlut", compute=ternary_dense_vlut,
                                     schedule=schedule_dense_vlut, operands=vlut_operands, fits=vlut_fits,
                                     preference=PREFERENCE))
