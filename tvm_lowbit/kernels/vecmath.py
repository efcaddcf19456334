"""Vectorizable float32 ``exp`` and ``erf`` with the C library's bits: glibc's ``expf`` and ``erff`` as TIR.

TVM lowers ``tirx.exp`` / ``tirx.erf`` of float32 to calls of the C library's ``expf`` / ``erff``, one scalar
call per element even inside a vectorized loop.  :func:`expf` builds the same computation as glibc's ``expf`` (2.27 and later,
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

:func:`erff` is glibc's ``erff`` up to 2.40 (``sysdeps/ieee754/flt-32/s_erff.c``: Sun's fdlibm in float32,
rational approximations on |x| < 0.84375, < 1.25, < 1/0.35, < 6, and ``1 - exp(..) exp(..) / |x|`` above
1.25, with its two ``expf`` calls as :func:`expf`): every branch is computed and the one of ``|x|`` selected.
glibc compiles it without FMA, and TVM's LLVM backend contracts ``a * b + c`` into an FMA, so every
product there passes an ``llvm.arithmetic.fence`` first (rounded on its own, as in the library).

Proof: ``scripts/check_vecmath.py`` compares both with the library on all 2^32 float32 inputs, bit for bit;
``tests/test_vecmath.py`` samples densely.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, getcontext
import platform

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


def glibc_version() -> tuple[int, int] | None:
    """The C library of this process, as (major, minor) when it is glibc (None otherwise)."""
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    major, minor = (int(v) for v in version.split(".")[:2])
    return major, minor


def expf_matches_libm(target: tvm.target.Target) -> bool:
    """Whether :func:`expf` gives the bits of the C library ``target`` runs with: an x86-64 target with FMA and
    AVX2 (glibc's ``__expf_fma``; read off the target's CPU and attributes, not assumed) on a glibc of 2.27 or
    later (the table algorithm; the x86 targets run where they are built, so this process's glibc)."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    if not triple.startswith("x86_64") or "linux-gnu" not in triple:
        return False
    glibc = glibc_version()
    return glibc is not None and glibc >= (2, 27) and bool(llvm_cpu_has_features(["fma", "avx2"], target))


def erff_matches_libm(target: tvm.target.Target) -> bool:
    """Whether :func:`erff` gives the bits of ``target``'s C library: where :func:`expf` does, on a glibc whose
    ``erff`` is still fdlibm's (before 2.41, which took CORE-MATH's correctly rounded one)."""
    glibc = glibc_version()
    return expf_matches_libm(target) and glibc is not None and glibc < (2, 41)


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


def _let(name: str, value: tirx.PrimExpr, body: Callable[[tirx.Var], tirx.PrimExpr]) -> tirx.PrimExpr:
    """``body(v)`` with ``v`` bound to ``value`` once (a TIR ``Let``: the expression stays a tree of bounded
    size for TVM's passes, however often ``v`` is read)."""
    if isinstance(value, (tirx.Var, tirx.IntImm, tirx.FloatImm)):
        return body(value)
    var = tirx.Var(name, str(value.ty))
    return tirx.Let(var, value, body(var))


def expf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``expf(x)`` of a float32 expression with the bits of glibc's ``__expf_fma`` (module docstring)."""
    x = x.asobject() if hasattr(x, "asobject") else x  # a te tensor element
    if str(x.ty) != "float32":
        raise ValueError(f"vecmath.expf: a float32 argument is needed, got {x.ty} ({x})")
    return _let("expf_x", x, _expf)


def _expf(x: tirx.Var) -> tirx.PrimExpr:
    xd = tirx.Cast("float64", x)
    shifted = _fma(_f64(INV_LN2_N), xd, _f64(SHIFT))   # k + SHIFT: k = rint(x * 32/ln2) in the low bits

    def body(ki: tirx.Var) -> tirx.PrimExpr:
        kd = tirx.reinterpret("float64", ki) - _f64(SHIFT)
        r = _fma(_f64(INV_LN2_N), xd, -kd)             # x * 32/ln2 - k, one rounding
        t = _let("expf_j", ki & tirx.IntImm("int64", N - 1), lambda j: _lookup(j, TABLE, N >> 1))
        s = tirx.reinterpret("float64", t + (ki << tirx.IntImm("int64", 52 - TABLE_BITS)))  # 2^(k/32)

        def poly(rv: tirx.Var) -> tirx.PrimExpr:
            z = _fma(_f64(POLY[0]), rv, _f64(POLY[1]))
            y = _fma(_f64(POLY[2]), rv, _f64(1.0))
            return _fma(z, rv * rv, y) * s

        return tirx.Cast("float32", _let("expf_r", r, poly))

    out = _let("expf_k", tirx.reinterpret("int64", shifted), body)
    out = tirx.Select(x < _c32(MAY_UNDERFLOW), _c32(DENORM_MIN), out)
    out = tirx.Select(x < _c32(UNDERFLOW), _c32(0.0), out)
    out = tirx.Select(x > _c32(OVERFLOW), _c32(np.inf), out)
    return tirx.Select(x != x, x + x, out)             # NaN: the library returns x + x (quieted)


def _c32(v: float | np.floating) -> tirx.FloatImm:
    return tirx.FloatImm("float32", float(v))


# --- erff: glibc's s_erff.c (2.36 and earlier: Sun's fdlibm in float32, Ian Lance Taylor's conversion) ----------
def _f32_bits(bits: int) -> np.float32:
    return np.uint32(bits).view(np.float32)


ERX = _f32_bits(0x3F58560B)  # erf(1) rounded to 24 bits: 0.84506291151
EFX = _f32_bits(0x3E0375D4)  # 2/sqrt(pi) - 1
PP = tuple(_f32_bits(b) for b in (0x3E0375D4, 0xBEA66BEB, 0xBCE9528F, 0xBBBD1489, 0xB7C756B1))  # |x| < 0.84375
QQ = tuple(_f32_bits(b) for b in (0x3ECBBBCE, 0x3D852A63, 0x3BA68116, 0x390AEE49, 0xB684E21A))
PA = tuple(_f32_bits(b) for b in (0xBB1ACDC6, 0x3ED46805, 0xBEBE9208, 0x3EA2FE54, 0xBDE31CC2, 0x3D1151B3,
                                  0xBB0DF9C0))  # 0.84375 <= |x| < 1.25
QA = tuple(_f32_bits(b) for b in (0x3DD9F331, 0x3F0A5785, 0x3D931AE7, 0x3E013307, 0x3C5F6E13, 0x3C445AA3))
RA = tuple(_f32_bits(b) for b in (0xBC21A093, 0xBF31A0B7, 0xC128F022, 0xC2798057, 0xC322658C, 0xC3389AE7,
                                  0xC2A2932B, 0xC11D077E))  # 1.25 <= |x| < 1/0.35
SA = tuple(_f32_bits(b) for b in (0x419D35CE, 0x4309A863, 0x43D9486F, 0x442158C9, 0x43D6810B, 0x42D9451F,
                                  0x40D23F7C, 0xBD777F97))
RB = tuple(_f32_bits(b) for b in (0xBC21A092, 0xBF4C9DD4, 0xC18E104B, 0xC320A2EA, 0xC41F6441, 0xC480230B,
                                  0xC3F1C275))  # 1/0.35 <= |x| < 6
SB = tuple(_f32_bits(b) for b in (0x41F2B459, 0x43A2E571, 0x44C01759, 0x4547FDBB, 0x451F90CE, 0x43ED43A7,
                                  0xC1B38712))
TINY = np.float32(1e-30)


def _u32(v: int) -> tirx.IntImm:
    return tirx.IntImm("uint32", v)


def _rounded(e: tirx.PrimExpr) -> tirx.PrimExpr:
    """``e`` rounded on its own: an arithmetic fence, so that LLVM does not contract it with the addition that
    reads it into a fused multiply-add (TVM's LLVM backend does that; glibc's ``erff`` has no FMA)."""
    return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", e)


def _horner(z: tirx.PrimExpr, coeffs: tuple[np.float32, ...], first: tirx.PrimExpr | None = None) -> tirx.PrimExpr:
    """``c0 + z*(c1 + z*(c2 + ...))`` in float32, every product rounded before its sum (``first``, if given,
    stands before ``c0``: ``first + z*(c0 + ...)``)."""
    acc: tirx.PrimExpr = _c32(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = _c32(c) + _rounded(z * acc)
    return acc if first is None else first + _rounded(z * acc)


def erff(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``erff(x)`` of a float32 expression with the bits of glibc's ``erff`` (which computes in float32 and
    calls the library's ``expf``, :func:`expf` here): every branch computed, the one of ``|x|`` selected."""
    x = x.asobject() if hasattr(x, "asobject") else x  # a te tensor element
    if str(x.ty) != "float32":
        raise ValueError(f"vecmath.erff: a float32 argument is needed, got {x.ty} ({x})")
    return _let("erff_x", x, _erff)


def _erff(x: tirx.Var) -> tirx.PrimExpr:
    # The bit operations are on uint32: Relax's te -> TIR conversion widens int32 variables to int64 where a
    # shape is int64, which would break the reinterpretations.  The sign test is x < 0: the sign bit wherever
    # it matters (for a NaN both branches return the NaN).
    one = _c32(1.0)
    negative = x < _c32(0.0)

    def body(ix: tirx.Var, ax: tirx.Var) -> tirx.PrimExpr:
        # inf or nan: (1 - 2 sign) + 1/x
        special = tirx.Select(negative, _c32(-1.0), one) + one / x
        # |x| < 2^-28 (below 2^-119 scaled by 16 against spurious underflow)
        tiny = _c32(0.0625) * (_rounded(_c32(16.0) * x) + _rounded(_c32(np.float32(16.0) * EFX) * x))
        small = x + _rounded(_c32(EFX) * x)
        # |x| < 0.84375
        near0 = _let("erff_z", _rounded(x * x), lambda z: x + _rounded(x * (_horner(z, PP) / _horner(z, QQ, first=one))))
        # 0.84375 <= |x| < 1.25
        pq = _let("erff_s1", ax - one, lambda s: _horner(s, PA) / _horner(s, QA, first=one))
        near1 = _let("erff_pq", pq, lambda v: tirx.Select(negative, -_c32(ERX) - v, _c32(ERX) + v))
        # 6 <= |x|: +-(1 - tiny)
        saturated = tirx.Select(negative, _c32(TINY) - one, one - _c32(TINY))
        # 1.25 <= |x| < 6: 1 - exp(-z^2 - 0.5625) exp((z - |x|)(z + |x|) + R/S) / |x|, z = |x| with 12 bits cut
        r_s = _let("erff_s", one / _rounded(ax * ax), lambda s: tirx.Select(
            ix < _u32(0x4036DB6E), _horner(s, RA) / _horner(s, SA, first=one),
            _horner(s, RB) / _horner(s, SB, first=one)))

        def tail_of(zc: tirx.Var) -> tirx.PrimExpr:
            r = expf(_rounded((-zc) * zc) - _c32(0.5625)) * expf(_rounded((zc - ax) * (zc + ax)) + r_s)
            return _let("erff_r", r, lambda rv: tirx.Select(negative, rv / ax - one, one - rv / ax))

        tail = _let("erff_zc", tirx.reinterpret("float32", ix & _u32(0xFFFFF000)), tail_of)  # ix & 0xfffff000
        out = tirx.Select(ix >= _u32(0x40C00000), saturated, tail)
        out = tirx.Select(ix < _u32(0x3FA00000), near1, out)
        out = tirx.Select(ix < _u32(0x3F580000), near0, out)
        out = tirx.Select(ix < _u32(0x31800000), small, out)
        out = tirx.Select(ix < _u32(0x04000000), tiny, out)
        return tirx.Select(ix >= _u32(0x7F800000), special, out)

    return _let("erff_ix", tirx.reinterpret("uint32", x) & _u32(0x7FFFFFFF),
                lambda ix: _let("erff_ax", tirx.reinterpret("float32", ix), lambda ax: body(ix, ax)))


__all__ = ["N", "POLY", "TABLE", "erff", "erff_matches_libm", "expf", "expf_matches_libm", "glibc_version"]
