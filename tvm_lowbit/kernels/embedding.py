"""The integer embedding gather: rows of an int8 / packed int4 table (times 8-bit group scale codes) looked up
by index and written as float32 integers, exactly the ``table_int`` rows of the fake-quant
``quantizers.embedding.QEmbedding`` (the per-row float32 scale multiplies after it, as in fake-quant).

Codes are those of ``qmath.IntWeight.packed_codes`` for a 2-D ``[V, D]`` table: int8 ``[V, D]``, or uint8
``[V, ceil(D / 2)]`` for int4 (low nibble first, two's complement nibbles); ``scale codes`` uint8
``[V, ceil(D / N)]`` for groups of N along the row (element ``j`` of a row is in group ``j // N``).  Not in the
kernel registry (which holds conv/dense kernels of a ``LayerSpec``): ``passes.embedding`` emits it directly.
"""

from __future__ import annotations

from tvm import te, tirx

NAME = "embedding_gather_int"
TAKE_MODES = ("fast", "wrap", "clip")


def row_index(i: tirx.PrimExpr, rows: int, mode: str) -> tirx.PrimExpr:
    """The row ``take(..., mode)`` reads for index ``i`` of a table of ``rows`` rows."""
    i = i.astype("int64")
    if mode == "wrap":
        return tirx.floormod(i, tirx.const(rows, "int64"))
    if mode == "clip":
        return tirx.max(tirx.min(i, tirx.const(rows - 1, "int64")), tirx.const(0, "int64"))
    return i


def gather_int(codes: te.Tensor, idx: te.Tensor, scale_codes: te.Tensor | None = None, *, bits: int, dim: int,
               group_size: int = 0, mode: str = "wrap") -> te.Tensor:
    """float32 ``[*idx.shape, dim]``: row ``idx[...]`` of the integer table (``code * scale_code`` when
    grouped), each value an exact float32 integer."""
    if bits not in (4, 8):
        raise ValueError(f"{NAME}: {bits}-bit codes; int4 or int8 only")
    if mode not in TAKE_MODES:
        raise ValueError(f"{NAME}: take mode {mode!r}; one of {', '.join(TAKE_MODES)}")
    rows = int(codes.shape[0])

    def value(*ax: tirx.Var) -> tirx.PrimExpr:
        r, j = row_index(idx[ax[:-1]], rows, mode), ax[-1]
        if bits == 8:
            c = codes[r, j].astype("int32")
        else:
            byte = codes[r, tirx.floordiv(j, 2)].astype("int32")
            nib = tirx.bitwise_and(tirx.shift_right(byte, tirx.floormod(j, 2) * 4), 15)
            c = tirx.Select(nib >= 8, nib - 16, nib)
        if scale_codes is not None:
            c = c * scale_codes[r, tirx.floordiv(j, group_size)].astype("int32")
        return c.astype("float32")

    return te.compute((*idx.shape, dim), value, name="embedding_gather_int")
