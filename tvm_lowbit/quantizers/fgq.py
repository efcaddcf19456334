"""FGQ: post-training grouped-ternary weights with 8/4-bit activations (Mellempudi et al. 2017).

Procedure (``quantize_fgq``), on a copy of the model unless ``inplace``:

1. every Conv2d/Linear the configuration selects is replaced by a fake-quant layer whose weight is
   ternarized in static groups of N input channels per (output channel, kernel position), with the
   exact per-group solver (``qmath.ternarize_groups``) and an integer-coded alpha;
2. activation ranges are calibrated on the calibration data (min-max, percentile, MSE of the
   layer input or of the layer output; ``auto`` picks per bit width);
3. batch-norm statistics are re-estimated with the quantized network, and activations recalibrated;
   layers with no batch norm after them get their bias corrected (output mean float - quantized);
4. each batch norm that directly follows a quantized conv is folded into that layer's per-channel
   epilogue, so the exported graph is conv -> epilogue with no separate batch norm.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tvm_lowbit import qmath
from tvm_lowbit.quantizers import calibrate, inputs, surgery
from tvm_lowbit.quantizers.config import SchemeConfig
from tvm_lowbit.quantizers.surgery import analyze

LAYER_POLICIES = ("float", "fgq", "int8")
_LAYER_KEYS = ("group_size", "act_bits", "threshold", "alpha_bits", "calibration", "percentile")


@dataclass(frozen=True)
class FGQ(SchemeConfig):
    """Configuration of FGQ post-training quantization.

    group_size: N, weights sharing one alpha (4 in the paper's headline results; 64 saves ~99% of
    multiplies).  act_bits: 8 or 4 (2..8 accepted).  threshold: ``exact`` (L2-optimal, default),
    ``twn`` (0.7 * mean|w|) or ``asym`` (separate positive/negative thresholds, one alpha).
    alpha_bits: width of the integer alpha codes (against a per-channel float scale).
    calibration: ``minmax`` | ``percentile`` | ``mse`` (input MSE) | ``entropy`` (TensorRT's KL) |
    ``mse_out`` (MSE of the layer's output) | ``best`` (per tensor, the one of minmax / percentile /
    mse / entropy with the least layer-output error) | ``auto`` (default: ``mse`` at 8 bits, ``percentile`` below; chosen from measurements on
    ResNet-20/Fashion-MNIST).  bn_reestimate: shift batch-norm
    statistics by what quantization changed in their inputs (relative to the float network on the
    same calibration inputs, ``surgery.correct_batchnorm``).  bias_correction: for quantized layers with no batch
    norm right after them (whose output mean BN re-estimation cannot fix), shift the bias by the
    per-channel mean output difference float - quantized on the calibration data (each of the two is
    kept only if it lowers the output error on held-out calibration inputs).  act_mode: ``static``
    (calibrated scales, lowered to integer kernels), ``dynamic`` (per-token scales on Linear inputs,
    stays float when compiled) or ``auto`` (dynamic only on Linear layers where static fails).
    first_layer / last_layer: ``float`` (keep in float, as most ternary work does), ``fgq`` or ``int8``
    (8-bit integers, one scale per output channel; the first layer's default: its few input channels make
    groups degenerate, and int8 keeps the stem integer).  overrides: module-name pattern (fnmatch) -> ``"float"`` to
    keep a layer in float, or a dict of the per-layer keys above; later patterns win.
    """

    SCHEME = "fgq"
    VERSION = 1

    group_size: int = 4
    act_bits: int = 8
    threshold: str = "exact"
    alpha_bits: int = 7
    calibration: str = "auto"
    percentile: float = 99.99
    bn_reestimate: bool = True
    bias_correction: bool = True
    act_mode: str = "static"
    first_layer: str = "int8"
    last_layer: str = "float"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_layer_settings(asdict(self), where="FGQ")
        for name in ("first_layer", "last_layer"):
            if getattr(self, name) not in LAYER_POLICIES:
                raise ValueError(f"FGQ {name}={getattr(self, name)!r}: use one of {', '.join(LAYER_POLICIES)}")
        if not isinstance(self.overrides, Mapping):
            raise TypeError("FGQ overrides must be a mapping of module-name pattern -> 'float' or dict of settings")
        for pattern, ov in self.overrides.items():
            if ov is None or ov == "float":
                continue
            if not isinstance(ov, Mapping):
                raise ValueError(f"FGQ override {pattern!r}: use 'float' or a dict with keys {', '.join(_LAYER_KEYS)}")
            unknown = set(ov) - set(_LAYER_KEYS)
            if unknown:
                raise ValueError(f"FGQ override {pattern!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                                 f"per-layer options are {', '.join(_LAYER_KEYS)}")
            _check_layer_settings(dict(ov), where=f"FGQ override {pattern!r}")
        if self.batch_size < 1:
            raise ValueError(f"FGQ batch_size must be >= 1, got {self.batch_size}")
        if self.act_mode not in calibrate.ACT_MODES:
            raise ValueError(f"FGQ act_mode {self.act_mode!r}: use one of {', '.join(calibrate.ACT_MODES)}")

    def calibration_method(self) -> str:
        """The calibration method this setting uses (resolves ``auto`` by activation bits)."""
        return self.calibration if self.calibration != "auto" else calibrate.auto_method(self.act_bits)

    def settings_for(self, name: str, position: str | None) -> "FGQ | None":
        """The effective settings of layer ``name`` (``position`` is 'first', 'last' or None), or None
        if the layer stays in float."""
        cfg: FGQ | None = self
        if position == "first" and self.first_layer == "float":
            cfg = None
        if position == "last" and self.last_layer == "float":
            cfg = None
        for pattern, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                cfg = None if ov is None or ov == "float" else replace(self, **dict(ov))
        return cfg


def _check_layer_settings(s: dict[str, Any], where: str) -> None:
    if "group_size" in s and (not isinstance(s["group_size"], int) or s["group_size"] < 1):
        raise ValueError(f"{where}: group_size must be an integer >= 1, got {s['group_size']!r}")
    if "act_bits" in s and (not isinstance(s["act_bits"], int) or not 2 <= s["act_bits"] <= 8):
        raise ValueError(f"{where}: act_bits must be an integer in 2..8, got {s['act_bits']!r}")
    if "alpha_bits" in s and (not isinstance(s["alpha_bits"], int) or not 2 <= s["alpha_bits"] <= 8):
        raise ValueError(f"{where}: alpha_bits must be an integer in 2..8, got {s['alpha_bits']!r}")
    if "threshold" in s and s["threshold"] not in qmath.THRESHOLD_MODES:
        raise ValueError(f"{where}: unknown threshold {s['threshold']!r}; use one of {', '.join(qmath.THRESHOLD_MODES)}")
    if "calibration" in s and s["calibration"] not in (*calibrate.CALIB_METHODS, "auto"):
        raise ValueError(f"{where}: unknown calibration {s['calibration']!r}; "
                         f"use one of auto, {', '.join(calibrate.CALIB_METHODS)}")
    if "percentile" in s and not 50.0 < float(s["percentile"]) <= 100.0:
        raise ValueError(f"{where}: percentile must be in (50, 100], got {s['percentile']!r}")


def _policy(name: str, order: list[str], config: FGQ) -> str:
    """``int8`` for a first/last layer whose policy says so (unless an override names it), else ``fgq``."""
    pos = "first" if name == order[0] else "last" if name == order[-1] else None
    policy = config.first_layer if pos == "first" else config.last_layer if pos == "last" else "fgq"
    if any(fnmatch.fnmatchcase(name, p) for p in config.overrides):
        return "fgq"
    return policy


def _choose(order: list[str], config: FGQ) -> dict[str, FGQ]:
    chosen: dict[str, FGQ] = {}
    for i, name in enumerate(order):
        pos = "first" if i == 0 else "last" if i == len(order) - 1 else None
        cfg = config.settings_for(name, pos)
        if cfg is not None:
            chosen[name] = cfg
    return chosen


def selected_layers(model: nn.Module, config: FGQ, example: object) -> dict[str, FGQ]:
    """Layer name -> effective settings, for the Conv2d/Linear layers ``config`` would quantize
    (in execution order; ``example`` is one input batch: a tensor, tuple or dict)."""
    return _choose(analyze(model, inputs.as_batch(example)).order, config)


def quantize_fgq(model: nn.Module, config: FGQ, calib_data: object, *, inplace: bool = False,
                 progress: bool = True) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() takes a torch.nn.Module, got {type(model).__name__}")
    first_batch = next(inputs.iterate_batches(calib_data, config.batch_size, inputs.positional_inputs(model)))
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    graph = analyze(qmodel, inputs.take(first_batch, 0, 1))
    order = graph.order
    if not order:
        why = "; ".join(str(s) for s in graph.skipped[:4])
        raise ValueError("the model has no quantizable layer (no nn.Conv2d or nn.Linear weight use is called in "
                         f"forward){': ' + why if why else ''}")
    chosen = _choose(order, config)
    if not chosen:
        raise ValueError(f"no layer left to quantize: all {len(order)} Conv2d/Linear layers are kept in float by "
                         "first_layer/last_layer/overrides; relax the policy (e.g. first_layer='fgq')")

    weights = {}
    bar = tqdm(chosen.items(), desc="ternarizing weights", disable=not progress, leave=False)
    for name, cfg in bar:
        w = graph.uses[name].weight
        if not torch.isfinite(w).all():
            raise ValueError(f"layer {name!r}: weight {tuple(w.shape)} holds NaN/Inf values; fix or retrain the "
                             f"model, or keep the layer in float with overrides={{{name!r}: 'float'}}")
        if _policy(name, order, config) == "int8":
            weights[name] = qmath.int_quantize_weight(w, 8)
            continue
        weights[name] = qmath.ternarize_weight(w, cfg.group_size, cfg.threshold, cfg.alpha_bits)  # type: ignore[arg-type]
    why = {n: "kept float by first_layer/last_layer/overrides" for n in order if n not in chosen}
    q = surgery.build_fake_quant(
        qmodel, weights, calib_data, act_bits={n: c.act_bits for n, c in chosen.items()},
        calibration={n: (c.calibration_method(), c.percentile) for n, c in chosen.items()},
        bn_reestimate=config.bn_reestimate, bias_correction=config.bias_correction, batch_size=config.batch_size,
        progress=progress, inplace=True, reference=model, graph=graph, float_layers=why, act_mode=config.act_mode,
        config=config.to_dict())
    surgery.warn_report(q.tvm_lowbit_report, progress)
    return q
