"""TIR pass (a ``prim_func_pass``): a default CPU schedule for the float ops between the integer kernels.

Relax legalizes the ops no kernel owns (max pool, residual add + ReLU, the squeeze-excitation gate, layer
norm, softmax, GELU, the attention matmuls) into PrimFuncs that nothing schedules on CPU: one serial loop
nest per block, on one core, vectorized only where LLVM manages it alone.  ``ScheduleFloatOps`` gives
every such block (after ``FuseOps`` / ``FuseTIR``, before ``CallTIRRewrite``) the schedule that leaves
its arithmetic unchanged:

* the leading spatial loops fused and run in parallel when the block has enough iterations
  (``PARALLEL_MIN``);
* the innermost spatial loop vectorized (``lanes`` of the target's vector width) when every buffer the
  block touches has that loop's variable as its last index, or not at all (a broadcast); in a reduction
  block (pooling, matmul, mean) that loop moves below the reduction loops, so each lane accumulates its
  own output in the original order.

No block is inlined into another and no reduction is reordered or split (no ``rfactor``): every output
element is computed by the same operations in the same order as before, so results are bit-identical to
the unscheduled build (TVM's LLVM backend contracts ``a * b + c`` into an FMA inside one expression;
inlining a producer could create such pairs, so nothing is inlined).  Blocks whose loops do not bind
their iteration variables one to one, or whose extents are not constants, are left as they were.
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm.sym.analyzer import Analyzer
from tvm import tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.target.codegen import llvm_get_vector_width

from tvm_lowbit.kernels import KERNEL_ATTR
from tvm_lowbit.passes.function_pass import PrimFuncRewrite
from tvm_lowbit.passes.vector_math import VectorMath

PARALLEL_MIN = 1 << 14  # block iterations below which a parallel region (a fork-join, a few µs) does not pay
SCHEDULED_ATTR = "tvm_lowbit.float_schedule"
DEBUG = False
_SBLOCK_REALIZE = tvm_ffi.get_global_func("s_tir.schedule.GetSBlockRealize")


def _var_uses(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _contiguous_in(block: tvm.s_tir.SBlock, var: tirx.Var) -> bool:
    """Whether every buffer region of ``block`` has ``var`` (plus a constant) as its last index and nowhere
    else, or uses it nowhere (a broadcast): the loop over ``var`` then reads and writes consecutive elements."""
    ana = Analyzer()
    for region in (*block.reads, *block.writes):
        ranges = list(region.region)
        if not ranges:
            continue
        last = ranges[-1]
        if _var_uses(last.min, var):
            if _var_uses(ana.simplify(last.min - var), var) or not _is_one(last.extent):
                return False
            if any(_var_uses(r.min, var) or _var_uses(r.extent, var) for r in ranges[:-1]):
                return False
        elif any(_var_uses(r.min, var) or _var_uses(r.extent, var) for r in ranges):
            return False
    return True


def _is_one(e: tirx.PrimExpr) -> bool:
    return isinstance(e, tirx.IntImm) and int(e) == 1


def schedule_block(sch: tvm.s_tir.Schedule, block: tvm.s_tir.schedule.SBlockRV, lanes: int) -> bool:
    """Parallelize and vectorize one block without changing its arithmetic (module docstring); False when
    the block is left as it was."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    ivs = list(stmt.iter_vars)
    values = list(_SBLOCK_REALIZE(sch, block).iter_values)
    if not loops or len(loops) != len(ivs) or len(values) != len(ivs):
        return False
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    if any(not (isinstance(v, tirx.Var) and v.same_as(lv)) for v, lv in zip(values, loop_vars)):
        return False
    extents = [sch.get(lp).extent for lp in loops]
    if any(not isinstance(e, tirx.IntImm) for e in extents):
        return False
    kinds = ["S" if iv.iter_type == tirx.IterVar.DataPar else "R" if iv.iter_type == tirx.IterVar.CommReduce else "O"
             for iv in ivs]
    text = "".join(kinds)
    if "O" in text or text.lstrip("S").strip("R") or not text.startswith("S"):
        return False  # only S...S R...R nests
    n_s = len(text) - len(text.lstrip("S"))
    spatial, reduce = loops[:n_s], loops[n_s:]
    sizes = [int(e) for e in extents]
    total = math.prod(sizes)
    inner = sizes[n_s - 1]
    vector = inner % lanes == 0 and _contiguous_in(stmt, ivs[n_s - 1].var)
    if vector and len(spatial) > 1:
        outer = sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0]
        vec_loop = spatial[-1]
    elif vector:  # one spatial loop: split it
        outer, vec_loop = sch.split(spatial[0], [None, lanes])
    else:
        outer, vec_loop = (sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]), None
    if vec_loop is not None and reduce:
        sch.reorder(outer, *reduce, vec_loop)
    if vec_loop is not None:
        if int(sch.get(vec_loop).extent) > lanes:
            _, vec_loop = sch.split(vec_loop, [None, lanes])
        sch.vectorize(vec_loop)
    if total >= PARALLEL_MIN and int(sch.get(outer).extent) > 1:
        sch.parallel(outer)
    if reduce:  # the init out of the reduction loops (the update keeps its order)
        init = sch.decompose_reduction(block, reduce[0])
        if vec_loop is not None:
            sch.vectorize(sch.get_loops(init)[-1])
    return True


