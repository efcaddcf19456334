"""INQ: incremental network quantization to power-of-two weights (Zhou et al., ICLR 2017; papers.md 4).

Each quantized layer's weights go, portion by portion, onto the layer's set
``P_l = {0, +-2^n2, ..., +-2^n1}`` (``n1 = floor(log2(4 s / 3))`` with ``s = max|W|`` of the
*pretrained* weights, computed once at ``attach``; ``n2 = n1 + 1 - 2^(b-1)/2``).  Quantized weights are
frozen; the others keep training.  Usage (the hook protocol of ``hooks.TrainingQuantizer``)::

    hook = INQ(bits=5).attach(model)              # an INQQuantizer; wrap the model in DDP afterwards
    for stage in hook.stages():                   # begin_stage: quantize + freeze the next portion
        for epoch ...: for x, y ...:
            loss.backward(); hook.before_step(); opt.step(); hook.after_step()
        hook.end_epoch()
    qmodel = hook.export(calib)                   # after the last stage (portion 1.0)
    art = tvm_lowbit.compile(qmodel, x)           # every INQ layer -> the power-of-two shift kernel

(``INQQuantizer(config).attach(model)`` is the same.)  Stage ``k`` with accumulated portion
``sigma_k``:

* ``strategy="pruning"`` (the paper's choice): among the still-float weights, the largest magnitudes
  are quantized until ``round(sigma_k * n)`` weights of the layer are quantized (ties by position);
* ``strategy="random"``: every still-float weight is quantized with probability
  ``(sigma_k - sigma_{k-1}) / (1 - sigma_{k-1})`` (so 1 at the last stage), drawn from a generator
  seeded by (seed, stage, layer index), so a resumed run draws the same.

Projection: nearest element of P_l in the linear domain (``qmath.project_pow2``, ties up).  Frozen
weights: ``before_step`` zeroes their gradients; since momentum and weight decay can still move
them, ``after_step`` restores them from a saved copy, so they are bit-identical across steps (the
official Caffe CPU path lacks this).  Biases and batch norm stay float.  ``state_dict`` holds the
masks, the saved values and n1/n2, so a run resumes between stages (load the model's own
``state_dict`` too).  Export: 8-bit activations calibrated as FGQ does, batch norms folded into
the layers' epilogues (``surgery.build_fake_quant``), weights as ``qmath.Pow2Weight``.

Deviation: a weight trained past ``1.5 * 2^n1`` (above the pretrained maximum) projects to ``2^n1``
(the nearest value), not to 0 as the paper's interval rule literally says.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_lowbit import qmath
from tvm_lowbit.quantizers import calibrate
from tvm_lowbit.quantizers.config import SchemeConfig
from tvm_lowbit.quantizers.hooks import HookOrderError, TrainingQuantizer, quantizable_layers
from tvm_lowbit.quantizers.surgery import build_fake_quant

STRATEGIES = ("pruning", "random")
GRANULARITIES = ("layer", "channel")
# The paper's accumulated portions for ResNet-18 by weight bits (papers.md 4.2): lower widths take
# finer steps, so the last, unretrained step quantizes only a few percent of each layer.
PAPER_PORTIONS: dict[int, tuple[float, ...]] = {
    5: (0.5, 0.75, 0.875, 1.0),
    4: (0.3, 0.5, 0.8, 0.9, 0.95, 1.0),
    3: (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
    2: (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 1.0),
}
LAYER_POLICIES = ("float", "inq")
_LAYER_KEYS = ("bits",)


@dataclass(frozen=True)
class INQ(SchemeConfig):
    """Configuration of INQ training (see the module docstring).

    bits: weight bits b in 2..5 (2^(b-2) magnitudes per sign plus zero; b=2 is ternary {0, +-2^n1}).
    portions: accumulated fraction of each layer's weights quantized at each stage, strictly
    increasing, ending at 1.0 (the paper's ResNet-18 5-bit schedule by default; ``PAPER_PORTIONS[b]``
    holds the paper's finer schedules for 4, 3 and 2 bits).  strategy:
    ``pruning`` (largest magnitudes first) or ``random``.  seed: of the random partition.  act_bits:
    activation bits of the exported model.  first_layer / last_layer: ``inq`` (quantized, as the
    official code does; default) or ``float``.  overrides: module-name pattern (fnmatch) ->
    ``"float"`` or ``{"bits": b}``; later patterns win.  calibration: activation calibration method of
    the export (``auto`` = FGQ's choice for act_bits).  bn_reestimate: re-estimate batch-norm
    statistics at export.  batch_size: of the export's calibration passes.  granularity: ``layer``
    (the paper: one set P_l per layer from the layer's max|W|) or ``channel`` (a deviation: one set per
    output channel from that channel's max|W|, so small filters keep their own exponents; the compiled
    form is the same, with the per-channel 2^n2 in the epilogue scale).
    """

    SCHEME = "inq"
    VERSION = 1

    bits: int = 5
    portions: tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)
    strategy: str = "pruning"
    seed: int = 0
    act_bits: int = 8
    first_layer: str = "inq"
    last_layer: str = "inq"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    calibration: str = "auto"
    bn_reestimate: bool = False
    batch_size: int = 64
    granularity: str = "layer"

    def __post_init__(self) -> None:
        _check_bits(self.bits, "INQ")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"INQ granularity={self.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        try:
            portions = tuple(float(p) for p in self.portions)
        except TypeError:
            raise ValueError(f"INQ portions must be a sequence of fractions, got {self.portions!r}") from None
        object.__setattr__(self, "portions", portions)
        if not portions:
            raise ValueError("INQ portions must not be empty: give the accumulated fractions, e.g. (0.5, 0.75, 0.875, 1.0)")
        if any(not 0.0 < p <= 1.0 for p in portions):
            raise ValueError(f"INQ portions must lie in (0, 1], got {list(portions)}")
        if any(b <= a for a, b in zip(portions, portions[1:])):
            raise ValueError(f"INQ portions must be strictly increasing (accumulated fractions), got {list(portions)}")
        if portions[-1] != 1.0:
            raise ValueError(f"INQ portions must end at 1.0 (every weight quantized), got {list(portions)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"INQ strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8:
            raise ValueError(f"INQ act_bits must be an integer in 2..8, got {self.act_bits!r}")
        for name in ("first_layer", "last_layer"):
            if getattr(self, name) not in LAYER_POLICIES:
                raise ValueError(f"INQ {name}={getattr(self, name)!r}: use one of {', '.join(LAYER_POLICIES)}")
        if not isinstance(self.overrides, Mapping):
            raise TypeError("INQ overrides must be a mapping of module-name pattern -> 'float' or {'bits': b}")
        for pattern, ov in self.overrides.items():
            if ov is None or ov == "float":
                continue
            if not isinstance(ov, Mapping) or set(ov) - set(_LAYER_KEYS):
                raise ValueError(f"INQ override {pattern!r}: use 'float' or a dict with key(s) {', '.join(_LAYER_KEYS)}, "
                                 f"got {ov!r}")
            _check_bits(ov.get("bits", self.bits), f"INQ override {pattern!r}")
        if self.calibration not in (*calibrate.CALIB_METHODS, "auto"):
            raise ValueError(f"INQ calibration={self.calibration!r}: use one of auto, {', '.join(calibrate.CALIB_METHODS)}")
        if self.batch_size < 1:
            raise ValueError(f"INQ batch_size must be >= 1, got {self.batch_size}")

    def bits_for(self, name: str) -> int | None:
        """Weight bits of layer ``name`` after overrides (None: kept in float)."""
        bits: int | None = self.bits
        for pattern, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                bits = None if ov is None or ov == "float" else int(ov.get("bits", self.bits))
        return bits

    def attach(self, model: nn.Module) -> "INQQuantizer":
        """Shorthand for ``INQQuantizer(self).attach(model)``."""
        return INQQuantizer(self).attach(model)


def _check_bits(bits: object, where: str) -> None:
    try:
        qmath.check_pow2_bits(bits)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"{where}: bits: {e}") from None


@dataclass
class _LayerState:
    bits: int
    n1: int | list[int] | None  # None: all-zero pretrained weight (everything projects to 0); a list:
    n2: int | list[int] | None  # one exponent per output channel (granularity="channel")
    frozen: torch.Tensor    # bool, weight shape: True = quantized and frozen (the paper's T == 0)
    saved: torch.Tensor     # the frozen values (valid where frozen)


class INQQuantizer(TrainingQuantizer):
    """The INQ training hook (see the module docstring)."""

    def __init__(self, config: INQ | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else INQ()
        if not isinstance(self.config, INQ):
            raise TypeError(f"INQQuantizer takes an INQ config, got {type(self.config).__name__}")
        self.schedule = self.config.portions
        self.layers: dict[str, _LayerState] = {}

    # -- wiring -------------------------------------------------------------------------------
    def on_attach(self, model: nn.Module) -> None:
        cfg = self.config
        names = quantizable_layers(model, cfg.first_layer == "inq", cfg.last_layer == "inq")
        self.layers = {}
        for name in names:
            bits = cfg.bits_for(name)
            if bits is None:
                continue
            w = model.get_submodule(name).weight.detach()
            if not torch.isfinite(w).all():
                raise ValueError(f"INQ: layer {name!r} has NaN/Inf weights")
            s = float(w.abs().max())
            n1, n2 = qmath.pow2_exponents(s, bits) if s > 0 else (None, None)
            if cfg.granularity == "channel" and n1 is not None:
                # an all-zero channel keeps the layer's set (it has nothing to place)
                pairs = [qmath.pow2_exponents(float(v), bits) if v > 0 else (n1, n2)
                         for v in w.abs().reshape(w.shape[0], -1).amax(1)]
                n1, n2 = [p[0] for p in pairs], [p[1] for p in pairs]
            self.layers[name] = _LayerState(bits, n1, n2, torch.zeros_like(w, dtype=torch.bool), torch.zeros_like(w))
        if not self.layers:
            raise ValueError("INQ: no layer left to quantize (every Conv2d/Linear is kept in float by the "
                             "first_layer/last_layer/overrides policies)")

    def _weight(self, name: str) -> nn.Parameter:
        assert self.model is not None
        return self.model.get_submodule(name).weight

    @staticmethod
    def _channel_scale(st: _LayerState, w: torch.Tensor) -> torch.Tensor:
        """float64 2^n2 per output channel, shaped to broadcast over ``w``."""
        assert isinstance(st.n2, list)
        return torch.tensor([2.0 ** e for e in st.n2], dtype=torch.float64, device=w.device).reshape(
            -1, *[1] * (w.dim() - 1))

    def _project(self, st: _LayerState, w: torch.Tensor) -> torch.Tensor:
        """The whole weight ``w`` projected onto its set(s)."""
        if st.n1 is None:
            return torch.zeros_like(w)
        if isinstance(st.n1, list) and isinstance(st.n2, list):
            # every channel's set is 2^n2_k times {0, 1, 2, ..., 2^(n1-n2)}: scaling by powers of two is exact
            scale = self._channel_scale(st, w)
            return (qmath.project_pow2(w.double() / scale, st.n1[0] - st.n2[0], 0) * scale).to(w.dtype)
        return qmath.project_pow2(w, st.n1, st.n2).to(w.dtype)

    # -- stages ---------------------------------------------------------------------------------
    def on_begin_stage(self, index: int) -> None:
        sigma = self.schedule[index]
        prev = self.schedule[index - 1] if index > 0 else 0.0
        for li, (name, st) in enumerate(self.layers.items()):
            p = self._weight(name)
            w = p.detach()
            free = ~st.frozen
            if self.config.strategy == "pruning" or index == len(self.schedule) - 1:
                target = w.numel() if index == len(self.schedule) - 1 else int(np.floor(sigma * w.numel() + 0.5))
                n_new = max(target - int(st.frozen.sum()), 0)
                mag = torch.where(free, w.abs(), torch.full_like(w, -1.0)).reshape(-1).double().cpu()
                order = torch.argsort(-mag, stable=True)[:n_new]  # largest first, ties by position
                newly = torch.zeros(w.numel(), dtype=torch.bool)
                newly[order] = True
                newly = newly.reshape(w.shape).to(w.device) & free
            else:
                gen = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + index * 1009 + li)
                u = torch.rand(w.shape, generator=gen, dtype=torch.float64).to(w.device)
                newly = free & (u < (sigma - prev) / (1.0 - prev))
            with torch.no_grad():
                q = self._project(st, w)[newly]
                p[newly] = q
                st.saved[newly] = q
            st.frozen |= newly

    def on_before_step(self) -> None:
        for name, st in self.layers.items():
            p = self._weight(name)
            if p.grad is not None:
                p.grad.masked_fill_(st.frozen, 0.0)

    def on_after_step(self) -> None:
        self._restore_frozen()

    def _restore_frozen(self) -> None:
        with torch.no_grad():
            for name, st in self.layers.items():
                p = self._weight(name)
                p.copy_(torch.where(st.frozen, st.saved.to(p.dtype), p))

    def quantized_fraction(self) -> dict[str, float]:
        """Fraction of each layer's weights quantized and frozen so far."""
        return {n: float(st.frozen.float().mean()) for n, st in self.layers.items()}

    # -- export ---------------------------------------------------------------------------------
    def pow2_weights(self) -> dict[str, qmath.Pow2Weight]:
        """Each INQ layer's weight as ``qmath.Pow2Weight`` (after the last stage)."""
        if self.model is None:
            raise HookOrderError("INQQuantizer.pow2_weights() before attach(model)")
        if self.stage != len(self.schedule) - 1:
            raise HookOrderError(f"INQQuantizer.export() before the last stage: stage {self.stage} of "
                                 f"{len(self.schedule)} (portions {list(self.schedule)}) has run; finish the stages first")
        out = {}
        for name, st in self.layers.items():
            w = self._weight(name).detach().cpu()
            if not bool(st.frozen.all()):
                raise HookOrderError(f"INQ layer {name!r}: {int((~st.frozen).sum())} weights are not quantized")
            if st.n1 is None:
                out[name] = qmath.Pow2Weight(torch.zeros_like(w, dtype=torch.int32),
                                             torch.ones(w.shape[0], dtype=torch.float32), st.bits)
            elif isinstance(st.n2, list):
                scale = self._channel_scale(st, w)
                unit = qmath.pow2_from_projected(w.double() / scale, 0, st.bits)
                out[name] = qmath.Pow2Weight(unit.w_int, scale.reshape(-1).to(torch.float32), st.bits)
            else:
                out[name] = qmath.pow2_from_projected(w, st.n2, st.bits)
        return out

    def export(self, calib_data: object, progress: bool = False) -> nn.Module:
        """Fake-quant copy of the model (QConv2d/QLinear with ``Pow2Weight``, calibrated activations,
        folded batch norms) for ``tvm_lowbit.compile``; the training model is not changed."""
        weights = self.pow2_weights()
        cfg = self.config
        method = None if cfg.calibration == "auto" else cfg.calibration
        return build_fake_quant(self.model, weights, calib_data, act_bits=cfg.act_bits, calibration=method,
                                bn_reestimate=cfg.bn_reestimate, batch_size=cfg.batch_size, progress=progress,
                                config=cfg.to_dict())

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["inq"] = {"portions": list(self.schedule), "strategy": self.config.strategy,
                        "layers": {n: {"bits": st.bits, "n1": st.n1, "n2": st.n2, "frozen": st.frozen.cpu().clone(),
                                       "saved": st.saved.cpu().clone()} for n, st in self.layers.items()}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.model is None:
            raise HookOrderError("INQQuantizer.load_state_dict() before attach(model)")
        inq = state["inq"]
        if list(inq["portions"]) != list(self.schedule):
            raise ValueError(f"checkpoint portions {inq['portions']} != configured {list(self.schedule)}")
        if set(inq["layers"]) != set(self.layers):
            raise ValueError(f"checkpoint layers {sorted(inq['layers'])} != this model's INQ layers {sorted(self.layers)}")
        super().load_state_dict(state)
        for name, d in inq["layers"].items():
            dev = self._weight(name).device
            self.layers[name] = _LayerState(int(d["bits"]), d["n1"], d["n2"], d["frozen"].to(dev).bool().clone(),
                                            d["saved"].to(dev).clone())
        self._restore_frozen()
