"""The exact integer form of the requantizing epilogue.

The float epilogue of a layer that writes the next layer's codes (:mod:`tvm_lowbit.qmath`, bit for bit)::

    y    = float32(float64(float32(acc)) * float64(scale) + float64(bias)),  optional ReLU
    code = clip(nearbyint(float32(y / requant_scale)), lo, hi)

is, per output channel, a non-decreasing function of the int32 accumulator when ``scale >= 0`` (every step
is: float32 rounding, a multiply by a non-negative number, an add, ReLU, a division by a positive number,
rounding to an integer, clipping).  So it is described exactly by its thresholds ``t_j``, the smallest
int32 ``acc`` whose code is at least ``j`` (``j = lo+1 .. hi``), which :func:`thresholds` finds by
bisection over the int32 range evaluating qmath's own NumPy math.

The integer form is ``code = clip((int64(acc) * M + C) >> shift, lo, hi)`` with ``0 <= M < 2^31`` and one
``shift >= 32`` for the layer.  Its right side ``g(acc)`` is non-decreasing too, so ``code(acc) >= j`` and
``g(acc) >= j`` agree for every int32 ``acc`` as soon as they agree at ``t_j - 1`` and ``t_j``:
``t_j * M + C >= j << shift`` and ``(t_j - 1) * M + C < j << shift`` -- one interval for ``C`` per
threshold.  :func:`solve` tries a few ``M`` around ``scale / requant_scale * 2^shift`` and takes a ``C``
from the intersection of those intervals: when it returns, the integer form equals the float epilogue for
every int32 accumulator (proven by the thresholds, not sampled).  ``|C| < 2^62`` keeps the int64 sum exact.

A kernel whose accumulator misses a per-channel constant (``acc = true_acc - offset``, e.g. the zero-point
term of unsigned codes in :mod:`.neon`) passes ``offset``: it is folded into ``C``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from tvm_lowbit import qmath, safe_io

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
MAX_MUL = 2 ** 31 - 1       # M fits int32 (smull takes two int32 lanes)
MAX_ADD = 2 ** 62           # |C| below it: |acc * M| < 2^62, so acc * M + C fits int64
MIN_SHIFT = 32              # (x >> 32) of the int64 sum fits int32, so the narrowing is exact
MAX_SHIFT = 52              # code << shift stays well inside int64 (|code| <= 255)
OPEN = 2 ** 80              # an interval end no threshold constrains
MUL_TRIES = (0, -1, 1, -2, 2, -3, 3, -4, 4)


@dataclass(frozen=True)
class IntRequant:
    """``code = clip((int64(acc) * mul + add) >> shift, lo, hi)`` per output channel."""

    mul: np.ndarray   # int32 [K], 0 <= mul < 2^31
    add: np.ndarray   # int64 [K]
    shift: int        # one for the layer, >= 32
    bits: int
    signed: bool


def codes_np(acc: np.ndarray, out_scale: np.ndarray, out_bias: np.ndarray, relu: bool, requant_scale: float,
             bits: int, signed: bool) -> np.ndarray:
    """The float epilogue's codes (int32) of accumulators ``acc[K, n]`` (qmath.epilogue_np + quantize_act_np)."""
    y = qmath.epilogue_np(np.asarray(acc, np.int32), out_scale, out_bias, relu, 0)
    return qmath.quantize_act_np(y, requant_scale, bits, signed)


def thresholds(out_scale: np.ndarray, out_bias: np.ndarray, relu: bool, requant_scale: float, bits: int,
               signed: bool) -> np.ndarray:
    """``t[k, j - lo - 1]``: the smallest int32 accumulator of channel k whose code is at least j
    (``j = lo+1 .. hi``), ``2^31`` where no int32 accumulator reaches j (int64 [K, hi - lo])."""
    lo, hi = qmath.act_range(bits, signed)
    scale = np.asarray(out_scale, np.float32).reshape(-1)
    k = scale.size
    j = np.arange(lo + 1, hi + 1, dtype=np.int64)[None, :].repeat(k, 0)
    below = np.full(j.shape, INT32_MIN - 1, np.int64)   # code < j here (a virtual point)
    above = np.full(j.shape, INT32_MAX + 1, np.int64)   # code >= j here (a virtual point)
    bias = np.asarray(out_bias, np.float32).reshape(-1)
    while True:
        open_ = above - below > 1
        if not open_.any():
            return above
        mid = (below + above) // 2
        # evaluate all (channel, j) midpoints at once: row k of acc is channel k
        code = codes_np(np.where(open_, mid, 0), scale, bias, relu, requant_scale, bits, signed)
        up = code >= j
        above = np.where(open_ & up, mid, above)
        below = np.where(open_ & ~up, mid, below)


