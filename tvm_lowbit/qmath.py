"""The quantized math, written once: grouped ternarization, alpha codes, 2-bit packing,
activation quantization and the integer layer with its float epilogue.

Everything that quantizes, packs, simulates or checks calls into this module: the FGQ quantizer,
the fake-quant PyTorch layers, the Relax rewrite (which packs weights), the NumPy reference the
compiled kernels are tested against, and the tests.

Conventions (the compiler relies on them, bit for bit):

* Groups.  A weight ``W[K, Cg, R, S]`` (Cg = input channels per conv group) is cut, for every
  (k, r, s), into consecutive chunks of ``N`` input channels; the last chunk of a row may be ragged
  (it is zero-padded, and zeros are never selected).  Depthwise filters (Cg == 1) are grouped along
  their R*S taps instead (papers.md 1.7, option 1).  A linear weight ``W[K, C]`` is grouped along C.
  The *grouped layout* of a weight is ``[K, L]`` with ``L = (#groups per row) * N``, groups
  contiguous: for a conv ``L`` runs over (r, s, channel-in-padded-group), channels innermost.
* Ternary codes ``t`` in {-1, 0, +1}; per group a float ``alpha``.  ``alpha`` is then coded as an
  unsigned integer ``alpha_q`` (``alpha_bits``, default 8) against a per-output-channel float
  ``w_scale``: ``alpha ~= alpha_q * w_scale[k]``.  The integer weight is ``w_int = alpha_q * t``
  and the weight the model uses is ``w_scale[k] * w_int``.
* Packing: four 2-bit two's-complement codes per byte (0 -> 0b00, +1 -> 0b01, -1 -> 0b11), element
  ``j`` of a row in bits ``2*(j % 4)`` of byte ``j // 4``; an all-zero byte is four zero weights.
* Activations: ``q = clip(round_half_even(x / scale), lo, hi)`` computed in float32, with
  ``[lo, hi] = [0, 2^b - 1]`` (unsigned) or ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (signed).
* A quantized layer: ``acc = sum(w_int * q)`` exactly in int32; then the epilogue
  ``y = float32(float64(float32(acc)) * float64(out_scale[k]) + float64(out_bias[k]))``, optional
  ReLU.  The product of two float32 values is exact in float64, so the epilogue gives the same bits
  whether or not a compiler contracts it into a fused multiply-add.  ``out_scale`` folds the input
  scale, ``w_scale`` and batch norm; ``out_bias`` folds the bias and batch norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

ThresholdMode = Literal["exact", "twn", "asym"]
THRESHOLD_MODES: tuple[str, ...] = ("exact", "twn", "asym")


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupLayout:
    """How a weight tensor maps onto rows of groups of ``group_size`` elements."""

    shape: tuple[int, ...]        # original weight shape: (K, C) or (K, Cg, R, S)
    group_size: int
    along: Literal["in", "taps"]  # group along input channels, or along R*S taps (depthwise)

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def seg_len(self) -> int:
        """Length of one segment cut into groups: Cg (or C), or R*S for depthwise filters."""
        if len(self.shape) == 2:
            return self.shape[1]
        _, cg, r, s = self.shape
        return r * s if self.along == "taps" else cg

    @property
    def segments(self) -> int:
        """Segments per output channel: R*S for a conv grouped along channels, else 1."""
        if len(self.shape) == 4 and self.along == "in":
            return self.shape[2] * self.shape[3]
        return 1

    @property
    def groups_per_segment(self) -> int:
        return -(-self.seg_len // self.group_size)

    @property
    def groups_per_row(self) -> int:
        return self.segments * self.groups_per_segment

    @property
    def row_len(self) -> int:
        """L: padded elements per output channel in the grouped layout."""
        return self.groups_per_row * self.group_size


def group_layout(shape: tuple[int, ...], group_size: int) -> GroupLayout:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(shape) == 2:
        lay = GroupLayout(tuple(shape), group_size, "in")
    elif len(shape) == 4:
        lay = GroupLayout(tuple(shape), group_size, "taps" if shape[1] == 1 else "in")
    else:
        raise ValueError(f"expected a linear [K, C] or conv [K, Cg, R, S] weight, got shape {tuple(shape)}")
    # a group never needs to be longer than the segment it is cut from (same groups, no padding)
    return GroupLayout(lay.shape, min(group_size, lay.seg_len), lay.along)


def to_grouped(w: torch.Tensor, lay: GroupLayout) -> torch.Tensor:
    """[K, ...] weight -> [K, groups_per_row, N] with zero padding of ragged groups."""
    k = lay.out_channels
    if w.dim() == 2:
        seg = w.reshape(k, 1, lay.seg_len)
    elif lay.along == "taps":
        seg = w.reshape(k, 1, lay.seg_len)
    else:
        seg = w.permute(0, 2, 3, 1).reshape(k, lay.segments, lay.seg_len)
    pad = lay.groups_per_segment * lay.group_size - lay.seg_len
    if pad:
        seg = torch.nn.functional.pad(seg, (0, pad))
    return seg.reshape(k, lay.groups_per_row, lay.group_size)


def from_grouped(g: torch.Tensor, lay: GroupLayout) -> torch.Tensor:
    """Inverse of :func:`to_grouped` (drops the padding)."""
    k = lay.out_channels
    seg = g.reshape(k, lay.segments, lay.groups_per_segment * lay.group_size)[..., : lay.seg_len]
    if len(lay.shape) == 2 or lay.along == "taps":
        return seg.reshape(lay.shape)
    _, cg, r, s = lay.shape
    return seg.reshape(k, r, s, cg).permute(0, 3, 1, 2).contiguous()


def group_mask(lay: GroupLayout) -> torch.Tensor:
    """Bool [groups_per_row, N]: True where an element is real, False where it is padding."""
    idx = torch.arange(lay.groups_per_segment * lay.group_size) < lay.seg_len
    return idx.reshape(1, lay.groups_per_segment, lay.group_size).expand(
        lay.segments, -1, -1).reshape(lay.groups_per_row, lay.group_size)


# --------------------------------------------------------------------------------------------
# Ternarization of groups
# --------------------------------------------------------------------------------------------

def ternarize_groups(g: torch.Tensor, mode: ThresholdMode = "exact",
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize each group (last axis) of ``g``: returns (t in {-1,0,1} as int8, alpha >= 0).

    ``exact``: the L2-optimal solution of min ||w - alpha t||^2 (sort |w|, prefix sums, pick the k
    maximising S_k^2 / k, keep the k largest magnitudes; ties broken by position).  ``twn``: the
    TWN rule delta = 0.7 * mean|w|.  ``asym``: separate positive and negative thresholds
    (0.7 * mean of the positive / of the negative magnitudes) with one shared alpha.
    ``mask`` marks real elements (padding is excluded from the TWN means; it is zero and never
    selected by ``exact``).
    """
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}: use one of {', '.join(THRESHOLD_MODES)}")
    g = g.to(torch.float64)
    a = g.abs()
    if mode == "exact":
        order = torch.argsort(-a, dim=-1, stable=True)
        a_sorted = torch.gather(a, -1, order)
        prefix = torch.cumsum(a_sorted, dim=-1)
        k = torch.arange(1, g.shape[-1] + 1, dtype=torch.float64)
        best = torch.argmax(prefix * prefix / k, dim=-1, keepdim=True)  # first maximum
        alpha = torch.gather(prefix, -1, best).squeeze(-1) / (best.squeeze(-1) + 1).to(torch.float64)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(g.shape[-1]).expand_as(order))
        selected = rank <= best
    else:
        real = torch.ones_like(a, dtype=torch.bool) if mask is None else mask.expand_as(a)
        realf = real.to(torch.float64)
        if mode == "twn":
            delta = 0.7 * (a * realf).sum(-1, keepdim=True) / realf.sum(-1, keepdim=True).clamp(min=1)
            selected = (a > delta) & real
        else:
            pos, neg = (g > 0) & real, (g < 0) & real
            dp = 0.7 * (a * pos).sum(-1, keepdim=True) / pos.sum(-1, keepdim=True).clamp(min=1)
            dn = 0.7 * (a * neg).sum(-1, keepdim=True) / neg.sum(-1, keepdim=True).clamp(min=1)
            selected = (pos & (a > dp)) | (neg & (a > dn))
        cnt = selected.sum(-1)
        alpha = (a * selected).sum(-1) / cnt.clamp(min=1)
    t = (torch.sign(g) * selected).to(torch.int8)
    alpha = torch.where((t != 0).any(-1), alpha, torch.zeros_like(alpha))
    return t, alpha


