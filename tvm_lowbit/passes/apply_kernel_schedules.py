"""TIR pass (a ``prim_func_pass``): give every tvm_lowbit kernel that has no schedule yet its default schedule
for the target (the registry's, ``kernels.schedule_default``), and mark it opaque so that FuseOps leaves it
whole."""

from __future__ import annotations

import tvm
from tvm import tirx

from tvm_lowbit import kernels
from tvm_lowbit.passes.function_pass import PrimFuncRewrite


def scheduled_kernel(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """A marked kernel PrimFunc with its default schedule, marked opaque so FuseOps leaves it whole; None for a
    PrimFunc that is no kernel or is scheduled already."""
    attrs = func.attrs or {}
    if kernels.KERNEL_ATTR not in attrs or attrs.get("tirx.is_scheduled", False):
        return None
    return kernels.schedule_default(func, target).with_attr("op_pattern", 8)  # kOpaque


@tirx.transform.prim_func_pass(opt_level=0, name="tvm_lowbit.ApplyKernelSchedules")
class ApplyKernelSchedules(PrimFuncRewrite):
    """:func:`scheduled_kernel` on every PrimFunc of a module."""

    def rewrite(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        return scheduled_kernel(func, self.target)


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule the marked, not yet scheduled kernel PrimFuncs; mark them opaque so FuseOps leaves them whole."""
    return ApplyKernelSchedules(target)(mod)
