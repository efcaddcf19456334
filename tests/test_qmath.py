"""Properties of the shared quantized math (tvm_lowbit.qmath)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tvm_lowbit import qmath

FAST = settings(max_examples=60, deadline=None)
finite = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=32)


def _brute_force_error(w: np.ndarray) -> float:
    """min over t in {-1,0,1}^n of ||w - alpha t||^2 with the best alpha for each t."""
    best = float(np.dot(w, w))  # t = 0
    for t in itertools.product((-1, 0, 1), repeat=len(w)):
        t = np.array(t, np.float64)
        nz = float(np.dot(t, t))
        if nz == 0:
            continue
        alpha = max(float(np.dot(w, t)) / nz, 0.0)  # alpha >= 0
        best = min(best, float(np.sum((w - alpha * t) ** 2)))
    return best


@FAST
@given(hnp.arrays(np.float64, st.integers(1, 7), elements=finite))
def test_exact_matches_brute_force(w: np.ndarray) -> None:
    g = torch.from_numpy(w).reshape(1, -1)
    t, alpha = qmath.ternarize_groups(g, "exact")
    err = float(qmath.ternary_error(g, t, alpha)[0])
    assert err == pytest.approx(_brute_force_error(w), rel=1e-9, abs=1e-9)
    assert set(t.unique().tolist()) <= {-1, 0, 1} and float(alpha[0]) >= 0
    # the optimum is a fixed point: every selected |w| >= alpha / 2 >= every unselected |w| (up to ties)
    sel = t[0] != 0
    if sel.any() and (~sel).any():
        assert float(g[0][~sel].abs().max()) <= float(alpha[0]) / 2 + 1e-9 <= float(g[0][sel].abs().min()) + 2e-9


@FAST
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 16)), elements=finite))
def test_exact_error_never_above_twn_or_asym(w: np.ndarray) -> None:
    g = torch.from_numpy(w)
    errs = {m: qmath.ternary_error(g, *qmath.ternarize_groups(g, m)) for m in qmath.THRESHOLD_MODES}
    assert torch.all(errs["exact"] <= errs["twn"] + 1e-9)
    assert torch.all(errs["exact"] <= errs["asym"] + 1e-9)


def test_asym_uses_separate_thresholds() -> None:
    # positives are large, negatives small: one symmetric TWN threshold drops all negatives, asym keeps the largest
    g = torch.tensor([[4.0, 3.0, 5.0, -0.5, -1.0, -0.1]], dtype=torch.float64)
    t_twn, _ = qmath.ternarize_groups(g, "twn")
    t_asym, alpha = qmath.ternarize_groups(g, "asym")
    assert (t_twn[0, 3:] == 0).all()
    # negative threshold = 0.7 * mean(0.5, 1.0, 0.1) = 0.373: -0.5 and -1.0 selected, -0.1 not
    assert t_asym[0].tolist() == [1, 1, 1, -1, -1, 0]
    assert float(alpha[0]) == pytest.approx((4 + 3 + 5 + 0.5 + 1.0) / 5)
    with pytest.raises(ValueError, match="unknown threshold mode"):
        qmath.ternarize_groups(g, "bogus")  # type: ignore[arg-type]


@FAST
@given(st.integers(1, 4), st.integers(0, 37), st.integers(0, 2 ** 31 - 1))
def test_pack_unpack_2bit(rows: int, length: int, seed: int) -> None:
    t = np.random.default_rng(seed).integers(-1, 2, size=(rows, length)).astype(np.int8)
    packed = qmath.pack_2bit(t)
    assert packed.dtype == np.uint8 and packed.shape == (rows, -(-length // 4))
    np.testing.assert_array_equal(qmath.unpack_2bit(packed, length), t)
    if length:  # documented bit layout: element j in bits 2*(j % 4) of byte j // 4
        j = length - 1
        assert (int(packed[0, j // 4]) >> (2 * (j % 4))) & 3 == int(t[0, j]) & 3


def test_pack_2bit_rejects_non_ternary() -> None:
    with pytest.raises(ValueError, match="ternary"):
        qmath.pack_2bit(np.array([0, 2]))


@FAST
@given(st.integers(1, 3), st.integers(0, 21), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_pack_unpack_4bit(rows: int, length: int, signed: bool, seed: int) -> None:
    lo, hi = (-8, 7) if signed else (0, 15)
    q = np.random.default_rng(seed).integers(lo, hi + 1, size=(rows, length))
    packed = qmath.pack_4bit(q)
    assert packed.shape == (rows, -(-length // 2))
    np.testing.assert_array_equal(qmath.unpack_4bit(packed, length, signed), q)


SHAPES = [
    ("linear", (5, 10)),
    ("conv", (6, 8, 3, 3)),
    ("conv-ragged", (4, 7, 3, 2)),
    ("depthwise", (8, 1, 3, 3)),
    ("grouped", (8, 2, 3, 3)),
    ("pointwise", (3, 9, 1, 1)),
]


@pytest.mark.parametrize("n", [1, 3, 4, 64])
@pytest.mark.parametrize("kind,shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_grouping_round_trip(kind: str, shape: tuple[int, ...], n: int) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lay = qmath.group_layout(shape, n)
    g = qmath.to_grouped(w, lay)
    assert g.shape == (shape[0], lay.groups_per_row, lay.group_size)
    torch.testing.assert_close(qmath.from_grouped(g, lay), w, rtol=0, atol=0)
    mask = qmath.group_mask(lay)
    assert int(mask.sum()) * shape[0] == w.numel()
    assert torch.all(g[:, ~mask] == 0)  # padding is zero
    if kind == "depthwise":
        assert lay.along == "taps" and lay.seg_len == 9
        # one group = the first min(n, 9) taps of a filter
        torch.testing.assert_close(g[2, 0, : lay.group_size], w[2, 0].reshape(-1)[: lay.group_size])
    elif len(shape) == 4:
        # a group = consecutive input channels at one kernel position (r, s)
        cg = shape[1]
        k_r, k_s = shape[2] - 1, shape[3] - 1
        gi = (k_r * shape[3] + k_s) * lay.groups_per_segment
        m = min(lay.group_size, cg)
        torch.testing.assert_close(g[1, gi, :m], w[1, :m, k_r, k_s])


def test_group_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        qmath.group_layout((4, 4), 0)
    with pytest.raises(ValueError, match="expected a linear"):
        qmath.group_layout((4, 4, 4), 2)


def test_ternarize_weight_ragged_and_zero_groups() -> None:
    w = torch.randn(3, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    w[1] = 0.0  # an all-zero output channel: alpha 0, codes 0, scale 0
    w[2, 4:, 0, 0] = 0.0  # an all-zero ragged group (channels 4, 5 with N=4)
    tw = qmath.ternarize_weight(w, 4)
    assert tw.t.shape == (3, 9 * 2, 4)
    assert torch.all(tw.t[1] == 0) and torch.all(tw.alpha_q[1] == 0) and float(tw.w_scale[1]) == 0
    assert int(tw.alpha_q[2, 1]) == 0 and torch.all(tw.t[2, 1] == 0)
    assert torch.all(tw.t[:, 1::2, 2:] == 0)  # padding of the ragged groups is never selected
    deq = tw.dequantized()
    assert deq.shape == w.shape and torch.all(deq[1] == 0)
    # the 2-bit codes round-trip through packing
    k = w.shape[0]
    np.testing.assert_array_equal(qmath.unpack_2bit(tw.packed_codes(), tw.layout.row_len), tw.t.reshape(k, -1).numpy())
    with pytest.raises(ValueError, match="NaN/Inf"):
        qmath.ternarize_weight(torch.tensor([[1.0, float("nan")]]), 2)


def test_zero_groups_in_ternarize_groups() -> None:
    t, alpha = qmath.ternarize_groups(torch.zeros(3, 4, dtype=torch.float64), "exact")
    assert torch.all(t == 0) and torch.all(alpha == 0)
    for mode in ("twn", "asym"):
        t, alpha = qmath.ternarize_groups(torch.zeros(2, 5), mode)  # type: ignore[arg-type]
        assert torch.all(t == 0) and torch.all(alpha == 0)


@FAST
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 9)),
                  elements=st.one_of(st.just(0.0), st.floats(1e-6, 10.0))), st.sampled_from([2, 4, 8]))
def test_quantize_alpha(alpha: np.ndarray, bits: int) -> None:
    a = torch.from_numpy(alpha)
    q, scale = qmath.quantize_alpha(a, bits)
    qmax = 2 ** bits - 1
    assert q.dtype == torch.int64 and int(q.min()) >= 0 and int(q.max()) <= qmax
    assert scale.dtype == torch.float32
    for k in range(a.shape[0]):
        if float(a[k].max()) == 0:
            assert torch.all(q[k] == 0)
            continue
        assert int(q[k].max()) == qmax  # the largest alpha of a row gets the top code
        # nearest code: reconstruction error at most half a step
        err = (q[k].double() * float(scale[k]) - a[k]).abs().max()
        assert float(err) <= 0.5 * float(scale[k]) * (1 + 1e-6) + 1e-12


def test_quantize_alpha_bits_checked() -> None:
    with pytest.raises(ValueError, match="alpha_bits"):
        qmath.quantize_alpha(torch.ones(1, 2), 1)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_act_range_rejects_bits(bits: int) -> None:
    for signed in (False, True):
        with pytest.raises(ValueError, match="activation bits must be in 2..8"):
            qmath.act_range(bits, signed)


def test_act_range_values() -> None:
    assert qmath.act_range(8, False) == (0, 255)
    assert qmath.act_range(8, True) == (-127, 127)
    assert qmath.act_range(4, False) == (0, 15)
    assert qmath.act_range(4, True) == (-7, 7)
    assert qmath.act_range(2, True) == (-1, 1)


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-300, 300, width=32)),
       st.floats(0.01, 4.0), st.sampled_from([2, 4, 8]), st.booleans())
def test_quantize_act_matches_numpy(x: np.ndarray, scale: float, bits: int, signed: bool) -> None:
    q_t = qmath.quantize_act(torch.from_numpy(x), scale, bits, signed)
    q_n = qmath.quantize_act_np(x, scale, bits, signed)
    np.testing.assert_array_equal(q_t.numpy().astype(np.int32), q_n)
    lo, hi = qmath.act_range(bits, signed)
    assert q_n.min() >= lo and q_n.max() <= hi


def test_quantize_act_ties_round_half_to_even() -> None:
    x = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5], np.float32)
    expected_signed = [0, 2, 2, 4, 0, -2, -2]
    np.testing.assert_array_equal(qmath.quantize_act_np(x, 1.0, 8, True), expected_signed)
    np.testing.assert_array_equal(qmath.quantize_act(torch.from_numpy(x), 1.0, 8, True).numpy(), expected_signed)
    np.testing.assert_array_equal(qmath.quantize_act_np(x, 1.0, 8, False), [0, 2, 2, 4, 0, 0, 0])


def test_epilogue_matches_numpy_and_integer_references() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, size=(2, 4, 6, 6))
    w = rng.integers(-255, 256, size=(6, 2, 3, 3))
    acc = qmath.conv2d_int_np(q, w, (1, 1), (1, 1), (1, 1), groups=2)
    ref = torch.nn.functional.conv2d(torch.from_numpy(q).double(), torch.from_numpy(w).double(), padding=1, groups=2)
    np.testing.assert_array_equal(acc, ref.numpy().astype(np.int64))
    scale = rng.random(6).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    y_np = qmath.epilogue_np(acc, scale, bias, True, 1)
    y_t = qmath.epilogue(torch.from_numpy(acc), torch.from_numpy(scale), torch.from_numpy(bias), True, 1)
    np.testing.assert_array_equal(y_t.numpy(), y_np)
    assert (y_np >= 0).all()
