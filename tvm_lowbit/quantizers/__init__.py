"""Quantizers: one module per algorithm over the shared math in ``tvm_lowbit.qmath``."""

from tvm_lowbit.quantizers.api import quantize
from tvm_lowbit.quantizers.fgq import FGQ

__all__ = ["quantize", "FGQ"]
