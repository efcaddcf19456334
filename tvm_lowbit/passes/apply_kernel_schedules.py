"""TIR module pass: give every tvm_lowbit kernel that has no schedule yet its default schedule for the target
(the registry's, ``kernels.schedule_default``), and mark it opaque so that FuseOps leaves it whole."""

from __future__ import annotations

import tvm
from tvm import tirx

from tvm_lowbit import kernels


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule the marked, not yet scheduled kernel PrimFuncs; mark them opaque so FuseOps leaves them whole."""
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or kernels.KERNEL_ATTR not in (func.attrs or {}):
            continue
        if func.attrs and func.attrs.get("tirx.is_scheduled", False):
            continue
        sched = kernels.schedule_default(func, target)
        updates[gv] = sched.with_attr("op_pattern", 8)  # kOpaque
    for gv, func in updates.items():
        mod[gv] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.ApplyKernelSchedules")
class ApplyKernelSchedules:
    """Module-pass form of :func:`apply_default_schedules`."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return apply_default_schedules(mod, self.target)
