"""How a quantized layer maps onto VTA's int8 x int8 -> int32 GEMM, exactly, and its NumPy reference.

Weights.  The integer weight ``w_int`` of a layer (grouped ternary ``alpha_q * t``, power-of-two
``+-2^e``, or k-bit integers) is written per output channel k as ``w_int[k] = w8[k] * 2^sigma[k]``
with the smallest ``sigma[k]`` that makes ``w8`` fit the core's weight lanes: int8 (|w8| <= 127), a
2-bit ternary lane ({-1, 0, 1}) or a 4-bit power-of-two code (0 or +-2^e, e <= 6).  This is exact
whenever it succeeds (a test checks ``w8 << sigma == w_int`` for every layer it accepts); when no
sigma works, e.g. a channel holding both alpha codes 255 and 1 (8-bit alphas need 9-bit weights), the
layer is not VTA-exact and runs on the host CPU instead.  ``2^sigma[k]`` is applied on the host.

Activations.  Signed codes (|q| <= 127) and unsigned codes of up to 7 bits are int8 as they are.
Unsigned 8-bit codes (0..255) are shifted by the zero point 128 into -128..127: the host writes
``q - 128`` into DRAM, pre-padded with -128 (so padding stays code 0), and the constant
``128 * sum(w8[k])`` is added back on the host: ``sum w8 * q = acc' + 128 * sum(w8[k])`` exactly.

Requantization on the ALU.  VTA's STORE writes 8 bits, so the int32 accumulator ``acc'`` is narrowed
on the ALU: ``y = acc' >> s`` (arithmetic shift, i.e. floor), then clipped to int8 (``MIN``, ``MAX``)
in the ``clip`` mode, with ``s`` chosen so the calibration data does not clip; in the ``bound`` mode
``s`` is chosen from the worst case ``max |acc'|`` over every possible input, so no clip is needed
(one ALU op instead of three, at the cost of ~1-3 bits of resolution).  The host reconstructs the
bucket midpoint ``acc_hat = (y * 2^s + 2^(s-1) + zp * sum(w8[k])) * 2^sigma[k]`` (floor then
midpoint has the same error as rounding, without an ALU ADD) and applies the layer's own float
epilogue (``qmath.epilogue``), the residual adds, ReLU and the next layer's activation quantizer,
exactly as the fake-quant model does.  The reference of the VTA part is therefore
``requant(conv2d_int_np(q - zp, w8))``: NumPy integer math, independent of the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm_lowbit import qmath
from tvm_lowbit.vta.lower import ConvSpec, Requant

REQUANT_MODES = ("clip", "bound")
MAX_SHIFT = 31


class NotVTAExact(ValueError):
    pass


def fold_weights(w_int: np.ndarray, weight_path: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """(w8, sigma) with ``w_int[k] == w8[k] * 2^sigma[k]`` and ``w8`` in the weight path's range,
    or :class:`NotVTAExact` saying which channel does not fit."""
    w = np.asarray(w_int, np.float64)
    if not np.isfinite(w).all() or not np.array_equal(w, np.round(w)):
        raise NotVTAExact("the weight is not integer")
    w = w.astype(np.int64)
    k = w.shape[0]
    flat = w.reshape(k, -1)
    sigma = np.zeros(k, np.int64)
    for c in range(k):
        mag = np.abs(flat[c])
        nz = mag[mag > 0]
        if nz.size == 0:
            continue
        tz = int(min((int(v) & -int(v)).bit_length() - 1 for v in np.unique(nz)))  # 2-adic valuation
        for s in range(tz + 1):
            m = nz >> s
            if weight_path == "int8" and m.max() <= 127:
                break
            if weight_path == "pow2" and not np.any(m & (m - 1)) and m.max() <= 64:
                break
            if weight_path == "ternary" and m.max() == 1:
                break
        else:
            what = {"int8": "|w| <= 127", "pow2": "0 or +-2^e with e <= 6", "ternary": "-1, 0 or +1"}[weight_path]
            raise NotVTAExact(f"output channel {c}: weights {sorted(set(nz.tolist()))[:4]}..{int(nz.max())} are not "
                              f"{what} times one power of two")
        sigma[c] = s
    w8 = (w.reshape(k, -1) >> sigma[:, None]).reshape(w.shape)
    assert np.array_equal(w8.reshape(k, -1) << sigma[:, None], flat)
    return w8, sigma


def zero_point(bits: int, signed: bool) -> int:
    """The offset that brings the layer's input codes into int8."""
    lo, hi = qmath.act_range(bits, signed)
    if lo >= -128 and hi <= 127:
        return 0
    if (lo, hi) == (0, 255):
        return 128
    raise NotVTAExact(f"activation codes {lo}..{hi} do not fit int8")


