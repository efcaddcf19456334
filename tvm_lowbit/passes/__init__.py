"""Relax and TIR passes of the tvm_lowbit pipeline (each IRModule -> IRModule), one per module:

* :mod:`.patterns`: the dataflow patterns of a fake-quant graph (``tvm.relax.dpl``);
* :mod:`.normalize_take`: ``NormalizeTake``, every ``take`` reads inside its tensor (negative indices);
* :mod:`.relu6_quantizer`: ``Relu6Quantizer``, a quantizer of ReLU6 whose bound is its top code reads a ReLU;
* :mod:`.fold_requantize`: ``FoldRequantize``, redundant re-quantizers read the first one's codes;
* :mod:`.lower_integer_layers`: ``LowerIntegerLayers``, fake-quant layers -> registered integer kernels;
* :mod:`.apply_kernel_schedules`: ``ApplyKernelSchedules``, the kernels' default schedules;
* :mod:`.schedule_float_ops`: ``ScheduleFloatOps`` (x86, inside ``tvm.compile``), the float ops between the
  kernels parallel and vectorized without changing a result;
* :mod:`.pipeline`: ``lowering_pipeline`` (the ``tvm.transform.Sequential`` compile runs) and ``run_pipeline``.
"""

from tvm_lowbit.passes.apply_kernel_schedules import ApplyKernelSchedules, apply_default_schedules
from tvm_lowbit.passes.fold_requantize import FoldRequantize, fold_requantize
from tvm_lowbit.passes.layer_info import LayerInfo, weight_key
from tvm_lowbit.passes.lower_integer_layers import LowerIntegerLayers, lower_integer_layers, lower_layers
from tvm_lowbit.passes.normalize_take import NormalizeTake, normalize_take
from tvm_lowbit.passes.pipeline import lowering_passes, lowering_pipeline, run_pipeline
from tvm_lowbit.passes.report import LoweringReport

__all__ = ["ApplyKernelSchedules", "FoldRequantize", "LayerInfo", "LowerIntegerLayers", "LoweringReport", "NormalizeTake",
           "apply_default_schedules", "fold_requantize", "lower_integer_layers", "lower_layers", "lowering_passes",
           "lowering_pipeline", "normalize_take", "run_pipeline", "weight_key"]