def ternary_error(g: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Squared L2 error per group of the approximation alpha * t."""
    return ((g.to(torch.float64) - alpha[..., None] * t.to(torch.float64)) ** 2).sum(-1)


def quantize_alpha(alpha: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha [K, G] float -> (alpha_q [K, G] int64 in [0, 2^bits - 1], w_scale [K] float32).

    ``w_scale[k] = max_g alpha[k, g] / (2^bits - 1)`` stored in float32; ``alpha_q`` is the nearest
    integer code against that stored scale.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"alpha_bits must be in 2..16, got {bits}")
    qmax = 2 ** bits - 1
    w_scale = (alpha.max(dim=-1).values / qmax).to(torch.float32)
    safe = torch.where(w_scale > 0, w_scale, torch.ones_like(w_scale)).to(torch.float64)
    alpha_q = torch.round(alpha / safe[:, None]).clamp(0, qmax).to(torch.int64)
    return alpha_q, w_scale


def dequantize(w_int: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """float32(w_scale[k] * w_int), the product taken in float64 and rounded once, with
    ``w_scale`` per output channel (dim 0)."""
    w = w_int.to(torch.float64) * w_scale.to(torch.float64).reshape(-1, *[1] * (w_int.dim() - 1))
    return w.to(torch.float32)


@dataclass
class TernaryWeight:
    """A weight in FGQ form.  ``w_int`` has the original weight shape; ``t``/``alpha_q`` are grouped."""

    layout: GroupLayout
    t: torch.Tensor         # int8 [K, G, N]
    alpha_q: torch.Tensor   # int64 [K, G]
    w_scale: torch.Tensor   # float32 [K]

    format = "ternary"

    @property
    def group_size(self) -> int:
        return self.layout.group_size

    @property
    def w_int(self) -> torch.Tensor:
        """alpha_q * t in the original weight shape (int32)."""
        g = self.alpha_q[..., None].to(torch.int32) * self.t.to(torch.int32)
        return from_grouped(g, self.layout)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the quantized model uses: w_scale[k] * w_int."""
        return dequantize(self.w_int, self.w_scale)

    def packed_codes(self) -> np.ndarray:
        """uint8 [K, ceil(L / 4)]: the 2-bit codes of the grouped layout, four per byte."""
        k = self.layout.out_channels
        return pack_2bit(self.t.reshape(k, -1).numpy())

    def storage_bytes(self, alpha_bits: int = 8) -> int:
        """Bytes of codes, alpha codes and per-channel scales (what the compiled layer stores)."""
        k, groups = self.alpha_q.shape
        return k * (-(-self.layout.row_len // 4)) + k * (-(-groups * alpha_bits // 8)) + 4 * k


def ternarize_weight(w: torch.Tensor, group_size: int, mode: ThresholdMode = "exact",
                     alpha_bits: int = 8) -> TernaryWeight:
    """FGQ-ternarize a linear or conv weight with groups of ``group_size`` (see module docstring)."""
    w = w.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"weight of shape {tuple(w.shape)} has {bad} NaN/Inf values")
    lay = group_layout(tuple(w.shape), group_size)
    g = to_grouped(w, lay)
    t, alpha = ternarize_groups(g, mode, group_mask(lay))
    alpha_q, w_scale = quantize_alpha(alpha, alpha_bits)
    return TernaryWeight(lay, t, alpha_q, w_scale)


def ternarize_per_layer(w: torch.Tensor) -> torch.Tensor:
    """TWN baseline: one threshold (0.7 mean|w|) and one alpha for the whole tensor; float weight."""
    w64 = w.detach().to(torch.float64)
    t, alpha = ternarize_groups(w64.reshape(1, -1), "twn")
    return (alpha[:, None] * t.to(torch.float64)).reshape(w.shape).to(w.dtype)


# --------------------------------------------------------------------------------------------
# 2-bit packing
# --------------------------------------------------------------------------------------------

def _codes(a: np.ndarray, lo: int, hi: int, what: str) -> np.ndarray:
    """``a`` as int64 codes after checking that every value is a finite integer in ``lo..hi``."""
    a = np.asarray(a)
    if a.ndim == 0:
        raise ValueError(f"{what} takes an array [..., L], got a scalar")
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{what} takes integer codes, got dtype {a.dtype}")
    if a.size and np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            first = a[bad].flat[0]
            raise ValueError(f"{what} takes integer codes in {lo}..{hi}, got {first!r} "
                             f"({int(bad.sum())} value(s) not a finite integer)")
    if a.size and (a.min() < lo or a.max() > hi):
        first = a[(a < lo) | (a > hi)].flat[0]
        raise ValueError(f"{what} takes integer codes in {lo}..{hi}, got {first!r}")
    return a.astype(np.int64)


def _packed(packed: np.ndarray, length: int, per_byte: int, what: str) -> np.ndarray:
    """``packed`` as uint8 after checking it holds bytes and at least ``length`` codes per row."""
    p = _codes(packed, 0, 255, what).astype(np.uint8)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"{what}: length must be a non-negative integer, got {length!r}")
    if length > per_byte * p.shape[-1]:
        raise ValueError(f"{what}: length {length} is beyond the data ({p.shape[-1]} byte(s) per row hold "
                         f"{per_byte * p.shape[-1]} codes)")
    return p


def pack_2bit(t: np.ndarray) -> np.ndarray:
    """int [..., L] with values in {-1, 0, 1} -> uint8 [..., ceil(L / 4)] (four codes per byte).
    Anything else (0.5, NaN, 2) is a ``ValueError``: a code is never rounded or dropped silently."""
    codes = (_codes(t, -1, 1, "pack_2bit (ternary codes)") & 3).astype(np.uint8)
    length = codes.shape[-1]
    pad = (-length) % 4
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint8)], axis=-1)
    codes = codes.reshape(codes.shape[:-1] + ((length + pad) // 4, 4))
    return (codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)).astype(np.uint8)


def unpack_2bit(packed: np.ndarray, length: int) -> np.ndarray:
    """uint8 [..., B] -> int8 [..., length]: inverse of :func:`pack_2bit` (``length <= 4 * B``)."""
    p = _packed(packed, length, 4, "unpack_2bit")
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8)  # move code j to the top two bits
    top = (p[..., None] << shifts).astype(np.int8)
    vals = (top >> 6).astype(np.int8)  # arithmetic shift sign-extends the 2-bit code
    return vals.reshape(p.shape[:-1] + (4 * p.shape[-1],))[..., :length]


