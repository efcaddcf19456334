"""Activation calibration: pick each quantized layer's input clipping range on sample data.

Methods: ``minmax`` (largest magnitude seen), ``percentile`` (a high percentile of magnitudes) and
``mse`` (the clip value minimising the mean squared quantization error on the samples; clipping
matters most at 4 bits) and ``mse_out`` (the clip value minimising the mean squared error of the
layer's *output*, computed with the layer's quantized weights on the first ``OUT_IMAGES``
calibration inputs: it weighs each input error by how much the weights amplify it, and measures the
effect of clipping where it matters), ``entropy`` (TensorRT's: the clip minimising the KL divergence
between the histogram of magnitudes and its quantized version) and ``best`` (per tensor, whichever of
minmax / percentile / mse / entropy gives the layer's output the smallest squared error on kept
inputs).  Signedness is read off the data: a layer whose inputs are never negative (after a ReLU) gets
unsigned codes.

Activation modes (``ACT_MODES``): ``static`` (one calibrated scale per tensor, what the lowering
turns into integer kernels), ``dynamic`` (per-token scales computed at run time from each row's
largest magnitude, Linear layers only: exact in fake-quant, stays float when compiled) and ``auto``
(per Linear layer: dynamic only where the static scale's output error is both above
``STATIC_FAILS`` and ``DYNAMIC_GAIN`` times the dynamic one's).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tvm_lowbit import qmath
from tvm_lowbit.quantizers import inputs
from tvm_lowbit.quantizers.inputs import iterate_batches
from tvm_lowbit.quantizers.layers import QuantLayer

CalibMethod = Literal["minmax", "percentile", "mse", "entropy", "mse_out", "best"]
CALIB_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy", "mse_out", "best")
INPUT_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")  # need only the input samples
OUTPUT_METHODS: tuple[str, ...] = ("mse_out", "best")  # need kept inputs and the layer's weights
ACT_MODES: tuple[str, ...] = ("static", "dynamic", "auto")
OUT_IMAGES = 64  # calibration inputs kept per layer for ``mse_out`` / ``best`` ...
OUT_ELEMENTS = 1 << 21  # ... but at most this many values per layer (at least one input)
STATIC_FAILS = 1e-3  # act_mode auto: static output error (relative MSE) above this ...
DYNAMIC_GAIN = 4.0   # ... and this many times the dynamic one's -> dynamic per-token scales
_GRID = np.linspace(0.02, 1.0, 80)  # candidate clips, as fractions of the largest magnitude seen
_MAX_SAMPLES = 1 << 17  # values kept per layer for percentile/MSE (a random subsample)
# ``calibration="auto"``: measured on ResNet-20 / Fashion-MNIST (2048 calibration images, 10k test)
AUTO_CALIBRATION_8BIT = "mse"
AUTO_CALIBRATION_LOWBIT = "percentile"


def auto_method(act_bits: int) -> str:
    """The calibration method ``auto`` stands for at ``act_bits``: ``mse`` at 8 bits, ``percentile`` below."""
    return AUTO_CALIBRATION_8BIT if act_bits >= 8 else AUTO_CALIBRATION_LOWBIT


class Observer:
    """A forward pre-hook that records a layer input's range and a random subsample of its values."""

    def __init__(self, seed: int, keep_inputs: int = 0) -> None:
        self.keep_inputs = keep_inputs
        self.inputs: list[torch.Tensor] = []
        self.lo = float("inf")
        self.hi = float("-inf")
        self.chunks: list[torch.Tensor] = []
        self.kept = 0
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, _m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float()
        lo, hi = (float(v) for v in torch.aminmax(x))  # NaN propagates into min/max
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("non-finite activations reached a quantized layer during calibration")
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        kept_inputs = sum(t.shape[0] for t in self.inputs)
        per_input = max(x[0].numel(), 1) if x.dim() > 0 and x.shape[0] else 1
        room = min(self.keep_inputs, max(OUT_ELEMENTS // per_input, 1)) - kept_inputs
        if room > 0:
            self.inputs.append(x[:room].clone())
        flat = x.reshape(-1)
        take = min(flat.numel(), max(2048, _MAX_SAMPLES // 8))
        if self.kept < _MAX_SAMPLES:
            idx = torch.randint(0, flat.numel(), (take,), generator=self.gen)
            self.chunks.append(flat[idx].cpu())
            self.kept += take

    def samples(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.zeros(1)




def clip_value(samples: torch.Tensor, lo: float, hi: float, bits: int, signed: bool,
               method: CalibMethod, percentile: float) -> float:
    """The clipping magnitude for one layer's input."""
    peak = max(abs(lo), abs(hi)) if signed else max(hi, 0.0)
    if peak <= 0:
        return 1.0  # an all-zero input: any scale is exact
    mag = samples.abs() if signed else samples.clamp(min=0)
    if method == "minmax":
        return peak
    if method == "percentile":
        return float(np.percentile(mag.numpy(), percentile)) or peak
    if method == "entropy":
        return entropy_clip(mag.numpy(), peak, bits, signed)
    # mse: grid search over fractions of the peak, error measured on the samples
    cands = [peak * float(f) for f in _GRID]
    errs = mse_errors(samples.numpy(), cands, bits, signed)
    return cands[int(np.argmin(errs))]  # first minimum


def entropy_clip(mag: np.ndarray, peak: float, bits: int, signed: bool, bins: int = 2048, step: int = 16) -> float:
    """TensorRT's entropy calibration: the clip whose quantized histogram of magnitudes (``levels``
    bins) is closest in KL divergence to the clipped histogram (outliers folded into the last bin)."""
    _, hi = qmath.act_range(bits, signed)
    levels = hi + 1
    hist, edges = np.histogram(np.asarray(mag, np.float64), bins=bins, range=(0.0, peak))
    hist = hist.astype(np.float64)
    best, best_kl = peak, np.inf
    for i in range(max(levels, step), bins + 1, step):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        if p.sum() == 0:
            continue
        # quantize the i bins into `levels` groups, spread each group's mass over its non-empty bins
        idx = (np.arange(i) * levels) // i
        nz = (hist[:i] > 0).astype(np.float64)
        mass = np.bincount(idx, weights=hist[:i], minlength=levels)
        cnt = np.bincount(idx, weights=nz, minlength=levels)
        q = np.where(nz > 0, mass[idx] / np.maximum(cnt[idx], 1), 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
        m = ps > 0
        kl = float(np.sum(ps[m] * np.log(ps[m] / np.maximum(qs[m], 1e-12))))
        if kl < best_kl:
            best, best_kl = float(edges[i]), kl
    return best


def mse_errors(x: np.ndarray, clips: list[float], bits: int, signed: bool, chunk: int = 16) -> np.ndarray:
    """Mean squared error of quantizing the samples ``x`` with each clip value (vectorised, with the
    exact rounding of ``qmath.quantize_act``)."""
    lo, hi = qmath.act_range(bits, signed)
    x = np.asarray(x, np.float32).reshape(1, -1)
    scales = np.array([qmath.scale_for_range(c, bits, signed) for c in clips], np.float32)[:, None]
    out = []
    for i in range(0, len(clips), chunk):
        s = scales[i:i + chunk]
        q = np.clip(np.round(x / s), lo, hi)
        out.append(np.square(q * s - x, dtype=np.float64).mean(1))
    return np.concatenate(out)


def output_errors(layer: QuantLayer, inputs_: torch.Tensor, clips: list[float], signed: bool,
                  max_elements: int = 1 << 23) -> list[float]:
    """Mean squared error of the layer's output (quantized weights, zero bias) when its input is quantized
    with each clip, against the same layer on the unquantized input.  The op is linear, so the error is
    the op applied to the input's quantization error: no reference output, and the distinct clips go
    through the op together (stacked on the batch dimension, at most ``max_elements`` inputs a call)."""
    w = layer.dequantized_weight()
    zero = torch.zeros_like(layer.bias)
    x = inputs_.float()
    distinct = list(dict.fromkeys(float(c) for c in clips))
    per_call = max(1, max_elements // max(x.numel(), 1))
    err: dict[float, float] = {}
    for i in range(0, len(distinct), per_call):
        group = distinct[i:i + per_call]
        deltas = []
        for c in group:
            s = qmath.scale_for_range(c, layer.act_bits, signed)
            deltas.append(qmath.quantize_act(x, s, layer.act_bits, signed).mul_(s).sub_(x))
        out = layer.float_op(torch.cat(deltas), w, zero).reshape(len(group), -1)
        for c, e in zip(group, torch.square(out).mean(1, dtype=torch.float64).tolist()):
            err[c] = e
    return [err[float(c)] for c in clips]


def _reference_output(layer: QuantLayer, inputs_: torch.Tensor) -> torch.Tensor:
    return layer.float_op(inputs_, layer.dequantized_weight(), torch.zeros_like(layer.bias))


def clip_value_output(layer: QuantLayer, inputs: torch.Tensor, lo: float, hi: float, signed: bool) -> float:
    """``mse_out``: the clip of the layer's input minimising the mean squared error of its output
    (quantized weights; reference = the same layer on the unquantized input)."""
    peak = max(abs(lo), abs(hi)) if signed else max(hi, 0.0)
    if peak <= 0:
        return 1.0
    with torch.no_grad():
        errs = output_errors(layer, inputs, [peak * float(frac) for frac in _GRID], signed)
    return peak * float(_GRID[int(np.argmin(errs))])


def clip_value_best(layer: QuantLayer, inputs: torch.Tensor, samples: torch.Tensor, lo: float, hi: float,
                    signed: bool, percentile: float) -> tuple[float, str]:
    """``best``: (clip, method) of the input-based method whose clip gives the layer's output the
    smallest squared error on ``inputs`` (ties: the first in ``INPUT_METHODS``; methods that give the
    same clip are evaluated once)."""
    peak = max(abs(lo), abs(hi)) if signed else max(hi, 0.0)
    if peak <= 0:
        return 1.0, "minmax"
    clips = {m: clip_value(samples, lo, hi, layer.act_bits, signed, m, percentile) for m in INPUT_METHODS}  # type: ignore[arg-type]
    with torch.no_grad():
        errs = dict(zip(clips, output_errors(layer, inputs, list(clips.values()), signed)))
    m = min(errs, key=lambda k: (errs[k], list(clips).index(k)))
    return clips[m], m


def dynamic_error(layer: QuantLayer, inputs_: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean squared output error of per-token dynamic input scales (Linear layers)."""
    _, qmax = qmath.act_range(layer.act_bits, True)
    s = qmath.token_scales(inputs_, layer.act_bits)
    xq = torch.clamp(torch.round(inputs_.float() / s), -qmax, qmax) * s
    return float(torch.square(layer.float_op(xq, layer.dequantized_weight(), torch.zeros_like(layer.bias)) - ref).mean())


def run_batches(model: nn.Module, calib: object, batch_size: int, desc: str, progress: bool) -> int:
    """Run ``model`` over the calibration data (``inputs.iterate_batches``); returns the input count."""
    count = 0
    batches = list(iterate_batches(calib, batch_size, inputs.positional_inputs(model)))
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            inputs.call(model, b)
            count += inputs.batch_len(b)
    return count


def calibrate_activations(model: nn.Module, layers: dict[str, QuantLayer], calib: object, method: dict[str, tuple[str, float]],
                          batch_size: int = 64, progress: bool = True,
                          act_modes: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Observe every quantized layer's input over ``calib`` and set its activation scale.

    ``method`` maps layer name -> (calibration method, percentile); ``act_modes`` layer name ->
    ``static`` (default) | ``dynamic`` | ``auto`` (``ACT_MODES``; dynamic needs a Linear layer, a
    conv stays static).  Returns a per-layer report (method chosen, clip, scale, mode)."""
    modes = {n: ((act_modes or {}).get(n, "static") if layers[n].kind == "linear" else "static") for n in layers}
    observers = {name: Observer(seed=i, keep_inputs=OUT_IMAGES if method[name][0] in OUTPUT_METHODS
                                or modes[name] == "auto" else 0)
                 for i, name in enumerate(layers)}
    handles = [layers[n].register_forward_pre_hook(observers[n]) for n in layers]
    was_calibrated = {n: m.calibrated for n, m in layers.items()}
    try:
        for m in layers.values():
            m.calibrated = False  # observe float activations of the weight-quantized network
        run_batches(model, calib, batch_size, "calibrating activations", progress)
    finally:
        for h in handles:
            h.remove()
        for n, m in layers.items():
            m.calibrated = was_calibrated[n]
    report = {}
    for name, layer in tqdm(layers.items(), desc="choosing activation scales", disable=not progress, leave=False):
        ob = observers[name]
        if ob.lo == float("inf"):
            raise ValueError(f"layer {name!r} was never executed on the calibration data: is it used in forward()?")
        signed = ob.lo < 0
        meth, pct = method[name]
        if modes[name] == "dynamic":
            layer.set_dynamic()
            report[name] = {"min": ob.lo, "max": ob.hi, "mode": "dynamic"}
            continue
        chosen = meth
        if meth == "mse_out":
            c = clip_value_output(layer, torch.cat(ob.inputs), ob.lo, ob.hi, signed)
        elif meth == "best":
            c, chosen = clip_value_best(layer, torch.cat(ob.inputs), ob.samples(), ob.lo, ob.hi, signed, pct)
        else:
            c = clip_value(ob.samples(), ob.lo, ob.hi, layer.act_bits, signed, meth, pct)  # type: ignore[arg-type]
        mode = "static"
        if modes[name] == "auto":
            kept = torch.cat(ob.inputs)
            with torch.no_grad():
                ref = _reference_output(layer, kept)
                e_static = output_errors(layer, kept, [c], signed)[0]
                e_dyn = dynamic_error(layer, kept, ref)
            rel = e_static / max(float(torch.square(ref).mean()), 1e-30)
            if rel > STATIC_FAILS and e_static > DYNAMIC_GAIN * e_dyn:
                mode = "dynamic"
        if mode == "dynamic":
            layer.set_dynamic()
            report[name] = {"min": ob.lo, "max": ob.hi, "mode": "dynamic"}
            continue
        scale = qmath.scale_for_range(c, layer.act_bits, signed)
        layer.set_activation(scale, signed)
        report[name] = {"min": ob.lo, "max": ob.hi, "clip": c, "scale": scale, "signed": float(signed),
                        "method": chosen, "mode": "static"}
    return report


def reestimate_batchnorm(model: nn.Module, calib: object, batch_size: int = 64, progress: bool = True) -> int:
    """Recompute BN running statistics on ``calib`` with the quantized network (gamma, beta fixed)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    try:
        n = run_batches(model, calib, batch_size, "re-estimating batch norm", progress)
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
    model.eval()
    return n
