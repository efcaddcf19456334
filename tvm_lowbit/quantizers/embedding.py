"""Embedding tables in integers: ``nn.Embedding`` -> :class:`QEmbedding`, an integer table with one float32
scale per row (per token), exact in fake-quant.

A word-embedding table is most of a small transformer's bytes (paraphrase-MiniLM-L3-v2: 30522 x 384
float32 = 46.9 MB against 5.3 M Linear weights), so a model whose Linear layers are 4-bit but whose table is
float32 is larger than ONNX Runtime's dynamic int8 (which quantizes Gather too).  Here each table is
rounded in one of the integer weight formats (``formats``: ``int8`` one scale per row, ``int4-g0`` int4 per
row, ``int4`` / ``int4-gN`` int4 in groups of N along the row with 8-bit scale codes, ``int8-gN``); a row
plays the part of a Linear layer's output channel.  The fake-quant module computes::

    y = F.embedding(ids, table_int) * F.embedding(ids, row_scale)      # float32 [..., D] * [..., 1]

``table_int`` holds the integers (``scale code * code`` for grouped formats) as float32, ``row_scale`` the
float32 scale of each row.  One float32 multiply of an integer and a float32 is the exact product rounded
once, which is what ``qmath.dequantize`` computes (float64 product, one rounding).  The compiler
(``passes.embedding.LowerEmbeddings``) stores ``table_int`` as packed integer codes and gathers them into
the same float32 integers, and the multiply by the gathered scales is the same op, so the compiled model's
values equal the fake-quant model's bit for bit.

``tvm_lowbit.quantize(..., embeddings="int8")`` (the default) quantizes every table of at least
``SMALL_TABLE_BYTES`` before the scheme runs (``quantize_with_embeddings``); ``embeddings="float"`` or None keeps
them float.  Smaller tables stay float (named) unless a mapping names them.  What cannot be quantized
is named (module path, class, reason) in the model's ``tvm_lowbit_report`` and warned about; a table named
explicitly in a mapping that cannot be quantized is a ValueError.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tvm_lowbit import formats
from tvm_lowbit.quantizers import inputs
from tvm_lowbit.quantizers.surgery import QuantReport, Skipped, set_module

DEFAULT_EMBEDDING_FORMAT = "int8"
# a table below this many float32 bytes stays float unless a mapping names it: its rows are shared by many tokens
# (a token-type row is added to every token: MiniLM's 2 x 384 token-type table in int8 alone costs its lowest
# sentence cosine 0.9987, the 30522-row word table in int8 0.99996) and its bytes are few (MiniLM's 512-row
# position table: 0.79 MB, and its lookups at constant positions are folded at compile time anyway)
SMALL_TABLE_BYTES = 1 << 20
EmbeddingFormats = str | Mapping[str, str] | None


class QEmbedding(nn.Module):
    """An embedding table as integers and per-row float32 scales (see the module docstring).  ``weight``
    reads the dequantized table, so code that reads the table directly sees the quantized values too."""

    kind = "embedding"

    def __init__(self, name: str, emb: nn.Embedding, fmt: formats.Format) -> None:
        super().__init__()
        tw = fmt.quantize(emb.weight.detach())
        if tw is None:
            raise ValueError(f"embedding {name!r}: format {fmt.name!r} keeps the table float")
        self.layer_name = name
        self.weight_format = str(tw.format)
        self.group_size = int(tw.group_size)
        self.format_name = fmt.name
        self.num_embeddings, self.embedding_dim = int(emb.num_embeddings), int(emb.embedding_dim)
        self.padding_idx = emb.padding_idx
        self.register_buffer("table_int", tw.w_int.to(torch.float32))
        self.register_buffer("row_scale", tw.w_scale.to(torch.float32).reshape(-1, 1).clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (float32, one rounding of ``table_int * row_scale``)."""
        return self.table_int * self.row_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table_int) * F.embedding(ids, self.row_scale)

    def storage_bytes(self) -> int:
        """Bytes of the table as compiled: its codes, group scale codes and one float32 scale per row."""
        obj, _ = formats.decompose(self.weight_format, self.table_int.numpy(), self.group_size)
        return formats.weight_bytes(obj, self.table_int.numel())

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}, {self.num_embeddings}x{self.embedding_dim}, {self.format_name}"


