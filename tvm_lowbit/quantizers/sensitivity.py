"""Per-layer sensitivity: the damage each candidate weight format does when it is the only change.

For every quantizable layer L and format F, layer L alone gets F's weight and the integer activation
pipeline (its input quantized with the scale FGQ's calibration picks on the FP32 network), its output
mean is corrected per channel on the calibration images (what batch-norm re-estimation / bias
correction do in the full pipeline), every other layer stays FP32, and the damage is the mean
KL(FP32 softmax || softmax with L in F) over the calibration images.  The float input of L is
captured once per layer, so each (L, F) costs one network forward.

Results are cached as JSON, keyed by a hash of the model's weights, the images and the settings; they
print as a table (``Sensitivity.table``) and draw as a layer x format heat map (``Sensitivity.plot``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tvm_lowbit import qmath
from tvm_lowbit.formats import Format, parse_format, weight_bytes
from tvm_lowbit.quantizers import calibrate, inputs
from tvm_lowbit.quantizers.inputs import Batch
from tvm_lowbit.quantizers.layers import (WeightUse, make_quant_layer, observe_module, unobserve_module, unwrap_module,
                                          wrap_module)
from tvm_lowbit.quantizers.surgery import analyze

CACHE_VERSION = 2
SENSITIVITY_MODES = ("full", "proxy")
CAPTURE_BYTES = 384 << 20  # layer inputs captured by one forward: at most this many bytes for all images


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted layer input is captured."""