def _add_interval(t: list[int], lo: int, mul: int, shift: int, a: int, b: int) -> tuple[int, int]:
    """The interval of C that puts g's thresholds at ``t`` for accumulators in ``[a, b]`` (Python ints: no
    overflow): a threshold at or below ``a`` only asks ``g(a) >= j``, one above ``b`` only ``g(b) < j``."""
    c_lo, c_hi = -OPEN, OPEN
    for i, tj in enumerate(t):
        level = (lo + 1 + i) << shift
        tj = min(max(tj, a), b + 1)
        if tj > a:              # g(t_j - 1) < j
            c_hi = min(c_hi, level - (tj - 1) * mul - 1)
        if tj <= b:             # g(t_j) >= j
            c_lo = max(c_lo, level - tj * mul)
    return c_lo, c_hi


def solve(out_scale: np.ndarray, out_bias: np.ndarray, relu: bool, requant_scale: float, bits: int, signed: bool,
          offset: np.ndarray | None = None, bounds: tuple[np.ndarray, np.ndarray] | None = None
          ) -> IntRequant | str:
    """The integer form of a layer's requantizing epilogue, or why it has none (a one-line reason: the
    kernel then keeps the float epilogue).  ``offset[k]``: the kernel's accumulator is ``true - offset``.
    ``bounds``: ``(low[k], high[k])``, the true accumulators of channel k provably lie in it
    (:func:`acc_bounds`); the form is then exact there (default: every int32)."""
    scale = np.asarray(out_scale, np.float32).reshape(-1)
    bias = np.asarray(out_bias, np.float32).reshape(-1)
    rs = np.float32(requant_scale)
    if not (np.isfinite(rs) and rs > 0):
        return f"requant_scale {requant_scale!r} is not a finite positive float32"
    if not (np.isfinite(scale).all() and np.isfinite(bias).all()):
        return "a non-finite output scale or bias"
    if (scale < 0).any():
        return f"channel {int(np.argmax(scale < 0))} has a negative output scale (the epilogue decreases)"
    lo, _ = qmath.act_range(bits, signed)
    ratio = scale.astype(np.float64) / np.float64(rs)
    top = float(ratio.max()) if ratio.size else 0.0
    shift = MIN_SHIFT if top == 0 else min(MAX_SHIFT, int(np.floor(np.log2(MAX_MUL / top))))
    if shift < MIN_SHIFT:
        return f"scale / requant_scale up to {top:.3g}: M = ratio * 2^{MIN_SHIFT} would not fit int32"
    t = thresholds(scale, bias, relu, rs, bits, signed)
    offs = np.zeros(scale.size, np.int64) if offset is None else np.asarray(offset, np.int64).reshape(-1)
    if bounds is None:
        lows, highs = [INT32_MIN] * scale.size, [INT32_MAX] * scale.size
    else:
        lows = [max(INT32_MIN, int(v)) for v in np.asarray(bounds[0]).reshape(-1)]
        highs = [min(INT32_MAX, int(v)) for v in np.asarray(bounds[1]).reshape(-1)]
    muls, adds = [], []
    for ch in range(scale.size):
        tj = [int(v) for v in t[ch]]
        base = int(round(float(ratio[ch]) * 2.0 ** shift))
        for d in MUL_TRIES:
            mul = base + d
            if not 0 <= mul <= MAX_MUL:
                continue
            c_lo, c_hi = _add_interval(tj, lo, mul, shift, lows[ch], highs[ch])
            if c_lo <= c_hi:
                break
        else:
            return f"channel {ch}: no integer (M, C) with shift {shift} matches the float epilogue's thresholds"
        # the middle of the interval (an end where the other is open: the code is constant on the domain),
        # the kernel's offset folded in
        mid = c_lo if c_hi >= OPEN else c_hi if c_lo <= -OPEN else (c_lo + c_hi) // 2
        add = mid + int(offs[ch]) * mul
        if abs(add) >= MAX_ADD:
            return f"channel {ch}: the integer offset {add} does not fit int64 with room for acc * M"
        muls.append(mul)
        adds.append(add)
    return IntRequant(np.asarray(muls, np.int32), np.asarray(adds, np.int64), shift, bits, signed)


