"""Auto: one weight format per layer, the cheapest mix that stays inside an accuracy budget.

``tvm_lowbit.quantize(model, Auto(budget=1.0), calib_data, val_data)``:

1. **Sensitivity** (``quantizers.sensitivity``): the damage of every layer x candidate format alone
   (output KL vs FP32 on calibration images), cached.
2. **Candidates**: for a trade-off weight lambda, each layer takes the format minimizing
   ``cost + lambda * KL``; sweeping lambda gives a path of mixes from the cheapest to the most
   accurate, ordered by total cost.
3. **Verification**: a mix is built in full (weights in their formats, 8-bit activations calibrated,
   batch norm re-estimated, bias corrected, batch norm folded: the model the compiler gets) and
   evaluated on the validation data; a binary search along the path finds the cheapest mix that
   meets the budget.  The per-layer KLs only rank the candidates; the budget is checked on the
   built model, never on a sum of estimates.  A reading on a few hundred check inputs is noisy and
   the cheapest mix that reads inside the budget is the luckiest reading (the winner's curse), so
   every decision reads a mix through :func:`monotone_fit`: each built mix's smooth damage on the
   check inputs (mean KL of its softmax to FP32's, or 1 - mean cosine) orders the mixes, and a mix
   that reads better than a less damaged one is pooled with it (isotonic regression of the readings
   against the damage).  ``confidence`` then asks for that many binomial standard errors to spare.
   A mix meets the budget when both its fitted reading and its own reading do; the search returns
   the cheapest built mix that meets it by the fit over every mix built.
4. **Greedy backoff**: from that mix, single layers step down to a cheaper format (least KL added per
   byte saved first); each step is evaluated and kept only if the budget still holds.

Repair is cheap and post-training: bias correction (batch-norm re-estimation, and FGQ's per-channel
mean correction for layers with no batch norm after them) and, by default, GPTQ-style rounding of
the integer and ternary codes against each layer's FP32 output (``quantizers.rounding``).

The cost is the weight bytes of the compiled model (``cost="bytes"``, see ``tvm_lowbit.formats``) or a
user table: a mapping format -> cost per weight (e.g. latency per weight measured on a board), or a
callable ``(layer, format, numel, nbytes) -> cost``.

The budget is checked on ``val_data``, or, when none is given (agree/cos budgets), on the last
``holdout`` share of ``calib_data``, which the search then never fits on; validation inputs that are
also calibration inputs are counted and reported (``AutoResult.val_overlap``), and ``margin``
tightens the budget against the noise of a small check set: ``budget=1.0`` or ``"drop<=1.0"``
allows a top-1 drop of at most 1 point against FP32 on it; ``"agree>=99.5"`` asks that at least
99.5 % of its predictions equal FP32's; ``"cos>=0.99"`` (embedding models) asks that the output of
*every* validation input has a cosine of at least 0.99 to FP32's (the sensitivity pass then ranks
layers by 1 - cosine instead of KL).  Budgets are parsed strictly when the config is made: another
operator (``agree<=50``, ``drop>=1``), a value out of range (``drop<=-1``, ``agree>=120``) or NaN is
a one-line ValueError.  ``val_data`` and ``calib_data`` may be any model inputs
(``quantizers.inputs``: tensors of any dtype, tuples, dicts of token ids and masks).  An unreachable budget raises :class:`BudgetError` holding
the best mix found and its cost.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tvm_lowbit.formats import Format, avg_weight_bits, model_weight_bytes, parse_format
from tvm_lowbit.quantizers import calibrate, inputs
from tvm_lowbit.quantizers.inputs import Batch
from tvm_lowbit.quantizers.layers import WeightUse
from tvm_lowbit.quantizers.config import SchemeConfig
from tvm_lowbit.quantizers.rounding import input_hessians, refine
from tvm_lowbit.quantizers.sensitivity import SENSITIVITY_MODES, Sensitivity, layer_sensitivity
from tvm_lowbit.quantizers.smoothing import smooth
from tvm_lowbit.quantizers.surgery import (FloatReference, ModelGraph, QuantReport, Skipped, analyze, build_fake_quant,
                                           warn_report)

DEFAULT_FORMATS = ("ternary-n16", "ternary", "pow2-3", "pow2-4", "pow2-5", "int4", "int8", "float")
ROUNDINGS = ("nearest", "gptq")
PROXY_LAYERS = 24  # sensitivity="auto": the proxy pass above this many layers
_BUDGET = re.compile(r"^\s*(drop|agree|cos)\s*(<=|>=|=<|=>|<|>|==|=)\s*([^\s%]+)\s*(?:%|pp|pt)?\s*$")


class BudgetError(ValueError):
    """The accuracy budget cannot be met with the allowed formats; ``best`` is the most accurate mix
    evaluated (an :class:`AutoResult`) and ``model`` its fake-quant model."""

    def __init__(self, msg: str, best: "AutoResult", model: nn.Module) -> None:
        super().__init__(msg)
        self.best = best
        self.model = model


@dataclass(frozen=True)
class Budget:
    kind: str      # "drop": max top-1 drop in points vs FP32; "agree": min % agreement with FP32;
    value: float   # "cos": min cosine of an output to FP32's (every validation input)

    def met(self, drop: float, agree: float, cos_min: float = float("nan"), margin: float = 0.0) -> bool:
        """Whether the measured accuracy is inside the budget tightened by ``margin`` (in the budget's
        units: points for drop/agree, cosine for cos)."""
        if self.kind == "drop":
            return drop <= self.value - margin + 1e-9
        if self.kind == "agree":
            return agree >= self.value + margin - 1e-9
        return cos_min >= self.value + margin - 1e-12

    def reading(self, drop: float, agree: float, cos_min: float = float("nan")) -> float:
        """The measured quantity this budget bounds, signed so that higher is better (-drop, agree, cos_min)."""
        return {"drop": -drop, "agree": agree, "cos": cos_min}[self.kind]

    def met_reading(self, reading: float, margin: float = 0.0) -> bool:
        """``met`` for a value of ``reading``."""
        return self.met(-reading, reading, reading, margin)

    def __str__(self) -> str:
        return {"drop": f"drop<={self.value:g}pp", "agree": f"agree>={self.value:g}%",
                "cos": f"cos>={self.value:g}"}[self.kind]


_BUDGET_HELP = ("use a number (max top-1 drop in points vs FP32 on the validation data), 'drop<=1.0', "
                "'agree>=99.5' (min % of predictions equal to FP32's) or 'cos>=0.99' (min cosine of every "
                "output to FP32's, for embedding models)")
_BUDGET_OPS = {"drop": "<=", "agree": ">=", "cos": ">="}
_BUDGET_RANGE = {"drop": (0.0, 100.0, "a top-1 drop is a number of points in 0..100"),
                 "agree": (0.0, 100.0, "agreement is a percentage in 0..100"),
                 "cos": (-1.0, 1.0, "a cosine is a number in -1..1")}


def parse_budget(budget: float | int | str) -> Budget:
    """A budget from a number (max top-1 drop) or ``drop<=X`` / ``agree>=Y`` / ``cos>=C``; anything else
    (another operator, a value out of range, NaN) is a ValueError naming the budget."""
    if isinstance(budget, bool):
        raise TypeError(f"Auto budget {budget!r}: {_BUDGET_HELP}")
    if isinstance(budget, (int, float)):
        kind, value = "drop", float(budget)
    elif isinstance(budget, str):
        m = _BUDGET.match(budget.lower())
        if m is None:
            raise ValueError(f"Auto budget {budget!r}: {_BUDGET_HELP}")
        kind, op, num = m.group(1), m.group(2), m.group(3)
        if op != _BUDGET_OPS[kind]:
            raise ValueError(f"Auto budget {budget!r}: a {kind} budget is written '{kind}{_BUDGET_OPS[kind]}X' "
                             f"(got the operator {op!r})")
        try:
            value = float(num)
        except ValueError:
            raise ValueError(f"Auto budget {budget!r}: {num!r} is not a number; {_BUDGET_HELP}") from None
    else:
        raise TypeError(f"Auto budget {budget!r} ({type(budget).__name__}): {_BUDGET_HELP}")
    lo, hi, what = _BUDGET_RANGE[kind]
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"Auto budget {budget!r}: {what}, got {value!r}")
    return Budget(kind, value)


@dataclass(frozen=True)
class Auto(SchemeConfig):
    """Per-layer precision search (see the module docstring).

    budget: max top-1 drop in points (a number or ``"drop<=X"``), ``"agree>=Y"`` (% agreement with
    FP32) or ``"cos>=C"`` (lowest output cosine to FP32), on ``val_data``.  cost: ``"bytes"``, a mapping format -> cost per weight, or a callable
    ``(layer, format, numel, nbytes) -> cost``.  formats: candidate formats for every layer
    (``tvm_lowbit.formats``).  overrides: module-name pattern (fnmatch) -> a format or list of formats
    for matching layers (later patterns win), e.g. ``{"classifier": "int8"}``.  act_bits /
    calibration / bn_reestimate / bias_correction: the activation pipeline, as in FGQ.  rounding:
    ``gptq`` (default: integer and ternary codes refined against each layer's FP32 output on
    ``rounding_images`` calibration images, ``quantizers.rounding``; same scales, same compiled form)
    or ``nearest``.  On the built-in mobilenet at a 0.5-point budget, gptq reached 3.53 average weight
    bits where nearest rounding needed 3.86 (scripts/bench_accuracy.py).
    sensitivity_images: calibration images the sensitivity pass uses.  sensitivity: ``full`` (one
    network forward per layer x format), ``proxy`` (one per layer: a probe format's damage measured,
    the others scaled by the layer's own output error, ``quantizers.sensitivity``) or ``auto`` (proxy
    above ``PROXY_LAYERS`` layers: on EfficientNet-Lite2's 65 layers x 7 formats the full pass is ~7x
    the forwards).  max_evals: how many mixes may
    be built and evaluated on the validation data.  cache_dir / use_cache: the sensitivity cache
    (default ``$TVM_LOWBIT_CACHE`` or ``~/.cache/tvm_lowbit``).
    holdout: with no ``val_data``, the share of ``calib_data`` (its last inputs) held out as the check
    set: the search fits (calibration, corrections, GPTQ, sensitivity) on the rest and verifies the
    budget on these, which it never fitted on.  margin: a mix must beat the budget by this much on
    the check set (points for drop/agree, cosine for cos): the lowest cosine over a few dozen check
    inputs is a noisy estimate of the lowest over unseen ones, and the margin covers that noise.
    confidence (agree / drop budgets): a mix must also beat the budget by this many binomial standard
    errors of its reading on the n check inputs, ``100 * sqrt(q (1 - q) / n)`` points with q its share
    of predictions that differ from FP32 (add-one smoothed), so a reading from few check inputs
    needs more to spare than one from many (``confidence=1``: one standard error).
    Every decision of the search reads a mix's budget quantity through :func:`monotone_fit` over all
    mixes built so far (see the module docstring, "Verification").
    smooth_alpha: None (off) or SmoothQuant's alpha: the input outliers of every Linear are migrated
    into its weights before anything else (``quantizers.smoothing``, fitted on the fit inputs).
    """

    SCHEME = "auto"
    VERSION = 1

    budget: float | int | str = 1.0
    cost: str | Mapping[str, float] | Callable[..., float] = "bytes"
    formats: tuple[str, ...] = DEFAULT_FORMATS
    overrides: Mapping[str, Any] = field(default_factory=dict)
    act_bits: int = 8
    calibration: str = "auto"
    bn_reestimate: bool = True
    bias_correction: bool = True
    act_mode: str = "static"
    rounding: str = "gptq"
    rounding_images: int = 256
    sensitivity_images: int = 512
    sensitivity: str = "auto"
    max_evals: int = 14
    batch_size: int = 64
    cache_dir: str | None = None
    use_cache: bool = True
    holdout: float = 0.25
    margin: float = 0.0
    confidence: float = 0.0
    smooth_alpha: float | None = None

    def __post_init__(self) -> None:
        parse_budget(self.budget)
        if isinstance(self.formats, str) or not self.formats:
            raise ValueError("Auto formats must be a non-empty list of format names, e.g. ('ternary', 'int4', 'int8')")
        for f in self.formats:
            parse_format(f)
        if not (isinstance(self.cost, (Mapping, str)) or callable(self.cost)):
            raise TypeError("Auto cost: 'bytes', a mapping format -> cost per weight, or a callable")
        if isinstance(self.cost, str) and self.cost != "bytes":
            raise ValueError(f"Auto cost {self.cost!r}: use 'bytes', a mapping format -> cost per weight "
                             "(e.g. measured latency), or a callable (layer, format, numel, nbytes) -> cost")
        if isinstance(self.cost, Mapping):
            missing = [f for f in self.formats if parse_format(f).name not in self.cost and f not in self.cost]
            if missing:
                raise ValueError(f"Auto cost table has no entry for format(s) {', '.join(missing)}")
        for pattern, ov in self.overrides.items():
            for f in [ov] if isinstance(ov, str) else list(ov):
                try:
                    parse_format(f)
                except ValueError as e:
                    raise ValueError(f"Auto override {pattern!r}: {e}") from None
        if not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8:
            raise ValueError(f"Auto act_bits must be an integer in 2..8, got {self.act_bits!r}")
        if self.calibration not in (*calibrate.CALIB_METHODS, "auto"):
            raise ValueError(f"Auto calibration {self.calibration!r}: use auto or one of {', '.join(calibrate.CALIB_METHODS)}")
        if self.act_mode not in calibrate.ACT_MODES:
            raise ValueError(f"Auto act_mode {self.act_mode!r}: use one of {', '.join(calibrate.ACT_MODES)}")
        if self.sensitivity not in (*SENSITIVITY_MODES, "auto"):
            raise ValueError(f"Auto sensitivity {self.sensitivity!r}: use auto or one of {', '.join(SENSITIVITY_MODES)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"Auto rounding {self.rounding!r}: use one of {', '.join(ROUNDINGS)}")
        if self.max_evals < 1 or self.sensitivity_images < 1 or self.batch_size < 1 or self.rounding_images < 1:
            raise ValueError("Auto max_evals, sensitivity_images and batch_size must be >= 1")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"Auto holdout must be a share in (0, 1) of the calibration inputs, got {self.holdout!r}")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(f"Auto margin must be a number >= 0 in the budget's units, got {self.margin!r}")
        if not math.isfinite(self.confidence) or self.confidence < 0:
            raise ValueError(f"Auto confidence must be a number of standard errors >= 0, got {self.confidence!r}")
        if self.confidence and parse_budget(self.budget).kind == "cos":
            raise ValueError(f"Auto confidence={self.confidence!r} with the budget {self.budget!r}: the lowest cosine "
                             "has no binomial standard error; use margin for a cos budget")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"Auto smooth_alpha must be None or in 0..1, got {self.smooth_alpha!r}")

    def candidates(self, name: str) -> list[str]:
        out = [parse_format(f).name for f in self.formats]
        for pattern, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                out = [parse_format(f).name for f in ([ov] if isinstance(ov, str) else list(ov))]
        return out

    def sensitivity_mode(self, n_layers: int) -> str:
        """The sensitivity pass this setting runs on a model of ``n_layers`` layers."""
        if self.sensitivity != "auto":
            return self.sensitivity
        return "proxy" if n_layers > PROXY_LAYERS else "full"

    def method(self) -> str:
        return self.calibration if self.calibration != "auto" else calibrate.auto_method(self.act_bits)


@dataclass
class Evaluation:
    formats: dict[str, str]
    cost: float
    weight_bytes: int
    avg_weight_bits: float
    top1: float
    agree: float
    drop: float
    met: bool
    stage: str
    seconds: float
    cos_min: float = float("nan")
    damage: float = float("nan")   # smooth damage on the check inputs: mean KL to FP32 (1 - mean cosine for cos)
    fitted: float = float("nan")   # the budget reading (Budget.reading) after monotone_fit and confidence


@dataclass
class AutoResult:
    """What the search did: the chosen formats, its verified accuracy on the validation data, every
    evaluated mix, and the sensitivity table."""

    budget: Budget
    formats: dict[str, str]
    fp32_top1: float
    top1: float
    agree: float
    drop: float
    cost: float
    weight_bytes: int
    avg_weight_bits: float
    met: bool
    evaluations: list[Evaluation]
    sensitivity: Sensitivity
    val_images: int
    cos_min: float = float("nan")
    margin: float = 0.0
    val_source: str = "val_data"
    val_overlap: int = 0
    confidence: float = 0.0

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        mix = ", ".join(f"{n} {f}" for f, n in sorted(counts.items(), key=lambda t: -t[1]))
        state = "meets" if self.met else "does NOT meet"
        return (f"Auto: {len(self.formats)} layers ({mix}); {self.avg_weight_bits:.2f} avg weight bits, "
                f"{self.weight_bytes:,d} weight bytes; on {self.val_images} validation images top-1 "
                f"{self.top1:.2f}% (FP32 {self.fp32_top1:.2f}%, drop {self.drop:.2f} pp), agreement with "
                f"FP32 {self.agree:.2f}%, lowest cosine to FP32 {self.cos_min:.4f}: {state} the budget {self.budget}"
                f"{f' with a margin of {self.margin:g}' if self.margin else ''}"
                f"{f' and {self.confidence:g} standard errors' if self.confidence else ''} (checked on {self.val_source}"
                f"{f', {self.val_overlap} of them also calibration inputs' if self.val_overlap else ''}; "
                f"{len(self.evaluations)} mixes evaluated)")

    def table(self) -> str:
        lines = [f"{'layer':28s} format"] + [f"{n:28s} {f}" for n, f in self.formats.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Building and evaluating one mix
# --------------------------------------------------------------------------------------------

GPTQ_MAX_BITS = 7  # GPTQ refines codes of formats up to this width; int8's rounding error is already tiny


class WeightMaker:
    """Quantized weights of one model's layers, made once per (layer, format): rounded to nearest, or
    with GPTQ codes (``rounding="gptq"``, formats of at most ``GPTQ_MAX_BITS`` bits) from input
    statistics gathered on the FP32 network the first time such a format is asked for.  ``uses``:
    each layer's weight use (``surgery.analyze``): its effective weight is quantized."""

    def __init__(self, model: nn.Module, rounding: str = "nearest", images: object = None,
                 layers: list[str] | None = None, uses: Mapping[str, WeightUse] | None = None,
                 progress: bool = False) -> None:
        self.model = model
        self.rounding = rounding
        self.cache: dict[tuple[str, str], Any] = {}
        self.hessians: dict[str, torch.Tensor] | None = None
        self.uses = dict(uses) if uses is not None else None
        self.images = images
        self.layers = layers
        self.progress = progress
        if rounding == "gptq" and (images is None or layers is None):
            raise ValueError("GPTQ rounding needs calibration images and the layer names")

    def weight(self, name: str) -> torch.Tensor:
        if self.uses is not None and name in self.uses:
            return self.uses[name].weight
        return self.model.get_submodule(name).weight.detach()

    def _hessians(self) -> dict[str, torch.Tensor]:
        if self.hessians is None:
            if self.uses is None:
                n_in = inputs.positional_inputs(self.model)
                self.uses = analyze(self.model, inputs.take(inputs.gather(self.images, 64, n_inputs=n_in), 0, 1)).uses
            self.hessians = input_hessians(self.model, list(self.layers or []), self.images, uses=self.uses,
                                           progress=self.progress)
        return self.hessians

    def __call__(self, name: str, fmt: Format) -> Any:
        if (name, fmt.name) not in self.cache:
            w = self.weight(name)
            tw = fmt.quantize(w)
            if tw is not None and self.rounding == "gptq" and fmt.bits <= GPTQ_MAX_BITS:
                h = self._hessians().get(name)
                if h is not None:
                    tw = refine(tw, w, h)
            self.cache[(name, fmt.name)] = tw
        return self.cache[(name, fmt.name)]


