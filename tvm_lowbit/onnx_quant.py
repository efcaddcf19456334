"""FGQ for ONNX models: import with ``tvm.relax.frontend.onnx``, quantize in Relax, compile.

There is no PyTorch module to hook, so the same FGQ configuration is applied to the Relax graph:

1. every conv2d / matmul with a constant weight that the configuration selects is found; its weight
   is ternarized with ``qmath.ternarize_weight`` (the same code as the PyTorch path);
2. a calibration build of the float graph returns each layer's input and output; activation ranges
   come from ``calibrate.clip_value`` (the same methods);
3. batch norm is already folded into the weights by ONNX exporters, so "batch-norm re-estimation"
   becomes moment matching of each quantized conv's per-channel output mean and variance to the
   float model's (mean only for matmul), which is what re-estimated statistics of a following BN do;
4. each layer is rewritten into the fake-quant chain that ``LowerIntegerLayers`` lowers (quantize ->
   integer op on ``w_int`` -> ``qmath`` epilogue), so the rest of the pipeline is shared.

Layers are named ``conv2d.0``, ``matmul.3``, ... in graph order, for reports and for ``overrides``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tvm_lowbit import qmath
from tvm_lowbit.compiler import Artifact, CompileError, build
from tvm_lowbit.passes import LayerInfo, weight_key
from tvm_lowbit.passes.patterns import ADD, CONV2D, INTEGER_OP, PERMUTE_DIMS, bound_call, const_value, var2val
from tvm_lowbit.quantizers import calibrate
from tvm_lowbit.quantizers.fgq import FGQ
from tvm_lowbit.targets import TargetSpec, load_target

@dataclass
class _Found:
    name: str
    var: Any            # the conv2d / matmul binding var
    out_var: Any        # after the bias add, if there is one
    data: Any           # the input var
    weight: np.ndarray  # [K, Cg, R, S] or [K, C]
    bias: np.ndarray | None
    kind: str
    call: Any           # the original Relax call (conv attributes)


def find_layers(func: Any) -> list[_Found]:
    """conv2d / matmul bindings with constant weights, in graph order, with a following bias add."""
    from tvm import relax

    values = var2val(func)
    users, order = {}, []
    for block in func.body.blocks:
        for b in block.bindings:
            order.append(b.var)
            for v in relax.analysis.free_vars(b.value):
                users.setdefault(v.__hash__(), []).append(b.var)
    found: list[_Found] = []
    counts: dict[str, int] = {}
    for v in order:
        call = bound_call(INTEGER_OP, v, values)
        if call is None:
            continue
        kind = "conv2d" if CONV2D.match(call) else "matmul"
        w = const_value(call.args[1], values)
        if kind == "matmul":
            perm = bound_call(PERMUTE_DIMS, call.args[1], values) if isinstance(call.args[1], relax.Var) else None
            if w is None and perm is not None:
                w = const_value(perm.args[0], values)  # [K, C] already
            elif w is not None and w.ndim == 2:
                w = w.T  # matmul(x, W[C, K]) -> [K, C]
            else:
                w = None
        if w is None or w.ndim not in (2, 4):
            continue
        if kind == "conv2d" and (call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW"):
            continue
        out_var, bias = v, None
        us = users.get(v.__hash__(), [])
        if len(us) == 1:
            add = bound_call(ADD, us[0], values)
            if add is not None:
                other = add.args[1] if add.args[0].same_as(v) else add.args[0]
                b = const_value(other, values)
                if b is not None and b.size == w.shape[0]:
                    out_var, bias = us[0], b.reshape(-1).astype(np.float32)
        i = counts.get(kind, 0)
        counts[kind] = i + 1
        found.append(_Found(f"{kind}.{i}", v, out_var, call.args[0], w.astype(np.float32), bias, kind, call))
    return found


def _return_vars(mod: Any, vars_: list[Any]) -> Any:
    """A copy of ``mod`` whose main returns ``vars_`` (a calibration build)."""
    import tvm
    from tvm import relax

    mod = relax.transform.ToNonDataflow()(mod)
    f = mod["main"]
    names = {v.name for v in vars_}
    keep = {p.name: p for p in f.params}
    for block in f.body.blocks:
        for b in block.bindings:
            if b.var.name in names:
                keep[b.var.name] = b.var
    out = relax.Tuple([keep[v.name] for v in vars_])
    new = relax.Function(f.params, relax.SeqExpr(f.body.blocks, out), relax.TupleType([x.ty for x in out.fields]),
                         f.is_pure, f.attrs)
    mod = tvm.IRModule({"main": new})
    return mod


def _rewrite(mod: Any, plan: dict[str, dict[str, Any]], found: list[_Found]) -> Any:
    """Replace each planned layer (op + bias add) by the fake-quant chain that LowerIntegerLayers matches."""
    from tvm import relax

    by_out = {f.out_var.name: f for f in found if f.name in plan}
    skip = {f.var.name for f in found if f.name in plan and not f.out_var.same_as(f.var)}

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_var_binding_(self, binding: Any) -> None:
            name = binding.var.name
            if name in skip:
                return
            f = by_out.get(name)
            if f is None:
                return super().visit_var_binding_(binding)
            p = plan[f.name]
            bb = self.builder_
            x = self.visit_expr(f.data)
            lo, hi = qmath.act_range(p["bits"], p["signed"])
            q = bb.emit(relax.op.divide(x, relax.const(np.float32(p["scale"]))))
            q = bb.emit(relax.op.round(q))
            q = bb.emit(relax.op.clip(q, relax.prim_value(lo), relax.prim_value(hi)))
            dt = p["acc_dtype"]
            w_int = relax.const(p["w_int"].astype(dt), dt)
            if dt == "float64":
                q = bb.emit(relax.op.astype(q, "float64"))
            if f.kind == "conv2d":
                call = f.call
                acc = bb.emit(relax.op.nn.conv2d(q, w_int, call.attrs.strides, call.attrs.padding,
                                                 call.attrs.dilation, call.attrs.groups, out_dtype=dt))
                shape = (1, -1, 1, 1)
            else:
                acc = bb.emit(relax.op.matmul(q, relax.op.permute_dims(w_int, [1, 0]), out_dtype=dt))
                shape = (-1,)
            if dt == "float64":
                acc = bb.emit(relax.op.astype(acc, "float32"))
            y = bb.emit(relax.op.astype(acc, "float64"))
            y = bb.emit(relax.op.multiply(y, relax.const(p["out_scale"].astype(np.float64).reshape(shape), "float64")))
            y = bb.emit(relax.op.add(y, relax.const(p["out_bias"].astype(np.float64).reshape(shape), "float64")))
            y = bb.emit(relax.op.astype(y, "float32"))
            self.set_var_remap(binding.var, y)

    rw = Rewriter(mod)
    new = rw.visit_expr(mod["main"])
    rw.builder_.update_func(mod.get_global_var("main"), new)
    return relax.transform.DeadCodeElimination(["main"])(rw.builder_.get())


def _load(model: str | Path | Any) -> Any:
    import onnx

    if isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise FileNotFoundError(f"{model}: no such ONNX file")
        return onnx.load(str(model))
    return model


def _import(proto: Any, shape: tuple[int, ...]) -> Any:
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        raise CompileError(f"the ONNX model has {len(inputs)} inputs; tvm_lowbit quantizes single-input models")
    try:
        mod = from_onnx(proto, shape_dict={inputs[0].name: shape}, keep_params_in_input=False)
    except Exception as e:
        raise CompileError(f"TVM's ONNX importer cannot convert the model: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return relax.transform.FoldConstant()(mod)


def quantize_onnx_module(model: str | Path | Any, config: FGQ, calib: np.ndarray, batch: int = 1,
                         progress: bool = False) -> tuple[Any, dict[str, LayerInfo]]:
    """The fake-quant Relax module (input batch ``batch``) and its layer table."""
    import tvm
    from tvm import relax

    proto = _load(model)
    calib = np.asarray(calib, np.float32)
    if calib.ndim < 2 or len(calib) == 0:
        raise ValueError("calibration data must be a non-empty array [n, ...] of model inputs")
    cb = min(config.batch_size, len(calib))
    cmod = _import(proto, (cb, *calib.shape[1:]))
    found = find_layers(cmod["main"])
    if not found:
        raise ValueError("the ONNX model has no quantizable layer (conv2d or matmul with a constant weight)")
    chosen: dict[str, FGQ] = {}
    for i, f in enumerate(found):
        pos = "first" if i == 0 else "last" if i == len(found) - 1 else None
        cfg = config.settings_for(f.name, pos)
        if cfg is not None:
            if not np.isfinite(f.weight).all():
                raise ValueError(f"layer {f.name!r}: weight {f.weight.shape} holds NaN/Inf values")
            chosen[f.name] = cfg
    if not chosen:
        raise ValueError(f"no layer left to quantize among {len(found)}: relax first_layer/last_layer/overrides")
    sel = [f for f in found if f.name in chosen]

    # calibration build: inputs and float outputs of every selected layer
    ex = tvm.compile(_return_vars(cmod, [f.data for f in sel] + [f.out_var for f in sel]), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    obs = {f.name: calibrate.Observer(seed=i) for i, f in enumerate(sel)}
    stats = {f.name: [] for f in sel}
    inputs_kept = {f.name: [] for f in sel}
    n = (len(calib) // cb) * cb
    if n == 0:
        raise ValueError(f"need at least {cb} calibration inputs")
    for i in range(0, n, cb):
        outs = vm["main"](tvm.runtime.tensor(calib[i:i + cb]))
        outs = [o.numpy() for o in outs]
        for j, f in enumerate(sel):
            xin, yout = torch.from_numpy(outs[j]), outs[len(sel) + j]
            obs[f.name](None, (xin,))
            stats[f.name].append(yout)
            if i < 4 * cb:
                inputs_kept[f.name].append(xin)

    plan: dict[str, dict[str, Any]] = {}
    infos: dict[str, LayerInfo] = {}
    for f in sel:
        cfg = chosen[f.name]
        ob = obs[f.name]
        signed = ob.lo < 0
        method = cfg.calibration_method()
        if method == "mse_out":
            raise ValueError(f"layer {f.name!r}: calibration 'mse_out' needs the PyTorch model; for ONNX use "
                             "auto, minmax, percentile or mse")
        clip = calibrate.clip_value(ob.samples(), ob.lo, ob.hi, cfg.act_bits, signed, method, cfg.percentile)
        scale = qmath.scale_for_range(clip, cfg.act_bits, signed)
        tw = qmath.ternarize_weight(torch.from_numpy(f.weight), cfg.group_size, cfg.threshold, cfg.alpha_bits)
        w_int = tw.w_int.to(torch.float64)
        cdim = 1 if f.kind == "conv2d" else -1
        # quantized output (before correction) on kept calibration inputs
        xin = torch.cat(inputs_kept[f.name])
        qx = qmath.quantize_act(xin, scale, cfg.act_bits, signed).double()
        acc = _integer_op(f, qx, w_int)
        ws = tw.w_scale.double()
        base_scale = scale * ws
        bias = torch.from_numpy(f.bias).double() if f.bias is not None else torch.zeros(len(ws), dtype=torch.float64)
        yq = acc * base_scale.reshape([-1 if d == cdim % acc.dim() else 1 for d in range(acc.dim())]) + \
            bias.reshape([-1 if d == cdim % acc.dim() else 1 for d in range(acc.dim())])
        yf = torch.from_numpy(np.concatenate(stats[f.name])).double()
        red = [d for d in range(yq.dim()) if d != cdim % yq.dim()]
        a = torch.ones_like(ws)
        if cfg.bn_reestimate and f.kind == "conv2d":
            a = torch.where(yq.std(red) > 1e-12, yf.std(red) / yq.std(red).clamp(min=1e-12), a)
        shift = (yf.mean(red) - a * yq.mean(red)) if cfg.bn_reestimate else torch.zeros_like(ws)
        out_scale = (base_scale * a).float().numpy()
        out_bias = (bias * a + shift).float().numpy()
        plan[f.name] = dict(scale=scale, bits=cfg.act_bits, signed=signed, w_int=tw.w_int.numpy(),
                            acc_dtype=str(qmath.exact_float_dtype(w_int, cfg.act_bits, signed)).split(".")[-1],
                            out_scale=out_scale, out_bias=out_bias)
        infos[weight_key(tw.w_int.numpy())] = LayerInfo(f.name, tw.layout.group_size)

    mod = _import(proto, (batch, *calib.shape[1:]))
    found_main = find_layers(mod["main"])
    return _rewrite(mod, plan, found_main), infos


def _integer_op(f: _Found, qx: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
    """The layer's integer op in float64 (exact), for the calibration statistics."""
    if f.kind == "matmul":
        return torch.matmul(qx, w_int.t())
    a = f.call.attrs
    top, left, bottom, right = (int(p) for p in a.padding)
    qx = F.pad(qx, (left, right, top, bottom))
    return F.conv2d(qx, w_int, None, tuple(int(s) for s in a.strides), 0, tuple(int(d) for d in a.dilation),
                    int(a.groups))


def quantize_onnx(model: str | Path | Any, config: FGQ, calib: np.ndarray, target: str | TargetSpec = "x86-host",
                  batch: int = 1) -> Artifact:
    """Quantize an ONNX model with an FGQ configuration and compile it for ``target``."""
    spec = load_target(target)
    mod, infos = quantize_onnx_module(model, config, calib, batch)
    shape = tuple(int(d) for d in mod["main"].params[0].ty.shape)
    return build(mod, spec, infos, shape)