def acc_bounds(w8: np.ndarray, x_lo: int, x_hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the largest and smallest ``sum w8 * x`` over inputs in [x_lo, x_hi]."""
    w = np.asarray(w8, np.int64).reshape(w8.shape[0], -1)
    pos, neg = np.clip(w, 0, None).sum(1), np.clip(w, None, 0).sum(1)
    return pos * x_hi + neg * x_lo, pos * x_lo + neg * x_hi


def shift_for(acc_max: float, acc_min: float) -> int:
    """Smallest s with floor(acc / 2^s) in -128..127 for acc in [acc_min, acc_max]."""
    for s in range(MAX_SHIFT + 1):
        if acc_max <= 128 * 2 ** s - 1 and acc_min >= -128 * 2 ** s:
            return s
    raise NotVTAExact(f"accumulators up to {max(acc_max, -acc_min):.3g} cannot be narrowed to int8")


@dataclass
class VTALayerMath:
    """The integer math of one layer on VTA (everything but the program)."""

    name: str
    kind: str                  # "conv2d" | "dense"
    w_int: np.ndarray          # the model's integer weight
    w8: np.ndarray             # the core's weights
    sigma: np.ndarray          # per output channel: w_int = w8 << sigma
    zp: int                    # input zero point (0 or 128)
    requant: Requant
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def wsum(self) -> np.ndarray:
        return np.asarray(self.w8, np.int64).reshape(self.w8.shape[0], -1).sum(1)

    def spec(self, input_shape: tuple[int, ...]) -> ConvSpec:
        if self.kind == "dense":
            n, k = input_shape
            return ConvSpec(n=1, cin=k, h=1, w=n, cout=self.w8.shape[0])
        n, c, h, w = input_shape
        kh, kw = self.w8.shape[2:]
        return ConvSpec(n, c, h, w, self.w8.shape[0], kh, kw, tuple(self.stride), tuple(self.padding),
                        pre_padded=self.zp != 0 and max(self.padding) > 0)

    def codes_to_vta(self, q: np.ndarray) -> np.ndarray:
        """Model input codes -> the int8 codes VTA reads, in NCHW (dense: 1 x K x 1 x N)."""
        x = np.asarray(q, np.int64) - self.zp
        if self.kind == "dense":
            x = x.T[None, :, None, :]
        return x

    def output_from_vta(self, y: np.ndarray) -> np.ndarray:
        """VTA's NCHW output -> the model layout (dense: (N, M))."""
        return np.ascontiguousarray(y[0, :, 0, :].T) if self.kind == "dense" else y

    @property
    def channel_axis(self) -> int:
        return -1 if self.kind == "dense" else 1

    def reference(self, q: np.ndarray) -> np.ndarray:
        """The int8 output VTA must produce (model layout: NCHW, or (N, M) for dense), by NumPy
        integer math, independent of the simulator and the lowering."""
        x = np.asarray(q, np.int64) - self.zp
        if self.kind == "dense":
            acc = qmath.dense_int_np(x, self.w8)
        else:
            # padding holds input code 0, i.e. -zp after the shift
            ph, pw = self.padding
            xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-self.zp)
            acc = qmath.conv2d_int_np(xp, self.w8, self.stride, (0, 0), (1, 1), 1)
        return self.requant.apply(acc, self.channel_axis)

    def reconstruct(self, y8: np.ndarray) -> np.ndarray:
        """VTA int8 output -> the accumulator the model's epilogue takes (float64, exact integers + halves)."""
        y = np.asarray(y8, np.float64)
        shape = (1, -1) if self.kind == "dense" else (1, -1, 1, 1)
        s = self.requant.lane_shifts(self.w8.shape[0]).astype(np.float64)
        mid = np.where(s > 0, np.exp2(s - 1), 0.0)
        corr = (mid + self.zp * self.wsum.astype(np.float64)).reshape(shape)
        return (y * np.exp2(s).reshape(shape) + corr) * np.exp2(self.sigma.astype(np.float64)).reshape(shape)


def plan_layer(name: str, kind: str, w_int: np.ndarray, act_bits: int, act_signed: bool, mode: str,
               weight_path: str = "int8", acc_range: tuple[float, float] | None = None,
               stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)) -> VTALayerMath:
    """The VTA math of one layer; ``acc_range`` (min, max of acc' on calibration data) sets the
    shift of the ``clip`` mode."""
    if mode not in REQUANT_MODES:
        raise ValueError(f"requant mode {mode!r}: use one of {', '.join(REQUANT_MODES)}")
    w8, sigma = fold_weights(w_int, weight_path)
    zp = zero_point(act_bits, act_signed)
    lo, hi = qmath.act_range(act_bits, act_signed)
    bmax, bmin = acc_bounds(w8, lo - zp, hi - zp)
    bound = [shift_for(float(a), float(b)) for a, b in zip(bmax, bmin)]
    if mode == "bound" or acc_range is None:
        shifts = bound
        clip = None
    else:
        amin, amax = (np.broadcast_to(np.asarray(v, np.float64), bmax.shape) for v in acc_range)
        shifts = [min(bs, shift_for(max(float(a), 0.0), min(float(b), 0.0))) for bs, a, b in zip(bound, amax, amin)]
        # a clip that can never trigger is dropped (saves two ALU ops)
        clip = None if shifts == bound else (-128, 127)
    spread = max(shifts) - min(shifts)
    if spread > 15:  # the per-lane tensor SHR takes 0..15 on top of the common immediate shift
        shifts = [max(s, max(shifts) - 15) for s in shifts]
    rq = Requant(shifts[0] if len(set(shifts)) == 1 else tuple(shifts), clip)
    return VTALayerMath(name, kind, np.asarray(w_int), w8, sigma, zp, rq, tuple(stride), tuple(padding))
