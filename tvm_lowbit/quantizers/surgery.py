"""Model surgery shared by every quantizer: find layers, swap modules, fold batch norms, correct biases,
and the one build pipeline that turns a float model plus integer weights into the fake-quant model
the compiler consumes.

``build_fake_quant`` runs: replace layers -> calibrate activations -> re-estimate batch norms ->
recalibrate -> (bias correction) -> fold batch norms into the layers' epilogues.  FGQ, Auto and the
training quantizers (INQ, SQ, PACT) all build through it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tvm_lowbit.quantizers import calibrate
from tvm_lowbit.quantizers.layers import QConv2d, QLinear, QuantLayer, quant_layers

DEFAULT_PERCENTILE = 99.99


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``model`` by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of Conv2d/Linear modules in the order forward() calls them."""
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n) if n not in order else None))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """conv name -> name of the BatchNorm2d that is the sole consumer of its output (via torch.fx)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow etc.: batch norms then stay separate
        warnings.warn(f"torch.fx could not trace the model ({type(e).__name__}); batch norms will not be "
                      "folded into quantized layers (still correct, slower)", stacklevel=3)
        return {}
    mods = dict(gm.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.BatchNorm2d):
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(mods.get(src.target), nn.Conv2d) and len(src.users) == 1):
                pairs[str(src.target)] = str(node.target)
    return pairs


def make_quant_layer(name: str, module: nn.Module, tw: object, act_bits: int) -> QuantLayer:
    """The fake-quant layer replacing ``module`` (a Conv2d or Linear) with integer weight ``tw``."""
    if isinstance(module, nn.Conv2d):
        return QConv2d(name, module, tw, act_bits)  # type: ignore[arg-type]
    return QLinear(name, module, tw, act_bits)  # type: ignore[arg-type]


def fold_batchnorms(qmodel: nn.Module, pairs: Mapping[str, str]) -> None:
    """Fold each batch norm of ``pairs`` (conv name -> BN name) that follows a QuantLayer into that
    layer's epilogue and replace the batch norm by Identity."""
    for conv_name, bn_name in pairs.items():
        layer = qmodel.get_submodule(conv_name)
        if not isinstance(layer, QuantLayer):
            continue
        bn = qmodel.get_submodule(bn_name)
        a = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        b = bn.bias.detach().double() - bn.running_mean.double() * a
        layer.bn_fold = (a.clone(), b.clone())
        layer.refresh_epilogue(a, b)
        set_module(qmodel, bn_name, nn.Identity())


def channel_means(net: nn.Module, names: list[str], dims: Mapping[str, int], calib: object, batch_size: int,
                  progress: bool) -> dict[str, torch.Tensor]:
    """Per-channel mean output (float64) of the modules ``names`` of ``net`` over the calibration data;
    ``dims[name]`` is the channel dimension of that module's output."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(_m: nn.Module, _a: object, out: torch.Tensor, n: str) -> None:
        o = out.detach().double().movedim(dims[n], -1)
        sums[n] = sums.get(n, 0) + o.reshape(-1, o.shape[-1]).sum(0)
        counts[n] = counts.get(n, 0) + o.numel() // o.shape[-1]

    handles = [net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    try:
        calibrate.run_batches(net, calib, batch_size, "bias correction", progress)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}


def correct_bias(model: nn.Module, qmodel: nn.Module, names: list[str], calib: object, batch_size: int,
                 progress: bool) -> None:
    """bias += E[float output] - E[quantized output] per channel, for the QuantLayers ``names`` of
    ``qmodel`` (in execution order, each measured after the layers before it are corrected), against
    the float ``model``."""
    if not names:
        return
    dims = {n: qmodel.get_submodule(n).channel_dim for n in names}
    ref = channel_means(copy.deepcopy(model).eval(), names, dims, calib, batch_size, progress)
    for n in names:
        layer = qmodel.get_submodule(n)
        got = channel_means(qmodel, [n], dims, calib, batch_size, progress)[n]
        layer.bias += (ref[n] - got).float()
        layer.refresh_epilogue()


def build_fake_quant(model: nn.Module, weights: Mapping[str, Any], calib_data: object, *,
                     act_bits: int | Mapping[str, int] = 8,
                     fixed_activations: Mapping[str, tuple[float, bool, int]] | None = None,
                     calibration: str | None | Mapping[str, tuple[str, float]] = None, bn_reestimate: bool = False,
                     bias_correction: bool = False, batch_size: int = 64, progress: bool = True, inplace: bool = False,
                     reference: nn.Module | None = None, config: dict[str, Any] | None = None) -> nn.Module:
    """The fake-quant model the compiler consumes, from a plain float ``model`` (copied unless ``inplace``).

    ``weights``: layer name -> integer weight object (``qmath.TernaryWeight``, ``Pow2Weight``,
    ``IntWeight`` or ``hooks.IntegerWeight``).  ``act_bits``: input bits, one for all or per layer.
    ``fixed_activations``: layer name -> (scale, signed, bits) for inputs whose scale is known (PACT's
    alpha / (2^k - 1), unsigned k bits); every other quantized layer's input is calibrated on
    ``calib_data`` by ``calibration``: a method for all (default: ``auto`` for each layer's width), or
    per layer (method, percentile).  ``bn_reestimate``: recompute batch-norm statistics with the
    quantized network, then recalibrate.  ``bias_correction``: layers with no batch norm after them get
    their bias shifted by the per-channel mean output difference float (``reference``, default
    ``model``) - quantized.  Batch norms right
    after quantized convs are folded into their epilogues.  ``config`` is kept as ``tvm_lowbit_config``.
    """
    fixed = dict(fixed_activations or {})
    qmodel = model if inplace else copy.deepcopy(model).cpu()
    qmodel.eval()
    pairs = conv_bn_pairs(qmodel)
    order: list[str] = []
    if bias_correction:
        first = next(calibrate.iterate_batches(calib_data, batch_size))
        order = execution_order(qmodel, first[:1])
    for name, w in weights.items():
        bits = fixed[name][2] if name in fixed else act_bits[name] if isinstance(act_bits, Mapping) else act_bits
        q = make_quant_layer(name, qmodel.get_submodule(name), w, bits)
        if name in fixed:
            scale, signed, _ = fixed[name]
            q.set_activation(scale, signed)
        set_module(qmodel, name, q)
    layers = quant_layers(qmodel)
    todo = {n: m for n, m in layers.items() if n not in fixed}
    if isinstance(calibration, Mapping):
        methods = {n: calibration[n] for n in todo}
    else:
        methods = {n: (calibration or calibrate.auto_method(m.act_bits), DEFAULT_PERCENTILE) for n, m in todo.items()}
    if todo:
        calibrate.calibrate_activations(qmodel, todo, calib_data, methods, batch_size, progress)
    if bn_reestimate and calibrate.reestimate_batchnorm(qmodel, calib_data, batch_size, progress) and todo:
        calibrate.calibrate_activations(qmodel, todo, calib_data, methods, batch_size, progress)
    if bias_correction:
        correct_bias(model if reference is None else reference, qmodel, [n for n in order if n in layers and n not in pairs], calib_data, batch_size,
                     progress)
    fold_batchnorms(qmodel, {c: b for c, b in pairs.items() if c in layers})
    if config is not None:
        qmodel.tvm_lowbit_config = config
    return qmodel.eval()
