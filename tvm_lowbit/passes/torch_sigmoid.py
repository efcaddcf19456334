"""TorchSigmoid: compute ``sigmoid`` as PyTorch's CPU kernel does, bit for bit.

``torch.sigmoid`` of a contiguous float32 tensor is ``1 / (1 + exp(-x))`` with two exps: the elements of the
flattened tensor in whole chunks of ``2 * lanes`` take the vector path, Sleef's ``expf_u10`` (``lanes`` = 16
with AVX-512, 8 with AVX2: ``torch.backends.cpu.get_cpu_capability()``), the remaining ``n % (2 * lanes)``
(the tail) take the scalar path, the C library's ``expf``.  TVM's ``sigmoid`` is the same formula with the C
library's ``expf`` everywhere, so on the vector path it differs from PyTorch's in the last bit on about 4 %
of the values (N(0, 3^2) inputs).  A quantizer after an efficientnet squeeze-excitation gate
``x * sigmoid(g)`` turns such a difference into a different code whenever the product lies at a rounding
midpoint (docs/results-models.md, "efficientnet_b0 FGQ N=4"), so the compiled model follows PyTorch's paths.

The vector path is written with Relax's element-wise ops, so it fuses and follows any layout: Sleef's fused
multiply-adds are computed in float64 (the product of two float32 values is exact there) and rounded to
float32; ``2^q`` is an exact float64 power of two.  The one rounding difference left is a float64 sum that
lands exactly on a float32 rounding midpoint (double rounding), about once in 1e8 values.  The tail (static
shapes only) is picked by a constant mask in PyTorch's element order.  Only float32 sigmoids of static shape
are rewritten, and only when PyTorch runs a known vector path here (``lanes`` None: unchanged).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

# Sleef 3.x xexpf (sleefsimdsp.c): float32 constants of the range reduction and the polynomial
R_LN2F = np.float32(1.442695040888963407359924681001892137426645954152985934135449406931)
L2UF = np.float32(0.693145751953125)
L2LF = np.float32(1.428606765330187045e-06)
POLY = tuple(np.float32(c) for c in (0.000198527617612853646278381, 0.00139304355252534151077271,
                                       0.00833336077630519866943359, 0.0416664853692054748535156,
                                       0.166666671633720397949219, 0.5))
CAPABILITY_LANES = {"AVX512": 16, "AVX2": 8}  # float32 lanes of ATen's Vectorized<float> per CPU capability

_X = wildcard()
_SIGMOID = is_op("relax.sigmoid")(_X)


TORCH_CPU_ENV = "TVM_LOWBIT_TORCH_CPU"


def torch_capability() -> str:
    """The PyTorch CPU capability whose kernels computed the fake-quant reference: this host's
    (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, ...) unless the environment variable
    ``TVM_LOWBIT_TORCH_CPU`` names another one; ``none`` there leaves TVM's own float ops (passes off)."""
    return os.environ.get(TORCH_CPU_ENV) or torch.backends.cpu.get_cpu_capability()


def torch_vector_lanes() -> int | None:
    """float32 lanes of PyTorch's vectorized CPU kernels (:func:`torch_capability`; None: a path this pass
    does not model)."""
    return CAPABILITY_LANES.get(torch_capability())


def _c32(v: float) -> relax.Constant:
    return relax.const(np.float32(v), "float32")


def _c64(v: float) -> relax.Constant:
    return relax.const(float(v), "float64")


def _fma32(a: relax.Expr, b: relax.Expr, c: relax.Expr) -> relax.Expr:
    """float32 ``a * b + c`` rounded once (up to a double rounding at a float32 midpoint, see the module doc)."""
    f64 = relax.op.astype
    return relax.op.astype(relax.op.add(relax.op.multiply(f64(a, "float64"), f64(b, "float64")), f64(c, "float64")),
                           "float32")


def sleef_expf(d: relax.Expr) -> relax.Expr:
    """``exp(d)`` of a float32 expression as Sleef's ``expf_u10`` computes it (with FMA)."""
    q = relax.op.round(relax.op.multiply(d, _c32(R_LN2F)))  # rint: round half to even, as cvtps2dq
    s = _fma32(q, _c32(-L2UF), d)
    s = _fma32(q, _c32(-L2LF), s)
    u: relax.Expr = _c32(POLY[0])
    for c in POLY[1:]:
        u = _fma32(u, s, _c32(c))
    u = relax.op.add(_c32(1.0), _fma32(relax.op.multiply(s, s), u, s))
    # ldexp(u, q): Sleef multiplies by 2^(q>>1) (exact) and 2^(q-(q>>1)) (one rounding): u * 2^q rounded once
    p = relax.op.power(_c64(2.0), relax.op.astype(q, "float64"))
    e = relax.op.astype(relax.op.multiply(relax.op.astype(u, "float64"), p), "float32")
    e = relax.op.where(relax.op.less(d, _c32(-104.0)), _c32(0.0), e)
    return relax.op.where(relax.op.less(_c32(100.0), d), _c32(np.inf), e)


def tail_mask(shape: tuple[int, ...], lanes: int) -> np.ndarray | None:
    """Where PyTorch takes the scalar path for a contiguous tensor of ``shape``: the last ``n % (2 * lanes)``
    elements in C order (None: no tail)."""
    n = int(np.prod(shape))
    t = n % (2 * lanes)
    if t == 0:
        return None
    mask = np.zeros(n, bool)
    mask[n - t:] = True
    return mask.reshape(shape)


def torch_sigmoid_expr(x: relax.Expr, shape: tuple[int, ...], lanes: int) -> relax.Expr:
    """``torch.sigmoid(x)`` for a float32 ``x`` of static ``shape`` as PyTorch's CPU kernel with ``lanes``
    float32 lanes computes it."""
    one = _c32(1.0)
    vector = relax.op.divide(one, relax.op.add(one, sleef_expf(relax.op.negative(x))))
    mask = tail_mask(shape, lanes)
    if mask is None:
        return vector
    scalar = relax.op.divide(one, relax.op.add(one, relax.op.exp(relax.op.negative(x))))
    if mask.all():
        return scalar
    return relax.op.where(relax.const(mask), scalar, vector)


def _static_shape(x: relax.Expr) -> tuple[int, ...] | None:
    ty = x.ty
    if getattr(ty, "dtype", None) != "float32" or getattr(ty, "shape", None) is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def torch_sigmoid(mod: tvm.IRModule, func_name: str = "main", lanes: int | None = -1) -> tvm.IRModule:
    """``mod`` with every float32 static-shape ``sigmoid`` of ``mod[func_name]`` computed as PyTorch's CPU
    kernel does with ``lanes`` float32 lanes (-1: this host's, :func:`torch_vector_lanes`; None: unchanged)."""
    lanes = torch_vector_lanes() if lanes == -1 else lanes
    if lanes is None:
        return mod

    def rewrite(call: relax.Expr, matches: dict) -> relax.Expr:
        x = matches[_X]
        shape = _static_shape(x)
        return call if shape is None else torch_sigmoid_expr(x, shape, lanes)

    mod = mod.clone() if hasattr(mod, "clone") else mod
    mod[func_name] = rewrite_call(_SIGMOID, rewrite, mod[func_name])
    return mod


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.TorchSigmoid")
class TorchSigmoid:
    """Module-pass form of :func:`torch_sigmoid`."""

    def __init__(self, func_name: str = "main", lanes: int | None = -1) -> None:
        self.func_name = func_name
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return torch_sigmoid(mod, self.func_name, self.lanes)
