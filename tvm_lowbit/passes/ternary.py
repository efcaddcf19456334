"""Relax pass: lower fake-quant grouped-ternary layers to integer kernels.

Input: a Relax module imported from a fake-quant model (``tvm_lowbit.quantize`` then
``torch.export``), after ``FoldConstant``.  Each quantized layer appears as::

    q   = clip(round(divide(x, s)), lo, hi)            # activation quantizer (float codes)
    acc = conv2d(q, W_int) | matmul(q, W_int^T)         # W_int = alpha_q * t, a constant
    y   = astype(astype(acc, f32) ..., f64) * S + B -> astype(f32)    # the qmath epilogue
    [relu(y)]

``LowerTernary`` replaces every such chain by one ``call_tir`` to an integer kernel
(``tvm_lowbit.kernels``): a grouped-ternary kernel over packed 2-bit codes and integer alphas, or,
for a weight whose integers are all 0 or +-2^e (INQ), a power-of-two shift kernel over 4/8-bit
sign+exponent codes, or, for "int4" / "int8" (``qmath.IntWeight``), a k-bit integer kernel
(``kernels.intw``).  The format comes from ``LayerInfo.weight_format`` when the quantizer is known
("ternary", "pow2", "int4", "int8", or "int": any small integers, as ternary groups of one);
without it the pass tries grouped ternary with a real group (N >= 2), then power-of-two, then ternary with N = 1 (which any small integer weight satisfies, so it comes last:
a shift kernel beats a per-element multiply).  ``LoweringReport.kernels`` says which kernel each
layer got.  Activations are quantized once
per distinct (tensor, scale) at the entry of an integer region; a layer whose output only feeds
other quantized layers with one common input quantizer emits those layers' codes directly
(requantization fused with bias, folded batch norm and ReLU), so no float tensor sits between
two quantized layers.  Everything else (pooling, residual adds, layer norm, softmax, GELU,
concatenation, reshapes) stays as it was, in float.  A chain that cannot be lowered stays in
float too (it still computes the fake-quant math) and is listed in ``report`` with the reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.ir import Op

from tvm_lowbit import formats, kernels, qmath
from tvm_lowbit.kernels import avx2, lut, sdot
from tvm_lowbit.passes.requant import fold_requantize

_OPS = {n: Op.get(f"relax.{n}") for n in (
    "clip", "round", "divide", "astype", "reshape", "nn.conv2d", "matmul", "permute_dims", "multiply", "add",
    "nn.relu")}


def weight_key(w: np.ndarray) -> str:
    """Identifies an integer weight constant by value (to find its layer name and group size)."""
    a = np.ascontiguousarray(np.asarray(w, np.float32))
    return f"{a.shape}:{hashlib.sha1(a.tobytes()).hexdigest()}"


@dataclass
class LayerInfo:
    """What the quantizer knows about a layer, keyed by ``weight_key`` of its integer weight."""

    name: str
    group_size: int
    weight_format: str = "ternary"


@dataclass
class LoweringReport:
    lowered: list[str] = field(default_factory=list)
    requant_fused: list[str] = field(default_factory=list)
    fallback: list[tuple[str, str]] = field(default_factory=list)  # (layer, why it stayed in float)
    kernels: dict[str, str] = field(default_factory=dict)  # lowered layer -> "ternary" | "pow2"
    requant_folded: int = 0  # redundant re-quantizers removed by FoldRequantize
    fast_kernels: dict[str, str] = field(default_factory=dict)  # layer -> "avx2" | "sdot" | "lut" (see lower_ternary)

    def kernel_of(self, name: str) -> str:
        """The weight format of the kernel layer ``name`` was lowered to ("ternary" if not recorded)."""
        return self.kernels.get(name, "ternary")

    def text(self) -> str:
        counts: dict[str, int] = {}
        for name in self.lowered:
            counts[self.kernel_of(name)] = counts.get(self.kernel_of(name), 0) + 1
        what = {"ternary": "grouped-ternary", "pow2": "power-of-two"}
        kinds = ", ".join(f"{n} {what.get(k, k)}" for k, n in counts.items()) or "none"
        lines = [f"{len(self.lowered)} layer(s) lowered to integer kernels ({kinds}; "
                 f"{len(self.requant_fused)} with fused requantization)"]
        for isa, how in (("avx2", "AVX2 int8 dot-product kernels (vpmaddubsw/vpmaddwd)"),
                         ("sdot", "aarch64 int8 dot-product kernels (sdot)"),
                         ("lut", "lookup-table ternary kernel (few rows, large weight)")):
            n = sum(v == isa for v in self.fast_kernels.values())
            if n:
                lines.append(f"  {n} of them on the {how}")
        if self.requant_folded:
            lines.append(f"  {self.requant_folded} redundant re-quantizer(s) folded (same scale, codes unchanged)")
        lines += [f"  fallback to float: {name}: {why}" for name, why in self.fallback]
        return "\n".join(lines)


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
    tw: qmath.TernaryWeight | qmath.Pow2Weight | qmath.IntWeight  # ``.format`` picks the kernel
    attrs: dict
    out_scale: np.ndarray
    out_bias: np.ndarray
    relu: bool
    out_var: relax.Var            # last var of the chain (the float output in the graph)
    chain: list[relax.Var]        # every var of the chain that the kernel replaces
    requant: _Quant | None = None


def const_value(e: relax.Expr, bindings: dict) -> np.ndarray | None:
    """The NumPy value of a constant, looking through a variable bound to one; else None."""
    e = bindings.get(e.__hash__(), e) if isinstance(e, relax.Var) else e
    if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "numpy"):
        return e.value.numpy()
    return None


def _call(e: relax.Expr, bindings: dict, op: str) -> relax.Call | None:
    if isinstance(e, relax.Var):
        e = bindings.get(e.__hash__())
    if isinstance(e, relax.Call) and e.op.same_as(_OPS[op]):
        return e
    return None


def _prim(e: relax.Expr) -> float:
    v = e.value  # PrimValue -> IntImm/FloatImm (or a plain number, depending on the printer path)
    return float(getattr(v, "value", v))


def _bits_of(lo: float, hi: float) -> tuple[int, bool] | None:
    for bits in range(2, 9):
        for signed in (False, True):
            if qmath.act_range(bits, signed) == (lo, hi):
                return bits, signed
    return None


class _Analysis:
    """Finds quantizers and quantized-layer chains in one dataflow block."""

    def __init__(self, func: relax.Function, infos: dict[str, LayerInfo], report: LoweringReport) -> None:
        self.bindings: dict[int, relax.Expr] = {}
        self.vars: dict[int, relax.Var] = {}
        self.users: dict[int, list[relax.Var]] = {}
        self.report = report
        self.infos = infos
        order = []
        for block in func.body.blocks:
            for b in block.bindings:
                self.bindings[b.var.__hash__()] = b.value
                self.vars[b.var.__hash__()] = b.var
                order.append(b.var)
                for v in relax.analysis.free_vars(b.value) if isinstance(b.value, relax.Expr) else []:
                    self.users.setdefault(v.__hash__(), []).append(b.var)
        for v in relax.analysis.free_vars(func.body.body):
            self.users.setdefault(v.__hash__(), []).append(None)  # used by the function result
        self.order = order
        self.layers: list[_Layer] = []
        self.quants: dict[int, _Quant] = {}
        for v in order:
            value = self.bindings[v.__hash__()]
            if isinstance(value, relax.Call) and (value.op.same_as(_OPS["nn.conv2d"]) or value.op.same_as(_OPS["matmul"])):
                layer = self._match_layer(v, value)
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
        clip = _call(e, self.bindings, "clip")
        if clip is None:
            return None
        rnd = _call(clip.args[0], self.bindings, "round")
        div = _call(rnd.args[0], self.bindings, "divide") if rnd is not None else None
        if div is None:
            return None
        s = const_value(div.args[1], self.bindings)
        bs = _bits_of(_prim(clip.args[1]), _prim(clip.args[2]))
        if s is None or s.size != 1 or bs is None or not isinstance(div.args[0], relax.Var):
            return None
        if div.args[0].ty.dtype != "float32":
            return None
        q = _Quant(e, div.args[0], float(s.reshape(())), bs[0], bs[1], [rnd.args[0], clip.args[0], e])
        self.quants[e.__hash__()] = q
        return q

    def _match_layer(self, anchor: relax.Var, call: relax.Call) -> _Layer | None:
        is_conv = call.op.same_as(_OPS["nn.conv2d"])
        data = call.args[0]
        chain = [anchor]
        chain_in = []
        # casts, and (for matmul) reshapes that merge leading dims, may sit between codes and op
        while isinstance(data, relax.Var):
            inner = _call(data, self.bindings, "astype")
            if inner is None and not is_conv:
                inner = _call(data, self.bindings, "reshape")
            if inner is None:
                break
            if inner.op.same_as(_OPS["reshape"]) and int(inner.args[0].ty.shape[-1]) != int(data.ty.shape[-1]):
                return None
            chain_in.append(data)
            data = inner.args[0]
        quant = self._match_quant(data)
        if quant is None:
            return None  # a float layer the configuration does not quantize
        wconst = call.args[1]
        perm = None if is_conv else _call(wconst, self.bindings, "permute_dims")
        if perm is not None:
            w = const_value(perm.args[0], self.bindings)
            chain_in.append(wconst)
        else:
            w = const_value(wconst, self.bindings)
            if w is not None and not is_conv:
                w = w.T if w.ndim == 2 else None
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
            val = self.bindings[u.__hash__()]
            if scale is None and (_call(u, self.bindings, "astype") is not None
                                  or (not is_conv and _call(u, self.bindings, "reshape") is not None)):
                pass
            elif _call(u, self.bindings, "multiply") is not None and scale is None:
                scale = const_value(val.args[1], self.bindings)
                if scale is None:
                    break
            elif _call(u, self.bindings, "add") is not None and scale is not None and bias is None:
                bias = const_value(val.args[1], self.bindings)
                if bias is None:
                    break
            elif _call(u, self.bindings, "astype") is not None and bias is not None:
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
        if u is not None and _call(u, self.bindings, "nn.relu") is not None:
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
            if a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
                self.report.fallback.append((name, f"layout {a.data_layout}/{a.kernel_layout}: only NCHW/OIHW"))
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
        return _Layer(name, "conv2d" if is_conv else "dense", quant, tw, attrs, out_scale, out_bias, relu,
                      cur, chain + [v for v in chain_in if isinstance(v, relax.Var)])

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
                div = _call(u, self.bindings, "divide")
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


_DOT_KERNELS = {("avx2", "ternary_conv2d"): avx2.ternary_conv2d_avx2, ("avx2", "ternary_dense"): avx2.ternary_dense_avx2,
                ("avx2", "pow2_conv2d"): avx2.pow2_conv2d_avx2, ("avx2", "pow2_dense"): avx2.pow2_dense_avx2,
                ("sdot", "ternary_conv2d"): sdot.ternary_conv2d_sdot, ("sdot", "pow2_conv2d"): sdot.pow2_conv2d_sdot}


def _dot_isa(target: tvm.target.Target | None) -> str | None:
    if target is None:
        return None
    return "avx2" if avx2.has_avx2(target) else "sdot" if sdot.has_sdot(target) else None


def _rows(l: _Layer) -> int:
    """Activation rows of a dense layer (batch x tokens)."""
    return int(np.prod([int(d) for d in l.quant.var.ty.shape][:-1]))


def _lut_fits(l: _Layer) -> bool:
    """A ternary dense layer with at most ``lut.LUT_MAX_ROWS`` activation rows (the measured rule)."""
    _, cin = l.attrs["weight_shape"]
    return (l.tw.format == "ternary" and _rows(l) <= lut.LUT_MAX_ROWS and cin % 4 == 0
            and l.tw.layout.group_size % 4 == 0)


def _dot_fits(l: _Layer, isa: str) -> bool:
    """Whether the layer runs exactly on the int8 dot-product kernels of ``isa`` (``kernels.avx2`` / ``kernels.sdot``)."""
    if isinstance(l.tw, qmath.IntWeight) or qmath.act_dtype(l.quant.bits, l.quant.signed) != "uint8":
        return False
    if l.tw.format == "pow2" and l.tw.code_bits != 4:  # |w| <= 2^6 keeps vpmaddubsw's pair sums exact
        return False
    shape = tuple(l.attrs["weight_shape"])
    if l.kind == "dense":
        kout, cin = shape
        if isa == "avx2" and _rows(l) < avx2.DENSE_MIN_ROWS:  # measured: the default kernel is faster
            return False
        return kout % 8 == 0 and cin % 4 == 0 and (l.tw.format == "pow2" or l.tw.layout.group_size % 4 == 0)
    if avx2.conv_unsupported(shape, l.attrs.get("strides", 1), l.attrs.get("dilation", 1), l.attrs.get("groups", 1),
                             "uint8", lanes=8 if isa == "avx2" else 4) is not None:
        return False
    return l.tw.format == "pow2" or (l.tw.layout.along == "in" and l.tw.layout.group_size % 4 == 0)


@relax.expr_functor.mutator
class _Lowering(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, analysis: _Analysis, expose_acc: bool, dot: str | None = None) -> None:
        super().__init__(mod)
        self.a = analysis
        self.dot = dot  # "avx2" | "sdot" | None: the target's int8 dot-product kernels
        self.fast_kernels: dict[str, str] = {}  # layer -> "avx2" | "sdot" | "lut"
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
            if lowered_users.get(q.var.__hash__(), 0) == len(analysis._users(q.var)):
                self.skip.update(v.__hash__() for v in q.chain)
        self.codes: dict[tuple, relax.Expr] = {}

    def _codes(self, q: _Quant) -> relax.Expr:
        producer = getattr(q, "produced_by", None)
        if producer is not None:
            return self.codes[("layer", id(producer))]
        if q.key not in self.codes:
            x = self.visit_expr(q.source)
            self.codes[q.key] = self.builder_.emit_te(
                kernels.quantize_act, x, scale=q.scale, bits=q.bits, signed=q.signed,
                primfunc_name_hint="quantize_act", primfunc_attrs=kernels.kernel_attrs("quantize_act"))
        return self.codes[q.key]

    def _emit(self, l: _Layer) -> relax.Expr:
        x = self._codes(l.quant)
        if l.tw.format == "pow2":
            fn = kernels.pow2_conv2d if l.kind == "conv2d" else kernels.pow2_dense
            args = [x, relax.const(l.tw.packed_codes()), relax.const(l.out_scale), relax.const(l.out_bias)]
            kw = dict(l.attrs, code_bits=l.tw.code_bits, relu=l.relu)
        elif isinstance(l.tw, qmath.IntWeight):
            fn = kernels.int_conv2d if l.kind == "conv2d" else kernels.int_dense
            args = [x, relax.const(l.tw.packed_codes()), relax.const(l.out_scale), relax.const(l.out_bias)]
            sc = l.tw.scale_codes()
            kw = dict(l.attrs, bits=l.tw.bits, group_size=l.tw.group_size, relu=l.relu,
                      scale_codes=None if sc is None else relax.const(sc))
        else:
            fn = kernels.ternary_conv2d if l.kind == "conv2d" else kernels.ternary_dense
            k = l.tw.layout.out_channels
            args = [x, relax.const(l.tw.packed_codes()),
                    relax.const(l.tw.alpha_q.numpy().astype(np.uint8).reshape(k, -1)),
                    relax.const(l.out_scale), relax.const(l.out_bias)]
            kw = dict(l.attrs, group_size=l.tw.layout.group_size, relu=l.relu)
        name = f"{'int' if isinstance(l.tw, qmath.IntWeight) else l.tw.format}_{l.kind}"
        dot_fn = _DOT_KERNELS.get((self.dot, name)) if self.dot and _dot_fits(l, self.dot) else None
        if self.dot == "avx2" and name == "ternary_dense" and _lut_fits(l):  # measured: faster for few rows
            fn, name = lut.ternary_dense_lut, "ternary_dense_lut"
            args[1] = relax.const(lut.base3_codes(l.tw.t.numpy().reshape(l.tw.layout.out_channels, -1)
                                                  [:, :l.attrs["weight_shape"][1]]))
            self.fast_kernels[l.name] = "lut"
        elif dot_fn is not None:
            fn, name = dot_fn, f"{name}_{self.dot}"
            self.fast_kernels[l.name] = self.dot
        if self.expose_acc:
            acc = self.builder_.emit_te(fn, *args, **kw, out_mode="acc", primfunc_name_hint=name,
                                        primfunc_attrs=kernels.kernel_attrs(name))
            self.accs.append(self.builder_.emit_output(acc))
        if l.requant is not None:
            out = self.builder_.emit_te(fn, *args, **kw, out_mode="requant", requant_scale=l.requant.scale,
                                        out_bits=l.requant.bits, out_signed=l.requant.signed,
                                        primfunc_name_hint=name, primfunc_attrs=kernels.kernel_attrs(name))
            self.codes[("layer", id(l))] = out
            return out
        return self.builder_.emit_te(fn, *args, **kw, out_mode="float", primfunc_name_hint=name,
                                     primfunc_attrs=kernels.kernel_attrs(name))

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


def lower_ternary(mod: tvm.IRModule, infos: dict[str, LayerInfo] | None = None, *, expose_acc: bool = False,
                  func_name: str = "main", target: tvm.target.Target | None = None
                  ) -> tuple[tvm.IRModule, LoweringReport]:
    """Lower the fake-quant ternary layers of ``mod[func_name]``; returns the new module and a report.

    ``infos`` (``weight_key`` -> LayerInfo) names layers and gives their group sizes; without it the
    largest group size that reproduces the weight exactly is used.  ``expose_acc`` appends every
    layer's int32 accumulators to the function's outputs (for bit-exact testing).  The layers that fit
    (unsigned 8-bit codes, K % 8 == 0, C % 4 == 0, ternary groups of a multiple of 4 along the input channels
    or 4-bit power-of-two codes) get the int8 dot-product kernels of the ``target``: ``kernels.avx2`` on x86
    with AVX2 (conv, and dense with at least ``kernels.avx2.DENSE_MIN_ROWS`` rows), ``kernels.sdot`` on
    aarch64 with +dotprod (conv); on x86 a ternary dense layer with at most ``kernels.lut.LUT_MAX_ROWS`` rows
    gets the lookup-table kernel (``kernels.lut``). Both row rules are measured (``scripts/bench_gemm.py
    --shapes``). The result is the same, bit for bit.
    """
    report = LoweringReport()
    # CanonicalizeBindings + DCE drop dead tuple members the importers leave, e.g. the constant
    # "indices" of torch's max_pool2d_with_indices, a whole activation-sized array
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = relax.transform.DeadCodeElimination([func_name])(mod)
    mod = relax.transform.FoldConstant()(mod)
    mod, report.requant_folded = fold_requantize(mod, func_name)
    func = mod[func_name]
    analysis = _Analysis(func, infos or {}, report)
    analysis.plan_requant()
    report.lowered = [l.name for l in analysis.layers]
    report.kernels = {l.name: str(l.tw.format) for l in analysis.layers}
    seen = set(report.lowered) | {name for name, _ in report.fallback}
    for info in (infos or {}).values():
        if info.name not in seen:
            report.fallback.append((info.name, "quantized by the quantizer, but its quantize -> op -> epilogue "
                                               "chain was not found in the imported graph"))
    report.requant_fused = [l.name for l in analysis.layers if l.requant is not None]
    if not analysis.layers:
        return mod, report
    mut = _Lowering(mod, analysis, expose_acc, dot=_dot_isa(target))
    new_func = mut.visit_expr(func)
    report.fast_kernels = mut.fast_kernels
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


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.LowerTernary")
class LowerTernary:
    """Module-pass form of :func:`lower_ternary` (keeps its report in ``self.report``)."""

    def __init__(self, infos: dict[str, LayerInfo] | None = None, expose_acc: bool = False) -> None:
        self.infos = infos
        self.expose_acc = expose_acc
        self.report = LoweringReport()

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out, self.report = lower_ternary(mod, self.infos, expose_acc=self.expose_acc)
        return out
