"""SmoothQuant-style migration of activation outliers into the weights, before quantizing.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models": a transformer's activations carry a few channels far larger than the rest, so one static
scale per tensor leaves the other channels a handful of 8-bit levels.  For a Linear ``y = x W^T + b``
and any positive ``s``, ``y = (x / s) (W diag(s))^T + b``: dividing input channel j by ``s_j`` and
multiplying weight column j by ``s_j`` leaves the float function unchanged and moves the range from
the activations (one scale per tensor) into the weights (one scale per output channel or group)::

    s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)

``alpha`` trades activation range against weight range (0.5 in the paper).

SmoothQuant folds ``1 / s`` into the LayerNorm before the Linear.  That is exact only where the
LayerNorm's output feeds nothing but Linears; in a post-LN encoder (BERT, MiniLM) it also feeds the
residual add, and the worst outliers sit in the input of the FFN down-projection, after a GELU,
where no fold exists.  Here ``1 / s`` is applied explicitly: the Linear gets a ``smooth_scale``
buffer (``s``) and a forward pre-hook that multiplies its input by ``1 / s`` before the weight use
(so calibration and quantization see the smoothed input); the compiled model computes that multiply
in float right before the layer's input quantization (one elementwise op, fused with it).

On paraphrase-MiniLM-L3-v2, static per-tensor int8 activations cost nearly all their cosine in the
FFN down-projections (layer 0's input: channel 256 reaches 23 where the median channel peaks at 1).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tvm_lowbit.quantizers import inputs

SCALE_ATTR = "smooth_scale"
SCALE_RANGE = (1e-2, 1e2)  # s_j is clipped to this range; a channel that is always 0 keeps s_j = 1


@dataclass
class SmoothReport:
    """``scales``: Linear name -> (smallest, largest) ``s_j`` applied to it."""

    alpha: float
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.scales:
            return f"smoothing (alpha {self.alpha:g}): no Linear smoothed"
        top = max(self.scales.items(), key=lambda kv: kv[1][1])
        return (f"smoothing (alpha {self.alpha:g}): {len(self.scales)} Linear layers; largest scale "
                f"{top[1][1]:.3g} ({top[0]})")


def scale_input(module: nn.Module, args: tuple) -> tuple:
    """The forward pre-hook of a smoothed Linear: its input divided by ``smooth_scale``."""
    s = getattr(module, SCALE_ATTR)
    return (args[0] / s,) + tuple(args[1:])


def is_smoothed(module: nn.Module) -> bool:
    return SCALE_ATTR in module._buffers


def _input_absmax(model: nn.Module, names: list[str], batches: list[inputs.Batch]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of the input of each Linear in ``names`` over ``batches``."""
    amax: dict[str, torch.Tensor] = {}

    def seen(name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).double()
        amax[name] = torch.maximum(amax[name], m) if name in amax else m

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen(n, a[0])) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                inputs.call(model, b)
    finally:
        for h in hooks:
            h.remove()
    return amax


def smooth(model: nn.Module, calib_data: object, alpha: float = 0.5, layers: Sequence[str] = ("*",), *,
           batch_size: int = 64, inplace: bool = False) -> tuple[nn.Module, SmoothReport]:
    """The model with the input outliers of its Linears (those whose name matches a pattern in
    ``layers``, fnmatch) migrated into their weights (module docstring); the float function is
    unchanged up to float rounding.  ``calib_data``: any inputs ``quantizers.inputs`` reads (the
    per-channel input ranges are measured on them).  A Linear smoothed before is refused."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in 0..1 (0.5 in the SmoothQuant paper), got {alpha!r}")
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    names = [n for n, m in out.named_modules()
             if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in layers)]
    for n in names:
        if is_smoothed(out.get_submodule(n)):
            raise ValueError(f"Linear {n!r} is already smoothed (it has a {SCALE_ATTR!r} buffer); smooth the "
                             "original model once")
    report = SmoothReport(alpha)
    if not names:
        return out, report
    calib = inputs.gather(calib_data, batch_size, n_inputs=inputs.positional_inputs(out))
    amax = _input_absmax(out, names, inputs.split(calib, batch_size))
    lo, hi = SCALE_RANGE
    for n in names:
        lin = out.get_submodule(n)
        if n not in amax:
            continue  # not called by forward on these inputs
        a = amax[n]
        wmax = lin.weight.detach().abs().amax(0).double()
        s = a.pow(alpha) / wmax.clamp(min=1e-12).pow(1.0 - alpha)
        s = torch.where((a > 0) & (wmax > 0), s.clamp(lo, hi), torch.ones_like(s)).to(lin.weight.dtype)
        with torch.no_grad():
            lin.weight.mul_(s[None, :])
        lin.register_buffer(SCALE_ATTR, s)
        lin.register_forward_pre_hook(scale_input)
        report.scales[n] = (float(s.min()), float(s.max()))
    return out, report