def pack_4bit(q: np.ndarray) -> np.ndarray:
    """4-bit values (signed -8..7 or unsigned 0..15) [..., L] -> uint8 [..., ceil(L/2)], low nibble first."""
    nib = (_codes(q, -8, 15, "pack_4bit") & 15).astype(np.uint8)
    if nib.shape[-1] % 2:
        nib = np.concatenate([nib, np.zeros(nib.shape[:-1] + (1,), np.uint8)], axis=-1)
    nib = nib.reshape(nib.shape[:-1] + (nib.shape[-1] // 2, 2))
    return (nib[..., 0] | (nib[..., 1] << 4)).astype(np.uint8)


def unpack_4bit(packed: np.ndarray, length: int, signed: bool) -> np.ndarray:
    """uint8 [..., B] -> [..., length] (int8 -8..7 when ``signed``, else uint8 0..15): inverse of :func:`pack_4bit`."""
    p = _packed(packed, length, 2, "unpack_4bit")
    nib = np.stack([p & 15, p >> 4], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))[..., :length]
    nib = nib.astype(np.int16)
    if signed:
        nib = np.where(nib >= 8, nib - 16, nib)
    return nib.astype(np.int8 if signed else np.uint8)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------

def act_range(bits: int, signed: bool) -> tuple[int, int]:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8 (an integer), got {bits!r}")
    bits = int(bits)
    if signed:
        hi = 2 ** (bits - 1) - 1
        return -hi, hi
    return 0, 2 ** bits - 1


def act_dtype(bits: int, signed: bool) -> str:
    """Storage dtype of activation codes: int8 when signed, uint8 otherwise."""
    act_range(bits, signed)
    return "int8" if signed else "uint8"


def quantize_act(x: torch.Tensor, scale: float, bits: int, signed: bool) -> torch.Tensor:
    """Fake-quant codes (float32 tensor holding integers): clip(round(x / scale), lo, hi)."""
    lo, hi = act_range(bits, signed)
    s = float(np.float32(scale))  # a float32 value; division by it happens in float32
    y = x.to(torch.float32) / s
    if y.requires_grad or torch.compiler.is_compiling():  # export sees the functional chain the lowering matches
        return torch.clamp(torch.round(y), lo, hi)
    return y.round_().clamp_(lo, hi)  # the same values, two fewer full-size temporaries


def quantize_act_np(x: np.ndarray, scale: float, bits: int, signed: bool) -> np.ndarray:
    """NumPy twin of :func:`quantize_act` returning int32 codes. ``scale`` must be a finite float32 > 0 and
    ``x`` free of NaN (``ValueError`` otherwise: a NaN has no code); +-Inf clip to the end codes."""
    lo, hi = act_range(bits, signed)
    s = np.float32(scale) if np.isfinite(scale) else np.float32(np.nan)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"quantize_act_np: scale must be a finite positive float32, got {scale!r}")
    xf = np.asarray(x, np.float32)
    if np.isnan(xf).any():
        raise ValueError(f"quantize_act_np: the input {tuple(xf.shape)} holds {int(np.isnan(xf).sum())} NaN value(s)")
    with np.errstate(over="ignore"):  # x / tiny scale overflowing to +-Inf clips to the end code
        return np.clip(np.round(xf / s), lo, hi).astype(np.int32)


