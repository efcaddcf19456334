"""A lookup-table grouped-ternary dense kernel (T-MAC style) for memory-bound shapes: few activation rows
against a large weight, e.g. a classifier at batch 1.

Four ternary weights have 3^4 = 81 sign patterns, so their codes pack into one byte as a base-3 index
``idx = sum_q (t_q + 1) * 3^q`` (the same 2 bits a weight as the 2-bit codes).  For each activation row
and each step of 4 input channels, the kernel first tabulates the 81 partial sums

    table[m, s, idx] = sum_q x[m, 4s + q] * t_q(idx)

(``M * C/4 * 81`` entries, built once per call), then every output channel needs one table lookup per
4 weights instead of 4 multiply-adds and no weight unpacking:

    acc[m, k] = sum_s alpha_q[k, group(4s)] * table[m, s, codes3[k, s]]

Exact in int32, like the other kernels (groups of a multiple of 4, so the 4 weights of a step share one
alpha).  Which kernel a dense layer gets is a measured rule (``scripts/bench_gemm.py --shapes``): see
:data:`LUT_MAX_ROWS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm import te

from tvm_lowbit import qmath
from tvm_lowbit.kernels.avx2 import has_avx2
from tvm_lowbit.kernels.common import (LayerSpec, OutMode, Pick, TargetLike, check_mode, dense_dims, epilogue,
                                       kernel_attrs, maybe_block, tile)
from tvm_lowbit.kernels.registry import Kernel, Operands, register
from tvm_lowbit.kernels.vnni import ternary_vnni_fits, vnni_lanes

PATTERNS = 81  # 3^4 sign patterns of 4 ternary weights
# rows (batch x tokens) up to which the x86 ternary dense layers take this kernel: measured with
# scripts/bench_gemm.py --shapes (README, "Autotuning and AVX2"); its table costs grow with the rows, and
# from 4 rows on the default kernel is faster
LUT_MAX_ROWS = 2


def base3_codes(t: np.ndarray) -> np.ndarray:
    """Ternary values [K, C] (C % 4 == 0) -> uint8 [K, C/4] base-3 indices of each run of 4."""
    t = np.asarray(t, np.int64)
    k, c = t.shape
    if c % 4 or not np.isin(t, (-1, 0, 1)).all():
        raise ValueError(f"base3_codes takes ternary values with C % 4 == 0, got shape {t.shape}")
    return ((t.reshape(k, c // 4, 4) + 1) * np.array([1, 3, 9, 27])).sum(-1).astype(np.uint8)


def ternary_dense_lut(data: te.Tensor, codes3: te.Tensor, alpha_q: te.Tensor, out_scale: te.Tensor,
                      out_bias: te.Tensor, *, weight_shape: Sequence[int], group_size: int, relu: bool = False,
                      out_mode: OutMode = "float", requant_scale: float | None = None, out_bits: int = 8,
                      out_signed: bool = False) -> te.Tensor:
    """``kernels.ternary_dense`` on a lookup table: ``codes3`` [K, C/4] from :func:`base3_codes`,
    ``alpha_q`` [K, groups] as for the other kernels; C % 4 == 0, ``group_size % 4 == 0``."""
    check_mode(out_mode, requant_scale)
    kout, cin = dense_dims(data, weight_shape)
    lay = qmath.group_layout((kout, cin), group_size)
    if cin % 4 or lay.group_size % 4:
        raise ValueError(f"the LUT kernel needs C % 4 == 0 and group_size % 4 == 0, got C={cin}, group_size="
                         f"{lay.group_size}; use kernels.ternary_dense")
    if tuple(int(v) for v in codes3.shape) != (kout, cin // 4):
        raise ValueError(f"codes3 shape {tuple(codes3.shape)} != ({kout}, {cin // 4}): base-3 codes, one byte per 4 "
                         "weights (kernels.lut.base3_codes)")
    lead = [int(v) for v in data.shape[:-1]]
    q = te.reduce_axis((0, 4), name="q")
    pow3 = (1, 3, 9, 27)

    def digit(idx, qq):  # t_q of pattern idx: its q-th base-3 digit minus 1
        p3 = te.if_then_else(qq == 0, pow3[0], te.if_then_else(qq == 1, pow3[1], te.if_then_else(qq == 2, pow3[2],
                                                                                                   pow3[3])))
        return (idx // p3) % 3 - 1

    table = te.compute((*lead, cin // 4, PATTERNS),
                       lambda *i: te.sum(data[(*i[:-2], i[-2] * 4 + q)].astype("int32") * digit(i[-1], q), axis=q),
                       name="lut")
    rs = te.reduce_axis((0, cin // 4), name="rs")  # one table lookup per step of 4 weights
    acc = te.compute(
        (*lead, kout),
        lambda *i: te.sum(table[(*i[:-1], rs, codes3[i[-1], rs].astype("int32"))]
                          * alpha_q[i[-1], (rs * 4) // lay.group_size].astype("int32"), axis=rs),
        name="acc", attrs=kernel_attrs("ternary_dense_lut") if out_mode == "acc" else None)
    if out_mode == "acc":
        return acc
    return te.compute(
        (*lead, kout),
        lambda *i: epilogue(acc[i], out_scale[i[-1]], out_bias[i[-1]], relu, out_mode, requant_scale, out_bits,
                             out_signed),
        name="out", attrs=kernel_attrs("ternary_dense_lut"))


def schedule_dense_lut(sch: tvm.s_tir.Schedule, pick: Pick | None = None) -> None:
    """The table in parallel over its steps (vectorized over the 81 patterns); the lookups in parallel over
    blocks of output channels, vectorized over ``kb`` channels (AVX2: one ``vpgatherdd`` per 8 lookups)."""
    lut = sch.get_sblock("lut")
    lps = sch.get_loops(lut)
    sch.parallel(sch.fuse(*lps[:-2]))
    acc = sch.get_sblock("acc")
    lps = sch.get_loops(acc)
    lead, k, rs = lps[:-2], lps[-2], lps[-1]
    kout = int(sch.get(k).extent)
    kb = tile(kout, (8, 16, 4, 2), pick)
    ko, ki = sch.split(k, [None, kb])
    order = [ko, *lead, rs, ki]
    sch.reorder(*order)
    at = lead[-1] if lead else ko
    if maybe_block(sch, "out") is not None:  # the epilogue consumes the accumulator tile
        sch.reverse_compute_at(sch.get_sblock("out"), at, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
    else:
        sch.reverse_compute_at(sch.cache_write(acc, 0, "local"), at, preserve_unit_loops=True)
    sch.parallel(ko)
    init = sch.decompose_reduction(acc, rs)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(ki)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def lut_fits(layer: LayerSpec, target: tvm.target.Target | None) -> str | None:
    """A ternary dense layer with at most ``LUT_MAX_ROWS`` activation rows on an AVX2 target (the measured
    rule: its gathers are AVX2's ``vpgatherdd``), C % 4 == 0 and groups of a multiple of 4."""
    if target is None or not has_avx2(target):
        return "the target has no AVX2"
    lanes = vnni_lanes(target)
    if lanes and ternary_vnni_fits(lanes)(layer, target) is None:
        # measured (scripts/bench_gemm.py --shapes 1x4096x4096 --kernels vnni,lut): the folded VNNI kernel is
        # 2.4-2.5x faster at batch 1 on an AVX-512 VNNI host
        return "the VNNI dense kernel fits (faster at few rows, measured)"
    if layer.rows > LUT_MAX_ROWS:
        return f"{layer.rows} activation rows > LUT_MAX_ROWS={LUT_MAX_ROWS}"
    cin = int(layer.attrs["weight_shape"][1])
    if cin % 4 or layer.weight.layout.group_size % 4:
        return f"C={cin}, groups of {layer.weight.layout.group_size}: need multiples of 4"
    return None


def lut_operands(layer: LayerSpec) -> Operands:
    """The base-3 codes [K, C/4] and the uint8 ``alpha_q`` [K, groups] of a ternary dense layer."""
    tw = layer.weight
    k, cin = (int(v) for v in layer.attrs["weight_shape"])
    codes3 = base3_codes(tw.t.numpy().reshape(k, -1)[:, :cin])
    return [codes3, tw.alpha_q.numpy().astype(np.uint8).reshape(k, -1)], {"group_size": tw.layout.group_size}


def _schedule(sch: tvm.s_tir.Schedule, _target: TargetLike, pick: Pick | None = None) -> None:
    schedule_dense_lut(sch, pick)


PREFERENCE = 30  # measured: before the AVX2 and the generic kernels for the few rows it takes
TERNARY_DENSE_LUT = register(Kernel("ternary_dense_lut", family="ternary", op="dense", isa="lut",
                                    compute=ternary_dense_lut, schedule=_schedule, operands=lut_operands,
                                    fits=lut_fits, preference=PREFERENCE))
