"""Activation calibration: pick each quantized layer's input clipping range on sample data.

Methods: ``minmax`` (largest magnitude seen), ``percentile`` (a high percentile of magnitudes) and
``mse`` (the clip value minimising the mean squared quantization error on the samples; clipping
matters most at 4 bits) and ``mse_out`` (the clip value minimising the mean squared error of the
layer's *output*, computed with the layer's quantized weights on the first ``OUT_IMAGES``
calibration inputs: it weighs each input error by how much the weights amplify it, and measures the
effect of clipping where it matters).  Signedness is read off the data: a layer whose inputs are never negative
(after a ReLU) gets unsigned codes.
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

CalibMethod = Literal["minmax", "percentile", "mse", "mse_out"]
CALIB_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "mse_out")
INPUT_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse")  # methods that need only the input samples
OUT_IMAGES = 64  # calibration inputs kept per layer for ``mse_out``
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
        if kept_inputs < self.keep_inputs:
            self.inputs.append(x[: self.keep_inputs - kept_inputs].clone())
        flat = x.reshape(-1)
        take = min(flat.numel(), max(2048, _MAX_SAMPLES // 8))
        if self.kept < _MAX_SAMPLES:
            idx = torch.randint(0, flat.numel(), (take,), generator=self.gen)
            self.chunks.append(flat[idx].cpu())
            self.kept += take

    def samples(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.zeros(1)


_Observer = Observer  # the old name, still read by tvm_lowbit/onnx_quant.py (owned elsewhere)


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
    # mse: grid search over fractions of the peak, error measured on the samples
    cands = [peak * float(f) for f in _GRID]
    errs = mse_errors(samples.numpy(), cands, bits, signed)
    return cands[int(np.argmin(errs))]  # first minimum


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


def clip_value_output(layer: QuantLayer, inputs: torch.Tensor, lo: float, hi: float, signed: bool) -> float:
    """``mse_out``: the clip of the layer's input minimising the mean squared error of its output
    (quantized weights; reference = the same layer on the unquantized input)."""
    peak = max(abs(lo), abs(hi)) if signed else max(hi, 0.0)
    if peak <= 0:
        return 1.0
    w = layer.dequantized_weight()
    with torch.no_grad():
        ref = layer.float_op(inputs, w, torch.zeros_like(layer.bias))
        errs = []
        for frac in _GRID:
            s = qmath.scale_for_range(peak * float(frac), layer.act_bits, signed)
            xq = qmath.quantize_act(inputs, s, layer.act_bits, signed) * s
            errs.append(float(torch.square(layer.float_op(xq, w, torch.zeros_like(layer.bias)) - ref).mean()))
    return peak * float(_GRID[int(np.argmin(errs))])


def run_batches(model: nn.Module, calib: object, batch_size: int, desc: str, progress: bool) -> int:
    """Run ``model`` over the calibration data (``inputs.iterate_batches``); returns the input count."""
    count = 0
    batches = list(iterate_batches(calib, batch_size))
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            inputs.call(model, b)
            count += inputs.batch_len(b)
    return count


def calibrate_activations(model: nn.Module, layers: dict[str, QuantLayer], calib: object, method: dict[str, tuple[str, float]],
                          batch_size: int = 64, progress: bool = True) -> dict[str, dict[str, float]]:
    """Observe every quantized layer's input over ``calib`` and set its activation scale.

    ``method`` maps layer name -> (calibration method, percentile).  Returns a per-layer report.
    """
    observers = {name: Observer(seed=i, keep_inputs=OUT_IMAGES if method[name][0] == "mse_out" else 0)
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
    for name, layer in layers.items():
        ob = observers[name]
        if ob.lo == float("inf"):
            raise ValueError(f"layer {name!r} was never executed on the calibration data: is it used in forward()?")
        signed = ob.lo < 0
        meth, pct = method[name]
        if meth == "mse_out":
            c = clip_value_output(layer, torch.cat(ob.inputs), ob.lo, ob.hi, signed)
        else:
            c = clip_value(ob.samples(), ob.lo, ob.hi, layer.act_bits, signed, meth, pct)  # type: ignore[arg-type]
        scale = qmath.scale_for_range(c, layer.act_bits, signed)
        layer.set_activation(scale, signed)
        report[name] = {"min": ob.lo, "max": ob.hi, "clip": c, "scale": scale, "signed": float(signed)}
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