def scale_for_range(clip_value: float, bits: int, signed: bool) -> float:
    """Activation scale (float32-representable) that maps ``clip_value`` to the largest code."""
    _, hi = act_range(bits, signed)
    return float(np.float32(max(clip_value, 1e-8) / hi))


def token_scales(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token (last-dimension row) dynamic activation scales, float32 ``[..., 1]``: the row's largest
    magnitude over the largest signed code (a row of zeros gets scale 1)."""
    _, hi = act_range(bits, True)
    peak = x.detach().to(torch.float32).abs().amax(dim=-1, keepdim=True)
    return torch.where(peak > 0, peak / hi, torch.ones_like(peak))


def epilogue_rows(acc: torch.Tensor, row_scale: torch.Tensor, out_scale: torch.Tensor, out_bias: torch.Tensor,
                  channel_dim: int) -> torch.Tensor:
    """float32(float64(float32(acc)) * row_scale * out_scale + out_bias): the epilogue of a layer with
    per-token dynamic input scales ``row_scale`` ([..., 1], float32)."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    y = acc.to(torch.float32).to(torch.float64) * row_scale.to(torch.float64)
    y = y * out_scale.to(torch.float64).reshape(shape)
    return (y + out_bias.to(torch.float64).reshape(shape)).to(torch.float32)


# --------------------------------------------------------------------------------------------
# The layer epilogue and a NumPy reference of whole layers
# --------------------------------------------------------------------------------------------

def epilogue(acc: torch.Tensor, out_scale: torch.Tensor, out_bias: torch.Tensor, relu: bool,
             channel_dim: int) -> torch.Tensor:
    """float32(float64(float32(acc)) * out_scale + out_bias), per channel along ``channel_dim``."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    y = acc.to(torch.float32).to(torch.float64)
    scale, bias = out_scale.to(torch.float64).reshape(shape), out_bias.to(torch.float64).reshape(shape)
    if y.requires_grad:
        y = y * scale + bias
    else:  # the same operations in place: no second full-size float64 temporary (~2-3x faster)
        y = y.mul_(scale).add_(bias)
    y = y.to(torch.float32)
    return torch.relu(y) if relu else y


def epilogue_np(acc: np.ndarray, out_scale: np.ndarray, out_bias: np.ndarray, relu: bool,
                channel_dim: int) -> np.ndarray:
    shape = [1] * acc.ndim
    shape[channel_dim] = -1
    y = acc.astype(np.float32).astype(np.float64) * np.asarray(out_scale, np.float32).astype(np.float64).reshape(shape)
    y = (y + np.asarray(out_bias, np.float32).astype(np.float64).reshape(shape)).astype(np.float32)
    return np.maximum(y, np.float32(0)) if relu else y


def conv2d_int_np(q: np.ndarray, w_int: np.ndarray, stride: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int], groups: int) -> np.ndarray:
    """Exact int64 NCHW convolution of integer codes with integer weights (independent reference)."""
    q = np.asarray(q, np.int64)
    w = np.asarray(w_int, np.int64)
    b, c, h, wd = q.shape
    k, cg, r, s = w.shape
    ph, pw = padding
    qp = np.pad(q, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (h + 2 * ph - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pw - dilation[1] * (s - 1) - 1) // stride[1] + 1
    out = np.zeros((b, k, oh, ow), np.int64)
    kg = k // groups
    for gi in range(groups):
        xs = qp[:, gi * cg:(gi + 1) * cg]
        ws = w[gi * kg:(gi + 1) * kg]
        for ri in range(r):
            for si in range(s):
                h0, w0 = ri * dilation[0], si * dilation[1]
                patch = xs[:, :, h0:h0 + stride[0] * (oh - 1) + 1:stride[0], w0:w0 + stride[1] * (ow - 1) + 1:stride[1]]
                out[:, gi * kg:(gi + 1) * kg] += np.einsum("bchw,kc->bkhw", patch, ws[:, :, ri, si])
    return out


def dense_int_np(q: np.ndarray, w_int: np.ndarray) -> np.ndarray:
    """Exact int64 q[..., C] @ w_int[K, C].T."""
    return np.asarray(q, np.int64) @ np.asarray(w_int, np.int64).T


def decompose_w_int(w_int: np.ndarray, group_size: int, alpha_bits: int = 8) -> TernaryWeight | None:
    """Recover the FGQ form (t, alpha_q) of an integer weight ``alpha_q * t`` with groups of ``group_size``,
    or None if ``w_int`` is not of that form (a group holding two different non-zero magnitudes, a
    non-integer value, or an alpha code wider than ``alpha_bits``).  ``w_scale`` is set to ones."""
    w = torch.from_numpy(np.ascontiguousarray(w_int, dtype=np.float64))
    if not torch.isfinite(w).all() or not torch.equal(w, torch.round(w)):
        return None
    lay = group_layout(tuple(w.shape), group_size)
    g = to_grouped(w, lay)
    alpha_q = g.abs().amax(dim=-1)
    t = torch.sign(g)
    if not torch.equal(t * alpha_q[..., None], g) or (alpha_q.numel() and float(alpha_q.max()) > 2 ** alpha_bits - 1):
        return None
    return TernaryWeight(lay, t.to(torch.int8), alpha_q.to(torch.int64), torch.ones(lay.out_channels))


F32_EXACT_INT = 2 ** 24  # float32 adds integers exactly while every partial sum stays below this


def integer_sum_bound(w_int: np.ndarray | torch.Tensor, act_bits: int, act_signed: bool) -> float:
    """The largest |partial sum| a layer's integer op can reach: max over output channels of
    sum |w_int| times the largest activation code."""
    w = torch.as_tensor(np.asarray(w_int, np.float64) if isinstance(w_int, np.ndarray) else w_int).double()
    _, hi = act_range(act_bits, act_signed)
    return float(w.abs().reshape(w.shape[0], -1).sum(1).max()) * max(hi, 1)


def exact_float_dtype(w_int: np.ndarray | torch.Tensor, act_bits: int, act_signed: bool) -> torch.dtype:
    """float32 when a float32 convolution/matmul of codes and ``w_int`` is exact, else float64."""
    return torch.float32 if integer_sum_bound(w_int, act_bits, act_signed) < F32_EXACT_INT else torch.float64


# --------------------------------------------------------------------------------------------
# Power-of-two weights (INQ, papers.md 4.1)
# --------------------------------------------------------------------------------------------
#
# P_l = {0, +-2^n2, ..., +-2^n1} with s = max|W_l|, n1 = floor(log2(4s/3)), n2 = n1 + 1 - 2^(b-1)/2.
# Integer form: w_scale[k] = 2^n2 (float32, every output channel), w_int = sign * 2^e with
# e = exponent - n2 in 0 .. 2^(b-2) - 1, so w_int is an integer.
# Codes: per weight, 0 = zero, else (e + 1) in the low bits and the sign (1 = negative) in the top
# bit of a ``code_bits``-wide field.  ``code_bits`` is 4 (two codes per byte, low nibble first:
# e in 0..6) when the weight fits, else 8 (one code per byte: e in 0..15).  A 5-bit INQ layer has
# 17 values (0 and 16 non-zero), which cannot fit a 4-bit code; it gets 8-bit codes whenever it
# uses all 8 magnitudes.  Layout of the codes (like the ternary grouped layout, channels innermost):
# a conv weight [K, Cg, R, S] is flattened to [K, R*S*Cg] in (r, s, c) order, a linear [K, C] stays.

POW2_BITS: tuple[int, ...] = (2, 3, 4, 5)
POW2_MAX_EXP = 15  # largest e a code may hold (|w_int| <= 2^15)


def check_pow2_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in POW2_BITS:
        raise ValueError(f"power-of-two weight bits must be an integer in 2..5, got {bits!r} "
                         "(b bits: 1 bit flags zero, b-1 bits index 2^(b-2) exponents per sign)")
    return bits


def pow2_exponents(s: float, bits: int) -> tuple[int, int]:
    """(n1, n2) of INQ's set for a layer with ``s = max|W|`` (> 0): n1 = floor(log2(4s/3)),
    n2 = n1 + 1 - 2^(b-1)/2.  Computed exactly (no float log rounding at powers of two)."""
    check_pow2_bits(bits)
    s = float(s)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"max|W| must be finite and > 0 to place the power-of-two set, got {s}")
    t = 4.0 * s / 3.0
    n1 = int(np.floor(np.log2(t)))
    while 2.0 ** (n1 + 1) <= t:
        n1 += 1
    while 2.0 ** n1 > t:
        n1 -= 1
    return n1, n1 + 1 - 2 ** (bits - 1) // 2


def pow2_levels(n1: int, n2: int) -> np.ndarray:
    """The non-negative part of P_l, sorted: [0, 2^n2, ..., 2^n1] (float64)."""
    return np.concatenate([[0.0], 2.0 ** np.arange(n2, n1 + 1)])


def project_pow2(w: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Nearest element of P_l = {0, +-2^n2..+-2^n1} in the linear domain, as float64.

    The paper's interval rule: with adjacent levels a < b, |w| in [(a+b)/2, 3b/2) maps to b (ties
    map up); below 2^(n2-1) maps to 0.  Above 3*2^n1/2 (only after training moved a weight past the
    pretrained maximum) the nearest value, 2^n1, is taken rather than the paper's 0."""
    if n2 > n1:
        raise ValueError(f"n2={n2} > n1={n1}")
    w = w.detach().to(torch.float64)
    lv = torch.from_numpy(pow2_levels(n1, n2)).to(w.device)
    mids = (lv[:-1] + lv[1:]) / 2  # exact: 2^(n2-1), then 1.5 * 2^i
    idx = torch.searchsorted(mids, w.abs().contiguous(), right=True)  # number of midpoints <= |w|
    return torch.sign(w) * lv[idx]


def pow2_flat(w: torch.Tensor | np.ndarray) -> np.ndarray:
    """[K, Cg, R, S] -> [K, R*S*Cg] in (r, s, c) order; [K, C] unchanged (the code layout)."""
    a = np.asarray(w)
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1).reshape(a.shape[0], -1))
    if a.ndim == 2:
        return np.ascontiguousarray(a)
    raise ValueError(f"expected a linear [K, C] or conv [K, Cg, R, S] weight, got shape {a.shape}")