@dataclass
class Sensitivity:
    """``kl[layer][format]``: the damage of one layer in one format (0 for ``float``);
    ``bytes[layer][format]``: what that layer's weight stores in that format."""

    layers: list[str]
    formats: list[str]
    kl: dict[str, dict[str, float]]
    bytes: dict[str, dict[str, int]]
    numel: dict[str, int]
    images: int = 0
    key: str = ""
    from_cache: bool = False
    info: dict = field(default_factory=dict)

    def table(self, digits: int = 4) -> str:
        """The KL table as text: one row per layer (with its weight count), one column per format."""
        w = max(12, *(len(n) for n in self.layers)) + 2
        head = f"{'layer':{w}s}{'weights':>9s}" + "".join(f"{f:>12s}" for f in self.formats)
        lines = [f"output KL vs FP32 of one layer quantized alone ({self.images} calibration images)", head]
        for n in self.layers:
            row = f"{n:{w}s}{self.numel[n]:9d}"
            for f in self.formats:
                v = self.kl[n].get(f, float("nan"))
                row += f"{v:12.{digits}g}" if f != "float" else f"{0:12d}"
            lines.append(row)
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> Path:
        """Save the layer x format heat map of log10 KL as a PNG (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise RuntimeError("the sensitivity heat map needs matplotlib: `pip install matplotlib` "
                               "(scripts/setup.sh installs it); the table (Sensitivity.table()) needs nothing") from e
        fmts = [f for f in self.formats if f != "float"]
        data = np.array([[self.kl[n].get(f, np.nan) for f in fmts] for n in self.layers], np.float64)
        logd = np.log10(np.maximum(data, 1e-8))
        fig, ax = plt.subplots(figsize=(1.1 * len(fmts) + 3.5, 0.28 * len(self.layers) + 1.8))
        im = ax.imshow(logd, aspect="auto", cmap="magma_r")
        ax.set_xticks(range(len(fmts)), fmts, rotation=30, ha="right")
        ax.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
        ax.set_xlabel("weight format")
        ax.set_title(title or f"log10 output KL vs FP32, one layer quantized ({self.images} images)", fontsize=9)
        fig.colorbar(im, ax=ax, label="log10 KL")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("from_cache")
        return d


def default_cache_dir() -> Path:
    return Path(os.environ.get("TVM_LOWBIT_CACHE") or Path.home() / ".cache" / "tvm_lowbit") / "sensitivity"


def _hash(model: nn.Module, images: Batch, settings: dict) -> str:
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    parts = images.items() if isinstance(images, dict) else enumerate(images) if isinstance(images, tuple) else [("", images)]
    for k, t in parts:
        h.update(str(k).encode())
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _logits(net: nn.Module, batches: list[Batch]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([inputs.rows(inputs.call(net, b), inputs.batch_len(b)) for b in batches])


def kl_div(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(logits))."""
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def cos_damage(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean over rows of 1 - cosine(ref, got) (embedding models)."""
    return float(1.0 - torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1, eps=1e-12).mean())


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {"kl": kl_div, "cos": cos_damage}


def observe_call_inputs(model: nn.Module, layers: list[str], seen: Callable[[str, torch.Tensor], None]
                        ) -> Callable[[], None]:
    """Call ``seen(layer, x)`` with the input of each layer's conv/linear call (after any padding its
    forward does) from now on; returns the function that stops it."""
    mods = {n: model.get_submodule(n) for n in layers}
    for n, m in mods.items():
        observe_module(m, lambda _f, a, k, _o, n=n: seen(n, a[0] if a else k["input"]))

    def stop() -> None:
        for m in mods.values():
            unobserve_module(m)
    return stop


def input_scales(model: nn.Module, layers: list[str], batches: list[Batch], act_bits: int,
                 method: str, percentile: float = 99.99, input_bytes: dict[str, int] | None = None
                 ) -> dict[str, tuple[float, bool]]:
    """(scale, signed) of each layer's input on the FP32 network, by an input-based calibration method
    (``mse_out`` needs a quantized layer; it falls back to ``mse`` here).  ``input_bytes``, if given, is
    filled with the bytes of each layer's first input (per batch, summed over the batches)."""
    if method not in calibrate.INPUT_METHODS:
        method = "mse"
    obs = {n: calibrate.Observer(seed=i) for i, n in enumerate(layers)}
    first: dict[str, int] = {}

    def seen(n: str, x: torch.Tensor) -> None:
        obs[n](None, (x,))
        if n not in first:
            first[n] = x.numel() * x.element_size()

    stop = observe_call_inputs(model, layers, seen)
    try:
        with torch.no_grad():
            for b in batches:
                first.clear()
                inputs.call(model, b)
                if input_bytes is not None:
                    for n, v in first.items():
                        input_bytes[n] = input_bytes.get(n, 0) + v
    finally:
        stop()
    out = {}
    for n in layers:
        ob = obs[n]
        signed = ob.lo < 0
        c = calibrate.clip_value(ob.samples(), ob.lo, ob.hi, act_bits, signed, method, percentile)  # type: ignore[arg-type]
        out[n] = (qmath.scale_for_range(c, act_bits, signed), signed)
    return out


