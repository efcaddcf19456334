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
   built model, never on a sum of estimates.
4. **Greedy backoff**: from that mix, single layers step down to a cheaper format (least KL added per
   byte saved first); each step is evaluated and kept only if the budget still holds.

Repair is cheap and post-training: bias correction (batch-norm re-estimation, and FGQ's per-channel
mean correction for layers with no batch norm after them) and, by default, GPTQ-style rounding of
the integer and ternary codes against each layer's FP32 output (``quantizers.rounding``).

The cost is the weight bytes of the compiled model (``cost="bytes"``, see ``tvm_lowbit.formats``) or a
user table: a mapping format -> cost per weight (e.g. latency per weight measured on a board), or a
callable ``(layer, format, numel, nbytes) -> cost``.

The budget is checked on ``val_data`` (never the calibration data): ``budget=1.0`` or ``"drop<=1.0"``
allows a top-1 drop of at most 1 point against FP32 on it; ``"agree>=99.5"`` asks that at least
99.5 % of its predictions equal FP32's.  An unreachable budget raises :class:`BudgetError` holding
the best mix found and its cost.
"""

from __future__ import annotations

import copy
import fnmatch
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
from tvm_lowbit.quantizers import calibrate
from tvm_lowbit.quantizers.config import SchemeConfig
from tvm_lowbit.quantizers.rounding import input_hessians, refine
from tvm_lowbit.quantizers.sensitivity import Sensitivity, layer_sensitivity
from tvm_lowbit.quantizers.surgery import build_fake_quant, conv_bn_pairs, correct_bias, execution_order

DEFAULT_FORMATS = ("ternary-n16", "ternary", "pow2-3", "pow2-4", "pow2-5", "int4", "int8", "float")
ROUNDINGS = ("nearest", "gptq")
_BUDGET = re.compile(r"^\s*(drop|agree)\s*(<=|>=|=)?\s*([-+]?\d+(?:\.\d*)?)\s*(?:%|pp|pt)?\s*$")


class BudgetError(ValueError):
    """The accuracy budget cannot be met with the allowed formats; ``best`` is the most accurate mix
    evaluated (an :class:`AutoResult`) and ``model`` its fake-quant model."""

    def __init__(self, msg: str, best: "AutoResult", model: nn.Module) -> None:
        super().__init__(msg)
        self.best = best
        self.model = model


@dataclass(frozen=True)
class Budget:
    kind: str      # "drop": max top-1 drop in points vs FP32; "agree": min % agreement with FP32
    value: float

    def met(self, drop: float, agree: float) -> bool:
        return drop <= self.value + 1e-9 if self.kind == "drop" else agree >= self.value - 1e-9

    def __str__(self) -> str:
        return f"drop<={self.value:g}pp" if self.kind == "drop" else f"agree>={self.value:g}%"


def parse_budget(budget: float | int | str) -> Budget:
    if isinstance(budget, bool):
        raise TypeError("Auto budget: pass a number (max top-1 drop in points) or 'drop<=X' / 'agree>=Y'")
    if isinstance(budget, (int, float)):
        return Budget("drop", float(budget))
    m = _BUDGET.match(str(budget).lower())
    if m is None:
        raise ValueError(f"Auto budget {budget!r}: use a number (max top-1 drop in points vs FP32 on the "
                         "validation data), 'drop<=1.0' or 'agree>=99.5' (min % of predictions equal to FP32's)")
    kind, value = m.group(1), float(m.group(3))
    if kind == "agree" and not 0 <= value <= 100:
        raise ValueError(f"Auto budget {budget!r}: agreement is a percentage in 0..100")
    return Budget(kind, value)


@dataclass(frozen=True)
class Auto(SchemeConfig):
    """Per-layer precision search (see the module docstring).

    budget: max top-1 drop in points (a number or ``"drop<=X"``) or ``"agree>=Y"`` (% agreement with
    FP32), on ``val_data``.  cost: ``"bytes"``, a mapping format -> cost per weight, or a callable
    ``(layer, format, numel, nbytes) -> cost``.  formats: candidate formats for every layer
    (``tvm_lowbit.formats``).  overrides: module-name pattern (fnmatch) -> a format or list of formats
    for matching layers (later patterns win), e.g. ``{"classifier": "int8"}``.  act_bits /
    calibration / bn_reestimate / bias_correction: the activation pipeline, as in FGQ.  rounding:
    ``gptq`` (default: integer and ternary codes refined against each layer's FP32 output on
    ``rounding_images`` calibration images, ``quantizers.rounding``; same scales, same compiled form)
    or ``nearest``.  On the built-in mobilenet at a 0.5-point budget, gptq reached 3.53 average weight
    bits where nearest rounding needed 3.86 (scripts/bench_accuracy.py).
    sensitivity_images: calibration images the sensitivity pass uses.  max_evals: how many mixes may
    be built and evaluated on the validation data.  cache_dir / use_cache: the sensitivity cache
    (default ``$TVM_LOWBIT_CACHE`` or ``~/.cache/tvm_lowbit``).
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
    rounding: str = "gptq"
    rounding_images: int = 256
    sensitivity_images: int = 512
    max_evals: int = 14
    batch_size: int = 64
    cache_dir: str | None = None
    use_cache: bool = True

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
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"Auto rounding {self.rounding!r}: use one of {', '.join(ROUNDINGS)}")
        if self.max_evals < 1 or self.sensitivity_images < 1 or self.batch_size < 1 or self.rounding_images < 1:
            raise ValueError("Auto max_evals, sensitivity_images and batch_size must be >= 1")

    def candidates(self, name: str) -> list[str]:
        out = [parse_format(f).name for f in self.formats]
        for pattern, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                out = [parse_format(f).name for f in ([ov] if isinstance(ov, str) else list(ov))]
        return out

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

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        mix = ", ".join(f"{n} {f}" for f, n in sorted(counts.items(), key=lambda t: -t[1]))
        state = "meets" if self.met else "does NOT meet"
        return (f"Auto: {len(self.formats)} layers ({mix}); {self.avg_weight_bits:.2f} avg weight bits, "
                f"{self.weight_bytes:,d} weight bytes; on {self.val_images} validation images top-1 "
                f"{self.top1:.2f}% (FP32 {self.fp32_top1:.2f}%, drop {self.drop:.2f} pp), agreement with "
                f"FP32 {self.agree:.2f}%: {state} the budget {self.budget} ({len(self.evaluations)} mixes evaluated)")

    def table(self) -> str:
        lines = [f"{'layer':28s} format"] + [f"{n:28s} {f}" for n, f in self.formats.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Building and evaluating one mix
# --------------------------------------------------------------------------------------------

class WeightMaker:
    """Quantized weights of one model's layers, made once per (layer, format): rounded to nearest, or
    with GPTQ codes (``rounding="gptq"``) from input statistics gathered on the FP32 network."""

    def __init__(self, model: nn.Module, rounding: str = "nearest", images: torch.Tensor | None = None,
                 layers: list[str] | None = None) -> None:
        self.model = model
        self.rounding = rounding
        self.cache: dict[tuple[str, str], Any] = {}
        self.hessians: dict[str, torch.Tensor] = {}
        if rounding == "gptq":
            if images is None or layers is None:
                raise ValueError("GPTQ rounding needs calibration images and the layer names")
            self.hessians = input_hessians(model, layers, images)

    def __call__(self, name: str, fmt: Format) -> Any:
        if (name, fmt.name) not in self.cache:
            w = self.model.get_submodule(name).weight.detach()
            tw = fmt.quantize(w)
            if tw is not None and name in self.hessians:
                tw = refine(tw, w, self.hessians[name])
            self.cache[(name, fmt.name)] = tw
        return self.cache[(name, fmt.name)]


def build_mixed(model: nn.Module, formats: Mapping[str, str], calib_data: object, config: Auto | None = None, *,
                weights: WeightMaker | None = None, progress: bool = False) -> nn.Module:
    """The fake-quant model with layer ``name`` in format ``formats[name]`` (``float`` or absent: stays
    float), through the FGQ activation pipeline: calibration, batch-norm re-estimation, bias correction
    of layers with no batch norm after them, batch-norm folding.  ``weights`` makes (and caches) the
    quantized weights; by default they are rounded to nearest."""
    cfg = config or Auto()
    make = weights if weights is not None else WeightMaker(model)
    qw = {}
    for name, fname in formats.items():
        fmt = parse_format(fname)
        if not fmt.is_float:
            qw[name] = make(name, fmt)
    if not qw:
        q = copy.deepcopy(model).cpu().eval()
    else:
        q = build_fake_quant(model, qw, calib_data, act_bits=cfg.act_bits, calibration=cfg.method(),
                             bn_reestimate=cfg.bn_reestimate, batch_size=cfg.batch_size, progress=progress)
        if cfg.bias_correction:
            first = next(calibrate.iterate_batches(calib_data, cfg.batch_size))
            pairs = conv_bn_pairs(model)
            order = [n for n in execution_order(model.eval(), first[:1]) if n in qw and n not in pairs]
            correct_bias(model, q, order, calib_data, cfg.batch_size, progress)
    q.tvm_lowbit_config = cfg.to_dict()
    return q.eval()


def predictions(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    # small batches: a depthwise-separable net runs 2-4x faster on the CPU at 64 images than at 500
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, x.shape[0], batch)])


