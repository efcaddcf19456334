"""Relax pass: lower the fake-quant layers of every weight format to integer kernels.

Input: a Relax module imported from a fake-quant model (``tvm_lowbit.quantize`` then
``torch.export``), after ``FoldConstant``.  Each quantized layer appears as::

    q   = clip(round(divide(x, s)), lo, hi)            # activation quantizer (float codes)
    acc = conv2d(q, W_int) | matmul(q, W_int^T)         # W_int = alpha_q * t, a constant
    y   = astype(astype(acc, f32) ..., f64) * S + B -> astype(f32)    # the qmath epilogue
    [relu(y)]

``LowerIntegerLayers`` replaces every such chain (the patterns of :mod:`tvm_lowbit.passes.patterns`)
by one ``call_tir`` to an integer kernel.  The layer's integer weight is decomposed by
``formats.decompose`` (grouped ternary, power of two, k-bit integers; from ``LayerInfo.weight_format``
when the quantizer is known, else guessed) and the kernel registry (``kernels.select``) picks the kernel
of its family and op that fits the layer on the target: the int8 dot-product kernels of the target's
ISA (``kernels.avx2``, ``kernels.sdot``), the lookup-table kernel (``kernels.lut``) or the generic one.
``LoweringReport.kernels`` says which weight format each layer got, ``kernel_names`` which kernel and
``kernel_reasons`` why.

Activations are quantized once per distinct (tensor, scale) at the entry of an integer region; a layer
whose output only feeds other quantized layers with one common input quantizer emits those layers' codes
directly (requantization fused with bias, folded batch norm and ReLU), so no float tensor sits between
two quantized layers.  Everything else (pooling, residual adds, layer norm, softmax, GELU,
concatenation, reshapes) stays as it was, in float.  A chain that cannot be lowered stays in
float too (it still computes the fake-quant math) and is listed in ``report`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvm_lowbit import formats, kernels, qmath
from tvm_lowbit.kernels import Kernel, LayerSpec, requant
from tvm_lowbit.kernels.common import target_kind
from tvm_lowbit.passes.convert_layout import integer_layout, nhwc_passes
from tvm_lowbit.passes.embedding import lower_embeddings
from tvm_lowbit.passes.fold_requantize import fold_requantize
from tvm_lowbit.passes.fuse_add_quantize import act_quant_attrs
from tvm_lowbit.passes.layer_info import LayerInfo, weight_key
from tvm_lowbit.passes.patterns import (ADD, ASTYPE, CONV2D, DIVIDE, INTEGER_OP, MULTIPLY, PERMUTE_DIMS, RELU,
                                        RESHAPE, bound_call, const_value, match_quantizer, users, var2val)
from tvm_lowbit.passes.relu6_quantizer import relu6_quantizer
from tvm_lowbit.passes.report import LoweringReport
from tvm_lowbit.passes.torch_mean import torch_mean
from tvm_lowbit.passes.torch_sigmoid import torch_sigmoid
from tvm_lowbit.passes.torch_silu import torch_silu


def constant(value: np.ndarray) -> relax.Expr:
    """A kernel operand as a Relax constant of exactly its numpy dtype: ``relax.const`` without a dtype casts
    int64 arrays to int32 (and float64 to float32), which would wrap the integer requantization's int64
    offsets (``rq_add``)."""
    arr = np.asarray(value)
    return relax.const(arr, str(arr.dtype))


@dataclass
class _Quant:
    var: relax.Var          # the clip output (float codes)
    source: relax.Expr      # x
    scale: float
    bits: int
    signed: bool
    chain: list[relax.Var]  # divide, round, clip vars

    @property
    def key(self) -> tuple:
        return (self.source.__hash__(), np.float32(self.scale).item(), self.bits, self.signed)


@dataclass
class _Layer:
    name: str
    kind: str                     # "conv2d" | "dense"
    quant: _Quant
    tw: Any                       # the decomposed weight (formats.decompose): its family picks the kernels
    attrs: dict
    out_scale: np.ndarray
    out_bias: np.ndarray
    relu: bool
    out_var: relax.Var            # last var of the chain (the float output in the graph)
    chain: list[relax.Var]        # every var of the chain that the kernel replaces
    kernel: Kernel                # the registry's choice for the layer on the target
    reason: str                   # and why
    requant: _Quant | None = None
    nhwc: bool = False            # an NHWC conv (passes.convert_layout): its codes in and out are NHWC


def _nchw_shape(codes: relax.Var, nhwc: bool) -> tuple[int, ...]:
    """The shape of a layer's input codes, as NCHW for an NHWC conv."""
    shape = tuple(int(d) for d in codes.ty.shape)
    return (shape[0], shape[3], shape[1], shape[2]) if nhwc else shape


TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _bits_of(lo: float, hi: float) -> tuple[int, bool] | None:
    for bits in range(2, 9):
        for signed in (False, True):
            if qmath.act_range(bits, signed) == (lo, hi):
                return bits, signed
    return None


class _Analysis:
    """Finds quantizers and quantized-layer chains in one dataflow block."""

    def __init__(self, func: relax.Function, infos: dict[str, LayerInfo], report: LoweringReport,
                 target: tvm.target.Target | None) -> None:
        self.values = var2val(func)
        self.users = users(func)  # None: used by the function result
        self.report = report
        self.infos = infos
        self.target = target
        order = [b.var for block in func.body.blocks for b in block.bindings]
        self.order = order
        self.layers: list[_Layer] = []
        self.quants: dict[int, _Quant] = {}
        for v in order:
            call = bound_call(INTEGER_OP, v, self.values)
            if call is not None:
                layer = self._match_layer(v, call)
                if layer is not None:
                    self.layers.append(layer)

    def _users(self, v: relax.Var) -> list:
        return self.users.get(v.__hash__(), [])

    def _sole_user(self, v: relax.Var) -> relax.Var | None:
        u = self._users(v)
        return u[0] if len(u) == 1 and u[0] is not None else None

    def _match_quant(self, e: relax.Expr) -> _Quant | None:
        if not isinstance(e, relax.Var):
            return None
        if e.__hash__() in self.quants:
            return self.quants[e.__hash__()]
        m = match_quantizer(e, self.values)
        if m is None:
            return None
        bs = _bits_of(m.lo, m.hi)
        if m.scale is None or m.scale.size != 1 or bs is None or not isinstance(m.source, relax.Var):
            return None
        if m.source.ty.dtype != "float32":
            return None
        q = _Quant(e, m.source, float(m.scale.reshape(())), bs[0], bs[1], list(m.chain))
        self.quants[e.__hash__()] = q
        return q

    def _match_layer(self, anchor: relax.Var, call: relax.Call) -> _Layer | None:
        is_conv = CONV2D.match(call)
        data = call.args[0]
        chain = [anchor]
        chain_in = []
        # casts, and (for matmul) reshapes that merge leading dims, may sit between codes and op
        while isinstance(data, relax.Var):
            inner = bound_call(ASTYPE, data, self.values)
            if inner is None and not is_conv:
                inner = bound_call(RESHAPE, data, self.values)
            if inner is None:
                break
            if RESHAPE.match(inner) and int(inner.args[0].ty.shape[-1]) != int(data.ty.shape[-1]):
                return None
            chain_in.append(data)
            data = inner.args[0]
        quant = self._match_quant(data)
        if quant is None:
            return None  # a float layer the configuration does not quantize
        wconst = call.args[1]
        perm = None if is_conv else bound_call(PERMUTE_DIMS, wconst, self.values)
        nhwc = is_conv and (call.attrs.data_layout, call.attrs.kernel_layout, call.attrs.out_layout) == \
            ("NHWC", "OHWI", "NHWC")
        if perm is not None:
            w = const_value(perm.args[0], self.values)
            chain_in.append(wconst)
        else:
            w = const_value(wconst, self.values)
            if w is not None and not is_conv:
                w = w.T if w.ndim == 2 else None
            if w is not None and nhwc:  # passes.convert_layout: OHWI -> the OIHW weight the formats read
                w = np.ascontiguousarray(w.transpose(0, 3, 1, 2))
        key = weight_key(w) if w is not None else ""
        info = self.infos.get(key)
        name = info.name if info else f"{'conv2d' if is_conv else 'linear'} '{anchor.name}'"
        if w is None:
            self.report.fallback.append((name, "its weight is not a constant (bind the parameters first)"))
            return None

        # the epilogue: [astype f32] -> astype f64 -> multiply S -> add B -> astype f32 [-> relu]
        cur, scale, bias = anchor, None, None
        while True:
            u = self._sole_user(cur)
            if u is None:
                break
            val = self.values[u]
            if scale is None and (bound_call(ASTYPE, u, self.values) is not None
                                  or (not is_conv and bound_call(RESHAPE, u, self.values) is not None)):
                pass
            elif bound_call(MULTIPLY, u, self.values) is not None and scale is None:
                scale = const_value(val.args[1], self.values)
                if scale is None:
                    break
            elif bound_call(ADD, u, self.values) is not None and scale is not None and bias is None:
                bias = const_value(val.args[1], self.values)
                if bias is None:
                    break
            elif bound_call(ASTYPE, u, self.values) is not None and bias is not None:
                chain.append(u)
                cur = u
                break
            else:
                break
            chain.append(u)
            cur = u
        if scale is None or bias is None or cur.ty.dtype != "float32":
            self.report.fallback.append((name, "its output is not followed by the fake-quant epilogue "
                                               "(multiply by scale, add bias)"))
            return None
        relu = False
        u = self._sole_user(cur)
        if u is not None and bound_call(RELU, u, self.values) is not None:
            chain.append(u)
            cur, relu = u, True

        tw, why = formats.decompose(info.weight_format if info else None, w, info.group_size if info else None)
        if tw is None:
            self.report.fallback.append((name, why))
            return None
        k = w.shape[0]
        out_scale = np.asarray(scale, np.float64).reshape(-1).astype(np.float32)
        out_bias = np.asarray(bias, np.float64).reshape(-1).astype(np.float32)
        if out_scale.size == 1:
            out_scale = np.repeat(out_scale, k)
        if out_bias.size == 1:
            out_bias = np.repeat(out_bias, k)
        if out_scale.size != k or out_bias.size != k:
            self.report.fallback.append((name, f"its epilogue has {out_scale.size} scales for {k} channels"))
            return None
        attrs: dict = {}
        if is_conv:
            a = call.attrs
            pad = [int(p) for p in a.padding]
            if not nhwc and (a.data_layout, a.kernel_layout) != ("NCHW", "OIHW"):
                self.report.fallback.append((name, f"layout {a.data_layout}/{a.kernel_layout}: only NCHW/OIHW "
                                                   "and NHWC/OHWI"))
                return None
            if pad[0] != pad[2] or pad[1] != pad[3]:
                self.report.fallback.append((name, f"asymmetric padding {pad} is not supported by the kernel"))
                return None
            attrs = dict(weight_shape=tuple(int(d) for d in w.shape), strides=tuple(int(s) for s in a.strides),
                         padding=(pad[0], pad[1]), dilation=tuple(int(d) for d in a.dilation), groups=int(a.groups))
        else:
            attrs = dict(weight_shape=tuple(int(d) for d in w.shape))
        for v in chain_in:
            if len(self._users(v)) != 1:
                return None
        if not is_conv:
            codes_shape = [int(d) for d in quant.var.ty.shape]
            expect = tuple(codes_shape[:-1]) + (int(w.shape[0]),)
            if tuple(int(d) for d in cur.ty.shape) != expect:
                self.report.fallback.append((name, f"its output shape {tuple(cur.ty.shape)} is not the codes' "
                                                   f"leading dims + {w.shape[0]}"))
                return None
        op = "conv2d" if is_conv else "dense"
        spec = LayerSpec(name, op, formats.kernel_family(tw), tw, attrs, quant.bits, quant.signed,
                         _nchw_shape(quant.var, nhwc))
        kernel, reason = kernels.select(spec, self.target)
        if kernel is None:
            self.report.fallback.append((name, f"no integer kernel fits: {reason}"))
            return None
        return _Layer(name, op, quant, tw, attrs, out_scale, out_bias, relu,
                      cur, chain + [v for v in chain_in if isinstance(v, relax.Var)], kernel, reason, nhwc=nhwc)

    def plan_requant(self) -> None:
        """Fuse requantization where a layer's output feeds only quantized layers with one quantizer."""
        by_quant: dict[int, list[_Layer]] = {}
        for layer in self.layers:
            by_quant.setdefault(layer.quant.var.__hash__(), []).append(layer)
        for layer in self.layers:
            users = self._users(layer.out_var)
            if not users or any(u is None for u in users):
                continue
            quants = []
            for u in users:
                div = bound_call(DIVIDE, u, self.values)
                if div is None:
                    break
                clip_vars = [q for q in self.quants.values() if q.chain[0].same_as(u)]
                if not clip_vars or clip_vars[0].var.__hash__() not in by_quant:
                    break
                q = clip_vars[0]
                # every user of the codes must be a lowered layer
                if len(self._users(q.var)) != len(by_quant[q.var.__hash__()]):
                    break
                quants.append(q)
            else:
                if len({(np.float32(q.scale).item(), q.bits, q.signed) for q in quants}) == 1:
                    layer.requant = quants[0]
                    for q in quants:
                        q.produced_by = layer  # type: ignore[attr-defined]

    def user_count(self, q: _Quant) -> int:
        """How many users the codes of ``q`` have in all (lowered or not)."""
        return len(self._users(q.var))


