"""A decode-free grouped-ternary dense kernel for few activation rows on aarch64 (T-MAC style: NEON ``tbl``
lookups of the stored 2-bit codes in 16-byte tables built from the activations).  Exact in int32.

At batch 1 every weight is used once, so decoding it into int8 (``kernels.neon``) costs as much as using
it, and a widening multiply-accumulate needs one multiply per 8 weights.  This kernel never decodes a
weight: for groups of 4 weights (FGQ N=4) with alpha code ``alpha_q[k, s]`` it computes

    P[k, s] = sum_q t[k, 4s + q] * x[4s + q]        (the group's partial sum)
    acc[k]  = sum_s alpha_q[k, s] * P[k, s]

by splitting every activation code into nibbles, ``x = xl + 16 xh`` (``xl = x & 15`` in 0..15; ``xh = x >> 4``,
0..15 for unsigned codes, -8..7 for signed ones by an arithmetic shift, so signed codes need no zero point):

* a code byte of :func:`qmath.pack_2bit` (4 weights, 2 bits each) is two nibbles of 2 weights; for one pair
  of inputs, the 16 nibble values index a 16-byte table of the partial sums ``v(n & 3) * xn0 + v(n >> 2) * xn1``
  (``v``: code 0 -> 0, 1 -> +1, 3 -> -1, and 2 -> 0: ``pack_2bit`` never writes it), in -30..30;
* a group has 4 such tables, ``(xl | xh) x (weights 0-1 | weights 2-3)``, built once per call and row
  (64 bytes per 4 inputs: a ``dup``, a multiply and a multiply-add each);
* one ``tbl`` (``vqtbl1q_s8``) looks up 16 output channels at once: the 16 code bytes of group ``s`` of
  channels ``16 kb .. 16 kb + 15`` are one 16-byte load, their low and high nibbles (an ``and``, a ``ushr``)
  index the tables, two byte adds give ``Pl`` and ``Ph`` (|.| <= 60, an int8);
* ``smull``/``smlal`` multiply them by the 16 alpha codes (one more 16-byte load) into int16 lanes, over 4
  groups: ``|alpha_q * P| <= 127 * 60 = 7620`` and ``4 * 7620 = 30480 <= 32767``, so the int16 sums never
  overflow; then ``saddw`` into int32 (``accL``, ``accH``) and at the end ``acc = accL + 16 * accH``.

Per 64 weights (16 channels x 1 group): 2 loads of weight bytes, the table loads, ``and`` + ``ushr``, 4 ``tbl``,
2 ``add``, 4 ``smlal`` and 2 ``saddw`` (over 4 groups): the compiled loop takes 74 instructions per 256 weights,
0.29-0.31 per MAC measured in all (the generic dense kernel: 1.6 at one row).  Alpha codes must fit 7 bits (signed
byte multiplies; FGQ's default ``alpha_bits=7``).  The stored weight is the packed 2-bit codes and the alpha
codes, reordered at compile time into the kernel's tile order (the same bytes: :func:`tbl_tiles`).

Registered as ``ternary_dense_tbl``: ``LowerIntegerLayers`` gives it the ternary dense layers with groups of
4 along the inputs, K % 16 == 0, C % 16 == 0 and at most :data:`MAX_ROWS` activation rows on aarch64 targets
(the rule is measured: ``scripts/bench_gemm.py --arm``).  The accumulators are a ``te.extern`` stage whose
loops are written with TVM's IRBuilder; the epilogue is an ordinary TE stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as B

from tvm_lowbit.kernels.common import LayerSpec, OutMode, Pick, TargetLike, check_mode, epilogue, kernel_attrs, \
    maybe_block
from tvm_lowbit.kernels.neon import is_aarch64
from tvm_lowbit.kernels.registry import Kernel, Operands, register

LANES = 16        # output channels per tbl (16 byte lanes)
GROUP_SIZE = 4    # the groups this kernel takes (one alpha code per code byte)
SPAN = 4          # groups summed in int16 before widening: 4 * 127 * 60 = 30480 <= 32767
STEP = GROUP_SIZE * SPAN  # input channels per int16 span
MAX_ALPHA = 127   # alpha codes are multiplied as signed bytes (smull/smlal)
MAX_P = 60        # |Pl|, |Ph|: two table entries of at most 2 * 15 each
_TBL = "llvm.aarch64.neon.tbl1.v16i8"
VALUES = (0, 1, 0, -1)  # the table's value of a 2-bit code (0, +1, never written, -1)

MAX_CIN = (2**31 - 1) // (255 * MAX_ALPHA)  # input channels for which |acc| <= 255 * 127 * C fits int32

assert SPAN * MAX_ALPHA * MAX_P <= 32767, "the int16 sums of a span would overflow"


def tbl_tiles(codes: np.ndarray, alpha_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The packed 2-bit codes [K, C/4] (``qmath.pack_2bit``) and alpha codes [K, C/4] (groups of 4) in the
    kernel's tile order ``[K/16, C/4, 16]``: byte (kb, s, i) is group ``s`` of channel ``16 kb + i`` (the same
    bytes, reordered)."""
    kout, nbytes = codes.shape
    if alpha_q.shape != codes.shape or kout % LANES or nbytes % SPAN:
        raise ValueError(f"tbl_tiles takes codes and alpha codes [K, C/4] with K % {LANES} == 0 and C % {STEP} == 0 "
                         f"(groups of {GROUP_SIZE}), got {codes.shape} and {alpha_q.shape}")
    if alpha_q.min(initial=0) < 0 or alpha_q.max(initial=0) > MAX_ALPHA:
        raise ValueError(f"tbl_tiles takes alpha codes in 0..{MAX_ALPHA} (7 bits: quantize with alpha_bits=7)")

    def order(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(kout // LANES, LANES, nbytes).transpose(0, 2, 1), np.uint8)

    return order(codes), order(alpha_q)


def _table_consts() -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """The int8x16 values of weight 0 and weight 1 of every nibble ``n`` (entry n of a table): constants
    picked from broadcasts of 0, 1 and -1 (LLVM folds them)."""
    src = [tirx.Broadcast(tirx.const(v, "int8"), LANES) for v in (0, 1, -1)]
    where = {0: 0, 1: LANES, -1: 2 * LANES}
    return (tirx.Shuffle(src, [where[VALUES[n & 3]] + n for n in range(LANES)]),
            tirx.Shuffle(src, [where[VALUES[n >> 2]] + n for n in range(LANES)]))


def _tbl_stmt(x: tirx.Buffer, codes: tirx.Buffer, alpha: tirx.Buffer, out: tirx.Buffer, parallel: bool) -> tirx.Stmt:
    """The kernel's loops on ``x[rows, C]`` (8-bit codes), ``codes`` / ``alpha`` ``[K/16, C/4, 16]``
    (:func:`tbl_tiles`) and ``out[rows, K]`` (int32 accumulators): the body of a ``te.extern``."""
    rows, cin = (int(v) for v in x.shape)
    nkb, ngroups = int(codes.shape[0]), int(codes.shape[1])
    signed = str(x.dtype) == "int8"
    v0, v1 = _table_consts()

    def nibble(v: tirx.PrimExpr, high: bool) -> tirx.PrimExpr:
        """The low (0..15) or high nibble of a code as an int8 (arithmetic shift for signed codes)."""
        if high:
            return (v >> tirx.const(4, str(x.dtype))).astype("int8")
        return (v & tirx.const(15, str(x.dtype))).astype("int8")

    def tbl(tab: tirx.PrimExpr, idx: tirx.PrimExpr) -> tirx.PrimExpr:
        return T.call_llvm_pure_intrin("int8x16", _TBL, tab, idx)

    def wide(v: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
        return v.astype(f"{dtype}x{LANES}")

    with IRBuilder() as ib:
        with B.seq_scope():
            # tables [row, group, 4, 16]: (xl | xh) x (weights 0-1 | weights 2-3) of every group, 64 bytes each
            tab = B.alloc_buffer((rows, ngroups, 4, LANES), "int8")
            with B.grid(rows, ngroups) as (r, s):
                for w in range(4):
                    high, pair = w >= 2, w % 2
                    x0 = nibble(x[r, 4 * s + 2 * pair], high)
                    x1 = nibble(x[r, 4 * s + 2 * pair + 1], high)
                    B.buffer_store(tab, tirx.Broadcast(x0, LANES) * v0 + tirx.Broadcast(x1, LANES) * v1,
                                   [r, s, w, slice(0, LANES)])
            low4, four = T.broadcast(T.uint8(15), LANES), T.broadcast(T.uint8(4), LANES)
            with (B.parallel if parallel else B.serial)(0, nkb) as kb:
                with B.serial(0, rows) as r:
                    acc = B.alloc_buffer((2, LANES), "int32", scope="local")
                    B.buffer_store(acc, T.broadcast(0, LANES), [0, slice(0, LANES)])
                    B.buffer_store(acc, T.broadcast(0, LANES), [1, slice(0, LANES)])
                    with B.serial(0, ngroups // SPAN) as sp:
                        part: list[tirx.PrimExpr | None] = [None, None]  # int16 sums of the span: L, H
                        for u in range(SPAN):  # unrolled: the int16 sums stay in registers
                            s = sp * SPAN + u
                            c = codes.vload([kb, s, 0], f"uint8x{LANES}")
                            a = wide(T.reinterpret(f"int8x{LANES}", alpha.vload([kb, s, 0], f"uint8x{LANES}")), "int16")
                            lo = T.reinterpret(f"int8x{LANES}", c & low4)
                            hi = T.reinterpret(f"int8x{LANES}", c >> four)
                            t = [tab.vload([r, s, w, 0], f"int8x{LANES}") for w in range(4)]
                            for h in range(2):  # xl, xh
                                p = tbl(t[2 * h], lo) + tbl(t[2 * h + 1], hi)
                                term = a * wide(p, "int16")
                                part[h] = term if part[h] is None else part[h] + term
                        for h in range(2):
                            B.buffer_store(acc, acc.vload([h, 0], f"int32x{LANES}") + wide(part[h], "int32"),
                                           [h, slice(0, LANES)])
                    B.buffer_store(out, acc.vload([0, 0], f"int32x{LANES}")
                                   + (acc.vload([1, 0], f"int32x{LANES}") << T.broadcast(4, LANES)),
                                   [r, slice(kb * LANES, (kb + 1) * LANES)])
    return ib.get()


def tbl_acc(x: te.Tensor, codes_t: te.Tensor, alpha_t: te.Tensor, parallel: bool = True) -> te.Tensor:
    """The int32 accumulators ``[rows, K]`` of 8-bit activation codes ``x[rows, C]`` by the tiles of
    :func:`tbl_tiles` (a ``te.extern`` stage named ``acc``)."""
    nkb, ngroups = (int(v) for v in codes_t.shape[:2])
    rows, cin = (int(v) for v in x.shape)
    if cin != GROUP_SIZE * ngroups or ngroups % SPAN or str(x.dtype) not in ("uint8", "int8"):
        raise ValueError(f"the tbl LUT kernel takes 8-bit codes x[rows, {GROUP_SIZE * ngroups}] with C % {STEP} == 0, "
                         f"got x {x.dtype}{list(x.shape)}")
    return te.extern((rows, LANES * nkb), [x, codes_t, alpha_t],
                     lambda ins, outs: _tbl_stmt(*ins, *outs, parallel), dtype="int32", name="acc")


def dense_tbl_func(rows: int, kout: int, cin: int, signed: bool = False, parallel: bool = True) -> tirx.PrimFunc:
    """``acc[m, k] = sum_c x[m, c] * alpha_q[k, c // 4] * t[k, c]`` (int32) for 8-bit activation codes
    ``x[rows, cin]`` and the tiles of :func:`tbl_tiles`; ``parallel``: the blocks of 16 channels over TVM's
    thread pool."""
    if kout % LANES or cin % STEP:
        raise ValueError(f"the tbl LUT kernel needs K % {LANES} == 0 and C % {STEP} == 0, got K={kout}, C={cin}")
    x = te.placeholder((rows, cin), "int8" if signed else "uint8", name="x")
    codes = te.placeholder((kout // LANES, cin // GROUP_SIZE, LANES), "uint8", name="codes")
    alpha = te.placeholder((kout // LANES, cin // GROUP_SIZE, LANES), "uint8", name="alpha")
    acc = tbl_acc(x, codes, alpha, parallel)
    return te.create_prim_func([x, codes, alpha, acc]).with_attr("global_symbol", "main")


def build_dense(rows: int, kout: int, cin: int, *, signed: bool = False, parallel: bool = True,
                target: TargetLike = None) -> tvm.runtime.Module:
    """The compiled kernel (arguments ``x, codes_t, alpha_t, out``; the weights from :func:`tbl_tiles`) for an
    aarch64 target (default: the Pi 4's)."""
    tgt = tvm.target.Target(target if target is not None else
                            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]})
    if not is_aarch64(tgt):
        raise ValueError(f"target {tgt} is not aarch64: the tbl LUT kernel needs NEON tbl")
    return tvm.compile(tvm.IRModule({"main": dense_tbl_func(rows, kout, cin, signed, parallel)}), target=tgt)


# --------------------------------------------------------------------------------------------
# The registered kernel: TE compute (the extern accumulators + the epilogue), operands, rule
# --------------------------------------------------------------------------------------------

# activation rows (batch x tokens) up to which a ternary dense layer takes this kernel on aarch64, measured with
# scripts/bench_gemm.py --arm (docs/results-arm.md, 2026-12-05): on the emulated Pi 4 and Pi 5 it executes
# 0.29-0.31 instructions per MAC at every row count, the generic kernel 1.6 at one row, 0.75 at 8, 0.63 at 64
# (its decode is shared by the rows, never below ~0.6), so it wins up to 64 rows, the most measured; above that
# its tables (16 bytes per activation) outgrow the caches, which the estimate does not see: the generic kernel
MAX_ROWS = 64
PREFERENCE = 31  # before the generic dense kernel (0) for the rows it takes
NAME = "ternary_dense_tbl"


def ternary_dense_tbl(data: te.Tensor, codes_t: te.Tensor, alpha_t: te.Tensor, out_scale: te.Tensor,
                      out_bias: te.Tensor, *, weight_shape: Sequence[int], group_size: int, relu: bool = False,
                      out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                      out_signed: bool = False) -> te.Tensor:
    """``kernels.ternary_dense`` (same result) of 8-bit activation codes ``data[..., C]`` (signed or unsigned)
    by the tiles of :func:`tbl_tiles`; groups of 4."""
    check_mode(out_mode, requant_scale)
    kout, cin = (int(v) for v in weight_shape)
    if group_size != GROUP_SIZE:
        raise ValueError(f"the tbl LUT kernel takes groups of {GROUP_SIZE}, got {group_size}")
    lead = [int(v) for v in data.shape[:-1]]
    if not lead or int(data.shape[-1]) != cin or str(data.dtype) not in ("uint8", "int8"):
        raise ValueError(f"the tbl LUT kernel takes 8-bit activation codes [..., {cin}], got {data.dtype}"
                         f"{[int(v) for v in data.shape]}")
    rows = int(np.prod(lead))
    x = data
    if len(lead) != 1:  # batch x tokens: one row each (a copy of the codes, C bytes a row)
        x = te.compute((rows, cin), lambda i, c: data[(*_unravel(i, lead), c)],
                       name="x_rows")
    acc = tbl_acc(x, codes_t, alpha_t)

    def body(*i):
        row = i[0] if len(lead) == 1 else _ravel(i[:-1], lead)
        a = acc[row, i[-1]]
        if out_mode == "acc":
            return a
        return epilogue(a, out_scale[i[-1]], out_bias[i[-1]], relu, out_mode, requant_scale, out_bits, out_signed)

    return te.compute((*lead, kout), body, name="out", attrs=kernel_attrs(NAME))


def _unravel(i: tirx.PrimExpr, lead: Sequence[int]) -> list[tirx.PrimExpr]:
    idx = []
    for d in reversed(lead):
        idx.append(i % d)
        i = i // d
    return idx[::-1]


def _ravel(idx: Sequence[tirx.PrimExpr], lead: Sequence[int]) -> tirx.PrimExpr:
    flat = idx[0]
    for v, d in zip(idx[1:], lead[1:]):
        flat = flat * d + v
    return flat


def tbl_fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
    """A ternary dense layer with groups of 4 along the input channels, 7-bit alpha codes, K % 16 == 0,
    C % 16 == 0 (and C <= :data:`MAX_CIN`, for int32) and at most :data:`MAX_ROWS` rows of at most 8-bit
    activation codes, on an aarch64 target."""
    if not is_aarch64(target):
        return "the target is not aarch64"
    if layer.act_bits > 8:
        return f"{layer.act_bits}-bit activation codes"
    if layer.rows > MAX_ROWS:
        return f"{layer.rows} activation rows > MAX_ROWS={MAX_ROWS}"
    kout, cin = (int(v) for v in layer.attrs["weight_shape"])
    tw = layer.weight
    if tw.layout.along != "in" or tw.layout.group_size != GROUP_SIZE:
        return (f"ternary groups of {tw.layout.group_size} along {tw.layout.along!r}: takes {GROUP_SIZE} along the "
                "inputs")
    if kout % LANES or cin % STEP or cin > MAX_CIN:
        return f"K={kout}, C={cin}: need K % {LANES} == 0, C % {STEP} == 0 and C <= {MAX_CIN}"
    top = int(tw.alpha_q.max()) if tw.alpha_q.numel() else 0
    if top > MAX_ALPHA:
        return f"alpha codes up to {top} > {MAX_ALPHA} (quantize with alpha_bits=7)"
    return None


def tbl_operands(layer: LayerSpec) -> Operands:
    """The tile-ordered codes and alpha codes and the group size."""
    tw = layer.weight
    kout, cin = (int(v) for v in layer.attrs["weight_shape"])
    ct, at = tbl_tiles(tw.packed_codes().reshape(kout, -1)[:, :cin // 4], tw.alpha_q.numpy().reshape(kout, -1))
    return [ct, at], {"group_size": tw.layout.group_size}


def schedule_dense_tbl(sch: tvm.s_tir.Schedule, _target: TargetLike = None, _pick: Pick | None = None) -> None:
    """The accumulators are the extern's own loops; the epilogue is vectorized over 16 channels."""
    blk = maybe_block(sch, "out")
    if blk is not None:
        inner = sch.get_loops(blk)[-1]
        if int(sch.get(inner).extent) % LANES == 0:
            sch.vectorize(sch.split(inner, [None, LANES])[1])


TERNARY_DENSE_TBL = register(Kernel(NAME, family="ternary", op="dense", isa="tbl", compute=ternary_dense_tbl,
                                    schedule=schedule_dense_tbl, operands=tbl_operands, fits=tbl_fits,
                                    preference=PREFERENCE, tunable=False))
