"""Former home of the lowering pass, kept so that ``from tvm_lowbit.passes.ternary import ...`` in
``compiler.py`` and ``onnx_quant`` callers keeps working while they move to ``tvm_lowbit.passes``:
the names are re-exported from the modules that define them.  New code imports ``tvm_lowbit.passes``."""

from tvm_lowbit.passes.layer_info import LayerInfo, weight_key
from tvm_lowbit.passes.lower_integer_layers import lower_integer_layers
from tvm_lowbit.passes.patterns import const_value
from tvm_lowbit.passes.report import LoweringReport

lower_ternary = lower_integer_layers

__all__ = ["LayerInfo", "LoweringReport", "const_value", "lower_ternary", "weight_key"]
