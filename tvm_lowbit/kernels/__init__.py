"""TVM kernels of the low-bit layers (TE compute definitions + default schedules).

Importing this package imports TVM.
"""

from tvm_lowbit.kernels.ternary import (
    KERNEL_ATTR,
    OUT_MODES,
    kernel_attrs,
    make_prim_func,
    quantize_act,
    schedule_default,
    ternary_conv2d,
    ternary_dense,
)
from tvm_lowbit.kernels.pow2 import pow2_conv2d, pow2_dense
from tvm_lowbit.kernels.intw import int_conv2d, int_dense

__all__ = [
    "KERNEL_ATTR",
    "OUT_MODES",
    "int_conv2d",
    "int_dense",
    "kernel_attrs",
    "make_prim_func",
    "pow2_conv2d",
    "pow2_dense",
    "quantize_act",
    "schedule_default",
    "ternary_conv2d",
    "ternary_dense",
]
