"""SQ: stochastic quantization (Dong et al., BMVC 2017; papers.md section 2).

Weight-only binary/ternary training in stages of growing "SQ ratio" r (default 50%, 75%, 87.5%,
100%).  At every step each quantized layer quantizes a random subset of its output channels (rows)
and keeps the rest in full precision; channels with a smaller quantization error are more likely to
be quantized.  Usage (the hook protocol of ``hooks.TrainingQuantizer``)::

    hook = SQ(inner="twn").attach(model)       # then wrap the model in DDP if you use DDP
    for stage in hook.stages():
        for epoch ...: for x, y ...:
            loss.backward(); hook.before_step(); opt.step(); hook.after_step()   # after_step resamples
        hook.end_epoch()
    qmodel = hook.export(calib)                # after the last stage (r = 1)

Per layer with real weight W (rows W_i, m rows), every selection:

* ``Q`` = the inner quantizer applied to the whole layer: ``bwn`` (alpha_i = mean|W_i|, sign(0) = +1),
  ``twn`` (per-layer Delta = 0.7 * mean|W - mean W|, mean-centred as the reference code; per-row
  alpha_i = mean of |W_ij| > Delta, 0 if none) or ``fgq`` (grouped ternary of ``qmath.ternarize_weight``,
  exact threshold, groups of ``group_size``).
* ``e_i = ||W_i - Q_i||_1 / ||W_i||_1`` (0 when W_i = 0).
* ``rule="paper"`` (default, Alg. 1): ``round(r*m)`` channels (round half up) are drawn into the
  quantized set by roulette without replacement with ``p_i ~ f(1 / (e_i + eps))``, f = ``prob``
  (linear x, constant 1, softmax exp(x), sigmoid).
* ``rule="code"`` (the official Caffe ``Roulette()``): ``int((1 - r)*m)`` channels (truncated) are
  drawn into the *full-precision* set by roulette without replacement with ``p_i ~ e_i``; all others
  are quantized (so the quantized count rounds up).  ``prob`` must be ``linear`` with this rule.

The layer computes with the hybrid weight (``Q_i`` for selected rows, ``W_i`` for the others) through a
weight parametrization; its gradient goes to W unchanged: straight-through for quantized rows, exact
for full-precision rows (papers.md 2.3 step 6).  The selection is drawn in ``begin_stage`` and after
every optimizer step, and is held fixed between (so evaluation inside a stage uses the current
hybrid, as the reference code does).  Random numbers come from one NumPy PCG64 generator seeded with
``seed`` that draws the same count of uniforms whatever the weights, so every DDP rank (same
weights, same calls) makes the same selection.  Biases and batch norm stay float; activations stay
float during training and are calibrated to 8 bits (like FGQ) at export.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from tvm_lowbit import qmath
from tvm_lowbit.quantizers.config import SchemeConfig
from tvm_lowbit.quantizers.hooks import HookOrderError, TrainingQuantizer, quantizable_layers, strip_parametrizations
from tvm_lowbit.quantizers.surgery import build_fake_quant

INNER = ("twn", "bwn", "fgq")
PROBS = ("linear", "constant", "softmax", "sigmoid")
RULES = ("paper", "code")
LAYER_POLICIES = ("float", "sq")


@dataclass(frozen=True)
class SQ(SchemeConfig):
    """Configuration of SQ training (see the module docstring).

    inner: ``twn`` | ``bwn`` | ``fgq`` (group_size applies to fgq).  schedule: the SQ ratio per stage,
    increasing, ending at 1.0.  prob: f of the paper rule.  rule: ``paper`` | ``code``.  eps: the
    epsilon of x = 1/(e + eps).  seed: of the selection generator.  first_layer / last_layer:
    ``float`` (kept in float, like FGQ's default) or ``sq`` (quantized, as the reference code does).
    act_bits: activation bits of the exported model (calibrated like FGQ).
    """

    SCHEME = "sq"
    VERSION = 1

    inner: str = "twn"
    group_size: int = 4
    schedule: tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)
    prob: str = "linear"
    rule: str = "paper"
    eps: float = 1e-7
    seed: int = 0
    first_layer: str = "float"
    last_layer: str = "float"
    act_bits: int = 8

    def __post_init__(self) -> None:
        if self.inner not in INNER:
            raise ValueError(f"SQ inner={self.inner!r}: use one of {', '.join(INNER)}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"SQ group_size must be an integer >= 1, got {self.group_size!r}")
        try:
            sched = tuple(float(r) for r in self.schedule)
        except (TypeError, ValueError):
            raise ValueError(f"SQ schedule must be a sequence of ratios, got {self.schedule!r}") from None
        if not sched:
            raise ValueError("SQ schedule is empty: give the SQ ratio of each stage, e.g. (0.5, 0.75, 0.875, 1.0)")
        if any(not 0.0 < r <= 1.0 for r in sched):
            raise ValueError(f"SQ schedule {list(sched)}: every ratio must be in (0, 1]")
        if any(b <= a for a, b in zip(sched, sched[1:])):
            raise ValueError(f"SQ schedule {list(sched)} must be strictly increasing")
        if sched[-1] != 1.0:
            raise ValueError(f"SQ schedule {list(sched)} must end at 1.0 (the last stage quantizes every channel)")
        object.__setattr__(self, "schedule", sched)
        if self.prob not in PROBS:
            raise ValueError(f"SQ prob={self.prob!r}: use one of {', '.join(PROBS)}")
        if self.rule not in RULES:
            raise ValueError(f"SQ rule={self.rule!r}: use one of {', '.join(RULES)}")
        if self.rule == "code" and self.prob != "linear":
            raise ValueError(f"SQ rule='code' draws full-precision channels with p ~ e (linear); prob={self.prob!r} "
                             "only applies to rule='paper'")
        if not self.eps > 0:
            raise ValueError(f"SQ eps must be > 0, got {self.eps!r}")
        for name in ("first_layer", "last_layer"):
            if getattr(self, name) not in LAYER_POLICIES:
                raise ValueError(f"SQ {name}={getattr(self, name)!r}: use one of {', '.join(LAYER_POLICIES)}")
        if not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8:
            raise ValueError(f"SQ act_bits must be an integer in 2..8, got {self.act_bits!r}")

    def attach(self, model: nn.Module) -> "SQQuantizer":
        return SQQuantizer(self).attach(model)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The math: inner quantizers, errors, probabilities, roulette
# --------------------------------------------------------------------------------------------

def bwn_twn_codes(w: torch.Tensor, inner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, alpha): codes t (weight shape, values in {-1, 0, 1}, dtype of w) and per-row alpha [m]
    such that Q = alpha[:, None] * t, for ``inner`` = ``bwn`` or ``twn`` (papers.md 2.2)."""
    m = w.shape[0]
    w2 = w.reshape(m, -1)
    if inner == "bwn":
        t = torch.where(w2 >= 0, torch.ones_like(w2), -torch.ones_like(w2))  # sign(0) = +1
        alpha = w2.abs().mean(1)
    elif inner == "twn":
        delta = 0.7 * (w - w.mean()).abs().mean()  # per layer, mean-centred (reference code)
        sel = w2.abs() > delta
        t = torch.sign(w2) * sel
        alpha = (w2.abs() * sel).sum(1) / sel.sum(1).clamp(min=1)  # 0 for a row with nothing above delta
    else:
        raise ValueError(f"bwn_twn_codes: inner must be bwn or twn, got {inner!r}")
    return t.reshape(w.shape), alpha


def quantize_rows(w: torch.Tensor, inner: str, group_size: int = 4) -> torch.Tensor:
    """The inner quantizer's Q for every row of ``w`` (same shape and dtype)."""
    if inner == "fgq":
        return qmath.ternarize_weight(w, group_size).dequantized().to(w.device, w.dtype)
    t, alpha = bwn_twn_codes(w, inner)
    return alpha.reshape(-1, *[1] * (w.dim() - 1)) * t


def relative_errors(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """e_i = ||W_i - Q_i||_1 / ||W_i||_1 per row (0 where W_i = 0), float64."""
    w2, q2 = w.reshape(w.shape[0], -1).double(), q.reshape(q.shape[0], -1).double()
    norm = w2.abs().sum(1)
    err = (w2 - q2).abs().sum(1)
    return torch.where(norm > 0, err / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))


def selection_probabilities(e: np.ndarray, prob: str = "linear", eps: float = 1e-7) -> np.ndarray:
    """The paper's p_i = f(x_i) / sum_j f(x_j) with x_i = 1 / (e_i + eps)."""
    x = 1.0 / (np.asarray(e, np.float64) + eps)
    if prob == "linear":
        f = x
    elif prob == "constant":
        f = np.ones_like(x)
    elif prob == "softmax":
        f = np.exp(x - x.max())  # shift-invariant; avoids overflow
    elif prob == "sigmoid":
        f = 1.0 / (1.0 + np.exp(-x))
    else:
        raise ValueError(f"unknown prob {prob!r}: use one of {', '.join(PROBS)}")
    return f / f.sum()


def roulette(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Roulette-wheel selection of ``n`` distinct indices without replacement (papers.md 2.3, Alg. 1):
    n times renormalize ``p`` over the indices not yet drawn, draw v ~ U(0, 1], take the first index
    whose cumulative probability reaches v.  Exactly ``n`` uniforms are drawn from ``rng`` whatever
    ``p`` is.  Where every remaining weight is 0 the draw is uniform over the remaining indices."""
    w = np.array(p, dtype=np.float64, copy=True).reshape(-1)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("roulette: probabilities must be finite and >= 0")
    if not 0 <= n <= w.size:
        raise ValueError(f"roulette: cannot draw {n} of {w.size} indices")
    taken = np.zeros(w.size, dtype=bool)
    out = np.empty(n, dtype=np.int64)
    for k in range(n):
        v = 1.0 - rng.random()  # (0, 1]
        cur = np.where(taken, 0.0, w)
        tot = cur.sum()
        if not tot > 0:
            cur = (~taken).astype(np.float64)
            tot = cur.sum()
        c = np.cumsum(cur / tot)
        j = int(np.searchsorted(c, v, side="left"))
        if j >= w.size or cur[j] == 0:  # v above the rounded total: the last index still in the wheel
            j = int(np.flatnonzero(cur > 0)[-1])
        out[k] = j
        taken[j] = True
    return out


def quantized_count(ratio: float, m: int, rule: str) -> int:
    """Rows quantized at SQ ratio ``ratio``: round(r*m) (half up) for the paper rule,
    m - int((1 - r)*m) for the code rule."""
    if rule == "paper":
        return min(m, int(math.floor(ratio * m + 0.5)))
    return m - int((1.0 - ratio) * m)


def select_channels(e: np.ndarray, ratio: float, rng: np.random.Generator, rule: str = "paper",
                    prob: str = "linear", eps: float = 1e-7) -> np.ndarray:
    """Bool mask [m]: True for the rows quantized this step."""
    e = np.asarray(e, np.float64)
    m = e.size
    if rule == "paper":
        mask = np.zeros(m, dtype=bool)
        mask[roulette(selection_probabilities(e, prob, eps), quantized_count(ratio, m, "paper"), rng)] = True
    else:
        mask = np.ones(m, dtype=bool)
        mask[roulette(e, m - quantized_count(ratio, m, "code"), rng)] = False
    return mask


# --------------------------------------------------------------------------------------------
# The weight parametrization and the hook
# --------------------------------------------------------------------------------------------

class _Substitute(torch.autograd.Function):
    """Forward: the hybrid weight (bit-exact); backward: the gradient goes to W unchanged."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, hybrid: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return hybrid

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


class SQHybridWeight(nn.Module):
    """Weight parametrization: rows where ``mask`` is True use the inner quantizer's Q, others W.
    ``mask`` is a plain attribute (no buffer, so DDP does not broadcast it: every rank draws it)."""

    def __init__(self, inner: str, group_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.group_size = group_size
        self.mask: torch.Tensor | None = None  # bool [m] on the CPU; None: full precision

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mask is None or not bool(self.mask.any()):
            return w
        wd = w.detach()
        q = quantize_rows(wd, self.inner, self.group_size)
        m = self.mask.to(w.device).reshape(-1, *[1] * (w.dim() - 1))
        return _Substitute.apply(w, torch.where(m, q, wd))


class SQQuantizer(TrainingQuantizer):
    """The SQ training hook (built by ``SQ(...).attach(model)``)."""

    def __init__(self, config: SQ) -> None:
        super().__init__()
        self.config = config
        self.schedule = config.schedule
        self.layers: list[str] = []
        self.rng = np.random.Generator(np.random.PCG64(config.seed))

    @property
    def ratio(self) -> float:
        """The SQ ratio of the current stage (0 before the first stage)."""
        return self.schedule[self.stage] if self.stage >= 0 else 0.0

    def _param(self, name: str) -> SQHybridWeight:
        assert self.model is not None
        return self.model.get_submodule(name).parametrizations.weight[0]  # type: ignore[index,return-value]

    def real_weight(self, name: str) -> torch.Tensor:
        """The real (full-precision) weight W of layer ``name``."""
        assert self.model is not None
        return self.model.get_submodule(name).parametrizations.weight.original  # type: ignore[return-value]

    def on_attach(self, model: nn.Module) -> None:
        if self.layers:
            raise HookOrderError("SQQuantizer.attach(): already attached; build a new hook with SQ(...).attach(model)")
        cfg = self.config
        self.layers = quantizable_layers(model, cfg.first_layer == "sq", cfg.last_layer == "sq")
        for name in self.layers:
            parametrize.register_parametrization(model.get_submodule(name), "weight",
                                                 SQHybridWeight(cfg.inner, cfg.group_size))

    def errors(self) -> dict[str, torch.Tensor]:
        """Per layer, the relative L1 error e_i of every row under the inner quantizer (float64, CPU)."""
        out = {}
        with torch.no_grad():
            for name in self.layers:
                w = self.real_weight(name).detach()
                out[name] = relative_errors(w, quantize_rows(w, self.config.inner, self.config.group_size)).cpu()
        return out

    def resample(self) -> None:
        """Draw a new selection for every layer at the current ratio."""
        cfg = self.config
        for name, e in self.errors().items():
            mask = select_channels(e.numpy(), self.ratio, self.rng, cfg.rule, cfg.prob, cfg.eps)
            self._param(name).mask = torch.from_numpy(mask)

    def selections(self) -> dict[str, torch.Tensor]:
        """Layer name -> the current bool mask of quantized rows (None before the first stage)."""
        return {n: self._param(n).mask for n in self.layers}  # type: ignore[misc]

    def on_begin_stage(self, index: int) -> None:
        self.resample()

    def on_after_step(self) -> None:
        self.resample()

    # -- export ------------------------------------------------------------------------------
    def integer_weight(self, name: str) -> Any:
        """The layer's final (r = 1) weight as a ``qmath.TernaryWeight``: FGQ groups for ``fgq``; for
        ``bwn``/``twn`` one alpha per row, i.e. groups as long as the layout allows (a linear row, a
        conv row's input channels at each kernel position, a depthwise filter's taps) all sharing
        ``w_scale[k] = alpha_k`` (float32), with ``alpha_q`` = 1 (0 for all-zero groups) so
        ``w_int = t`` and the weight is ``w_scale[k] * t``."""
        w = self.real_weight(name).detach().to("cpu", torch.float64)
        if self.config.inner == "fgq":
            return qmath.ternarize_weight(w, self.config.group_size)
        t, alpha = bwn_twn_codes(w, self.config.inner)
        lay = qmath.group_layout(tuple(w.shape), 1 << 30)  # clamped to one group per segment
        tg = qmath.to_grouped(t, lay).to(torch.int8)
        alpha_q = (tg != 0).any(-1).to(torch.int64)
        return qmath.TernaryWeight(lay, tg, alpha_q, alpha.to(torch.float32))

    def export(self, calib_data: object, *, batch_size: int = 64, progress: bool = True) -> nn.Module:
        """The trained model at r = 1 as a fake-quant model: quantized layers become QuantLayers with
        ternary (binary for BWN) weights and ``act_bits`` activations calibrated like FGQ; batch norms
        after them are folded."""
        if self.model is None:
            raise HookOrderError("SQQuantizer.export() before attach(model)")
        if self.stage != len(self.schedule) - 1:
            raise HookOrderError(f"SQQuantizer.export(): the model is final only in the last stage (r = 1.0); "
                                 f"current stage {self.stage} of {list(self.schedule)}: finish training first")
        plain = strip_parametrizations(copy.deepcopy(self.model))
        weights = {name: self.integer_weight(name) for name in self.layers}
        return build_fake_quant(plain, weights, calib_data, act_bits=self.config.act_bits,
                                batch_size=batch_size, progress=progress, config=self.config.to_dict())

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s["rng"] = self.rng.bit_generator.state
        s["masks"] = {n: (None if m is None else m.clone()) for n, m in self.selections().items()}
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rng.bit_generator.state = state["rng"]
        for n, m in state["masks"].items():
            self._param(n).mask = None if m is None else m.clone().bool()
