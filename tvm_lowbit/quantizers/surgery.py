"""Model surgery shared by every quantizer: read the model's graph, wrap layers, fold batch norms, correct
biases, and the one build pipeline that turns a float model plus integer weights into the fake-quant
model the compiler consumes.

``analyze(model, example)`` reads a model of any code: one forward on ``example`` (a tensor, tuple
or dict, ``quantizers.inputs``) records every ``nn.Conv2d`` / ``nn.Linear`` weight use (the
effective weight, bias and conv arguments the module's own forward passed to ``F.conv2d`` /
``F.linear``), and ``torch.export`` gives the execution order and the conv -> batch-norm pairs to fold.
Whatever cannot be quantized is named with its module path, class and reason (``ModelGraph.skipped``);
if ``torch.export`` fails, that is said, and the batch norms that then stay unfolded are named.

``build_fake_quant`` runs: wrap layers -> calibrate activations -> re-estimate batch norms relative to
the float network (kept only if it helps) -> recalibrate -> bias correction (kept only if it helps) -> fold batch norms into the
layers' epilogues.  "Helps" is measured on inputs the correction was not fitted on (the last quarter
of the calibration data): a correction fitted on a few inputs can hurt.  FGQ, Auto and the training
quantizers (INQ, SQ, PACT) all build through it.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from tvm_lowbit.quantizers import calibrate, inputs
from tvm_lowbit.quantizers.inputs import Batch
from tvm_lowbit.quantizers.layers import (QuantLayer, WeightUse, is_wrapped, make_quant_layer, observe_module,
                                          quant_layer, quant_layers, unobserve_module, unwrap_module, wrap_module)

DEFAULT_PERCENTILE = 99.99
CHECK_FRACTION = 0.25   # share of the calibration inputs held out to verify BN re-estimation / bias correction
MIN_CHECK = 4           # below 2 * MIN_CHECK calibration inputs, corrections are verified on the fit inputs
BIAS_FIT_MAX = 256      # bias correction fits on at most this many inputs (in one batch)
_EXPORT_CONV = ("aten.conv2d.default", "aten.convolution.default", "aten._convolution.default")
_EXPORT_LINEAR = ("aten.linear.default",)
_EXPORT_BN = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default",
              "aten.native_batch_norm.default", "aten.cudnn_batch_norm.default")
_NO_QUANTIZED_FORM = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.Bilinear)


@dataclass
class Skipped:
    """A layer left float: module path, class name, why."""

    path: str
    cls: str
    reason: str
    chosen: bool = False  # left float by the configuration (not because it cannot be quantized)

    def __str__(self) -> str:
        return f"{self.path} ({self.cls}): {self.reason}"


@dataclass
class ModelGraph:
    """What ``analyze`` read of a model: the quantizable layers in execution order with their weight
    uses, the conv -> batch norm pairs to fold, the layers that stay float (and why), and notes (e.g.
    that torch.export failed)."""

    order: list[str]
    uses: dict[str, WeightUse]
    bn_pairs: dict[str, str]
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exported: bool = False

    def reason(self, name: str) -> str | None:
        return next((s.reason for s in self.skipped if s.path == name), None)


@dataclass
class QuantReport:
    """What the quantizer did to each layer: ``quantized`` (path -> weight format), ``left_float``
    (path, class, reason), ``notes`` (export failures, corrections kept or dropped)."""

    quantized: dict[str, str] = field(default_factory=dict)
    left_float: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{len(self.quantized)} layer(s) quantized, {len(self.left_float)} left float"]
        lines += [f"  float: {s}" for s in self.left_float]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``model`` by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


# --------------------------------------------------------------------------------------------
# Reading the model
# --------------------------------------------------------------------------------------------

def _innermost(node: torch.fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return str(path), str(cls)


def _export_graph(model: nn.Module, example: Batch, uses: Mapping[str, WeightUse]
                  ) -> tuple[list[str], dict[str, str]]:
    """(execution order of the layers ``uses`` names, conv -> BN pairs) from ``torch.export``."""
    args, kwargs = inputs.export_args(example)
    ep = torch.export.export(model, args, kwargs, strict=False)
    mods = dict(model.named_modules())
    order: list[str] = []
    calls: dict[str, int] = {}
    convs: list[tuple[torch.fx.Node, str]] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        inner = _innermost(node)
        if inner is None:
            continue
        path = inner[0]
        if target in _EXPORT_CONV + _EXPORT_LINEAR + _EXPORT_BN:
            calls[path] = calls.get(path, 0) + 1
        if target in _EXPORT_CONV + _EXPORT_LINEAR and path in uses and path not in order:
            order.append(path)
        if target in _EXPORT_CONV and isinstance(mods.get(path), nn.Conv2d):
            convs.append((node, path))
    pairs: dict[str, str] = {}
    for node, path in convs:
        users = list(node.users)
        if len(users) != 1 or str(users[0].target) not in _EXPORT_BN or users[0].args[0] is not node:
            continue
        bn = _innermost(users[0])
        if bn is None or not isinstance(mods.get(bn[0]), nn.BatchNorm2d):
            continue
        if calls.get(path) == 1 and calls.get(bn[0]) == 1 and path in uses:
            pairs[path] = bn[0]
    return order, pairs


def _discover(model: nn.Module, example: Batch) -> tuple[list[str], dict[str, WeightUse], list[Skipped]]:
    """One forward on ``example`` with every Conv2d/Linear observed: the weight uses, in call order."""
    seen: dict[str, list[WeightUse]] = {}
    invoked: dict[str, int] = {}
    order: list[str] = []
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                  and not isinstance(m, QuantLayer) and not is_wrapped(m)}

    def recorder(name: str) -> Callable[[Callable, tuple, dict, Any], None]:
        def seen_call(func: Callable, args: tuple, kwargs: dict, _out: Any) -> None:
            seen.setdefault(name, []).append(WeightUse.from_call(func, args, kwargs))
            if name not in order:
                order.append(name)
        return seen_call

    handles = []
    for name, m in candidates.items():
        observe_module(m, recorder(name))
        handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: invoked.__setitem__(n, invoked.get(n, 0) + 1)))
    try:
        with torch.no_grad():
            inputs.call(model, example)
    finally:
        for name, m in candidates.items():
            unobserve_module(m)
        for h in handles:
            h.remove()
    uses: dict[str, WeightUse] = {}
    skipped: list[Skipped] = []
    for name, m in candidates.items():
        cls = type(m).__name__
        calls = seen.get(name, [])
        if not invoked.get(name) and not calls:
            skipped.append(Skipped(name, cls, "not called by forward() on the example input (if its weight is used, "
                                              "its parent's code reads it directly, which cannot be wrapped)"))
            continue
        if not calls:
            skipped.append(Skipped(name, cls, "its forward() made no F.conv2d/F.linear call on a weight of its weight's "
                                              "shape (it computes with e.g. torch.matmul, or a function imported under "
                                              "another name), so its weight use cannot be wrapped"))
            continue
        first = calls[0]
        if any(not first.same_call(c) for c in calls[1:]):
            skipped.append(Skipped(name, cls, f"its forward() uses its weight in {len(calls)} different calls; one "
                                              "quantized operator cannot stand for them"))
            continue
        uses[name] = first
    for name, m in model.named_modules():
        if isinstance(m, _NO_QUANTIZED_FORM):
            skipped.append(Skipped(name, type(m).__name__, f"{type(m).__name__} has no quantized form here "
                                                            "(only Conv2d and Linear weight uses are quantized)"))
    return [n for n in order if n in uses], uses, skipped


def analyze(model: nn.Module, example: Batch) -> ModelGraph:
    """Read ``model`` (in eval mode) on one ``example`` batch: see the module docstring."""
    was_training = model.training
    model.eval()
    try:
        try:
            order, uses, skipped = _discover(model, example)
        except Exception as e:
            raise ValueError(f"the model failed on a calibration batch {inputs.describe(example)}: "
                             f"{type(e).__name__}: {e}") from e
        graph = ModelGraph(order, uses, {}, skipped)
        bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        try:
            ex_order, pairs = _export_graph(model, example, uses)
        except Exception as e:  # noqa: BLE001 - any export failure is reported, not raised
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            graph.notes.append(f"torch.export failed on the model ({type(e).__name__}: {first[:200]}); execution "
                               "order read from one forward pass; batch norm(s) not folded into the quantized "
                               f"layer before them (they stay float ops): {', '.join(bns) if bns else 'none'}")
            return graph
        graph.exported = True
        graph.order = ex_order + [n for n in order if n not in ex_order]
        graph.bn_pairs = pairs
        return graph
    finally:
        model.train(was_training)


def execution_order(model: nn.Module, example: Batch) -> list[str]:
    """Names of the quantizable Conv2d/Linear modules in the order forward() calls them."""
    return analyze(model, example).order


def conv_bn_pairs(model: nn.Module, example: Batch) -> dict[str, str]:
    """conv name -> name of the BatchNorm2d that is the sole consumer of its output (via torch.export)."""
    return analyze(model, example).bn_pairs


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

def wrap_layer(model: nn.Module, name: str, use: WeightUse, tw: object, act_bits: int) -> QuantLayer:
    """Wrap module ``name`` of ``model`` with a QuantLayer computing ``use`` with weight ``tw``."""
    q = make_quant_layer(name, use, tw, act_bits)
    wrap_module(model.get_submodule(name), q)
    return q


def fold_batchnorms(qmodel: nn.Module, pairs: Mapping[str, str]) -> None:
    """Fold each batch norm of ``pairs`` (conv name -> BN name) that follows a quantized layer into that
    layer's epilogue and replace the batch norm by Identity."""
    layers = quant_layers(qmodel)
    for conv_name, bn_name in pairs.items():
        layer = layers.get(conv_name)
        if layer is None:
            continue
        bn = qmodel.get_submodule(bn_name)
        a = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        b = bn.bias.detach().double() - bn.running_mean.double() * a
        layer.bn_fold = (a.clone(), b.clone())
        layer.refresh_epilogue(a, b)
        set_module(qmodel, bn_name, nn.Identity())


