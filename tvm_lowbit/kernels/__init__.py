"""TVM kernels of the low-bit layers (TE compute definitions + default schedules), in a registry keyed by
(weight-format family, op, ISA).

* :mod:`.common`: the pieces every kernel shares (marker, epilogue, decodes, padding, tiling helpers);
* :mod:`.registry`: :class:`Kernel`, :func:`register`, :func:`select` (which kernel fits a layer on a
  target, and why), :func:`schedule_default`, :func:`register_intrinsics`;
* generic kernels per weight format (every target): :mod:`.ternary`, :mod:`.pow2`, :mod:`.intw`, with
  their default schedules in :mod:`.generic`;
* one module per ISA family: :mod:`.avx2` (x86 AVX2), :mod:`.vnni` (x86 AVX-512 VNNI / AVX-VNNI, alpha folded
  into int8 weights), :mod:`.sdot` (aarch64 dot product), :mod:`.neon` (aarch64, alpha folded: sdot and
  widening multiplies), :mod:`.a76` (its sdot conv redone for the Cortex-A76), :mod:`.lut`
  (lookup table, on AVX2 targets), :mod:`.vlut` (decode-free ``vpermb`` lookup table + ``vpdpbusd``, on
  AVX-512 VBMI + VNNI targets, batch-1 dense layers), :mod:`.tbl` (decode-free NEON ``tbl`` lookup table on
  aarch64, few-row dense layers), :mod:`.depthwise` (depthwise convs, channels as vector lanes, x86 and aarch64).

Each kernel module registers its kernels when imported: adding an ISA is one new module plus its import
line below.  Importing this package imports TVM.
"""

from tvm_lowbit.kernels.common import KERNEL_ATTR, OUT_MODES, LayerSpec, kernel_attrs, make_prim_func, quantize_act
from tvm_lowbit.kernels.registry import (GENERIC, Choice, Kernel, describe, get, lookup, register,
                                         register_intrinsics, registered, schedule_default, schedule_kernel,
                                         select, unregister)
from tvm_lowbit.kernels.generic import schedule_conv2d, schedule_dense
from tvm_lowbit.kernels.ternary import ternary_conv2d, ternary_dense
from tvm_lowbit.kernels.pow2 import pow2_conv2d, pow2_dense
from tvm_lowbit.kernels.intw import int_conv2d, int_dense
# the ISA kernels: one import line each registers them
from tvm_lowbit.kernels import a76, avx2, depthwise, lut, neon, pool, sdot, shuffle, tbl, vlut, vnni  # noqa: F401  (registrations)

__all__ = [
    "GENERIC",
    "KERNEL_ATTR",
    "OUT_MODES",
    "Choice",
    "Kernel",
    "LayerSpec",
    "describe",
    "get",
    "int_conv2d",
    "int_dense",
    "kernel_attrs",
    "lookup",
    "make_prim_func",
    "pow2_conv2d",
    "pow2_dense",
    "quantize_act",
    "register",
    "register_intrinsics",
    "registered",
    "schedule_conv2d",
    "schedule_dense",
    "schedule_default",
    "schedule_kernel",
    "select",
    "ternary_conv2d",
    "ternary_dense",
    "unregister",
]
