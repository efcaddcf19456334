"""Embedding tables in integers, on the Relax graph: ``LowerEmbeddings`` (the compiler) and
``quantize_embedding_takes`` (the fake-quant form for a graph with no PyTorch module, e.g. an ONNX Gather).

**LowerEmbeddings.**  A fake-quant embedding (``quantizers.embedding.QEmbedding``) imports as::

    rows  = take(T, ids, axis=0)          # T: float32 constant [V, D] holding integers
    scale = take(S, ids, axis=0)          # S: float32 constant [V, 1], one scale per row
    y     = multiply(rows, scale)

Every ``take`` along axis 0 of a 2-D float32 constant whose values are all integers that an int8 / int4 table
holds (``qmath.decompose_int``: int4 or int8 per row, else int4 / int8 codes times 8-bit scale codes in
groups of N along the row) becomes the integer gather ``kernels.embedding.gather_int`` on the packed codes.
It writes the same float32 integers the float ``take`` read, so everything after it (the multiply by the
gathered scales, in the fake-quant's float op order) computes the same values bit for bit; only the stored
constant changes (30522 x 384 float32 = 46.9 MB -> 11.7 MB of int8 codes, 5.9 MB of int4 codes).  The
conversion is lossless for any such table, so it needs no word from the quantizer; ``infos`` (``weight_key``
of the table -> ``LayerInfo``) name the table and give its recorded format.  A table the quantizer recorded
but that no integer form holds stays float and is reported with the reason.

**quantize_embedding_takes.**  The same fake-quant form written into an imported module: every ``take`` along
axis 0 of a 2-D float32 constant table with at least ``min_rows`` rows (an ONNX ``Gather`` on an embedding
initializer) is replaced by ``take(T_int) * take(S)`` with ``T_int`` / ``S`` from the weight format
(``formats.parse_format(fmt).quantize``, per row = per output channel); returns the layer table to compile
it with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_lowbit import formats, qmath
from tvm_lowbit.kernels.embedding import NAME, gather_int
from tvm_lowbit.passes.layer_info import LayerInfo, weight_key
from tvm_lowbit.passes.patterns import const_value, var2val
from tvm_lowbit.passes.report import LoweringReport

TAKE = tvm.ir.Op.get("relax.take")
# (bits, group size) tried in order for a table with no recorded format: per row first, then the groups
GUESSES = ((4, 0), (8, 0), *((4, n) for n in (32, 16, 64, 128, 8)), *((8, n) for n in (32, 16, 64, 128, 8)))
MIN_ROWS = 2  # quantize_embedding_takes: tables with fewer rows are not embeddings worth a scale per row


@dataclass
class TableStorage:
    """How a table is stored: its integer weight (codes, scale codes) and the format name."""

    weight: qmath.IntWeight
    label: str


def _label(w: qmath.IntWeight) -> str:
    return f"int{w.bits}" + (f"-g{w.group_size}" if w.group_size else " per row")


def table_storage(table: np.ndarray, info: LayerInfo | None = None) -> tuple[TableStorage | None, str]:
    """The integer storage of a float32 ``[V, D]`` table whose values are integers, or (None, why not)."""
    a = np.asarray(table)
    if a.ndim != 2 or a.dtype != np.float32 or not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
        return None, "its table is not 2-D float32 integers"
    if info is not None and info.weight_format in ("int4", "int8"):
        obj, why = formats.decompose(info.weight_format, a, info.group_size)
        if obj is None:
            return None, why
        return TableStorage(obj, _label(obj)), ""  # type: ignore[arg-type]
    peak = float(np.abs(a).max(initial=0))
    for bits, n in GUESSES:
        if n == 0 and peak > qmath.int_qmax(bits):
            continue
        w = qmath.decompose_int(a, bits, n)
        if w is not None:
            return TableStorage(w, _label(w)), ""
    return None, "its integers fit no int4 / int8 table (per row, or 8-bit scale codes in groups of 8-128)"


@mutator
class _Lower(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, infos: dict[str, LayerInfo], report: LoweringReport) -> None:
        super().__init__(mod)
        self.infos = infos
        self.report = report
        self.values: dict = {}
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D401 - the mutator's hook
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or call.op != TAKE or call.attrs.axis is None or int(call.attrs.axis) != 0:
            return call
        table = const_value(call.args[0], self.values)
        if table is None or table.ndim != 2 or table.dtype != np.float32 or not np.array_equal(table, np.round(table)):
            return call
        info = self.infos.get(weight_key(table)) if self.infos else None
        name = info.name if info is not None else f"embedding table {tuple(table.shape)} #{self.count}"
        self.count += 1
        store, why = table_storage(table, info)
        if store is None:
            if info is not None:
                self.report.fallback.append((name, why))
            return call
        w = store.weight
        codes = w.packed_codes()
        kw: dict = {}
        sc = w.scale_codes()
        if sc is not None:
            kw["scale_codes"] = relax.const(sc, "uint8")
        out = self.builder_.emit_te(gather_int, relax.const(codes, str(codes.dtype)), call.args[1], bits=w.bits,
                                    dim=int(table.shape[1]), group_size=w.group_size, mode=str(call.attrs.mode),
                                    primfunc_name_hint=NAME, **kw)
        self.report.embeddings[name] = store.label
        return out


def lower_embeddings(mod: tvm.IRModule, infos: dict[str, LayerInfo] | None = None,
                     report: LoweringReport | None = None, func_name: str = "main") -> tvm.IRModule:
    """``mod`` with every integer-valued embedding ``take`` of ``mod[func_name]`` on the integer gather
    (module docstring); the tables go into ``report.embeddings`` (name -> storage)."""
    report = report if report is not None else LoweringReport()
    func = mod[func_name]
    rw = _Lower(mod, infos or {}, report)
    rw.values = var2val(func)
    rw.builder_.update_func(mod.get_global_var(func_name), rw.visit_expr(func))
    return relax.transform.DeadCodeElimination([func_name])(rw.builder_.get())


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.LowerEmbeddings")
class LowerEmbeddings:
    """Module-pass form of :func:`lower_embeddings` (after FoldConstant, so a lookup at constant indices,
    e.g. position embeddings, is folded away first)."""

    def __init__(self, infos: dict[str, LayerInfo] | None = None, report: LoweringReport | None = None,
                 func_name: str = "main") -> None:
        self.infos = infos
        self.report = report if report is not None else LoweringReport()
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return lower_embeddings(mod, self.infos, self.report, self.func_name)


@mutator
class _FakeQuant(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, fmt: formats.Format, min_rows: int) -> None:
        super().__init__(mod)
        self.fmt = fmt
        self.min_rows = min_rows
        self.values: dict = {}
        self.infos: dict[str, LayerInfo] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D401 - the mutator's hook
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or call.op != TAKE or call.attrs.axis is None or int(call.attrs.axis) != 0:
            return call
        table = const_value(call.args[0], self.values)
        if table is None or table.ndim != 2 or table.dtype != np.float32 or table.shape[0] < self.min_rows:
            return call
        if const_value(call.args[1], self.values) is not None:
            return call  # constant indices: folded away, nothing is gathered at run time
        tw = self.fmt.quantize(torch.from_numpy(np.ascontiguousarray(table)))
        if tw is None:
            return call
        t_int = tw.w_int.numpy().astype(np.float32)
        scale = tw.w_scale.numpy().astype(np.float32).reshape(-1, 1)
        name = f"gather.{len(self.infos)}"
        self.infos[weight_key(t_int)] = LayerInfo(name, int(tw.group_size), str(tw.format))
        mode, idx = str(call.attrs.mode), call.args[1]
        rows = self.builder_.emit(relax.op.take(relax.const(t_int, "float32"), idx, 0, mode))
        s = self.builder_.emit(relax.op.take(relax.const(scale, "float32"), idx, 0, mode))
        return relax.op.multiply(rows, s)


def quantize_embedding_takes(mod: tvm.IRModule, fmt: str = "int8", min_rows: int = MIN_ROWS,
                             func_name: str = "main") -> tuple[tvm.IRModule, dict[str, LayerInfo]]:
    """The fake-quant form of every embedding ``take`` of ``mod[func_name]`` (module docstring), and the layer
    table (``weight_key`` of each integer table -> ``LayerInfo``, named ``gather.0``, ``gather.1``, ... in
    graph order)."""
    f = formats.parse_format(fmt)
    if f.kind != "int":
        raise ValueError(f"embedding format {fmt!r}: embedding tables are int8 or int4 rows with a float32 scale per "
                         "row (int8, int8-gN, int4, int4-gN, int4-g0)")
    func = mod[func_name]
    rw = _FakeQuant(mod, f, min_rows)
    rw.values = var2val(func)
    rw.builder_.update_func(mod.get_global_var(func_name), rw.visit_expr(func))
    return relax.transform.DeadCodeElimination([func_name])(rw.builder_.get()), rw.infos
