"""TorchMean: a mean over the trailing axes summed in PyTorch's CPU order, bit for bit.

``torch.mean`` of a contiguous float32 tensor over its trailing axes (the squeeze-excitation pool of
efficientnet and mobilenet_v3, every ``AdaptiveAvgPool2d(1)``) is PyTorch's cascade sum of each row, divided
by the row length.  The cascade sum (ATen's ``SumKernel.cpp``, built for AVX2 and used on AVX-512 hosts too:
8 float32 lanes) reads a row of ``n`` values as ``n // 8`` vectors and a scalar tail; the vectors as rows of 4
(``ilp``) summed column-wise in chunks of ``step`` = 2^max(4, ceil(log2(rows)) // 4) rows, the chunk sums in
chunks of ``step`` again (three levels), then the leftover vectors, the 4 columns, the tail and the 8 lanes
in a fixed order.  TVM's ``mean`` adds the values one after another, which differs in the last bits on 70-95 %
of the pooled values (docs/results-models.md), so a quantizer after the pool (the SE reduce conv) could see
another code.  This pass writes PyTorch's order with Relax ops (slices, reshapes, one-axis sums, adds; a
one-axis ``sum`` adds from 0 in index order), so it runs on any target.  Only float32 means over trailing
axes of static shapes are rewritten, and only where PyTorch's lane count is known (``lanes`` None: unchanged).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from tvm_lowbit.passes.torch_sigmoid import torch_capability

SUM_LANES = {"AVX512": 8, "AVX2": 8}  # float32 lanes of ATen's sum kernel per CPU capability (AVX2 build)
ILP = 4       # row_sum's ilp_factor
LEVELS = 4    # multi_row_sum's num_levels

_X = wildcard()
_MEAN = is_op("relax.mean")(_X)


def torch_sum_lanes() -> int | None:
    """float32 lanes of PyTorch's CPU sum kernel (:func:`.torch_sigmoid.torch_capability`; None: a path this
    pass does not model)."""
    return SUM_LANES.get(torch_capability())


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _slice(t: relax.Expr, axis: int, begin: int, end: int) -> relax.Expr:
    return relax.op.strided_slice(t, axes=[axis], begin=[begin], end=[end])


def _add(a: relax.Expr | None, b: relax.Expr) -> relax.Expr:
    return b if a is None else relax.op.add(a, b)


def _seq_sum(t: relax.Expr, shape: list[int], axis: int, begin: int, end: int, group: int) -> relax.Expr:
    """Sums of ``group`` consecutive entries along ``axis`` in [begin, end) (a multiple of ``group``), each
    added from 0 in order: the axis becomes (end - begin) // group long."""
    part = _slice(t, axis, begin, end)
    shp = shape[:axis] + [(end - begin) // group, group] + shape[axis + 1:]
    return relax.op.sum(relax.op.reshape(part, shp), axis=[axis + 1])


def multi_row_sum(t: relax.Expr, shape: list[int]) -> relax.Expr:
    """ATen's ``multi_row_sum`` of ``t`` (``shape`` [R, size, ...]) over axis 1: [R, ...]."""
    size = shape[1]
    step = 1 << max(4, _ceil_log2(size) // LEVELS)
    rest = shape[2:]
    # acc[L]: the sum of the level-L chunks (step^L rows each) since the last level-(L+1) boundary
    # (acc[3], the top level, since row 0); chunk sums are taken level by level
    sums, accs = t, []
    n = size  # entries of `sums` along axis 1 (rows, then chunk sums)
    for level in range(LEVELS):
        group = step if level < LEVELS - 1 else max(n, 1)
        full = (n // group) * group if level < LEVELS - 1 else 0
        tail = _seq_sum(sums, [shape[0], n] + rest, 1, full, n, n - full) if n > full else None
        accs.append(None if tail is None else relax.op.reshape(tail, [shape[0]] + rest))
        if level == LEVELS - 1 or full == 0:
            break
        sums, n = _seq_sum(sums, [shape[0], n] + rest, 1, 0, full, group), full // group
    acc = accs[0]
    for a in accs[1:]:
        if a is not None:
            acc = _add(acc, a)
    if acc is None:
        return relax.op.zeros([shape[0]] + rest, "float32")
    return acc


def torch_row_sum(x2: relax.Expr, rows: int, n: int, lanes: int) -> relax.Expr:
    """PyTorch's float32 sum of each row of ``x2`` ([rows, n], contiguous rows): [rows]."""
    if n < lanes:  # scalar_inner_sum: row_sum over scalars
        return _row_sum(x2, [rows, n])
    nv = n // lanes
    vec = relax.op.reshape(_slice(x2, 1, 0, nv * lanes), [rows, nv, lanes])
    lane_sums = _row_sum(vec, [rows, nv, lanes])  # [rows, lanes]
    final: relax.Expr | None = None
    for k in range(nv * lanes, n):  # final_acc = 0 + tail scalars, then + each lane in order
        final = _add(final, relax.op.reshape(_slice(x2, 1, k, k + 1), [rows]))
    for lane in range(lanes):
        final = _add(final, relax.op.reshape(_slice(lane_sums, 1, lane, lane + 1), [rows]))
    return final


def _row_sum(t: relax.Expr, shape: list[int]) -> relax.Expr:
    """ATen's ``row_sum`` over axis 1 of ``t`` (``shape`` [R, size, ...]): [R, ...]."""
    rows, size, rest = shape[0], shape[1], shape[2:]
    size_ilp = size // ILP
    if size_ilp == 0:  # partial sums all 0: 0 + each value in order (+ three zeros)
        return relax.op.sum(t, axis=[1])
    grid = relax.op.reshape(_slice(t, 1, 0, size_ilp * ILP), [rows, size_ilp, ILP] + rest)
    ps = multi_row_sum(grid, [rows, size_ilp, ILP] + rest)  # [rows, ILP, ...]
    cols = [relax.op.reshape(_slice(ps, 1, k, k + 1), [rows] + rest) for k in range(ILP)]
    acc = cols[0]
    for i in range(size_ilp * ILP, size):
        acc = relax.op.add(acc, relax.op.reshape(_slice(t, 1, i, i + 1), [rows] + rest))
    for k in range(1, ILP):
        acc = relax.op.add(acc, cols[k])
    return acc


def _static_shape(x: relax.Expr) -> tuple[int, ...] | None:
    ty = x.ty
    if getattr(ty, "dtype", None) != "float32" or getattr(ty, "shape", None) is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def torch_mean_expr(x: relax.Expr, shape: tuple[int, ...], k: int, keepdims: bool, lanes: int) -> relax.Expr:
    """``torch.mean`` of a contiguous float32 ``x`` of ``shape`` over its last ``k`` axes."""
    rows, n = int(np.prod(shape[:-k])), int(np.prod(shape[-k:]))
    total = torch_row_sum(relax.op.reshape(x, [rows, n]), rows, n, lanes)
    mean = relax.op.divide(total, relax.const(np.float32(n), "float32"))
    out_shape = list(shape[:-k]) + ([1] * k if keepdims else [])
    return relax.op.reshape(mean, out_shape)


def torch_mean(mod: tvm.IRModule, func_name: str = "main", lanes: int | None = -1) -> tvm.IRModule:
    """``mod`` with every float32 static-shape ``mean`` over trailing axes of ``mod[func_name]`` summed as
    PyTorch's CPU kernel with ``lanes`` float32 lanes does (-1: this host's, :func:`torch_sum_lanes`)."""
    lanes = torch_sum_lanes() if lanes == -1 else lanes
    if lanes is None:
        return mod

    def rewrite(call: relax.Expr, matches: dict) -> relax.Expr:
        x, attrs = matches[_X], matches[_MEAN].attrs
        shape = _static_shape(x)
        if shape is None or attrs.axis is None:
            return call
        nd = len(shape)
        axes = sorted(int(a) % nd for a in attrs.axis)
        k = len(axes)
        if k == 0 or k == nd or axes != list(range(nd - k, nd)) or int(np.prod(shape[-k:])) <= 1:
            return call
        return torch_mean_expr(x, shape, k, bool(attrs.keepdims), lanes)

    mod = mod.clone() if hasattr(mod, "clone") else mod
    mod[func_name] = rewrite_call(_MEAN, rewrite, mod[func_name])
    return mod


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.TorchMean")
class TorchMean:
    """Module-pass form of :func:`torch_mean`."""

    def __init__(self, func_name: str = "main", lanes: int | None = -1) -> None:
        self.func_name = func_name
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return torch_mean(mod, self.func_name, self.lanes)
