"""Property tests (hypothesis) of every packer and the activation quantizer: round trips for any shape,
size 0 included; anything that is not a valid code (0.5, NaN, Inf, out of range) is a ValueError, never a
silently packed 0; lengths beyond the data are refused; scale 0 / NaN is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tvm_lowbit import qmath

FAST = settings(max_examples=80, deadline=None)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9)


def codes(lo: int, hi: int, dtype: object = np.int64) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(dtype, shapes, elements=st.integers(lo, hi))


# -- round trips --------------------------------------------------------------------------------------------

@FAST
@given(codes(-1, 1, np.int8))
def test_2bit_round_trip(t: np.ndarray) -> None:
    p = qmath.pack_2bit(t)
    assert p.dtype == np.uint8 and p.shape == t.shape[:-1] + (-(-t.shape[-1] // 4),)
    back = qmath.unpack_2bit(p, t.shape[-1])
    assert back.shape == t.shape and np.array_equal(back, t)


@FAST
@given(codes(-1, 1).map(lambda a: a.astype(np.float32)))
def test_2bit_takes_integer_valued_floats(t: np.ndarray) -> None:
    assert np.array_equal(qmath.unpack_2bit(qmath.pack_2bit(t), t.shape[-1]), t.astype(np.int8))


@FAST
@given(st.booleans().flatmap(lambda s: st.tuples(st.just(s), codes(-8, 7) if s else codes(0, 15))))
def test_4bit_round_trip(arg: tuple[bool, np.ndarray]) -> None:
    signed, q = arg
    p = qmath.pack_4bit(q)
    assert p.shape == q.shape[:-1] + (-(-q.shape[-1] // 2),)
    back = qmath.unpack_4bit(p, q.shape[-1], signed)
    assert back.dtype == (np.int8 if signed else np.uint8) and np.array_equal(back, q)


@FAST
@given(st.sampled_from([4, 8]).flatmap(lambda b: st.tuples(st.just(b), codes(0, 2 ** b - 1))))
def test_pow2_pack_round_trip(arg: tuple[int, np.ndarray]) -> None:
    bits, c = arg
    p = qmath.pack_pow2(c, bits)
    assert p.shape == c.shape[:-1] + (-(-c.shape[-1] * bits // 8),)
    assert np.array_equal(qmath.unpack_pow2(p, c.shape[-1], bits), c)


@FAST
@given(hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(0, 12)),
                  elements=st.integers(-8, 8).map(lambda e: 0 if e == 0 else int(np.sign(e)) << (abs(e) - 1))))
def test_pow2_codes_round_trip(w: np.ndarray) -> None:
    c = qmath.pow2_codes(w)
    bits = qmath.pow2_code_bits(w)
    assert np.array_equal(qmath.pow2_values(qmath.unpack_pow2(qmath.pack_pow2(c, bits), c.shape[-1], bits), bits), w)


# -- refused inputs -----------------------------------------------------------------------------------------

bad_floats = st.one_of(st.sampled_from([0.5, -0.5, np.nan, np.inf, -np.inf, 1e-45, 1e38, -3.4e38, 2.0, -2.0]),
                       st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: v not in (-1.0, 0.0, 1.0)))


@FAST
@given(codes(-1, 1).filter(lambda a: a.size > 0).map(lambda a: a.astype(np.float64)), st.data())
def test_2bit_refuses_any_non_code(t: np.ndarray, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, t.size - 1))
    t.flat[i] = data.draw(bad_floats)
    with pytest.raises(ValueError, match="ternary"):
        qmath.pack_2bit(t)


@pytest.mark.parametrize("bad", [0.5, np.nan, np.inf, -np.inf, 2, -2, 1e-300])
def test_2bit_named_cases(bad: float) -> None:
    with pytest.raises(ValueError, match=r"pack_2bit .*-1\.\.1"):
        qmath.pack_2bit(np.array([bad]))


@FAST
@given(st.sampled_from([np.nan, np.inf, 0.5, 16.0, -9.0, 1e30]), st.integers(0, 5))
def test_4bit_and_pow2_refuse_non_codes(bad: float, n: int) -> None:
    a = np.zeros(n + 1)
    a[n] = bad
    with pytest.raises(ValueError, match="pack_4bit"):
        qmath.pack_4bit(a)
    with pytest.raises(ValueError, match="pack_pow2"):
        qmath.pack_pow2(a, 4)
    with pytest.raises(ValueError, match="pack_pow2"):
        qmath.pack_pow2(np.where(a == 16.0, 256.0, a), 8)


@FAST
@given(st.integers(0, 6), st.integers(1, 9))
def test_unpack_length_beyond_the_data_is_refused(nbytes: int, extra: int) -> None:
    p = np.zeros((2, nbytes), np.uint8)
    for fn, per in ((lambda n: qmath.unpack_2bit(p, n), 4), (lambda n: qmath.unpack_4bit(p, n, True), 2),
                    (lambda n: qmath.unpack_pow2(p, n, 4), 2), (lambda n: qmath.unpack_pow2(p, n, 8), 1)):
        assert fn(per * nbytes).shape == (2, per * nbytes)
        with pytest.raises(ValueError, match="beyond the data"):
            fn(per * nbytes + extra)
        with pytest.raises(ValueError, match="non-negative"):
            fn(-extra)


def test_unpack_refuses_non_bytes() -> None:
    with pytest.raises(ValueError, match="unpack_2bit"):
        qmath.unpack_2bit(np.array([256]), 1)
    with pytest.raises(ValueError, match="unpack_2bit"):
        qmath.unpack_2bit(np.array([-1]), 1)
    with pytest.raises(ValueError, match="scalar"):
        qmath.pack_2bit(np.int8(1))


def test_size_zero_in_size_zero_out() -> None:
    assert qmath.pack_2bit(np.zeros((0, 5), np.int8)).shape == (0, 2)
    assert qmath.pack_2bit(np.zeros((3, 0), np.int8)).shape == (3, 0)
    assert qmath.unpack_2bit(np.zeros((0, 2), np.uint8), 5).shape == (0, 5)
    assert qmath.pack_4bit(np.zeros((0,), np.int8)).shape == (0,)
    assert qmath.unpack_4bit(np.zeros((4, 0), np.uint8), 0, False).shape == (4, 0)
    assert qmath.quantize_act_np(np.zeros((0, 3), np.float32), 0.1, 8, False).shape == (0, 3)


# -- the activation quantizer -------------------------------------------------------------------------------

any_float32 = st.floats(width=32, allow_nan=False, allow_infinity=True, allow_subnormal=True)
scales = st.floats(width=32, min_value=0.0, exclude_min=True, max_value=float(np.float32(1e30)), allow_subnormal=True)


@FAST
@given(hnp.arrays(np.float32, shapes, elements=any_float32), scales, st.integers(2, 8), st.booleans())
def test_quantize_act_np_matches_torch_and_stays_in_range(x: np.ndarray, scale: float, bits: int, signed: bool) -> None:
    lo, hi = qmath.act_range(bits, signed)
    q = qmath.quantize_act_np(x, scale, bits, signed)
    assert q.dtype == np.int32 and q.shape == x.shape
    assert q.size == 0 or (q.min() >= lo and q.max() <= hi)
    ref = qmath.quantize_act(torch.from_numpy(x.copy()), scale, bits, signed).numpy()
    assert np.array_equal(q, ref.astype(np.int32))
    # inside the range, the code is the nearest grid point: |x - q*s| <= s/2 (computed in float64)
    s = float(np.float32(scale))
    inside = np.isfinite(x) & (x.astype(np.float64) / s >= lo) & (x.astype(np.float64) / s <= hi)
    err = np.abs(x.astype(np.float64)[inside] / s - q[inside])
    assert err.size == 0 or err.max() <= 0.5 + 1e-6


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 1e-50])
def test_quantize_act_np_refuses_bad_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="scale must be a finite positive"):
        qmath.quantize_act_np(np.ones(3, np.float32), scale, 8, False)


def test_quantize_act_np_refuses_nan_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        qmath.quantize_act_np(np.array([1.0, np.nan], np.float32), 0.5, 8, True)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True, None])
def test_act_range_refuses_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="activation bits"):
        qmath.act_range(bits, False)  # type: ignore[arg-type]