def pow2_code_bits(w_int: np.ndarray | torch.Tensor) -> int:
    """4 when every exponent fits a nibble code (e <= 6), else 8."""
    a = np.abs(np.asarray(w_int, np.int64))
    return 4 if (a.size == 0 or a.max() <= 2 ** 6) else 8


def pow2_codes(w_int: np.ndarray | torch.Tensor, code_bits: int | None = None) -> np.ndarray:
    """Integer weight sign * 2^e (or 0) -> uint8 codes [K, L] in the code layout (see above)."""
    a = np.asarray(w_int, np.int64)
    code_bits = pow2_code_bits(a) if code_bits is None else code_bits
    if code_bits not in (4, 8):
        raise ValueError(f"code_bits must be 4 or 8, got {code_bits}")
    mag = np.abs(a)
    nz = mag != 0
    if np.any(mag[nz] & (mag[nz] - 1)):
        raise ValueError("pow2_codes takes integers of the form sign * 2^e")
    e = np.zeros_like(mag)
    e[nz] = np.round(np.log2(mag[nz])).astype(np.int64)
    emax = 2 ** (code_bits - 1) - 2
    if nz.any() and e[nz].max() > min(emax, POW2_MAX_EXP):
        raise ValueError(f"exponent {int(e[nz].max())} does not fit a {code_bits}-bit code (max {emax})")
    code = np.where(nz, (e + 1) | ((a < 0).astype(np.int64) << (code_bits - 1)), 0)
    return pow2_flat(code).astype(np.uint8)