def capture_inputs(model: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, list[torch.Tensor]]:
    """The input of each layer of ``names`` (its first call per batch) on every batch, in one forward
    per batch that stops once all of them are seen."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    want = set(names)
    seen_now: set[str] = set()

    def seen(n: str, x: torch.Tensor) -> None:
        if n in seen_now:
            return
        seen_now.add(n)
        got[n].append(x.detach())
        if seen_now == want:
            raise _Stop

    stop = observe_call_inputs(model, names, seen)
    try:
        with torch.no_grad():
            for b in batches:
                seen_now.clear()
                try:
                    inputs.call(model, b)
                except _Stop:
                    pass
    finally:
        stop()
    return got


def capture_chunks(names: list[str], input_bytes: dict[str, int], limit: int = CAPTURE_BYTES) -> list[list[str]]:
    """``names`` (in execution order) cut into runs whose captured inputs (``input_bytes`` per layer,
    all images) stay under ``limit`` bytes together (a layer above it alone is a run of its own)."""
    chunks: list[list[str]] = []
    size = 0
    for n in names:
        if chunks and size + input_bytes.get(n, 0) <= limit:
            chunks[-1].append(n)
            size += input_bytes.get(n, 0)
        else:
            chunks.append([n])
            size = input_bytes.get(n, 0)
    return chunks


def _channel_mean(y: torch.Tensor, dim: int) -> torch.Tensor:
    dims = [d for d in range(y.dim()) if d != dim % y.dim()]
    return y.float().mean(dims).double() if dims else y.double()  # no float64 copy of y


def layer_sensitivity(model: nn.Module, images: object, formats: list[str] | tuple[str, ...],
                      *, layers: list[str] | None = None, candidates: dict[str, list[str]] | None = None,
                      act_bits: int = 8, calibration: str = "auto", bias_correction: bool = True,
                      batch_size: int = 64, cache_dir: str | os.PathLike[str] | None = None, use_cache: bool = True,
                      weight_fn: Callable[[str, Format], object] | None = None, weight_fn_key: str = "nearest",
                      progress: bool = True, uses: dict[str, WeightUse] | None = None, metric: str = "kl",
                      mode: str = "full") -> Sensitivity:
    """Measure (or load from the cache) the damage of every layer x format (see the module docstring).

    ``images``: calibration inputs (a tensor, or any form ``quantizers.inputs`` reads).  ``layers``:
    Conv2d/Linear names (default: all, in execution order); ``candidates``: per-layer format lists
    (default: ``formats`` for every layer).  ``weight_fn(layer, format)``: the quantized weight to use
    (default ``format.quantize(weight)``), named by ``weight_fn_key`` in the cache key.  ``uses``: each
    layer's weight use (``surgery.analyze``; read off the model when None).  ``metric``: ``kl``
    (softmax outputs, classifiers) or ``cos`` (1 - cosine of the outputs, embedding models).
    ``mode``: ``full`` (one network forward per layer x format) or ``proxy`` (one network forward per
    layer: the damage of one probe format is measured, every other format's is that damage scaled by
    the ratio of the layer's own output errors on its captured inputs, ``SENSITIVITY_MODES``).
    """
    if mode not in SENSITIVITY_MODES:
        raise ValueError(f"sensitivity mode {mode!r}: use one of {', '.join(SENSITIVITY_MODES)}")
    if metric not in METRICS:
        raise ValueError(f"sensitivity metric {metric!r}: use one of {', '.join(METRICS)}")
    fmts = [parse_format(f) for f in formats]
    x = inputs.gather(images if not isinstance(images, np.ndarray) else inputs.as_tensor(images), batch_size,
                      n_inputs=inputs.positional_inputs(model))
    if inputs.batch_len(x) == 0:
        raise ValueError("sensitivity analysis needs calibration images (got none)")
    model = copy.deepcopy(model).cpu().eval()
    batches = inputs.split(x, batch_size)
    if uses is None or layers is None:
        graph = analyze(model, inputs.take(x, 0, 1))
        uses = graph.uses if uses is None else uses
        layers = graph.order if layers is None else layers
    names = list(layers)
    if not names:
        raise ValueError("the model has no Conv2d/Linear layer to quantize")
    cand = {n: [parse_format(f).name for f in (candidates or {}).get(n, [f.name for f in fmts])] for n in names}
    all_fmts = list(dict.fromkeys([f.name for f in fmts] + [f for c in cand.values() for f in c]))
    method = calibration if calibration != "auto" else calibrate.auto_method(act_bits)
    settings = {"v": CACHE_VERSION, "layers": names, "candidates": cand, "act_bits": act_bits, "method": method,
                "bias_correction": bias_correction, "weights": weight_fn_key, "metric": metric}
    if mode != "full":
        settings["mode"] = mode
    key = _hash(model, x, settings)
    cache_file = Path(cache_dir or default_cache_dir()) / f"{key[:20]}.json"
    if use_cache and cache_file.is_file():
        try:
            d = json.loads(cache_file.read_text())
            return Sensitivity(d["layers"], d["formats"], d["kl"], d["bytes"], d["numel"], d["images"], key, True,
                               d.get("info", {}))
        except (ValueError, KeyError):
            pass  # a damaged cache file is recomputed and rewritten

    score = METRICS[metric]
    ref = _logits(model, batches)
    sizes: dict[str, int] = {}
    scales = input_scales(model, names, batches, act_bits, method, input_bytes=sizes)
    chunk_of = {n: c for c in capture_chunks(names, sizes, CAPTURE_BYTES) for n in c}
    captured: dict[str, list[torch.Tensor]] = {}
    kl: dict[str, dict[str, float]] = {n: {} for n in names}
    nbytes: dict[str, dict[str, int]] = {n: {} for n in names}
    numel = {n: int(uses[n].weight.numel()) for n in names}
    todo = sum(len(c) for c in cand.values())
    bar = tqdm(total=todo, desc="layer sensitivity", disable=not progress, leave=False)
    for name in names:
        module = model.get_submodule(name)
        use = uses[name]
        w = use.weight
        xin = None
        ref_out: list[torch.Tensor] | None = None  # the float layer on its captured inputs, for every format
        layer_q: dict[str, object] = {}
        errs: dict[str, float] = {}
        for fname in cand[name]:
            fmt = parse_format(fname)
            tw = weight_fn(name, fmt) if weight_fn is not None else fmt.quantize(w)
            nbytes[name][fname] = weight_bytes(tw, numel[name])
            if fmt.is_float:
                kl[name][fname] = 0.0
                bar.update()
                continue
            q = make_quant_layer(name, use, tw, act_bits)
            q.set_activation(*scales[name])
            q.fast = True  # a damage estimate: float32 integer ops are close enough
            if bias_correction or mode == "proxy":
                if xin is None:
                    if name not in captured:  # this layer's run of layers: their inputs in one forward
                        captured = capture_inputs(model, chunk_of[name], batches)
                    xin = captured.pop(name)
                with torch.no_grad():  # one pass of the quantized layer per format
                    if ref_out is None:
                        ref_out = [q.float_op(b, w, q.bias) for b in xin]
                    outs = [q(b) for b in xin]
                if bias_correction:
                    diff = sum(_channel_mean(r, q.channel_dim) - _channel_mean(o, q.channel_dim)
                               for r, o in zip(ref_out, outs)) / len(xin)
                    q.bias += diff.float()
                    q.refresh_epilogue()
                if mode == "proxy":
                    # the layer's own output error on its captured inputs (a bias shift cancels out of it)
                    errs[fname] = sum(float(torch.square(o - r).mean()) for o, r in zip(outs, ref_out))
                    layer_q[fname] = q
                    continue
                del outs
            wrap_module(module, q)
            try:
                kl[name][fname] = score(ref, _logits(model, batches))
            finally:
                unwrap_module(module)
            bar.update()
        if layer_q:
            ordered = sorted(errs, key=lambda f: errs[f])
            probe = ordered[len(ordered) // 2]  # the median error: the scaling is linear around it
            wrap_module(module, layer_q[probe])  # type: ignore[arg-type]
            try:
                measured = score(ref, _logits(model, batches))
            finally:
                unwrap_module(module)
            gain = measured / errs[probe] if errs[probe] > 0 else 0.0
            for f in layer_q:
                kl[name][f] = measured if f == probe else gain * errs[f]
                bar.update()
        xin = ref_out = None
    bar.close()
    res = Sensitivity(names, all_fmts, kl, nbytes, numel, inputs.batch_len(x), key, False,
                      {"act_bits": act_bits, "calibration": method, "bias_correction": bias_correction,
                       "weights": weight_fn_key, "metric": metric, "mode": mode})
    bad = [(n, f) for n in names for f, v in kl[n].items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"layer sensitivity is not finite for {bad[:3]}: NaN/Inf in the model's outputs")
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(res.to_json()))
            tmp.replace(cache_file)
        except OSError:
            pass  # a read-only cache only costs the recomputation
    return res