def acc_bounds(w_int: np.ndarray, act_bits: int, act_signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(low[k], high[k])``: every accumulator ``sum w[k] * x`` over activation codes ``x`` in their range
    (zero padding included) lies in it (int64 [K])."""
    lo, hi = qmath.act_range(act_bits, act_signed)
    w = np.asarray(w_int, np.int64).reshape(np.shape(w_int)[0], -1)
    pos, neg = np.where(w > 0, w, 0).sum(1), np.where(w < 0, w, 0).sum(1)
    return pos * lo + neg * hi, pos * hi + neg * lo


def apply_np(acc: np.ndarray, rq: IntRequant) -> np.ndarray:
    """The integer form on accumulators ``acc[K, n]`` (int32 codes), in int64 as the kernels compute it."""
    lo, hi = qmath.act_range(rq.bits, rq.signed)
    a = np.asarray(acc, np.int64)
    g = (a * rq.mul.astype(np.int64)[:, None] + rq.add[:, None]) >> rq.shift
    return np.clip(g, lo, hi).astype(np.int32)


def _lsb_exponent(v: float) -> int:
    """E such that the float32 ``v`` is an integer multiple of ``2^E`` (its 24-bit significand's last bit)."""
    _, e = math.frexp(v)
    return max(e - 24, -149)


def fma_unexact(out_scale: np.ndarray, out_bias: np.ndarray, bounds: tuple[np.ndarray, np.ndarray]) -> str | None:
    """Why ``float32 fma(float32(acc), scale, bias)`` (one rounding) might differ from the reference
    ``float32(float64(float32(acc)) * scale + bias)`` (two) for an accumulator within ``bounds``; None when it
    provably cannot.  ``x = float32(acc) * scale + bias`` is an integer multiple of ``2^E`` (E: the smaller
    last-bit exponent of scale and bias; float32(acc) is an integer) and ``|x| <= float32(A) |scale| + |bias|``
    (A: the largest ``|acc|``); below ``2^(53 + E)`` it has at most 53 significant bits, so float64 holds it
    exactly, the reference's float64 rounding is no rounding, and both are ``float32(x)``."""
    scale = np.asarray(out_scale, np.float32).reshape(-1)
    bias = np.asarray(out_bias, np.float32).reshape(-1)
    if not (np.isfinite(scale).all() and np.isfinite(bias).all()):
        return "a non-finite output scale or bias"
    top = np.maximum(np.abs(np.asarray(bounds[0], np.int64)), np.abs(np.asarray(bounds[1], np.int64))).reshape(-1)
    for ch in range(scale.size):
        s, b = float(scale[ch]), float(bias[ch])
        a = float(np.float32(min(int(top[ch]), 2 ** 31)))
        e = min(_lsb_exponent(s) if s else 0, _lsb_exponent(b) if b else 0)
        if Fraction(a) * abs(Fraction(s)) + abs(Fraction(b)) >= Fraction(2) ** (53 + e):
            return (f"channel {ch}: acc * scale + bias (scale {s:.3g}, bias {b:.3g}, |acc| <= {int(top[ch])}) may "
                    "need more than float64's 53 bits")
    return None


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``fma(a, b, c)`` (one rounding), exactly: ``a * b`` is exact in float64 (48 bits); the sum is
    split into ``s + e`` exactly (TwoSum), and float32(s) is the single rounding unless ``s`` is a float32
    midpoint, where the sign of ``e`` decides."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    other = np.nextafter(r, np.where(s > r.astype(np.float64), np.float32(np.inf), np.float32(-np.inf)))
    mid = (r.astype(np.float64) + other.astype(np.float64)) / 2 == s
    up = np.maximum(r, other)
    down = np.minimum(r, other)
    return np.where(mid & (e > 0), up, np.where(mid & (e < 0), down, r))


def recip_quotient(y: np.ndarray, rs: float) -> np.ndarray:
    """``y / rs`` without a division (float32): ``q0 = y * inv``, ``r = fma(-q0, rs, y)``,
    ``q = fma(r, inv, q0)`` with ``inv = float32(1 / rs)`` -- as the kernels compute it."""
    s = np.float32(rs)
    inv = np.float32(1) / s
    y = np.asarray(y, np.float32)
    q0 = (y * inv).astype(np.float32)
    r = _fma32(-q0, np.full_like(y, s), y)
    return _fma32(r, np.full_like(y, inv), q0)


def recip_unexact(requant_scale: float, out_scale: np.ndarray, out_bias: np.ndarray,
                  bounds: tuple[np.ndarray, np.ndarray]) -> str | None:
    """Why ``nearbyint(recip_quotient(y, rs))`` might differ from the reference ``nearbyint(float32(y / rs))``
    for a float32 ``y`` of the layer; None when it cannot.  Both are odd functions of y and, while every
    value stays a normal float32, unchanged by scaling y by a power of two, so every float32 y of one binade
    ([1, 2): 2^23 values) is compared; below ``rs / 4`` both codes are 0 (and with ``2^-60 <= rs <= 2^60``
    the remainder ``r``, a multiple of about ``y 2^-47``, stays normal above it), and ``|y|`` is bounded from
    ``bounds`` (``|acc| * scale + |bias|``) so that nothing overflows."""
    rs = np.float32(requant_scale)
    if not (np.isfinite(rs) and rs > 0):
        return f"requant_scale {requant_scale!r} is not a finite positive float32"
    if not 2.0 ** -60 <= float(rs) <= 2.0 ** 60:
        return f"requant_scale {float(rs):.3g}: intermediate values could leave the normal float32 range"
    scale = np.abs(np.asarray(out_scale, np.float64)).reshape(-1)
    bias = np.abs(np.asarray(out_bias, np.float64)).reshape(-1)
    top = np.maximum(np.abs(np.asarray(bounds[0], np.float64)), np.abs(np.asarray(bounds[1], np.float64)))
    ymax = float((top.reshape(-1) * scale + bias).max()) if scale.size else 0.0
    if ymax * 1.01 >= float(np.finfo(np.float32).max) * float(rs) / 4:
        return f"|y| up to {ymax:.3g} would overflow y / requant_scale"
    if not _recip_binade_exact(float(rs)):
        return f"requant_scale {float(rs)!r}: y * (1 / rs) with one correction step misrounds some y"
    return None


_RECIP_CHECKED: dict[float, bool] = {}
PROOF_CACHE_FORMAT = 1


def proof_cache_dir() -> Path:
    """Where :func:`recip_unexact`'s binade proofs are kept between processes: ``proofs/`` in the user cache
    folder (``$TVM_LOWBIT_CACHE``, default ``~/.cache/tvm_lowbit``, as the sensitivity cache)."""
    return Path(os.environ.get("TVM_LOWBIT_CACHE") or Path.home() / ".cache" / "tvm_lowbit") / "proofs"


def _proof_key(rs: float) -> dict[str, str | int] | None:
    """Everything the binade proof of ``rs`` depends on: rs's float32 bits, the code of the proof and of the
    arithmetic it checks (a changed line is a new key), NumPy's version; None where the code cannot be read
    (then nothing is cached on disk)."""
    try:
        code = "".join(inspect.getsource(f) for f in (_binade_exact_np, recip_quotient, _fma32))
    except (OSError, TypeError):
        return None
    return {"format": PROOF_CACHE_FORMAT, "rs_float32": f"{int(np.float32(rs).view(np.uint32)):08x}",
            "code_sha256": hashlib.sha256(code.encode()).hexdigest(), "numpy": np.__version__}


def _proof_path(folder: Path, key: dict[str, str | int]) -> Path:
    return folder / f"recip-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.json"


def _entry_check(key: dict[str, str | int], exact: bool) -> str:
    return hashlib.sha256(json.dumps([key, exact], sort_keys=True).encode()).hexdigest()


def _read_proof(path: Path, key: dict[str, str | int]) -> bool | None:
    """The cached result, or None where the entry is missing, unreadable, for another key or damaged (its
    checksum does not match): such an entry is never trusted."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("exact"), bool):
        return None
    return entry["exact"] if entry.get("check") == _entry_check(key, entry["exact"]) else None


def _write_proof(path: Path, key: dict[str, str | int], exact: bool) -> None:
    """Write the entry under a unique name and rename it into place; a cache that cannot be written only
    costs the proof again."""
    tmp = None
    try:
        tmp = safe_io.temp_sibling(path, ".json")
        tmp.write_text(json.dumps({"key": key, "exact": exact, "check": _entry_check(key, exact)}))
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def binade_exact(rs: float, cache: Path | None = None) -> bool:
    """Whether every float32 y in [1, 2) gets ``nearbyint(recip_quotient(y, rs)) == nearbyint(float32(y / rs))``
    (about 1 s of NumPy).  ``cache``: a folder of earlier results: an intact entry for exactly this proof
    (:func:`_proof_key`) is the answer, anything else is proven again and written."""
    key = None if cache is None else _proof_key(rs)
    exact = None if key is None else _read_proof(_proof_path(cache, key), key)
    if exact is None:
        exact = _binade_exact_np(rs)
        if key is not None:
            _write_proof(_proof_path(cache, key), key, exact)
    return exact


def _recip_binade_exact(rs: float) -> bool:
    """:func:`binade_exact`, kept per process and on disk (:func:`proof_cache_dir`)."""
    if rs not in _RECIP_CHECKED:
        _RECIP_CHECKED[rs] = binade_exact(rs, proof_cache_dir())
    return _RECIP_CHECKED[rs]


def _binade_exact_np(rs: float) -> bool:
    y = (np.arange(2 ** 23, dtype=np.uint32) + np.uint32(0x3F800000)).view(np.float32)
    for part in np.array_split(y, 8):
        want = (part / np.float32(rs)).astype(np.float32)
        got = recip_quotient(part, rs)
        if not (np.round(got) == np.round(want)).all():
            return False
    return True


def quantize_clamp(requant_scale: float, bits: int, signed: bool) -> tuple[float, float]:
    """``(L, H)``: float32 ``(lo - 1/4) rs`` and ``(hi + 1/4) rs``, the input range of a quantizer
    ``clip(nearbyint(y / rs), lo, hi)`` within which no code is clipped; clamping ``y`` to it first gives the
    same codes where ``L`` and ``H`` themselves get ``lo`` and ``hi`` (:func:`quantize_recip_unexact` checks),
    as the quantizer is monotone, and leaves no clip to do."""
    lo, hi = qmath.act_range(bits, signed)
    rs = np.float32(requant_scale)
    return float(np.float32((lo - 0.25) * rs)), float(np.float32((hi + 0.25) * rs))


def quantize_recip_unexact(requant_scale: float, bits: int, signed: bool) -> str | None:
    """Why a standalone quantizer of float32 ``y`` (``kernels.quantize_act``) with ``y`` clamped to ``[L, H]``
    (:func:`quantize_clamp`), the division as :func:`recip_quotient` and no clip might give other codes than
    ``clip(nearbyint(float32(y / rs)), lo, hi)``; None when it cannot: ``L`` and ``H`` get ``lo`` and ``hi``,
    and :func:`recip_unexact` holds for ``|y| <= max(-L, H)``."""
    lo, hi = qmath.act_range(bits, signed)
    low, high = quantize_clamp(requant_scale, bits, signed)
    ends = qmath.quantize_act_np(np.float32([low, high]), requant_scale, bits, signed)
    if not (np.isfinite([low, high]).all() and ends.tolist() == [lo, hi]):
        return f"requant_scale {requant_scale!r}: the clamp's ends {low!r}, {high!r} give codes {ends.tolist()}"
    top = max(-low, high)
    return recip_unexact(requant_scale, np.ones(1, np.float32), np.zeros(1, np.float32),
                         (np.array([-top]), np.array([top])))