def build_mixed(model: nn.Module, formats: Mapping[str, str], calib_data: object, config: Auto | None = None, *,
                weights: WeightMaker | None = None, progress: bool = False, graph: ModelGraph | None = None,
                float_ref: FloatReference | None = None) -> nn.Module:
    """The fake-quant model with layer ``name`` in format ``formats[name]`` (``float`` or absent: stays
    float), through the FGQ activation pipeline: calibration, batch-norm re-estimation, bias correction
    of layers with no batch norm after them (each kept only if it helps on held-out calibration
    inputs), batch-norm folding.  ``weights`` makes (and caches) the quantized weights; by default
    they are rounded to nearest.  ``graph``: ``surgery.analyze`` of ``model`` (read when None).
    ``float_ref``: ``surgery.FloatReference(model)``, shared by the builds of one search so the float
    side of the corrections is computed once."""
    cfg = config or Auto()
    calib = inputs.gather(calib_data, cfg.batch_size, n_inputs=inputs.positional_inputs(model))
    if graph is None:
        graph = analyze(model.eval(), inputs.take(calib, 0, 1))
    make = weights if weights is not None else WeightMaker(model, uses=graph.uses)
    qw = {}
    for name, fname in formats.items():
        fmt = parse_format(fname)
        if not fmt.is_float:
            qw[name] = make(name, fmt)
    if not qw:  # every layer float: the same report a partial mix gets, each layer named
        q = copy.deepcopy(model).cpu().eval()
        mods = dict(q.named_modules())
        q.tvm_lowbit_report = QuantReport(notes=list(graph.notes), left_float=list(graph.skipped) + [
            Skipped(n, type(mods[n]).__name__, f"Auto chose float for {n}" if n in formats
                    else "kept float by the configuration", True) for n in graph.order])
    else:
        why = {n: f"Auto chose float for {n}" for n, f in formats.items() if parse_format(f).is_float}
        q = build_fake_quant(model, qw, calib, act_bits=cfg.act_bits, calibration=cfg.method(),
                             bn_reestimate=cfg.bn_reestimate, bias_correction=cfg.bias_correction,
                             batch_size=cfg.batch_size, progress=progress, graph=graph, float_layers=why,
                             act_mode=cfg.act_mode, float_ref=float_ref)
    q.tvm_lowbit_config = cfg.to_dict()
    return q.eval()