def embedding_format(name: str) -> formats.Format | None:
    """The format of an embedding table (None: stays float); a ValueError for a format no table takes."""
    if name is None or str(name).strip().lower() == "float":
        return None
    fmt = formats.parse_format(name)
    if fmt.is_float:
        return None
    if fmt.kind != "int":
        raise ValueError(f"embedding format {name!r}: embedding tables are stored as int8 or int4 rows with a "
                         "float32 scale per row: use int8, int8-gN, int4 (groups of 32), int4-gN, int4-g0 (per row) "
                         "or float")
    return fmt


def why_not(module: nn.Module) -> str | None:
    """None if ``module`` (an embedding) can become a :class:`QEmbedding`, else why not."""
    cls = type(module).__name__
    if isinstance(module, nn.EmbeddingBag):
        return "EmbeddingBag reduces its rows (sum/mean/max) inside one op; only nn.Embedding lookups are quantized"
    if not isinstance(module, nn.Embedding):
        return f"{cls} is not an nn.Embedding"
    if type(module).forward is not nn.Embedding.forward:
        return f"{cls} overrides nn.Embedding.forward, so a plain integer-table lookup cannot stand for it"
    if module.max_norm is not None:
        return (f"max_norm={module.max_norm:g} renormalizes the looked-up rows of the float table at run time "
                "(in place); the integer table has no such form")
    if module.weight.dim() != 2 or not torch.isfinite(module.weight).all():
        return f"its table {tuple(module.weight.shape)} is not a finite 2-D float table"
    return None


def _called(model: nn.Module, names: list[str], example: inputs.Batch) -> set[str]:
    called: set[str] = set()
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, _a, n=n: called.add(n)) for n in names]
    try:
        with torch.no_grad():
            inputs.call(model, example)
    finally:
        for h in handles:
            h.remove()
    return called


def quantize_embeddings(model: nn.Module, fmt: EmbeddingFormats = DEFAULT_EMBEDDING_FORMAT,
                        example: inputs.Batch | None = None) -> tuple[dict[str, str], list[Skipped]]:
    """Replace the embedding tables of ``model`` (in place) by :class:`QEmbedding`.

    ``fmt``: one format for every table of at least ``SMALL_TABLE_BYTES`` (``"int8"``, ``"int4-g0"``, ...;
    ``"float"``/None: none), or a mapping module path -> format (the tables it names, any size; a named table
    that cannot be quantized is a ValueError).  ``example``: one input batch; a table its forward does not call (its weight read directly
    by the parent's code) is then left float and named.  Returns (path -> format of each quantized table,
    the tables left float with why)."""
    embs = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    if isinstance(fmt, Mapping):
        unknown = [n for n in fmt if n not in embs]
        if unknown:
            raise ValueError(f"embeddings: no embedding module {', '.join(map(repr, unknown))} in the model (its "
                             f"embedding modules: {', '.join(embs) or 'none'})")
        wanted = {n: embedding_format(f) for n, f in fmt.items()}
    else:
        one = embedding_format(fmt)  # type: ignore[arg-type]
        wanted = {n: one for n in embs}
    skipped: list[Skipped] = []
    todo: dict[str, formats.Format] = {}
    for n, f in wanted.items():
        m = embs[n]
        if f is None:
            skipped.append(Skipped(n, type(m).__name__, "embedding table kept float by the configuration", True))
            continue
        if not isinstance(fmt, Mapping) and isinstance(m, nn.Embedding) and 4 * m.weight.numel() < SMALL_TABLE_BYTES:
            skipped.append(Skipped(n, type(m).__name__, f"a small table ({m.num_embeddings} x {m.embedding_dim}, "
                                   f"{4 * m.weight.numel():,d} bytes float32, under SMALL_TABLE_BYTES) kept float: "
                                   "its rows are shared by many tokens, so their rounding error reaches every "
                                   "token; name it in a mapping to quantize it", True))
            continue
        why = why_not(m)
        if why is not None:
            if isinstance(fmt, Mapping):
                raise ValueError(f"embedding {n!r} ({type(m).__name__}) cannot be quantized: {why}")
            skipped.append(Skipped(n, type(m).__name__, why))
            continue
        todo[n] = f
    if example is not None and todo:
        called = _called(model, list(todo), example)
        for n in [n for n in todo if n not in called]:
            why = ("not called by forward() on the example input (if its table is used, its parent's code reads "
                   "the weight directly, which cannot be replaced)")
            if isinstance(fmt, Mapping):
                raise ValueError(f"embedding {n!r} ({type(embs[n]).__name__}) cannot be quantized: {why}")
            skipped.append(Skipped(n, type(embs[n]).__name__, why))
            del todo[n]
    done: dict[str, str] = {}
    for n, f in todo.items():
        set_module(model, n, QEmbedding(n, embs[n], f))  # type: ignore[arg-type]
        done[n] = f.name
    return done, skipped