def _val_arrays(val_data: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) from (x, y), a dict with x/y, or x alone."""
    if isinstance(val_data, Mapping):
        x, y = val_data.get("x"), val_data.get("y")
    elif isinstance(val_data, (tuple, list)) and len(val_data) == 2:
        x, y = val_data
    else:
        x, y = val_data, None
    if x is None:
        raise ValueError("validation data: pass (images, labels) or images")
    xt = torch.as_tensor(np.asarray(x, np.float32) if not isinstance(x, torch.Tensor) else x).float()
    if xt.dim() < 2 or xt.shape[0] == 0:
        raise ValueError(f"validation images must be an array [n, ...] with n >= 1, got shape {tuple(xt.shape)}")
    yt = None
    if y is not None:
        yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().reshape(-1)
        if yt.shape[0] != xt.shape[0]:
            raise ValueError(f"validation data: {xt.shape[0]} images but {yt.shape[0]} labels")
    return xt, yt


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
    if val_data is None:
        raise ValueError(f"Auto(budget={config.budget!r}) needs validation data to verify the budget: call "
                         "quantize(model, Auto(...), calib_data, val_data) with val_data=(images, labels) held out "
                         "from training and calibration (labels may be omitted for an 'agree>=...' budget)")
    xv, yv = _val_arrays(val_data)
    if budget.kind == "drop" and yv is None:
        raise ValueError(f"a top-1 drop budget ({budget}) needs validation labels: pass val_data=(images, labels), "
                         "or use an agreement budget such as 'agree>=99.5'")
    model = copy.deepcopy(model).cpu().eval()
    calib = torch.cat(list(calibrate.iterate_batches(calib_data, config.batch_size)))
    try:
        names = execution_order(model, calib[:1])
    except Exception as e:
        raise ValueError(f"the model failed on a calibration batch of shape {tuple(calib[:1].shape)}: "
                         f"{type(e).__name__}: {e}") from e
    if not names:
        raise ValueError("the model has no quantizable layer (no nn.Conv2d or nn.Linear is called in forward)")
    try:
        model(xv[:1])
    except Exception as e:
        raise ValueError(f"the model failed on a validation batch of shape {tuple(xv[:1].shape)}: "
                         f"{type(e).__name__}: {e}") from e
    for n in names:
        if not torch.isfinite(model.get_submodule(n).weight).all():
            raise ValueError(f"layer {n!r}: weight holds NaN/Inf values; fix or retrain the model")
    cands = {n: config.candidates(n) for n in names}

    weights = WeightMaker(model, config.rounding, calib[:config.rounding_images], names)
    sub = calib[:config.sensitivity_images]
    sens = layer_sensitivity(model, sub, config.formats, layers=names, candidates=cands, act_bits=config.act_bits,
                             calibration=config.method(), bias_correction=config.bias_correction,
                             batch_size=config.batch_size, cache_dir=config.cache_dir, use_cache=config.use_cache,
                             weight_fn=weights, weight_fn_key=f"{config.rounding}:{config.rounding_images}",
                             progress=progress)
    cf = _cost_fn(config.cost)
    cost = {n: {f: cf(n, f, sens.numel[n], sens.bytes[n][f]) for f in cands[n]} for n in names}
    path = lagrangian_path(sens, cands, cost)

    ref = predictions(model, xv)
    fp32 = 100.0 * float((ref == yv).double().mean()) if yv is not None else float("nan")
    evals: list[Evaluation] = []
    models: dict[tuple, nn.Module] = {}
    bar = tqdm(total=config.max_evals, desc="verifying mixes on validation data", disable=not progress, leave=False)

    def evaluate(mix: dict[str, str], stage: str) -> Evaluation:
        key = tuple(mix[n] for n in names)
        for e in evals:
            if tuple(e.formats[n] for n in names) == key:
                return e
        t0 = time.time()
        q = build_mixed(model, mix, calib, config, weights=weights)
        pred = predictions(q, xv)
        agree = 100.0 * float((pred == ref).double().mean())
        top1 = 100.0 * float((pred == yv).double().mean()) if yv is not None else float("nan")
        drop = fp32 - top1 if yv is not None else float("nan")
        nbytes, _ = model_weight_bytes(q)
        e = Evaluation(dict(mix), sum(cost[n][mix[n]] for n in names), nbytes, avg_weight_bits(q), top1, agree, drop,
                       budget.met(drop, agree), stage, time.time() - t0)
        evals.append(e)
        models[key] = q
        bar.update()
        return e

    # the most accurate end of the path first: if it fails, nothing on the path can pass
    best = evaluate(path[-1], "most accurate")
    if not best.met:
        bar.close()
        res = _result(budget, best, fp32, evals, sens, xv.shape[0])
        raise BudgetError(f"the budget {budget} is unreachable with formats {', '.join(config.formats)}: the most "
                          f"accurate mix found (top-1 {best.top1:.2f}%, drop {best.drop:.2f} pp, agreement "
                          f"{best.agree:.2f}%) costs {best.cost:,.0f} ({best.weight_bytes:,d} weight bytes, "
                          f"{best.avg_weight_bits:.2f} avg weight bits); allow more formats (e.g. 'int8', "
                          "'float') or loosen the budget", res, models[tuple(best.formats[n] for n in names)])
    lo, hi = 0, len(path) - 1  # path[hi] meets the budget
    while lo < hi and len(evals) < config.max_evals:
        mid = (lo + hi) // 2
        if evaluate(path[mid], "path").met:
            hi = mid
        else:
            lo = mid + 1
    chosen = next(e for e in evals if tuple(e.formats[n] for n in names) == tuple(path[hi][n] for n in names))

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
    bar.close()
    q = models[tuple(chosen.formats[n] for n in names)]
    q.tvm_lowbit_auto = _result(budget, chosen, fp32, evals, sens, xv.shape[0])
    return q


def _result(budget: Budget, e: Evaluation, fp32: float, evals: list[Evaluation], sens: Sensitivity,
            n_val: int) -> AutoResult:
    return AutoResult(budget, dict(e.formats), fp32, e.top1, e.agree, e.drop, e.cost, e.weight_bytes,
                      e.avg_weight_bits, e.met, list(evals), sens, n_val)
