"""Relax pass: run the integer region in NHWC, with layout changes only at the float boundaries.

``relax.transform.ConvertLayout`` turns every conv2d into NHWC / OHWI and carries the layout through the
ops that know how (the epilogue's casts, multiply and add; relu; residual adds; pooling), inserting
``permute_dims`` where an op does not.  The activation quantizer ``clip(round(divide(x, s)))`` is one of
those: ``clip`` has no layout rule, so every quantizer would sit between two transposes.  ``SinkPermutes``
moves a ``permute_dims`` up through the element-wise quantizer ops (``clip``, ``round``, division by a
scalar, the float64 cast of the exact-accumulator path) and cancels it against the inverse permute it meets, so the quantizers run in NHWC too and the
only transposes left are where float data enters or leaves (the network input, the flatten before a
classifier).  The integer-layer lowering then gives NHWC convs the NHWC form of their kernel (or
transposes around a kernel that only takes NCHW).
"""

from __future__ import annotations

import tvm
from tvm_ffi import structural_equal
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from tvm_lowbit.kernels.avx2 import has_avx2
from tvm_lowbit.kernels.neon import is_aarch64
from tvm_lowbit.kernels.vnni import vnni_lanes

NHWC_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"]}

_Y, _LO, _HI, _S, _Z = wildcard(), wildcard(), wildcard(), wildcard(), wildcard()
_CLIP = is_op("relax.clip")(_Y, _LO, _HI)
_ROUND = is_op("relax.round")(_Y)
_DIV = is_op("relax.divide")(_Y, _S)
_CAST = is_op("relax.astype")(_Y)
_INNER = is_op("relax.permute_dims")(_Z)
PERMUTED_CLIP = is_op("relax.permute_dims")(_CLIP)
PERMUTED_ROUND = is_op("relax.permute_dims")(_ROUND)
PERMUTED_DIV = is_op("relax.permute_dims")(_DIV)
PERMUTED_CAST = is_op("relax.permute_dims")(_CAST)
DOUBLE_PERMUTE = is_op("relax.permute_dims")(_INNER)


def _axes(call: relax.Call, ndim: int) -> list[int]:
    axes = call.attrs.axes
    return list(range(ndim))[::-1] if axes is None else [int(a) for a in axes]


def _sink(expr: relax.Expr, m: dict) -> relax.Expr:
    axes = expr.attrs.axes
    for pat in (PERMUTED_CLIP, PERMUTED_ROUND, PERMUTED_DIV, PERMUTED_CAST):
        if pat not in m:
            continue
        inner = relax.op.permute_dims(m[_Y], axes)
        if pat is PERMUTED_CAST:
            return relax.op.astype(inner, m[_CAST].attrs.dtype)
        if pat is PERMUTED_CLIP:
            return relax.op.clip(inner, m[_LO], m[_HI])
        if pat is PERMUTED_ROUND:
            return relax.op.round(inner)
        scale = m[_S]
        if isinstance(scale.ty, relax.TensorType) and scale.ty.ndim == 0:
            return relax.op.divide(inner, scale)
    return expr


def _cancel(expr: relax.Expr, m: dict) -> relax.Expr:
    inner = m[_INNER]
    ndim = int(inner.ty.ndim)
    a, b = _axes(inner, ndim), _axes(expr, ndim)
    return m[_Z] if [a[i] for i in b] == list(range(ndim)) else expr


def sink_permutes(func: relax.Function, max_rounds: int = 1000) -> relax.Function:
    """Move ``permute_dims`` up through clip / round / scalar division and cancel inverse pairs, until
    nothing changes (each round moves every transpose by about one op)."""
    for _ in range(max_rounds):
        new = func
        for pat in (PERMUTED_CLIP, PERMUTED_ROUND, PERMUTED_DIV, PERMUTED_CAST):
            new = rewrite_call(pat, _sink, new)
        new = rewrite_call(DOUBLE_PERMUTE, _cancel, new)
        if structural_equal(new, func):
            return func
        func = new
    return func


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.SinkPermutes")
class SinkPermutes:
    """Module-pass form of :func:`sink_permutes` on ``func_name``."""

    def __init__(self, func_name: str = "main") -> None:
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        gv = mod.get_global_var(self.func_name)
        mod = mod.copy() if hasattr(mod, "copy") else mod
        mod[gv] = sink_permutes(mod[gv])
        return mod


def integer_layout(target: tvm.target.Target | None) -> str:
    """The activation layout of the integer region on ``target``: NHWC where the conv kernels the registry
    prefers there read and write NHWC (x86 with VNNI or AVX2, aarch64: ``Kernel.layouts``), else NCHW (the
    generic kernels take NCHW)."""
    if target is None:
        return "NCHW"
    return "NHWC" if vnni_lanes(target) or has_avx2(target) or arm_nhwc(target) else "NCHW"


def arm_nhwc(target: tvm.target.Target) -> bool:
    """aarch64: the folded-alpha kernels of ``kernels.neon`` (sdot on +dotprod, widening multiplies
    otherwise) read and write NHWC, so the integer region runs NHWC there."""
    return is_aarch64(target)


def nhwc_passes(func_name: str = "main") -> list[tvm.transform.Pass]:
    """ConvertLayout to NHWC convs, SinkPermutes, and the clean-up of the dead transposes."""
    return [relax.transform.ConvertLayout(NHWC_LAYOUTS), SinkPermutes(func_name),
            relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination([func_name])]
