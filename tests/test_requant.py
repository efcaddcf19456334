"""kernels.requant: the exact integer requantization and the float32 fused multiply-add epilogue, against the
reference float epilogue (qmath.epilogue_np + qmath.quantize_act_np) on every accumulator of a dense window
around each threshold and on random accumulators.  The kernels that use them are checked bit for bit in
tests/test_neon.py (host) and tests/test_board.py (emulated Pi 4 and Pi 5)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from tvm_lowbit import qmath
from tvm_lowbit.kernels import requant

WINDOW = 4  # accumulators t_j - WINDOW .. t_j + WINDOW around every threshold


def check_exact(rq: requant.IntRequant, scale: np.ndarray, bias: np.ndarray, relu: bool, rs: float, bits: int,
                signed: bool, low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> None:
    """The integer form equals the float epilogue on a dense window around every threshold, on the bounds and
    on random accumulators in them."""
    t = requant.thresholds(scale, bias, relu, rs, bits, signed)
    lo_b, hi_b = low[:, None], high[:, None]
    parts = [np.clip(t + d, lo_b, hi_b) for d in range(-WINDOW, WINDOW + 1)]
    parts += [np.repeat(lo_b, 2, 1), np.repeat(hi_b, 2, 1)]
    parts.append(lo_b + (rng.random((len(scale), 3000)) * (hi_b - lo_b + 1)).astype(np.int64))
    acc = np.concatenate(parts, 1).astype(np.int32)
    want = requant.codes_np(acc, scale, bias, relu, rs, bits, signed)
    np.testing.assert_array_equal(requant.apply_np(acc, rq), want)


def random_layer(rng: np.random.Generator, k: int) -> tuple:
    """A layer whose accumulators span a few thousand to a few million and whose codes spread over the range."""
    bits, signed, relu = int(rng.integers(2, 9)), bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
    _, hi = qmath.act_range(bits, signed)
    bound = int(10 ** rng.uniform(3, 6.5))
    rs = float(np.float32(10 ** rng.uniform(-3, 0)))
    # scale * bound ~ the top code: the codes spread over the range, some clip
    scale = (rs * hi / bound * 10 ** rng.uniform(-0.3, 0.6, k)).astype(np.float32)
    bias = (rng.uniform(-0.5, 0.5, k) * rs * hi).astype(np.float32)
    low, high = np.full(k, -bound, np.int64), np.full(k, bound, np.int64)
    return scale, bias, relu, rs, bits, signed, low, high


def test_integer_form_is_exact_whenever_it_is_found() -> None:
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(60):
        scale, bias, relu, rs, bits, signed, low, high = random_layer(rng, 6)
        rq = requant.solve(scale, bias, relu, rs, bits, signed, bounds=(low, high))
        if isinstance(rq, str):
            assert rq.startswith("channel") and "\n" not in rq  # a one-line reason
            continue
        found += 1
        assert rq.shift >= requant.MIN_SHIFT and (rq.mul >= 0).all() and (np.abs(rq.add) < requant.MAX_ADD).all()
        check_exact(rq, scale, bias, relu, rs, bits, signed, low, high, rng)
    assert found >= 15, f"the integer form was found for {found} of 60 layers only"


def test_zero_point_offset_is_folded() -> None:
    """A kernel accumulating ``true - offset`` gets the same codes from ``rq`` with the offset folded in."""
    rng = np.random.default_rng(1)
    scale, bias = np.float32([0.0213, 0.0131, 0.0517]), np.float32([0.3, -1.01, 0.0])
    offset = np.int64([128 * 40, -128 * 7, 0])
    plain = requant.solve(scale, bias, True, 0.5, 8, False, bounds=(np.full(3, -2000), np.full(3, 2000)))
    folded = requant.solve(scale, bias, True, 0.5, 8, False, offset=offset,
                           bounds=(np.full(3, -2000), np.full(3, 2000)))
    assert not isinstance(plain, str) and not isinstance(folded, str)
    acc = rng.integers(-2000, 2001, (3, 500))
    np.testing.assert_array_equal(requant.apply_np(acc - offset[:, None], folded), requant.apply_np(acc, plain))
    check_exact(plain, scale, bias, True, 0.5, 8, False, np.full(3, -2000), np.full(3, 2000), rng)


def test_edge_cases() -> None:
    rng = np.random.default_rng(2)
    full = (np.full(2, requant.INT32_MIN), np.full(2, requant.INT32_MAX))
    # a zero scale: a constant code (M = 0)
    rq = requant.solve(np.float32([0.0, 0.0]), np.float32([0.37, -5.0]), False, 0.1, 8, True, bounds=full)
    assert not isinstance(rq, str) and (rq.mul == 0).all()
    check_exact(rq, np.float32([0.0, 0.0]), np.float32([0.37, -5.0]), False, 0.1, 8, True, *full, rng)
    # tiny scales over the whole int32 range: the thresholds lie beyond 2^24, where float32(acc) rounds
    scale, bias = np.float32([3e-9, 7.1e-9]), np.float32([0.0, 0.25])
    rq = requant.solve(scale, bias, True, 0.01, 8, False, bounds=full)
    if not isinstance(rq, str):
        check_exact(rq, scale, bias, True, 0.01, 8, False, *full, rng)
    # huge scales: every step of acc moves several codes, most accumulators clip
    scale, bias = np.float32([0.3071, 0.4519]), np.float32([-10.3, 3.17])
    rq = requant.solve(scale, bias, False, 1.0, 8, True, bounds=full)
    assert not isinstance(rq, str)
    check_exact(rq, scale, bias, False, 1.0, 8, True, *full, rng)
    # ties at .5 (acc / 4 rounds half to even): the thresholds alternate 3 and 5 apart, no line has them
    why = requant.solve(np.float32([1.0]), np.float32([0.0]), False, 4.0, 8, True,
                        bounds=(np.int64([-100]), np.int64([100])))
    assert isinstance(why, str) and "channel 0" in why
    # ... but on a window of accumulators with a single tie the line exists and keeps it
    rq = requant.solve(np.float32([1.0]), np.float32([0.0]), False, 4.0, 8, True,
                       bounds=(np.int64([0]), np.int64([7])))
    assert not isinstance(rq, str)
    check_exact(rq, np.float32([1.0]), np.float32([0.0]), False, 4.0, 8, True, np.int64([0]), np.int64([7]), rng)
    # what has no integer form says why
    assert "negative" in requant.solve(np.float32([-0.1]), np.float32([0.0]), True, 0.1, 8, False)
    assert "finite" in requant.solve(np.float32([np.inf]), np.float32([0.0]), True, 0.1, 8, False)
    assert "int32" in requant.solve(np.float32([4.0]), np.float32([0.0]), True, 0.1, 8, False)


def test_thresholds_are_the_first_accumulators_of_each_code() -> None:
    scale, bias = np.float32([0.01, 0.003]), np.float32([-0.2, 0.05])
    t = requant.thresholds(scale, bias, True, 0.05, 4, False)
    lo, hi = qmath.act_range(4, False)
    for ch in range(2):
        for i, j in enumerate(range(lo + 1, hi + 1)):
            acc = np.int64([[t[ch, i] - 1, t[ch, i]]])
            code = requant.codes_np(acc, scale[ch:ch + 1], bias[ch:ch + 1], True, 0.05, 4, False)[0]
            assert code[0] < j <= code[1]


def test_acc_bounds() -> None:
    w = np.array([[[[3, -2]]], [[[0, 0]]]])
    low, high = requant.acc_bounds(w, 8, False)
    np.testing.assert_array_equal(low, [-2 * 255, 0])
    np.testing.assert_array_equal(high, [3 * 255, 0])
    low, high = requant.acc_bounds(w, 8, True)
    np.testing.assert_array_equal(low, [-5 * 127, 0])
    np.testing.assert_array_equal(high, [5 * 127, 0])


@pytest.mark.parametrize("seed", range(4))
def test_fma_proof_means_float64_holds_the_sum_exactly(seed: int) -> None:
    """Where fma_unexact finds nothing, float64(float32(acc)) * scale + bias is exact (no rounding), so the
    reference's float32 of it is the fused multiply-add's single rounding."""
    rng = np.random.default_rng(seed)
    k = 8
    scale = (10 ** rng.uniform(-6, -2, k)).astype(np.float32)
    bias = rng.uniform(-2, 2, k).astype(np.float32)
    bound = int(10 ** rng.uniform(3, 8))
    low, high = np.full(k, -bound), np.full(k, bound)
    assert requant.fma_unexact(scale, bias, (low, high)) is None
    accs = np.concatenate([[-bound, bound, 0, 1, -1], rng.integers(-bound, bound + 1, 200)])
    for ch in range(k):
        af = accs.astype(np.float32).astype(np.float64)
        y64 = af * np.float64(scale[ch]) + np.float64(bias[ch])
        for a, y in zip(af, y64):
            assert Fraction(float(a)) * Fraction(float(scale[ch])) + Fraction(float(bias[ch])) == Fraction(float(y))


def test_fma_proof_refuses_double_rounding_cases() -> None:
    # 3 * (1 + 2^-23) is a float32 midpoint: a tiny negative bias makes float64 round back onto it (then
    # float32 ties to even, up) while one rounding goes down
    s, b = np.float32([1 + 2 ** -23]), np.float32([-1e-30])
    assert requant.fma_unexact(s, b, (np.int64([-3]), np.int64([3]))) is not None
    assert requant.fma_unexact(np.float32([np.nan]), np.float32([0]), (np.int64([0]), np.int64([1]))) is not None


@pytest.mark.parametrize("rs", [0.05, 0.013, 0.0071, 1.7, 3e-4])
def test_division_free_requantization(rs: float) -> None:
    """The multiply + one fused correction gives the division's codes on a whole binade (what recip_unexact
    checks), and on y scaled into the codes' range; the fused-multiply-add emulation rounds once."""
    assert requant.recip_unexact(rs, np.float32([0.01]), np.float32([0.5]), (np.int64([-10 ** 6]), np.int64([10 ** 6]))) is None
    rng = np.random.default_rng(int(rs * 1e4))
    y = (rng.random(200_000) * 300 * rs).astype(np.float32)
    y = np.concatenate([y, -y, ((np.arange(1, 256) - 0.5) * np.float32(rs)).astype(np.float32)])
    want = np.round((y / np.float32(rs)).astype(np.float32))
    np.testing.assert_array_equal(np.round(requant.recip_quotient(y, rs)), want)
    assert requant.recip_unexact(rs, np.float32([1e30]), np.float32([0]), (np.int64([0]), np.int64([2 ** 31]))) is not None