def pack_pow2(codes: np.ndarray, code_bits: int) -> np.ndarray:
    """uint8 codes [..., L] -> packed uint8 [..., ceil(L * code_bits / 8)] (4-bit: low nibble first)."""
    if code_bits == 4:
        return pack_4bit(_codes(codes, 0, 15, "pack_pow2(code_bits=4)"))
    if code_bits == 8:
        return np.ascontiguousarray(_codes(codes, 0, 255, "pack_pow2(code_bits=8)"), np.uint8)
    raise ValueError(f"code_bits must be 4 or 8, got {code_bits}")


def unpack_pow2(packed: np.ndarray, length: int, code_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_pow2`: uint8 codes [..., length]."""
    if code_bits == 4:
        return unpack_4bit(packed, length, signed=False)
    if code_bits == 8:
        return _packed(packed, length, 1, "unpack_pow2")[..., :length]
    raise ValueError(f"code_bits must be 4 or 8, got {code_bits}")


def pow2_values(codes: np.ndarray, code_bits: int) -> np.ndarray:
    """Codes -> integer weights sign * 2^e (int64), in the code layout (reference decoder)."""
    c = np.asarray(codes, np.int64)
    idx = c & (2 ** (code_bits - 1) - 1)
    neg = (c >> (code_bits - 1)) & 1
    mag = np.where(idx > 0, np.left_shift(1, np.maximum(idx - 1, 0)), 0)
    return np.where(neg == 1, -mag, mag)


@dataclass
class Pow2Weight:
    """A weight in power-of-two (INQ) form: ``w_scale[k] * w_int`` with ``w_int = sign * 2^e``."""

    w_int: torch.Tensor     # int32, the weight's shape
    w_scale: torch.Tensor   # float32 [K] (2^n2 for INQ)
    bits: int = 5           # the INQ bit width it was made with (informational)

    format = "pow2"
    group_size = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w_int.shape)

    @property
    def code_bits(self) -> int:
        return pow2_code_bits(self.w_int.numpy())

    def codes(self) -> np.ndarray:
        """uint8 [K, L] unpacked codes in the code layout."""
        return pow2_codes(self.w_int.numpy(), self.code_bits)

    def packed_codes(self) -> np.ndarray:
        """uint8 [K, ceil(L * code_bits / 8)]."""
        return pack_pow2(self.codes(), self.code_bits)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the quantized model uses: w_scale[k] * w_int."""
        return dequantize(self.w_int, self.w_scale)

    def storage_bytes(self) -> int:
        return int(self.packed_codes().size) + 4 * int(self.w_int.shape[0])


def pow2_quantize_weight(w: torch.Tensor, bits: int, n1: int | None = None) -> Pow2Weight:
    """Project a whole weight onto its INQ set (n1 from max|w| unless given) -> Pow2Weight."""
    check_pow2_bits(bits)
    w = w.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError(f"weight of shape {tuple(w.shape)} has NaN/Inf values")
    if n1 is None:
        n1, n2 = pow2_exponents(float(w.abs().max()), bits)
    else:
        n2 = n1 + 1 - 2 ** (bits - 1) // 2
    return pow2_from_projected(project_pow2(w, n1, n2), n2, bits)


def pow2_from_projected(wq: torch.Tensor, n2: int, bits: int = 5) -> Pow2Weight:
    """A weight already in P_l (values 0 and +-2^i, i >= n2) -> Pow2Weight with w_scale = 2^n2."""
    w_int = torch.ldexp(wq.to(torch.float64), torch.tensor(-n2, dtype=torch.float64))
    if not torch.equal(w_int, torch.round(w_int)):
        raise ValueError("weight is not in the power-of-two set (a value below 2^n2 or not a power of two)")
    k = wq.shape[0]
    return Pow2Weight(w_int.to(torch.int32), torch.full((k,), 2.0 ** n2, dtype=torch.float32), bits)


def decompose_pow2(w_int: np.ndarray | torch.Tensor) -> Pow2Weight | None:
    """The power-of-two form of an integer weight (every value 0 or +-2^e, e <= POW2_MAX_EXP), or
    None.  ``w_scale`` is set to ones (the compiler keeps the scale in the epilogue)."""
    a = np.asarray(w_int, np.float64)
    if a.ndim not in (2, 4) or not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
        return None
    mag = np.abs(a).astype(np.int64)
    nz = mag != 0
    if np.any(mag[nz] & (mag[nz] - 1)) or (nz.any() and mag.max() > 2 ** POW2_MAX_EXP):
        return None
    return Pow2Weight(torch.from_numpy(a.astype(np.int32)), torch.ones(a.shape[0], dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# k-bit integer weights: int8 per output channel, int4 in groups (the "int4" / "int8" formats)
# --------------------------------------------------------------------------------------------
#
# Codes c are signed, symmetric: |c| <= 2^(b-1) - 1 (7 for int4, 127 for int8), stored in the grouped
# layout above: int8 one byte a code, int4 two codes a byte (low nibble first, two's complement).
# Per output channel (group_size 0): w_int = c, w_scale[k] = max|W[k]| / qmax.
# Grouped (group_size N): every group of N has its own step s_g = max|w_g| / qmax, coded like FGQ's
# alpha as an 8-bit unsigned integer against a per-channel float: s_g ~= scale_q[k, g] * w_scale[k];
# then w_int = scale_q * c, so the integer kernel needs no float inside its sum (|w_int| <= 255 * 7).

INT_BITS: tuple[int, ...] = (4, 8)
INT_SCALE_BITS = 8


def int_qmax(bits: int) -> int:
    if bits not in INT_BITS:
        raise ValueError(f"integer weight bits must be one of {INT_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _int_layout(shape: tuple[int, ...], group_size: int) -> GroupLayout:
    """Per channel: one group per segment (the grouped layout without padding); else groups of N."""
    return group_layout(shape, group_size if group_size > 0 else 1 << 30)


@dataclass
class IntWeight:
    """A weight in k-bit integer form: ``w_scale[k] * scale_q[k, g] * c`` (``scale_q`` None: per channel)."""

    layout: GroupLayout
    codes: torch.Tensor             # int8 [K, G, N], |c| <= qmax
    scale_q: torch.Tensor | None    # int64 [K, G] in 0..255 (grouped), None (per channel)
    w_scale: torch.Tensor           # float32 [K]
    bits: int

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    @property
    def group_size(self) -> int:
        """N of the groups sharing one scale code; 0 for one scale per output channel."""
        return self.layout.group_size if self.scale_q is not None else 0

    @property
    def w_int(self) -> torch.Tensor:
        g = self.codes.to(torch.int32)
        if self.scale_q is not None:
            g = self.scale_q[..., None].to(torch.int32) * g
        return from_grouped(g, self.layout)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the quantized model uses: w_scale[k] * w_int."""
        return dequantize(self.w_int, self.w_scale)

    def packed_codes(self) -> np.ndarray:
        """int8 [K, L] (int8) or uint8 [K, ceil(L / 2)] (int4): the codes of the grouped layout."""
        flat = self.codes.reshape(self.layout.out_channels, -1).numpy()
        return pack_4bit(flat) if self.bits == 4 else np.ascontiguousarray(flat, np.int8)

    def scale_codes(self) -> np.ndarray | None:
        """uint8 [K, G] group scale codes, or None (per channel)."""
        return None if self.scale_q is None else self.scale_q.numpy().astype(np.uint8)

    def storage_bytes(self) -> int:
        """Bytes of codes, group scale codes and per-channel float32 scales."""
        k = self.layout.out_channels
        sc = 0 if self.scale_q is None else k * self.scale_q.shape[1] * INT_SCALE_BITS // 8
        return int(self.packed_codes().size) + sc + 4 * k


def int_quantize_weight(w: torch.Tensor, bits: int, group_size: int = 0) -> IntWeight:
    """Round a linear or conv weight to ``bits``-bit symmetric integers: one scale per output channel
    (``group_size`` 0) or per group of ``group_size`` with 8-bit scale codes (see above)."""
    qmax = int_qmax(bits)
    w = w.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError(f"weight of shape {tuple(w.shape)} has NaN/Inf values")
    lay = _int_layout(tuple(w.shape), group_size)
    g = to_grouped(w, lay)
    if group_size > 0:
        scale_q, w_scale = quantize_alpha(g.abs().amax(-1) / qmax, INT_SCALE_BITS)
        step = scale_q.to(torch.float64) * w_scale.to(torch.float64)[:, None]
    else:
        w_scale = (g.abs().amax(dim=(1, 2)) / qmax).to(torch.float32)
        step = w_scale.to(torch.float64)[:, None].expand(-1, g.shape[1])
        scale_q = None
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.where(step[..., None] > 0, torch.round(g / safe[..., None]), torch.zeros_like(g))
    return IntWeight(lay, codes.clamp(-qmax, qmax).to(torch.int8), scale_q, w_scale, bits)


def int_grid(iw: IntWeight) -> tuple[torch.Tensor, int]:
    """(step per weight element in the weight's shape, float64; qmax): the grid ``step * c`` that
    ``iw``'s weights lie on (for rounding refinements that keep the scales)."""
    k = iw.layout.out_channels
    step = iw.w_scale.to(torch.float64)[:, None].expand(k, iw.layout.groups_per_row)
    if iw.scale_q is not None:
        step = step * iw.scale_q.to(torch.float64)
    el = step[..., None].expand(-1, -1, iw.layout.group_size)
    return from_grouped(el.contiguous(), iw.layout), int_qmax(iw.bits)


def int_from_codes(iw: IntWeight, codes: torch.Tensor) -> IntWeight:
    """``iw`` with new codes (in the weight's shape, |c| <= qmax) and the same scales."""
    qmax = int_qmax(iw.bits)
    c = torch.round(codes.to(torch.float64)).clamp(-qmax, qmax)
    return IntWeight(iw.layout, to_grouped(c, iw.layout).to(torch.int8), iw.scale_q, iw.w_scale, iw.bits)


def decompose_int(w_int: np.ndarray, bits: int, group_size: int) -> IntWeight | None:
    """The ``int{bits}`` form of an integer weight (``w_scale`` set to ones), or None.  Per channel
    (``group_size`` 0): every |value| <= qmax.  Grouped: each group as ``scale_q * c`` with
    scale_q <= 255 and |c| <= qmax; the group's gcd g gives one when any exists (g = scale_q * gcd(c),
    so g / gcd(c) works), found by trying g / d for d = 1..qmax."""
    qmax = int_qmax(bits)
    a = np.asarray(w_int, np.float64)
    if a.ndim not in (2, 4) or not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
        return None
    lay = _int_layout(a.shape, group_size)
    g = to_grouped(torch.from_numpy(a), lay).numpy().astype(np.int64)
    ones = torch.ones(lay.out_channels, dtype=torch.float32)
    if group_size <= 0:
        if np.abs(g).max(initial=0) > qmax:
            return None
        return IntWeight(lay, torch.from_numpy(g).to(torch.int8), None, ones, bits)
    gcd = np.gcd.reduce(np.abs(g), axis=-1)
    peak = np.abs(g).max(-1)
    scale = np.zeros_like(gcd)
    found = gcd == 0
    for d in range(1, qmax + 1):
        s = gcd // d
        ok = ~found & (gcd % d == 0) & (s <= 2 ** INT_SCALE_BITS - 1) & (peak <= qmax * s)
        scale[ok] = s[ok]
        found |= ok
    if not found.all():
        return None
    codes = np.where(scale[..., None] > 0, g // np.maximum(scale, 1)[..., None], 0)
    return IntWeight(lay, torch.from_numpy(codes).to(torch.int8), torch.from_numpy(scale), ones, bits)


def decompose_k_bit(w_int: np.ndarray) -> "IntWeight | TernaryWeight | None":
    """A weight of plain k-bit integers (format ``int``: PACT/DoReFa codes) in the narrowest packed form
    that holds it exactly: int4, then int8 (one scale per output channel), else ternary groups of one,
    each weight with its own 8-bit alpha (values up to +-255); None beyond that."""
    return decompose_int(w_int, 4, 0) or decompose_int(w_int, 8, 0) or decompose_w_int(w_int, 1)


def weight_storage_bytes(tw: object, numel: int) -> int:
    """Bytes a layer's weight takes in the compiled model: codes + scale codes + per-channel float32
    scales for the integer formats, 4 bytes a weight for a float layer (``tw`` None)."""
    if tw is None:
        return 4 * numel
    return int(tw.storage_bytes())  # type: ignore[attr-defined]