def _channel_mean(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-channel mean along ``dim`` (float32 reduction, returned as float64: no float64 copy of ``y``)."""
    y = y.detach()
    dims = [d for d in range(y.dim()) if d != dim % y.dim()]
    return y.float().mean(dims).double() if dims else y.double()


def float_output_means(model: nn.Module, names: list[str], dims: Mapping[str, int], batch: Batch
                       ) -> dict[str, torch.Tensor]:
    """Per-channel mean (float64) of the conv/linear output of layers ``names`` of the float ``model``
    on ``batch`` (the weight-use output, before anything the module's forward does after it)."""
    means: dict[str, torch.Tensor] = {}
    mods = {n: model.get_submodule(n) for n in names}
    for n, m in mods.items():
        observe_module(m, lambda _f, _a, _k, out, n=n: means.setdefault(n, _channel_mean(out, dims[n])))
    try:
        with torch.no_grad():
            inputs.call(model, batch)
    finally:
        for m in mods.values():
            unobserve_module(m)
    return means


def correct_bias(model: nn.Module, qmodel: nn.Module, names: list[str], calib: Batch,
                 float_ref: FloatReference | None = None) -> None:
    """bias += E[float output] - E[quantized output] per channel, for the quantized layers ``names`` of
    ``qmodel`` against the float ``model``, on ``calib`` (one batch).  One forward: each layer is
    corrected as the batch reaches it, so the layers after it see the corrected output.
    ``float_ref``: the float means, memoized (a :class:`FloatReference` of ``model``)."""
    if not names:
        return
    layers = {n: quant_layer(qmodel, n) for n in names}
    dims = {n: q.channel_dim for n, q in layers.items()}
    if float_ref is not None:
        ref = dict(float_ref.output_means(names, dims, calib))
    else:
        ref = float_output_means(copy.deepcopy(model).eval(), names, dims, calib)

    def fix(layer: QuantLayer, n: str, out: torch.Tensor) -> torch.Tensor:
        if n not in ref:
            return out
        diff = ref.pop(n) - _channel_mean(out, layer.channel_dim)
        layer.bias += diff.float()
        layer.refresh_epilogue()
        shape = [1] * out.dim()
        shape[layer.channel_dim] = -1
        return out + diff.float().reshape(shape)

    handles = [q.register_forward_hook(lambda m, _a, o, n=n: fix(m, n, o)) for n, q in layers.items()]
    try:
        with torch.no_grad():
            inputs.call(qmodel, calib)
    finally:
        for h in handles:
            h.remove()


def _bn_input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and variance of a batch-norm input, float64."""
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)  # no float64 copy of x
    return mean.double(), var.double()


def batchnorm_input_stats(model: nn.Module, calib: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, variance), float64, of every batch norm's input of ``model`` on ``calib``
    (one batch, one forward of a copy in eval mode)."""
    ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fmodel = copy.deepcopy(model).eval()
    fmods = {n: m for n, m in fmodel.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def seen(n: str, a: tuple) -> None:
        ref.setdefault(n, _bn_input_stats(a[0]))

    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen(n, a)) for n, m in fmods.items()]
    try:
        with torch.no_grad():
            inputs.call(fmodel, calib)
    finally:
        for h in handles:
            h.remove()
    return ref


def correct_batchnorm(model: nn.Module, qmodel: nn.Module, calib: Batch,
                      float_ref: FloatReference | None = None) -> int:
    """Batch-norm re-estimation relative to the float network: each batch norm of ``qmodel`` keeps the
    float ``model``'s statistics, shifted by what quantization changed on ``calib`` (one batch):
    ``mean += E_q[x] - E_f[x]``, ``var *= Var_q[x] / Var_f[x]``, per channel.  Re-estimating the
    statistics outright would replace the training set's statistics by the calibration data's, which
    changes the function itself when the calibration inputs are few or not from the training
    distribution (EfficientNet-Lite2 on 12 photos: output error 1.42 instead of 0.054).  One forward
    of each network: a batch norm is corrected as the batch reaches it, so later ones see the
    corrected network.  ``float_ref``: the float statistics, memoized (a :class:`FloatReference` of
    ``model``).  Returns how many batch norms were corrected."""
    ref = dict(float_ref.bn_stats(calib) if float_ref is not None else batchnorm_input_stats(model, calib))
    done = 0

    def fix(m: nn.Module, a: tuple, n: str) -> None:
        nonlocal done
        if n not in ref or m.running_mean is None or m.running_var is None:
            return
        mf, vf = ref.pop(n)
        mq, vq = _bn_input_stats(a[0])
        ratio = torch.where(vf > 1e-12, vq / vf.clamp_min(1e-12), torch.ones_like(vf))
        m.running_mean.copy_((m.running_mean.double() + mq - mf).to(m.running_mean.dtype))
        m.running_var.copy_((m.running_var.double() * ratio).to(m.running_var.dtype))
        done += 1

    qmods = {n: m for n, m in qmodel.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: fix(m, a, n)) for n, m in qmods.items()]
    try:
        with torch.no_grad():
            inputs.call(qmodel.eval(), calib)
    finally:
        for h in handles:
            h.remove()
    return done