@relax.expr_functor.mutator
class _Lowering(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, analysis: _Analysis, expose_acc: bool) -> None:
        super().__init__(mod)
        self.a = analysis
        self.expose_acc = expose_acc
        self.accs: list[relax.Var] = []
        self.layer_at = {l.out_var.__hash__(): l for l in analysis.layers}
        self.skip: set[int] = set()
        for l in analysis.layers:
            self.skip.update(v.__hash__() for v in l.chain if not v.same_as(l.out_var))
        # a quantizer's own bindings disappear when every user of its codes is a lowered layer
        lowered_users: dict[int, int] = {}
        for l in analysis.layers:
            lowered_users[l.quant.var.__hash__()] = lowered_users.get(l.quant.var.__hash__(), 0) + 1
        for q in analysis.quants.values():
            if lowered_users.get(q.var.__hash__(), 0) == analysis.user_count(q):
                self.skip.update(v.__hash__() for v in q.chain)
        self.codes: dict[tuple, relax.Expr] = {}

    def _codes(self, q: _Quant) -> relax.Expr:
        producer = getattr(q, "produced_by", None)
        if producer is not None:
            return self.codes[("layer", id(producer))]
        if q.key not in self.codes:
            x = self.visit_expr(q.source)
            # aarch64: the division-free form where kernels.requant proves it gives the same codes
            recip = target_kind(self.a.target) == "aarch64" and requant.quantize_recip_unexact(
                q.scale, q.bits, q.signed) is None
            self.codes[q.key] = self.builder_.emit_te(
                kernels.quantize_act, x, scale=q.scale, bits=q.bits, signed=q.signed,
                recip_clamp=requant.quantize_clamp(q.scale, q.bits, q.signed) if recip else None,
                primfunc_name_hint="quantize_act", primfunc_attrs={
                    **kernels.kernel_attrs("quantize_act"),
                    **({} if recip else act_quant_attrs(q.scale, q.bits, q.signed))})  # for FuseAddQuantize
        return self.codes[q.key]

    def _emit(self, l: _Layer) -> relax.Expr:
        x = self._codes(l.quant)
        spec = LayerSpec(l.name, l.kind, l.kernel.family, l.tw, l.attrs, l.quant.bits, l.quant.signed,
                         _nchw_shape(l.quant.var, l.nhwc))
        weights, extra = l.kernel.operands(spec)
        # an NHWC conv: the kernel's NHWC form, or transposes around a kernel that takes NCHW only
        native = l.nhwc and "NHWC" in l.kernel.layouts
        wrap = l.nhwc and not native
        if wrap:
            x = self.builder_.emit(relax.op.permute_dims(x, TO_NCHW))
        args = [x, *(constant(w) for w in weights), constant(l.out_scale), constant(l.out_bias)]
        kw = dict(l.attrs, **{k: constant(v) if isinstance(v, np.ndarray) else v for k, v in extra.items()},
                  relu=l.relu)
        layout = dict(in_layout="NHWC", out_layout="NHWC") if native else {}
        fn, name = l.kernel.compute, l.kernel.name

        def emit(**mode: object) -> relax.Expr:
            out = self.builder_.emit_te(fn, *args, **kw, **layout, **mode, primfunc_name_hint=name,
                                        primfunc_attrs=kernels.kernel_attrs(name))
            return self.builder_.emit(relax.op.permute_dims(out, TO_NHWC)) if wrap else out

        if self.expose_acc:  # the accumulators in NCHW, as the references compute them
            acc = self.builder_.emit_te(fn, *args, **kw, **(dict(layout, out_layout="NCHW") if native else {}),
                                        out_mode="acc", primfunc_name_hint=name,
                                        primfunc_attrs=kernels.kernel_attrs(name))
            self.accs.append(self.builder_.emit_output(acc))
        if l.requant is not None:
            out = emit(out_mode="requant", requant_scale=l.requant.scale, out_bits=l.requant.bits,
                       out_signed=l.requant.signed, **self._cheap_epilogue(l, extra))
            self.codes[("layer", id(l))] = out
            return out
        return emit(out_mode="float", **self._cheap_epilogue(l, extra))

    def _cheap_epilogue(self, l: _Layer, extra: dict[str, Any]) -> dict[str, Any]:
        """The operands of the cheapest epilogue kernels.requant proves exact for the layer on a kernel that
        takes them: the integer requantization, else the float32 fused multiply-add; none (float64) with
        the reason in the report."""
        if not l.kernel.cheap_epilogues:
            return {}
        bounds = requant.acc_bounds(np.asarray(l.tw.w_int), l.quant.bits, l.quant.signed)
        scale, bias = np.asarray(l.out_scale), np.asarray(l.out_bias)
        why_int = "no requantization"
        if l.requant is not None:
            rq = requant.solve(scale, bias, l.relu, l.requant.scale, l.requant.bits, l.requant.signed,
                               offset=extra.get("zp"), bounds=bounds)
            if not isinstance(rq, str):
                self.a.report.epilogue_forms[l.name] = "integer"
                return dict(rq_mul=constant(rq.mul), rq_add=constant(rq.add), rq_shift=rq.shift)
            why_int = rq
        why_fma = requant.fma_unexact(scale, bias, bounds)
        if why_fma is None:
            if l.requant is not None and requant.recip_unexact(l.requant.scale, scale, bias, bounds) is None:
                self.a.report.epilogue_forms[l.name] = "fma+recip"
                return {"fma_epilogue": True, "recip_requant": True}
            self.a.report.epilogue_forms[l.name] = "fma"
            return {"fma_epilogue": True}
        self.a.report.epilogue_forms[l.name] = f"float64: {why_int}; {why_fma}"
        return {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        h = binding.var.__hash__()
        if h in self.skip:
            return
        layer = self.layer_at.get(h)
        if layer is not None:
            out = self._emit(layer)
            if layer.requant is None:
                if not isinstance(binding.var, relax.DataflowVar):
                    out = self.builder_.emit_output(out)  # the value leaves the dataflow block
                self.set_var_remap(binding.var, out)
            return
        super().visit_var_binding_(binding)


def lower_layers(mod: tvm.IRModule, infos: dict[str, LayerInfo] | None = None, *, expose_acc: bool = False,
                 func_name: str = "main", target: tvm.target.Target | None = None,
                 report: LoweringReport | None = None) -> tuple[tvm.IRModule, LoweringReport]:
    """Replace the fake-quant layer chains of ``mod[func_name]`` by integer kernels (the module must be
    canonical, with its constants folded: :func:`lower_integer_layers` does that first); fills ``report``
    (a new one if None) and returns it with the new module."""
    report = report if report is not None else LoweringReport()
    func = mod[func_name]
    analysis = _Analysis(func, infos or {}, report, target)
    analysis.plan_requant()
    report.lowered = [l.name for l in analysis.layers]
    report.kernels = {l.name: str(l.tw.format) for l in analysis.layers}
    report.kernel_names = {l.name: l.kernel.name for l in analysis.layers}
    report.kernel_reasons = {l.name: l.reason for l in analysis.layers}
    report.fast_kernels = {l.name: l.kernel.isa for l in analysis.layers if l.kernel.isa != kernels.GENERIC}
    seen = set(report.lowered) | {name for name, _ in report.fallback} | set(report.embeddings)
    for info in (infos or {}).values():
        if info.name not in seen:
            report.fallback.append((info.name, "quantized by the quantizer, but its quantize -> op -> epilogue "
                                               "chain was not found in the imported graph"))
    report.requant_fused = [l.name for l in analysis.layers if l.requant is not None]
    if not analysis.layers:
        return mod, report
    mut = _Lowering(mod, analysis, expose_acc)
    new_func = mut.visit_expr(func)
    if expose_acc and mut.accs:
        # the result becomes (original outputs..., accumulators...)
        body = new_func.body
        ret = body.body
        outs = [relax.TupleGetItem(ret, i) for i in range(len(ret.ty.fields))] if isinstance(
            ret.ty, relax.TupleType) else [ret]
        result = relax.Tuple(outs + mut.accs)
        ret_ty = relax.TupleType([o.ty if o.ty is not None else ret.ty.fields[i] for i, o in enumerate(outs)]
                                 + [a.ty for a in mut.accs])
        new_func = relax.Function(new_func.params, relax.SeqExpr(body.blocks, result), ret_ty,
                                  new_func.is_pure, new_func.attrs)
    gv = mod.get_global_var(func_name)
    mut.builder_.update_func(gv, new_func)
    out = mut.builder_.get()
    out = relax.transform.DeadCodeElimination([func_name])(out)
    return out, report


def lower_integer_layers(mod: tvm.IRModule, infos: dict[str, LayerInfo] | None = None, *, expose_acc: bool = False,
                         func_name: str = "main", target: tvm.target.Target | None = None
                         ) -> tuple[tvm.IRModule, LoweringReport]:
    """Lower the fake-quant layers of ``mod[func_name]``; returns the new module and a report.

    Runs what the pipeline runs before the schedules (``passes.pipeline``): canonicalize, remove dead
    code, fold constants, fold redundant re-quantizers, lower.  ``infos`` (``weight_key`` -> LayerInfo)
    names layers and gives their formats and group sizes; without it the weight format is guessed.
    ``expose_acc`` appends every layer's int32 accumulators to the function's outputs (for bit-exact
    testing).  ``target`` decides which registered kernels fit (``kernels.select``): the int8 dot-product
    kernels of x86 AVX2 (conv, and dense from ``kernels.avx2.DENSE_MIN_ROWS`` rows) and aarch64 +dotprod
    (conv), the lookup-table kernel for ternary dense layers with at most ``kernels.lut.LUT_MAX_ROWS`` rows
    on AVX2, else the generic kernels (both row rules measured with ``scripts/bench_gemm.py --shapes``).
    The result is the same, bit for bit.
    """
    def run(nhwc: bool) -> tuple[tvm.IRModule, LoweringReport]:
        report = LoweringReport()
        prepared = prepare(mod, func_name, nhwc=nhwc)
        prepared, report.requant_folded = fold_requantize(prepared, func_name)
        prepared = lower_embeddings(prepared, infos, report, func_name)  # integer tables (passes.embedding)
        return lower_layers(prepared, infos, expose_acc=expose_acc, func_name=func_name, target=target,
                            report=report)

    if integer_layout(target) != "NHWC":
        return run(False)
    try:
        out, report = run(True)
    except Exception:  # noqa: BLE001 - a layout rule TVM's ConvertLayout lacks or fails on: keep NCHW
        return run(False)
    if not report.lowered:  # nothing integer: the float graph keeps its own layout
        return run(False)
    if report.fallback:  # a layer the NHWC graph hides (an op without a layout rule): keep NCHW if it lowers more
        nchw = run(False)
        if len(nchw[1].fallback) < len(report.fallback):
            return nchw
    return out, report


def prepare(mod: tvm.IRModule, func_name: str = "main", nhwc: bool = False) -> tvm.IRModule:
    """TorchSiLU (:mod:`.torch_silu`), TorchSigmoid (:mod:`.torch_sigmoid`), TorchMean (:mod:`.torch_mean`),
    CanonicalizeBindings + DCE (which drop dead tuple members the importers leave, e.g. the constant
    "indices" of torch's max_pool2d_with_indices, a whole activation-sized array), [``nhwc``: the convs and
    the integer region in NHWC, :mod:`.convert_layout`], then FoldConstant and Relu6Quantizer (:mod:`.relu6_quantizer`)."""
    mod = torch_mean(torch_sigmoid(torch_silu(mod, func_name), func_name), func_name)
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = relax.transform.DeadCodeElimination([func_name])(mod)
    if nhwc:
        mod = tvm.transform.Sequential(nhwc_passes(func_name))(mod)
    return relu6_quantizer(relax.transform.FoldConstant()(mod), func_name)


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.LowerIntegerLayers")
class LowerIntegerLayers:
    """Module-pass form of :func:`lower_layers` (the lowering alone: run it after canonicalization,
    FoldConstant and FoldRequantize, as ``passes.lowering_pipeline`` does).  The report is kept in
    ``self.report`` (the ``report`` given, or a new one)."""

    def __init__(self, infos: dict[str, LayerInfo] | None = None, target: tvm.target.Target | None = None,
                 expose_acc: bool = False, report: LoweringReport | None = None, func_name: str = "main") -> None:
        self.infos = infos
        self.target = target
        self.expose_acc = expose_acc
        self.report = report if report is not None else LoweringReport()
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out, _ = lower_layers(mod, self.infos, expose_acc=self.expose_acc, func_name=self.func_name,
                              target=self.target, report=self.report)
        return out
