"""PACT: learned-clip k-bit activations with DoReFa k-bit weights (Choi et al. 2018; papers.md section 3).

``PACT(act_bits=4, weight_bits=4).attach(model)`` changes the model in place:

* every ``nn.ReLU`` *module* whose output reaches a quantized layer (found by tracing the model with
  torch.fx, through pooling/additions/reshapes up to the next Conv2d/Linear or ReLU) is replaced by a
  :class:`PACTReLU` with its own learnable clip alpha (init ``alpha_init``).  Functional ReLUs
  (``F.relu``, ``torch.relu``, ``x.relu()``) are *not* replaced: write them as ``nn.ReLU`` modules.
  When the model cannot be traced, every ``nn.ReLU`` module is replaced (with a warning).
  Forward: ``y = clip(round(x / s), 0, 2^k - 1) * s`` with ``s = alpha / (2^k - 1)``; backward:
  ``dy/dx = 1[0 <= x < alpha]`` (straight-through round) and ``dL/dalpha = sum g * 1[x >= alpha]``
  (the scale is a constant for autograd, as in the paper and Distiller).
* every quantized Conv2d/Linear (all but the first and last by default, as in the paper) gets DoReFa
  weights through a weight parametrization: ``w_q = 2 Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1``
  with ``Q_k(u) = round((2^k - 1) u) / (2^k - 1)``; the straight-through estimator skips only the
  rounding (the gradient flows through tanh and the normalization).
* ``penalty()`` = lambda_alpha * sum alpha^2 with lambda_alpha = ``alpha_decay``, or the weight decay
  (``hook.weight_decay``, default 5e-4, set by ``tvm_lowbit.quantizers.train.train``) when None.
  Keep alpha out of the optimizer's own weight decay (``hook.alpha_parameters()``).
* ``after_step`` clamps every alpha to >= ``alpha_min`` so it stays > 0.

``export(calib)`` returns a fake-quant model: each quantized layer is a QuantLayer with weight format
``"int"`` (``w_int`` = the DoReFa codes as odd integers 2c - (2^k - 1) in [-(2^k-1), 2^k-1],
``w_scale`` = 1/(2^k - 1) for every channel of the layer) whose input, when it comes straight from a
PACT activation, is quantized unsigned k-bit with scale alpha/(2^k - 1) (the learned alpha becomes the
compiler's scale); each PACT activation becomes a fixed :class:`PACTQuant` (same codes times scale,
so residual additions see the values they saw in training).  Quantized layers whose input is not a
PACT output (the image with ``first_layer="pact"``, a layer after average pooling) get 8-bit
activations calibrated like FGQ.  BN stays float during training and is folded at export.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from tvm_lowbit import qmath
from tvm_lowbit.quantizers.calibrate import iterate_batches
from tvm_lowbit.quantizers.config import SchemeConfig
from tvm_lowbit.quantizers.hooks import (HookOrderError, IntegerWeight, TrainingQuantizer, quantizable_layers,
                                         strip_parametrizations)
from tvm_lowbit.quantizers.surgery import build_fake_quant, set_module

LAYER_POLICIES = ("float", "pact")
DEFAULT_WEIGHT_DECAY = 5e-4


@dataclass(frozen=True)
class PACT(SchemeConfig):
    """Configuration of PACT training.  act_bits / weight_bits: k (2..8).  alpha_init: the clip's
    initial value (10, ReLU-like).  alpha_decay: lambda_alpha of the L2 penalty on alpha (None: the
    weight decay).  alpha_min: the floor alpha is clamped to after each step.  first_layer /
    last_layer: ``float`` (paper) or ``pact``."""

    SCHEME = "pact"
    VERSION = 1

    act_bits: int = 4
    weight_bits: int = 4
    alpha_init: float = 10.0
    alpha_decay: float | None = None
    alpha_min: float = 1e-3
    first_layer: str = "float"
    last_layer: str = "float"

    def __post_init__(self) -> None:
        for name in ("act_bits", "weight_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8:
                raise ValueError(f"PACT {name} must be an integer in 2..8, got {v!r}")
        if not (np.isfinite(self.alpha_init) and self.alpha_init > 0):
            raise ValueError(f"PACT alpha_init must be > 0, got {self.alpha_init!r}")
        if self.alpha_decay is not None and not self.alpha_decay >= 0:
            raise ValueError(f"PACT alpha_decay must be >= 0 or None (= the weight decay), got {self.alpha_decay!r}")
        if not 0 < self.alpha_min < self.alpha_init:
            raise ValueError(f"PACT alpha_min must be in (0, alpha_init), got {self.alpha_min!r}")
        for name in ("first_layer", "last_layer"):
            if getattr(self, name) not in LAYER_POLICIES:
                raise ValueError(f"PACT {name}={getattr(self, name)!r}: use one of {', '.join(LAYER_POLICIES)}")

    def attach(self, model: nn.Module) -> "PACTQuantizer":
        return PACTQuantizer(self).attach(model)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Activation
# --------------------------------------------------------------------------------------------

def pact_scale(alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """s = alpha / (2^k - 1) in alpha's dtype (float32: the same value as ``qmath.scale_for_range``)."""
    return alpha / (2 ** bits - 1)


class PACTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, alpha)
        s = pact_scale(alpha.detach(), bits).to(x.dtype)
        return torch.clamp(torch.round(x / s), 0, 2 ** bits - 1) * s

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        a = alpha.to(x.dtype)
        gx = g * ((x >= 0) & (x < a)).to(g.dtype)
        ga = (g * (x >= a).to(g.dtype)).sum().reshape(alpha.shape).to(alpha.dtype)
        return gx, ga, None


class PACTReLU(nn.Module):
    """ReLU replacement: clip to [0, alpha] and quantize to ``bits`` unsigned bits; alpha is learned."""

    def __init__(self, bits: int, alpha_init: float = 10.0) -> None:
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    @property
    def scale(self) -> float:
        """The activation scale alpha / (2^k - 1) as a float32-representable Python float."""
        return qmath.scale_for_range(float(self.alpha.detach()), self.bits, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PACTFunction.apply(x, self.alpha, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha.detach()):.4g}"


class PACTQuant(nn.Module):
    """The exported, fixed form of a PACTReLU: ``clip(round(x / scale), 0, 2^k - 1) * scale``."""

    def __init__(self, scale: float, bits: int) -> None:
        super().__init__()
        self.scale = float(np.float32(scale))
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qmath.quantize_act(x, self.scale, self.bits, False) * self.scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:.4g}"


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def _dorefa_unit(w: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(w)
    return t / (2 * t.abs().max().clamp(min=1e-12)) + 0.5


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa k-bit weight in [-1, 1] (2^k levels, no zero), straight-through through the rounding only."""
    n = 2 ** bits - 1
    return 2 * (_RoundSTE.apply(_dorefa_unit(w) * n) / n) - 1


def dorefa_codes(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The DoReFa weight as odd integers 2c - (2^k - 1) (c in 0..2^k-1); the weight is codes / (2^k - 1)."""
    n = 2 ** bits - 1
    with torch.no_grad():
        c = torch.round(_dorefa_unit(w.detach()) * n)
    return (2 * c - n).to(torch.int32)


class DoReFaWeight(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return dorefa_weight(w, self.bits)


# --------------------------------------------------------------------------------------------
# Which ReLUs feed quantized layers
# --------------------------------------------------------------------------------------------

def relus_feeding(model: nn.Module, targets: set[str]) -> list[str] | None:
    """Names of the nn.ReLU modules whose output reaches one of ``targets`` (Conv2d/Linear names)
    before any other Conv2d/Linear/ReLU; None if torch.fx cannot trace the model."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return None
    mods = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if not (node.op == "call_module" and isinstance(mods.get(node.target), nn.ReLU)):
            continue
        stack, seen, hit = list(node.users), set(), False
        while stack and not hit:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_module" and isinstance(mods.get(u.target), (nn.Conv2d, nn.Linear)):
                hit = str(u.target) in targets
                continue
            if u.op == "call_module" and isinstance(mods.get(u.target), (nn.ReLU, PACTReLU)):
                continue
            stack.extend(u.users)
        if hit and str(node.target) not in found:
            found.append(str(node.target))
    return found


class PACTQuantizer(TrainingQuantizer):
    """The PACT training hook (built by ``PACT(...).attach(model)``); one stage."""

    def __init__(self, config: PACT) -> None:
        super().__init__()
        self.config = config
        self.schedule = (1.0,)
        self.layers: list[str] = []
        self.activations: list[str] = []
        self.weight_decay = DEFAULT_WEIGHT_DECAY

    def on_attach(self, model: nn.Module) -> None:
        if self.layers:
            raise HookOrderError("PACTQuantizer.attach(): already attached; build a new hook with PACT(...).attach(model)")
        cfg = self.config
        self.layers = quantizable_layers(model, cfg.first_layer == "pact", cfg.last_layer == "pact")
        relus = relus_feeding(model, set(self.layers))
        if relus is None:
            warnings.warn("PACT: torch.fx could not trace the model; replacing every nn.ReLU module", stacklevel=3)
            relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
        ref = next(iter(model.parameters()), torch.zeros(()))
        for name in relus:
            set_module(model, name, PACTReLU(cfg.act_bits, cfg.alpha_init).to(ref.device))
        self.activations = relus
        for name in self.layers:
            parametrize.register_parametrization(model.get_submodule(name), "weight", DoReFaWeight(cfg.weight_bits))

    def pact_modules(self) -> dict[str, PACTReLU]:
        assert self.model is not None
        return {n: self.model.get_submodule(n) for n in self.activations}  # type: ignore[misc]

    def alpha_parameters(self) -> list[nn.Parameter]:
        """The clip parameters (give them no optimizer weight decay: ``penalty()`` regularizes them)."""
        return [m.alpha for m in self.pact_modules().values()]

    @property
    def alpha_decay(self) -> float:
        return self.weight_decay if self.config.alpha_decay is None else self.config.alpha_decay

    def penalty(self) -> torch.Tensor:
        alphas = self.alpha_parameters()
        if not alphas:
            return torch.zeros(())
        return self.alpha_decay * torch.stack([a.reshape(()) ** 2 for a in alphas]).sum()

    def on_after_step(self) -> None:
        with torch.no_grad():
            for a in self.alpha_parameters():
                a.clamp_(min=self.config.alpha_min)

    def alphas(self) -> dict[str, float]:
        return {n: float(m.alpha.detach()) for n, m in self.pact_modules().items()}

    def export(self, calib_data: object, *, batch_size: int = 64, progress: bool = True) -> nn.Module:
        """The fake-quant model (see the module docstring)."""
        if self.model is None:
            raise HookOrderError("PACTQuantizer.export() before attach(model)")
        k = self.config.weight_bits
        plain = strip_parametrizations(copy.deepcopy(self.model)).cpu().eval()
        # which quantized layers take a PACT output directly (the same tensor object) as input
        feeds: dict[str, str] = {}
        outs: dict[int, str] = {}
        handles = []
        for n in self.activations:
            handles.append(plain.get_submodule(n).register_forward_hook(
                lambda _m, _a, o, n=n: outs.__setitem__(id(o), n)))
        for n in self.layers:
            handles.append(plain.get_submodule(n).register_forward_pre_hook(
                lambda _m, a, n=n: feeds.__setitem__(n, outs[id(a[0])]) if id(a[0]) in outs else None))
        keep = []  # keep outputs alive so ids stay unique during the pass
        first = next(iterate_batches(calib_data, batch_size))
        hold = [plain.get_submodule(n).register_forward_hook(lambda _m, _a, o: keep.append(o)) for n in self.activations]
        try:
            with torch.no_grad():
                plain(first[:2])
        finally:
            for h in handles + hold:
                h.remove()
        fixed = {}
        for name, act in feeds.items():
            pm = plain.get_submodule(act)
            fixed[name] = (pm.scale, False, pm.bits)
        for n in self.activations:
            pm = plain.get_submodule(n)
            set_module(plain, n, PACTQuant(pm.scale, pm.bits))
        n_levels = 2 ** k - 1
        weights = {}
        for name in self.layers:
            w = plain.get_submodule(name).weight.detach()
            weights[name] = IntegerWeight(dorefa_codes(w, k), torch.full((w.shape[0],), 1.0 / n_levels))
        return build_fake_quant(plain, weights, calib_data, act_bits=8, fixed_activations=fixed,
                                batch_size=batch_size, progress=progress, config=self.config.to_dict())