def test_fma32_emulation_rounds_once() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(-2 ** 24, 2 ** 24, 2000).astype(np.float32)
    b = (10 ** rng.uniform(-8, 0, 2000)).astype(np.float32)
    c = rng.uniform(-3, 3, 2000).astype(np.float32)
    got = requant._fma32(a, b, c)
    for ai, bi, ci, gi in zip(a, b, c, got):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        lo_, hi_ = sorted([gi, np.nextafter(gi, np.float32(np.inf) if Fraction(float(gi)) < exact else -np.inf)])
        # gi is the float32 nearest the exact value (ties to even)
        assert abs(Fraction(float(gi)) - exact) <= abs(Fraction(float(lo_ if gi == hi_ else hi_)) - exact)


@pytest.mark.parametrize("scale,bits,signed", [(0.05, 8, False), (0.013, 8, True), (0.0071, 4, False),
                                               (1.7, 8, False)])
def test_division_free_activation_quantizer(scale: float, bits: int, signed: bool) -> None:
    """kernels.quantize_act without a division (proven by quantize_recip_unexact) gives qmath's codes, compiled:
    every x whose quotient is a tie or next to one, values around the clamp, huge values and infinities."""
    import tvm
    from tvm import te

    from tvm_lowbit.kernels import make_prim_func, quantize_act

    assert requant.quantize_recip_unexact(scale) is None
    s = np.float32(scale)
    k = np.arange(-300, 300, dtype=np.float32)
    ties = ((k + np.float32(0.5)) * s).astype(np.float32)
    near = [ties]
    for _ in range(3):  # the float32 neighbours of each tie, both ways
        near += [np.nextafter(near[-2 if len(near) > 1 else -1], np.float32(np.inf)), np.nextafter(ties, -np.inf)]
    lim = np.float32(s * np.float32(requant.QUANTIZE_CLAMP))
    extreme = np.float32([lim, -lim, np.nextafter(lim, np.inf), 3 * lim, 1e30, -1e30, 3.4e38, -3.4e38, np.inf,
                          -np.inf, 0.0, -0.0, 1e-40, -1e-40, s / 4, s / 2])
    rng = np.random.default_rng(3)
    x = np.concatenate([*near, extreme, (rng.standard_normal(4000) * 200 * s).astype(np.float32)])
    x = np.concatenate([x, np.zeros(-len(x) % 8, np.float32)]).reshape(1, -1, 8)
    ref = qmath.quantize_act_np(x, scale, bits, signed).astype(qmath.act_dtype(bits, signed))
    xp = te.placeholder(x.shape, "float32")
    func = make_prim_func([xp], quantize_act(xp, scale, bits, signed), "quant")
    assert "llvm.fma" in func.script()  # the division-free form
    f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                    target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 1}))
    out = tvm.runtime.tensor(np.zeros(x.shape, ref.dtype))
    f["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), ref)