def embedding_layers(model: nn.Module) -> dict[str, QEmbedding]:
    """Module path -> QEmbedding of every quantized embedding table."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QEmbedding)}


def embedding_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes as compiled, number of table entries) of every embedding table of ``model``: QEmbedding by
    its codes and scales, a float nn.Embedding / EmbeddingBag at 4 bytes an entry."""
    total, count = 0, 0
    for m in model.modules():
        if isinstance(m, QEmbedding):
            total += m.storage_bytes()
            count += m.table_int.numel()
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            total += 4 * m.weight.numel()
            count += m.weight.numel()
    return total, count


def quantize_with_embeddings(run: Callable[[nn.Module], nn.Module], model: nn.Module, fmt: EmbeddingFormats,
                             calib_data: object, inplace: bool, batch_size: int = 1) -> nn.Module:
    """``run(m)`` (a scheme's handler) on ``model`` with its embedding tables quantized first (on a copy
    unless ``inplace``); the tables are then recorded in the result's ``tvm_lowbit_report``.  A model with
    no embedding table, or ``fmt`` None/"float", goes to ``run`` unchanged."""
    if not isinstance(model, nn.Module) or fmt is None or (isinstance(fmt, str) and fmt.strip().lower() == "float"):
        return run(model)
    if not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()):
        if isinstance(fmt, Mapping) and fmt:
            raise ValueError(f"embeddings: the model has no embedding module (asked for {', '.join(fmt)})")
        return run(model)
    example = None  # a one-shot iterator is left for the scheme: then no table is checked for being called
    if not hasattr(calib_data, "__next__"):
        example = inputs.take(inputs.gather(calib_data, batch_size, limit=1,
                                            n_inputs=inputs.positional_inputs(model)), 0, 1)
    m = model if inplace else copy.deepcopy(model)
    was_training = m.training
    m.eval()
    done, skipped = quantize_embeddings(m, fmt, example)
    m.train(was_training)
    qmodel = run(m)
    report = getattr(qmodel, "tvm_lowbit_report", None)
    if not isinstance(report, QuantReport):
        report = QuantReport()
        qmodel.tvm_lowbit_report = report
    for n, f in done.items():
        report.quantized[n] = f"{f} (embedding table)"
    # the scheme's model reading names a float nn.Embedding with a generic reason: the reason here replaces it
    mine = {s.path for s in skipped} | set(done)
    report.left_float = [s for s in report.left_float if s.path not in mine] + skipped
    cannot = [s for s in skipped if not s.chosen]
    if cannot:
        warnings.warn(f"{len(cannot)} embedding table(s) left float: " + "; ".join(str(s) for s in cannot), stacklevel=3)
    if done:
        report.notes.append(f"{len(done)} embedding table(s) quantized before the scheme ran (its budget and "
                            f"corrections measured against the model with them): "
                            + ", ".join(f"{n} {f}" for n, f in done.items()))
    return qmodel
