"""Quantizers: one module per algorithm over the shared math in ``tvm_lowbit.qmath``."""

from tvm_lowbit.quantizers.api import quantize
from tvm_lowbit.quantizers.auto import Auto
from tvm_lowbit.quantizers.fgq import FGQ
from tvm_lowbit.quantizers.inq import INQ, INQQuantizer

__all__ = ["quantize", "Auto", "FGQ", "INQ", "INQQuantizer"]