def schedule_float_func(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """``func`` with every block it can schedule scheduled (module docstring), or None when it changed nothing."""
    bits = llvm_get_vector_width(target)
    sch = tvm.s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except (RuntimeError, ValueError):  # tvm.s_tir.ScheduleError is a RuntimeError
        return None
    changed = False
    for block in sch.get_child_blocks(root):
        dtype_bits = max((r.source.dtype.bits for r in sch.get(block).writes), default=32)
        lanes = max((bits if bits > 0 else 128) // dtype_bits, 2)
        try:
            changed = schedule_block(sch, block, lanes) or changed
        except tvm.s_tir.ScheduleError as e:
            if DEBUG:
                print(f"ScheduleFloatOps: {sch.get(block).name_hint}: {e}")
            return None  # leave the whole function as it was
    return sch.mod["main"].with_attr(SCHEDULED_ATTR, True) if changed else None


@tirx.transform.prim_func_pass(opt_level=0, name="tvm_lowbit.ScheduleFloatOps")
class ScheduleFloatOps(PrimFuncRewrite):
    """:func:`schedule_float_func` on every PrimFunc that is no kernel and has no schedule yet."""

    def rewrite(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        attrs = func.attrs or {}
        if KERNEL_ATTR in attrs or attrs.get("tirx.is_scheduled", False) or SCHEDULED_ATTR in attrs:
            return None
        return schedule_float_func(func, self.target)


def schedule_float_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every PrimFunc of ``mod`` that is no kernel and has no schedule yet."""
    return ScheduleFloatOps(target)(mod)


def build_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU default pipeline (``relax.backend.cpu_generic``) with ``VectorMath`` (vectorizable exp / erf,
    the C library's bits: ``passes.vector_math``) before the legalization and :class:`ScheduleFloatOps` after the
    float ops are legalized and fused: ``tvm.compile(mod, target, relax_pipeline=build_pipeline(target))``."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.BuildPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu_pipeline.library_dispatch_passes(target) + [VectorMath(target)] + cpu_pipeline.legalize_passes(target)
                + [tirx.transform.ConvertSSA(), ScheduleFloatOps(target)]  # SSA: FuseTIR may inline one func twice
                + cpu_pipeline.dataflow_lower_passes(target) + cpu_pipeline.finalize_passes(target))
            return seq(mod)

    return _pipeline


__all__ = ["PARALLEL_MIN", "ScheduleFloatOps", "build_pipeline", "schedule_block", "schedule_float_func",
           "schedule_float_ops"]
