"""Relax and TIR passes of the tvm_lowbit pipeline (each IRModule -> IRModule)."""

from tvm_lowbit.passes.requant import FoldRequantize, fold_requantize
from tvm_lowbit.passes.schedule import ApplyKernelSchedules, apply_default_schedules
from tvm_lowbit.passes.ternary import LayerInfo, LowerTernary, LoweringReport, lower_ternary, weight_key

__all__ = ["FoldRequantize", "fold_requantize", "LowerTernary", "lower_ternary", "LayerInfo", "LoweringReport",
           "weight_key",
           "ApplyKernelSchedules", "apply_default_schedules"]