def outputs(model: nn.Module, x: object, batch: int = 64) -> torch.Tensor:
    """The model's outputs on the inputs ``x`` (any form ``quantizers.inputs`` reads) as float64 rows."""
    whole = inputs.gather(x, batch, n_inputs=inputs.positional_inputs(model)) if not isinstance(
        x, (torch.Tensor, np.ndarray)) else inputs.as_batch(x)
    with torch.inference_mode():
        return torch.cat([inputs.rows(inputs.call(model, b), inputs.batch_len(b)) for b in inputs.split(whole, batch)])


def predictions(model: nn.Module, x: object, batch: int = 64) -> torch.Tensor:
    # small batches: a depthwise-separable net runs 2-4x faster on the CPU at 64 images than at 500
    return outputs(model, x, batch).argmax(-1)


def cosines(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of two output matrices."""
    return torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1, eps=1e-12)


def _val_arrays(val_data: object, n_inputs: int = 1) -> tuple[Batch, torch.Tensor | None]:
    """(inputs, labels or None) from (x, y), {"x": x, "y": y}, or x alone, where x is one batch of any
    form ``quantizers.inputs`` reads (a tensor/array, a dict, a tuple of ``n_inputs`` tensors), or an
    iterable of batches (labels then read from none).  ``n_inputs``: ``inputs.positional_inputs(model)``."""
    y: object = None
    if isinstance(val_data, Mapping) and set(val_data) <= {"x", "y"}:
        x, y = val_data.get("x"), val_data.get("y")
    elif (isinstance(val_data, (tuple, list)) and len(val_data) == 2
          and (n_inputs == 1 or isinstance(val_data[0], (tuple, list, Mapping)))
          and not isinstance(val_data[1], (tuple, list, Mapping))):
        x, y = val_data
    else:
        x = val_data
    if x is None:
        raise ValueError("validation data: pass (images, labels) or images")
    if isinstance(x, (torch.Tensor, np.ndarray, Mapping)) or (
            isinstance(x, (tuple, list)) and n_inputs >= 2 and len(x) == n_inputs
            and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in x)):
        xt = inputs.as_batch(tuple(x) if isinstance(x, list) else x)
    else:
        xt = inputs.gather(x, 64, n_inputs=n_inputs)
    first = inputs.first_tensor(xt)
    if first.dim() < 1 or first.shape[0] == 0:
        raise ValueError(f"validation inputs must be [n, ...] with n >= 1, got {inputs.describe(xt)}")
    yt = None
    if y is not None:
        yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().reshape(-1)
        if yt.shape[0] != inputs.batch_len(xt):
            raise ValueError(f"validation data: {inputs.batch_len(xt)} inputs but {yt.shape[0]} labels")
    return xt, yt


def mean_kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(got)), the rows being logits."""
    lr, lg = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    return float((lr.exp() * (lr - lg)).sum(-1).mean())


def monotone_fit(damage: list[float], reading: list[float]) -> list[float]:
    """The readings refitted as a non-increasing function of the damage (isotonic regression by pool
    adjacent violators, equal weights): where a more damaged mix reads better than a less damaged
    one, both get the mean of their readings.  Readings in the damage's order come back unchanged.
    A NaN damage counts as the largest."""
    if len(damage) != len(reading):
        raise ValueError(f"monotone_fit: {len(damage)} damages but {len(reading)} readings")
    order = sorted(range(len(damage)), key=lambda i: (math.isnan(damage[i]), damage[i]))
    blocks: list[tuple[float, int]] = []  # (sum of readings, count), means non-increasing
    for i in order:
        total, count = reading[i], 1
        while blocks and blocks[-1][0] / blocks[-1][1] < total / count:
            t, c = blocks.pop()
            total, count = total + t, count + c
        blocks.append((total, count))
    out = [0.0] * len(reading)
    k = 0
    for total, count in blocks:
        for _ in range(count):
            out[order[k]] = total / count
            k += 1
    return out


def agreement_se(agree: float, n: int) -> float:
    """The binomial standard error, in points, of an agreement of ``agree`` % read on ``n`` inputs; the
    share of differing predictions is add-one smoothed, so a reading of 100 % still has an error."""
    q = ((100.0 - agree) / 100.0 * n + 1.0) / (n + 2.0)
    return 100.0 * math.sqrt(q * (1.0 - q) / n)


def judge(evals: list[Evaluation], budget: Budget, margin: float = 0.0, confidence: float = 0.0,
          n_check: int = 1) -> None:
    """Set every built mix's ``fitted`` reading and ``met`` verdict from the readings of all of them:
    the budget's reading (``Budget.reading``) refitted against the mixes' damage (:func:`monotone_fit`),
    less ``confidence`` binomial standard errors of the mix's agreement on ``n_check`` inputs; a mix
    meets the budget (+ ``margin``) when that fitted reading and its own reading both do."""
    fit = monotone_fit([e.damage for e in evals], [budget.reading(e.drop, e.agree, e.cos_min) for e in evals])
    for e, v in zip(evals, fit):
        e.fitted = v - confidence * agreement_se(e.agree, n_check) if confidence else v
        e.met = budget.met_reading(e.fitted, margin) and budget.met(e.drop, e.agree, e.cos_min, margin)


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

def _cost_fn(cost: str | Mapping[str, float] | Callable[..., float]) -> Callable[[str, str, int, int], float]:
    if isinstance(cost, str):
        return lambda _n, _f, _numel, nbytes: float(nbytes)
    if isinstance(cost, Mapping):
        table = {parse_format(k).name: float(v) for k, v in cost.items()}
        return lambda _n, f, numel, _b: table[f] * numel
    return lambda n, f, numel, nbytes: float(cost(n, f, numel, nbytes))


def lagrangian_path(sens: Sensitivity, cands: dict[str, list[str]], cost: dict[str, dict[str, float]]
                    ) -> list[dict[str, str]]:
    """Distinct mixes argmin_f cost + lambda * KL per layer over a sweep of lambda, cheapest first."""
    layers = list(cands)
    kl = {n: {f: max(sens.kl[n][f], 0.0) for f in cands[n]} for n in layers}
    ratios = []
    for n in layers:
        for a in cands[n]:
            for b in cands[n]:
                dk = kl[n][a] - kl[n][b]
                dc = cost[n][b] - cost[n][a]
                if dk > 0 and dc > 0:
                    ratios.append(dc / dk)  # the lambda at which b (costlier, more accurate) overtakes a
    lams = sorted(set([0.0] + [r * (1 + 1e-9) for r in ratios] + [float("inf")]))
    seen, path = set(), []
    for lam in lams:
        mix = {}
        for n in layers:
            if lam == float("inf"):
                mix[n] = min(cands[n], key=lambda f: (kl[n][f], cost[n][f]))
            else:
                mix[n] = min(cands[n], key=lambda f: (cost[n][f] + lam * kl[n][f], kl[n][f]))
        key = tuple(mix[n] for n in layers)
        if key not in seen:
            seen.add(key)
            path.append(mix)
    total = lambda m: (sum(cost[n][m[n]] for n in layers), sum(kl[n][m[n]] for n in layers))  # noqa: E731
    return sorted(path, key=total)


def quantize_auto(model: nn.Module, config: Auto, calib_data: object, val_data: object = None, *,
                  progress: bool = True) -> nn.Module:
    """Run the search (module docstring); returns the chosen fake-quant model with the search's
    :class:`AutoResult` in ``model.tvm_lowbit_auto``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() takes a torch.nn.Module, got {type(model).__name__}")
    budget = parse_budget(config.budget)
    n_in = inputs.positional_inputs(model)
    calib = inputs.gather(calib_data, config.batch_size, n_inputs=n_in)
    if val_data is None:
        if budget.kind == "drop":
            raise ValueError(f"Auto(budget={config.budget!r}) needs validation data (with labels) to verify a top-1 drop: "
                             "call quantize(model, Auto(...), calib_data, val_data) with val_data=(images, labels) "
                             "held out from training and calibration, or use an 'agree>=...' / 'cos>=...' budget "
                             "(then part of the calibration data is held out to check it)")
        n_all = inputs.batch_len(calib)
        n_check = int(round(n_all * config.holdout))
        if n_check < 1 or n_all - n_check < 1:
            raise ValueError(f"Auto holds out {config.holdout:g} of the calibration inputs to check the budget "
                             f"{budget} when no val_data is given, but {n_all} calibration input(s) cannot be split: "
                             "pass more calibration inputs or val_data")
        xv, yv = inputs.take(calib, n_all - n_check), None
        calib = inputs.take(calib, 0, n_all - n_check)
        source = f"the last {n_check} of {n_all} calibration inputs, held out (fit on the first {n_all - n_check})"
    else:
        xv, yv = _val_arrays(val_data, n_in)
        source = f"{inputs.batch_len(xv)} validation inputs"
    if budget.kind == "drop" and yv is None:
        raise ValueError(f"a top-1 drop budget ({budget}) needs validation labels: pass val_data=(images, labels), "
                         "or use an agreement budget such as 'agree>=99.5'")
    overlap = shared_rows(calib, xv)
    model = copy.deepcopy(model).cpu().eval()
    if config.smooth_alpha is not None:
        model, smoothed = smooth(model, calib, config.smooth_alpha, batch_size=config.batch_size, inplace=True)
    graph = analyze(model, inputs.take(calib, 0, 1))
    names = graph.order
    if not names:
        why = "; ".join(str(s) for s in graph.skipped[:4])
        raise ValueError("the model has no quantizable layer (no nn.Conv2d or nn.Linear weight use is called in "
                         f"forward){': ' + why if why else ''}")
    try:
        inputs.call(model, inputs.take(xv, 0, 1))
    except Exception as e:
        raise ValueError(f"the model failed on a validation batch {inputs.describe(inputs.take(xv, 0, 1))}: "
                         f"{type(e).__name__}: {e}") from e
    for n in names:
        if not torch.isfinite(graph.uses[n].weight).all():
            raise ValueError(f"layer {n!r}: weight holds NaN/Inf values; fix or retrain the model")
    cands = {n: config.candidates(n) for n in names}
    t_start = time.time()

    def log(msg: str) -> None:
        if progress:
            tqdm.write(f"Auto [{time.time() - t_start:6.1f} s] {msg}")

    log(f"{len(names)} layers; {'rounding ' + config.rounding}; the budget {budget}"
        f"{f' (+ margin {config.margin:g})' if config.margin else ''}"
        f"{f' (+ {config.confidence:g} standard errors)' if config.confidence else ''} checked on {source}")
    if overlap:
        log(f"warning: {overlap} of the {inputs.batch_len(xv)} validation inputs are also calibration inputs: the "
            "budget is then checked on inputs the quantizer fitted on and may not hold on unseen ones")
    if config.smooth_alpha is not None:
        log(smoothed.summary())
    weights = WeightMaker(model, config.rounding, inputs.take(calib, 0, config.rounding_images), names, graph.uses,
                          progress)
    if all(len(c) == 1 for c in cands.values()):  # one format per layer: nothing to search
        sens = Sensitivity(names, sorted({c[0] for c in cands.values()}), {n: {cands[n][0]: 0.0} for n in names},
                           {n: {cands[n][0]: 0} for n in names},
                           {n: int(graph.uses[n].weight.numel()) for n in names}, 0, "", False, {"skipped": "one format"})
        path = [{n: cands[n][0] for n in names}]
        cost = {n: {cands[n][0]: 0.0} for n in names}
        log("one candidate format per layer: no sensitivity pass, one build")
    else:
        sub = inputs.take(calib, 0, config.sensitivity_images)
        sens = layer_sensitivity(model, sub, config.formats, layers=names, candidates=cands,
                                 act_bits=config.act_bits, calibration=config.method(),
                                 bias_correction=config.bias_correction, batch_size=config.batch_size,
                                 cache_dir=config.cache_dir, use_cache=config.use_cache, weight_fn=weights,
                                 weight_fn_key=f"{config.rounding}:{config.rounding_images}", progress=progress,
                                 uses=graph.uses, metric="cos" if budget.kind == "cos" else "kl",
                                 mode=config.sensitivity_mode(len(names)))
        log(f"sensitivity {'from the cache' if sens.from_cache else 'measured'}")
        cf = _cost_fn(config.cost)
        cost = {n: {f: cf(n, f, sens.numel[n], sens.bytes[n][f]) for f in cands[n]} for n in names}
        path = lagrangian_path(sens, cands, cost)

    ref_rows = outputs(model, xv)
    ref = ref_rows.argmax(-1)
    float_ref = FloatReference(model)  # the float side of every build's corrections, computed once
    fp32 = 100.0 * float((ref == yv).double().mean()) if yv is not None else float("nan")
    evals: list[Evaluation] = []
    models: dict[tuple, nn.Module] = {}
    bar = tqdm(total=config.max_evals, desc="verifying mixes on validation data", disable=not progress, leave=False)
    n_val = inputs.batch_len(xv)
    want = f"{budget}{f' + margin {config.margin:g}' if config.margin else ''}" + (
        f" + {config.confidence:g} SE" if config.confidence else "")

    def evaluate(mix: dict[str, str], stage: str) -> Evaluation:
        key = tuple(mix[n] for n in names)
        for e in evals:
            if tuple(e.formats[n] for n in names) == key:
                return e
        t0 = time.time()
        q = build_mixed(model, mix, calib, config, weights=weights, graph=graph, progress=progress,
                        float_ref=float_ref)
        rows = outputs(q, xv)
        pred = rows.argmax(-1)
        agree = 100.0 * float((pred == ref).double().mean())
        cos = cosines(ref_rows, rows)
        cos_min = float(cos.min())
        top1 = 100.0 * float((pred == yv).double().mean()) if yv is not None else float("nan")
        drop = fp32 - top1 if yv is not None else float("nan")
        damage = 1.0 - float(cos.mean()) if budget.kind == "cos" else mean_kl(ref_rows, rows)
        nbytes, _ = model_weight_bytes(q)
        e = Evaluation(dict(mix), sum(cost[n][mix[n]] for n in names), nbytes, avg_weight_bits(q), top1, agree, drop,
                       False, stage, time.time() - t0, cos_min, damage)
        evals.append(e)
        judge(evals, budget, config.margin, config.confidence, n_val)
        models[key] = q
        bar.update()
        log(f"{stage}: {e.avg_weight_bits:.2f} avg weight bits, agreement {agree:.2f}%, lowest cosine "
            f"{cos_min:.4f}{'' if yv is None else f', top-1 {top1:.2f}%'}, {'1 - mean cosine' if budget.kind == 'cos' else 'mean KL'} "
            f"{damage:.5f}, fitted {_shown(budget, e.fitted)} -> {'meets' if e.met else 'misses'} {want} ({e.seconds:.1f} s)")
        return e

    def unreachable(best: Evaluation) -> BudgetError:
        bar.close()
        res = _result(budget, best, fp32, evals, sens, n_val, config, source, overlap)
        return BudgetError(f"the budget {budget} is unreachable with formats {', '.join(config.formats)}: the most "
                          f"accurate mix found (top-1 {best.top1:.2f}%, drop {best.drop:.2f} pp, agreement "
                          f"{best.agree:.2f}%, lowest cosine {best.cos_min:.4f}) costs {best.cost:,.0f} ({best.weight_bytes:,d} weight bytes, "
                          f"{best.avg_weight_bits:.2f} avg weight bits); allow more formats (e.g. 'int8', "
                          "'float') or loosen the budget", res, models[tuple(best.formats[n] for n in names)])

    def cheapest_met() -> Evaluation:
        met = [e for e in evals if e.met]
        if not met:  # the fit may pull the most accurate mix under the budget when a less damaged one read worse
            raise unreachable(max(evals, key=lambda e: e.fitted))
        return min(met, key=lambda e: e.cost)

    # the most accurate end of the path first: if it fails, nothing on the path can pass
    best = evaluate(path[-1], "most accurate")
    if not best.met:
        raise unreachable(best)
    lo, hi = 0, len(path) - 1  # path[hi] meets the budget
    while lo < hi and len(evals) < config.max_evals:
        mid = (lo + hi) // 2
        if evaluate(path[mid], "path").met:
            hi = mid
        else:
            lo = mid + 1
    chosen = cheapest_met()

    # greedy backoff: one layer at a time to its next cheaper format, least KL per cost saved first
    frozen: set[str] = set()
    while len(evals) < config.max_evals:
        moves = []
        for n in names:
            if n in frozen:
                continue
            cur = chosen.formats[n]
            cheaper = [f for f in cands[n] if cost[n][f] < cost[n][cur]]
            if not cheaper:
                continue
            f = max(cheaper, key=lambda g: (cost[n][g], -sens.kl[n][g]))  # the next step down
            dk = max(sens.kl[n][f] - sens.kl[n][cur], 0.0)
            moves.append((dk / (cost[n][cur] - cost[n][f]), n, f))
        if not moves:
            break
        _, n, f = min(moves)
        e = evaluate(dict(chosen.formats, **{n: f}), "backoff")
        if e.met and e.cost < chosen.cost:
            chosen = e
        else:
            frozen.add(n)
        chosen = cheapest_met()  # the fit may have moved a verdict
    bar.close()
    log("the mixes built, cheapest first:\n" + evaluation_table(evals, budget))
    q = models[tuple(chosen.formats[n] for n in names)]
    q.tvm_lowbit_auto = _result(budget, chosen, fp32, evals, sens, n_val, config, source, overlap)
    warn_report(q.tvm_lowbit_report, progress)
    log(q.tvm_lowbit_auto.summary())
    return q


def _shown(budget: Budget, reading: float) -> str:
    return {"drop": f"drop {-reading:.2f} pp", "agree": f"{reading:.2f}%", "cos": f"{reading:.4f}"}[budget.kind]


def evaluation_table(evals: list[Evaluation], budget: Budget) -> str:
    """One line per built mix, cheapest first: bits, reading, damage, fitted reading, verdict."""
    head = f"{'stage':14s} {'bits':>6s} {'agree %':>8s} {'cos min':>8s} {'damage':>9s} {'fitted':>14s} verdict"
    rows = [f"{e.stage:14s} {e.avg_weight_bits:6.2f} {e.agree:8.2f} {e.cos_min:8.4f} {e.damage:9.5f} "
            f"{_shown(budget, e.fitted):>14s} {'meets' if e.met else 'misses'}" for e in sorted(evals, key=lambda e: e.cost)]
    return "\n".join([head, *rows])


def _result(budget: Budget, e: Evaluation, fp32: float, evals: list[Evaluation], sens: Sensitivity,
            n_val: int, config: Auto, source: str, overlap: int) -> AutoResult:
    return AutoResult(budget, dict(e.formats), fp32, e.top1, e.agree, e.drop, e.cost, e.weight_bytes,
                      e.avg_weight_bits, e.met, list(evals), sens, n_val, e.cos_min, config.margin, source, overlap,
                      config.confidence)


def shared_rows(a: Batch, b: Batch) -> int:
    """How many inputs of ``b`` are also inputs of ``a`` (equal bytes in every tensor of the input)."""
    def keys(x: Batch) -> list[bytes]:
        parts = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, tuple) else [x]
        flat = [t.detach().cpu().contiguous().reshape(t.shape[0], -1).numpy() for t in parts]
        return [b"".join(f[i].tobytes() for f in flat) for i in range(inputs.batch_len(x))]
    seen = set(keys(a))
    return sum(k in seen for k in keys(b))