def output_rows(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """The model's outputs on ``batches`` as float64 rows [n, features]."""
    with torch.no_grad():
        return torch.cat([inputs.rows(inputs.call(model, b), inputs.batch_len(b)) for b in batches])


def damage(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Relative squared error of the outputs ``got`` against ``ref`` (rows of float64)."""
    return float(torch.square(got - ref).sum() / torch.square(ref).sum().clamp_min(1e-30))


def fingerprint(batch: Batch) -> str:
    """A hash of the bytes (and dtypes, shapes) of every tensor of one batch."""
    h = hashlib.sha1()
    parts = sorted(batch.items()) if isinstance(batch, dict) else enumerate(batch) if isinstance(batch, tuple) else [("", batch)]
    for k, t in parts:
        t = t.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


class FloatReference:
    """What the float network gives on given inputs (output rows, batch-norm input statistics, layer
    output means), computed once per input batch and reused: Auto builds up to ``max_evals`` mixes of
    one float model on the same calibration inputs, and each build's corrections compare against the
    same float numbers.  A snapshot: the float model is copied when this is made, so later changes to
    the caller's model are not seen (make a new one then).  ``source`` is the model it was made from;
    ``build_fake_quant`` takes it only for that model."""

    def __init__(self, model: nn.Module) -> None:
        self.source = model
        self.model = copy.deepcopy(model).cpu().eval()
        self.store: dict[tuple, Any] = {}

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self.store:
            self.store[key] = make()
        return self.store[key]

    def rows(self, batches: list[Batch]) -> torch.Tensor:
        """``output_rows`` of the float model on ``batches``."""
        key = ("rows", tuple(fingerprint(b) for b in batches))
        return self._memo(key, lambda: output_rows(self.model, batches))

    def bn_stats(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``batchnorm_input_stats`` of the float model on ``batch``."""
        return self._memo(("bn", fingerprint(batch)), lambda: batchnorm_input_stats(self.model, batch))

    def output_means(self, names: list[str], dims: Mapping[str, int], batch: Batch) -> dict[str, torch.Tensor]:
        """``float_output_means`` of the float model's layers ``names`` on ``batch``."""
        key = ("means", tuple(names), tuple(dims[n] for n in names), fingerprint(batch))
        return self._memo(key, lambda: float_output_means(self.model, names, dims, batch))


def _bn_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _act_state(layers: Mapping[str, QuantLayer]) -> dict[str, tuple[float, bool, bool, bool]]:
    return {n: (float(m.act_scale), m.act_signed, m.calibrated, m.dynamic) for n, m in layers.items()}


def _restore_acts(layers: Mapping[str, QuantLayer], state: Mapping[str, tuple[float, bool, bool, bool]]) -> None:
    for n, (s, signed, cal, dyn) in state.items():
        if dyn:
            layers[n].set_dynamic()
        elif cal:
            layers[n].set_activation(s, signed)


def build_fake_quant(model: nn.Module, weights: Mapping[str, Any], calib_data: object, *,
                     act_bits: int | Mapping[str, int] = 8,
                     fixed_activations: Mapping[str, tuple[float, bool, int]] | None = None,
                     calibration: str | None | Mapping[str, tuple[str, float]] = None, bn_reestimate: bool = False,
                     bias_correction: bool = False, batch_size: int = 64, progress: bool = True, inplace: bool = False,
                     reference: nn.Module | None = None, config: dict[str, Any] | None = None,
                     graph: ModelGraph | None = None, verify: bool = True, float_layers: Mapping[str, str] | None = None,
                     act_mode: str | Mapping[str, str] = "static", float_ref: FloatReference | None = None
                     ) -> nn.Module:
    """The fake-quant model the compiler consumes, from a plain float ``model`` (copied unless ``inplace``).

    ``weights``: layer name -> integer weight object (``qmath.TernaryWeight``, ``Pow2Weight``,
    ``IntWeight`` or ``hooks.IntegerWeight``) of the layer's effective weight.  ``act_bits``: input
    bits, one for all or per layer.  ``fixed_activations``: layer name -> (scale, signed, bits) for
    inputs whose scale is known (PACT's alpha / (2^k - 1), unsigned k bits); every other quantized
    layer's input is calibrated on ``calib_data`` by ``calibration``: a method for all (default:
    ``auto`` for each layer's width), or per layer (method, percentile).  ``bn_reestimate``: shift the
    batch-norm statistics by what quantization changed in their inputs (``correct_batchnorm``, relative
    to the float network on the same inputs), then recalibrate.  ``bias_correction``: layers
    with no batch norm after them get their bias shifted by the per-channel mean output difference
    float (``reference``, default ``model``) - quantized.  With ``verify`` each of the two is kept only
    if it lowers the output error on held-out calibration inputs.  Batch norms right after quantized
    convs are folded into their epilogues.  ``graph``: ``analyze`` of ``model`` (computed if None).
    ``float_layers``: layer -> why the caller keeps it float (for the report).  ``act_mode``:
    ``static`` | ``dynamic`` | ``auto`` for all layers or per layer (``calibrate.ACT_MODES``).  ``config`` is kept as
    ``tvm_lowbit_config``; the report (``QuantReport``) as ``tvm_lowbit_report``.  ``float_ref``: a
    :class:`FloatReference` of the reference model, whose float outputs and statistics on the
    calibration inputs are then computed once over many builds (same result, less time).
    """
    fixed = dict(fixed_activations or {})
    qmodel = model if inplace else copy.deepcopy(model).cpu()
    qmodel.eval()
    ref_model = model if reference is None else reference
    if float_ref is not None and float_ref.source is not ref_model:
        raise ValueError("build_fake_quant: float_ref was made from another model than the reference the corrections "
                         "compare against; make it with FloatReference(reference or model)")
    calib_all = inputs.gather(calib_data, batch_size, n_inputs=inputs.positional_inputs(model))
    n_calib = inputs.batch_len(calib_all)
    if graph is None:
        graph = analyze(qmodel, inputs.take(calib_all, 0, 1))
    report = QuantReport(notes=list(graph.notes))
    for name, w in weights.items():
        if name not in graph.uses:
            why = graph.reason(name) or "not a Conv2d/Linear weight use called by forward()"
            raise ValueError(f"layer {name!r} cannot be quantized: {why}")
        bits = fixed[name][2] if name in fixed else act_bits[name] if isinstance(act_bits, Mapping) else act_bits
        q = wrap_layer(qmodel, name, graph.uses[name], w, bits)
        if name in fixed:
            scale, signed, _ = fixed[name]
            q.set_activation(scale, signed)
        report.quantized[name] = q.weight_format
    mods = dict(qmodel.named_modules())
    report.left_float = list(graph.skipped) + [
        Skipped(n, type(mods[n]).__name__, (float_layers or {}).get(n, "kept float by the configuration"), True)
        for n in graph.order if n not in weights]
    layers = quant_layers(qmodel)
    for m in layers.values():
        m.fast = True  # the passes below gather statistics: float32 integer ops are close enough
    todo = {n: m for n, m in layers.items() if n not in fixed}
    if isinstance(calibration, Mapping):
        methods = {n: calibration[n] for n in todo}
    else:
        methods = {n: (calibration or calibrate.auto_method(m.act_bits), DEFAULT_PERCENTILE) for n, m in todo.items()}
    modes = {n: act_mode[n] if isinstance(act_mode, Mapping) else act_mode for n in todo}
    if todo:
        calibrate.calibrate_activations(qmodel, todo, inputs.split(calib_all, batch_size), methods, batch_size, progress,
                                        modes)

    # held-out inputs to verify the corrections on
    n_check = int(n_calib * CHECK_FRACTION) if n_calib >= 2 * MIN_CHECK and verify else 0
    fit = inputs.take(calib_all, 0, n_calib - n_check) if n_check else calib_all
    check = inputs.split(inputs.take(calib_all, n_calib - n_check) if n_check else calib_all, batch_size)
    ref_rows = None
    if verify and (bn_reestimate or bias_correction):
        ref_rows = float_ref.rows(check) if float_ref is not None else output_rows(copy.deepcopy(ref_model).eval(), check)

    def err() -> float:
        return damage(ref_rows, output_rows(qmodel, check))  # type: ignore[arg-type]

    where = "held-out calibration inputs" if n_check else "the calibration inputs (too few to hold some out)"
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qmodel.modules())

    def reestimate(data: Batch) -> None:
        correct_batchnorm(ref_model, qmodel, inputs.take(data, 0, BIAS_FIT_MAX), float_ref)
        if todo:
            calibrate.calibrate_activations(qmodel, todo, inputs.split(calib_all, batch_size), methods, batch_size,
                                            progress, modes)

    current: float | None = None  # the output error on the check inputs of the model as it stands
    if bn_reestimate and has_bn:
        if ref_rows is None:
            reestimate(calib_all)
        else:
            before = err()
            bn_saved, act_saved = _bn_state(qmodel), _act_state(todo)
            reestimate(fit)
            after = err()
            if after > before:
                for n, st in bn_saved.items():
                    qmodel.get_submodule(n).load_state_dict(st)
                _restore_acts(todo, act_saved)
                report.notes.append(f"batch-norm re-estimation dropped: output error on {where} "
                                    f"{after:.3g} with it, {before:.3g} without")
                current = before
            else:
                current = after
                report.notes.append(f"batch-norm re-estimation kept: output error on {where} {after:.3g} "
                                    f"(was {before:.3g})")
    if bias_correction:
        names = [n for n in graph.order if n in layers and n not in graph.bn_pairs]
        if names and ref_rows is None:
            correct_bias(ref_model, qmodel, names, inputs.take(calib_all, 0, BIAS_FIT_MAX), float_ref)
        elif names:
            before = current if current is not None else err()
            saved = {n: layers[n].bias.clone() for n in names}

            def restore() -> None:
                for n, b in saved.items():
                    layers[n].bias.copy_(b)
                    layers[n].refresh_epilogue()

            correct_bias(ref_model, qmodel, names, inputs.take(fit, 0, BIAS_FIT_MAX), float_ref)
            after = err()
            restore()
            if after > before:
                report.notes.append(f"bias correction dropped: output error on {where} {after:.3g} with it, "
                                    f"{before:.3g} without")
            else:
                correct_bias(ref_model, qmodel, names, inputs.take(calib_all, 0, BIAS_FIT_MAX),  # refit on all
                             float_ref)
                report.notes.append(f"bias correction kept: output error on {where} {after:.3g} (was {before:.3g})")
    for m in layers.values():
        m.fast = False
    fold_batchnorms(qmodel, {c: b for c, b in graph.bn_pairs.items() if c in layers})
    dynamic = [n for n, m in layers.items() if m.dynamic]
    if dynamic:
        report.notes.append(f"{len(dynamic)} layer(s) take per-token dynamic activation scales ({', '.join(dynamic[:6])}"
                            f"{', ...' if len(dynamic) > 6 else ''}): exact in fake-quant, but the compiler's lowering "
                            "does not match that form yet, so they stay float when compiled")
    if config is not None:
        qmodel.tvm_lowbit_config = config
    qmodel.tvm_lowbit_report = report
    return qmodel.eval()


def warn_report(report: QuantReport, progress: bool) -> None:
    """Tell the user which layers stayed float because they cannot be quantized, and the notes."""
    cannot = [s for s in report.left_float if not s.chosen]
    if cannot:
        warnings.warn(f"{len(cannot)} layer(s) left float: " + "; ".join(str(s) for s in cannot[:8])
                      + (f"; ... ({len(cannot) - 8} more in model.tvm_lowbit_report)" if len(cannot) > 8 else ""),
                      stacklevel=3)
    for n in report.notes:
        if n.startswith("torch.export failed"):
            warnings.warn(n, stacklevel=3)
    if progress:
        for n in report.notes:
            if not n.startswith("torch.export failed"):
                tqdm.write(f"tvm_lowbit: {n}")


def unwrap_all(model: nn.Module) -> None:
    """Make every wrapped layer of ``model`` float again (in place)."""
    for m in model.modules():
        if is_wrapped(m):
            unwrap_module(m)
