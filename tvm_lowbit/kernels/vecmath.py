"""Vectorizable float32 ``exp`` with the C library's bits: glibc's ``expf`` written as one TIR expression.

TVM lowers ``tirx.exp`` of float32 to a call of the C library's ``expf``, one scalar call per element even
inside a vectorized loop.  :func:`expf` builds the same computation as glibc's ``expf`` (2.27 and later,
``sysdeps/ieee754/flt-32/e_expf.c``, from ARM's optimized-routines) out of element-wise TIR operations, so
LLVM vectorizes it and every result has the same bits as the library call:

* ``z = x * 32 / ln 2`` in float64, ``k`` = ``z`` rounded to an integer (ties to even), ``r = z - k``;
* ``exp(x) = 2^(k/32) * 2^(r/32)``: ``2^(k/32)`` from a 32-entry table of float64 powers ``2^(j/32)``
  (``j = k mod 32``) with ``k div 32`` added to the exponent field, ``2^(r/32)`` a degree-3 polynomial;
* the float64 product rounded once to float32; NaN, overflow, underflow and the "may underflow" range
  handled by selects with the library's special-case results.

glibc on x86-64 picks its variant at load time: ``__expf_fma`` where the CPU has FMA and AVX2 (compiled
with ``-mfma -mavx2``: the reduction ``k = rint(c*x)`` and ``r = c*x - k`` are fused multiply-adds of the
exact product, and so are two polynomial steps), ``__expf_sse2`` otherwise.  Only the FMA variant is
written here (:func:`expf_matches_libm` says where it applies); the table lookup is a tree of 31 selects
on the 5 index bits, so the expression stays element-wise (no buffer) and fuses into any loop.
"""

from __future__ import annotations

from decimal import Decimal, getcontext

import numpy as np
import tvm
from tvm import tirx
from tvm.target.codegen import llvm_cpu_has_features

TABLE_BITS = 5
N = 1 << TABLE_BITS
INV_LN2_N = float.fromhex("0x1.71547652b82fep+0") * N  # 32 / ln 2 rounded to float64 (exact scaling)
SHIFT = float.fromhex("0x1.8p+52")  # adding it rounds a float64 of magnitude < 2^51 to an integer (ties to even)
POLY = (float.fromhex("0x1.c6af84b912394p-5") / N**3,  # 2^(r/32) ~ 1 + C2 r + C1 r^2 + C0 r^3
        float.fromhex("0x1.ebfce50fac4f3p-3") / N**2,
        float.fromhex("0x1.62e42ff0c52d6p-1") / N)
OVERFLOW = np.float32(float.fromhex("0x1.62e42ep6"))      # x above: +inf (log(2^128) ~ 88.72)
UNDERFLOW = np.float32(-float.fromhex("0x1.9fe368p6"))    # x below: +0 (log(2^-150) ~ -103.97)
MAY_UNDERFLOW = np.float32(-float.fromhex("0x1.9d1d9ep6"))  # x below (and >= UNDERFLOW): 0x1.4p-75f squared
DENORM_MIN = np.float32(float.fromhex("0x1.4p-75")) * np.float32(float.fromhex("0x1.4p-75"))  # 2^-149


def _table() -> tuple[int, ...]:
    """glibc's ``__exp2f_data.tab``: the bits of the float64 nearest ``2^(j/32)`` minus ``j << 47``, so that
    adding ``k << 47`` (k = j mod 32) puts ``k div 32`` into the exponent field."""
    getcontext().prec = 60
    out = []
    for j in range(N):
        v = float(Decimal(2) ** (Decimal(j) / N))  # correctly rounded: Decimal -> str -> float
        out.append(int(np.float64(v).view(np.int64)) - (j << (52 - TABLE_BITS)))
    return tuple(out)


TABLE = _table()


def expf_matches_libm(target: tvm.target.Target) -> bool:
    """Whether :func:`expf` gives the bits of the C library ``target`` runs with: an x86-64 glibc target with
    FMA and AVX2 (glibc's ``__expf_fma``; read off the target's CPU and attributes, not this host's)."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    if not triple.startswith("x86_64") or "linux-gnu" not in triple:
        return False
    return bool(llvm_cpu_has_features(["fma", "avx2"], target))


def _f64(v: float) -> tirx.FloatImm:
    return tirx.FloatImm("float64", float(v))


def _fma(a: tirx.PrimExpr, b: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
    """float64 ``a * b + c`` rounded once (LLVM's ``llvm.fma``, one instruction with FMA)."""
    return tirx.call_llvm_pure_intrin("float64", "llvm.fma", a, b, c)


def _lookup(index: tirx.PrimExpr, values: tuple[int, ...], bit: int) -> tirx.PrimExpr:
    """``values[index]`` for ``0 <= index < len(values)`` (a power of two), as a tree of selects on the bits
    of ``index`` below ``bit``."""
    if len(values) == 1:
        return tirx.IntImm("int64", values[0])
    half = len(values) // 2
    lower = _lookup(index, values[:half], bit >> 1)
    upper = _lookup(index, values[half:], bit >> 1)
    return tirx.Select((index & tirx.IntImm("int64", bit)) != tirx.IntImm("int64", 0), upper, lower)


def expf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``expf(x)`` of a float32 expression with the bits of glibc's ``__expf_fma`` (module docstring)."""
    if x.dtype != "float32":
        raise ValueError(f"vecmath.expf: a float32 argument is needed, got {x.dtype} ({x})")
    xd = tirx.Cast("float64", x)
    shifted = _fma(_f64(INV_LN2_N), xd, _f64(SHIFT))   # k + SHIFT: k = rint(x * 32/ln2) in the low bits
    ki = tirx.reinterpret("int64", shifted)
    kd = shifted - _f64(SHIFT)
    r = _fma(_f64(INV_LN2_N), xd, -kd)                 # x * 32/ln2 - k, one rounding
    t = _lookup(ki & tirx.IntImm("int64", N - 1), TABLE, N >> 1) + (ki << tirx.IntImm("int64", 52 - TABLE_BITS))
    s = tirx.reinterpret("float64", t)                 # 2^(k/32)
    z = _fma(_f64(POLY[0]), r, _f64(POLY[1]))
    r2 = r * r
    y = _fma(_f64(POLY[2]), r, _f64(1.0))
    y = _fma(z, r2, y)
    out = tirx.Cast("float32", y * s)
    f32 = lambda v: tirx.FloatImm("float32", float(v))  # noqa: E731
    out = tirx.Select(x < f32(MAY_UNDERFLOW), f32(DENORM_MIN), out)
    out = tirx.Select(x < f32(UNDERFLOW), f32(0.0), out)
    out = tirx.Select(x > f32(OVERFLOW), f32(np.inf), out)
    return tirx.Select(x != x, x + x, out)             # NaN: the library returns x + x (quieted)


__all__ = ["N", "POLY", "TABLE", "expf", "expf_matches_libm"]
