"""Embedding tables in integers (quantizers.embedding, passes.embedding, kernels.embedding): the fake-quant
lookup against a NumPy dequantization, the compiled integer gather against the fake-quant model bit for bit
(a PyTorch nn.Embedding and an ONNX Gather), the weight bytes, and every table that cannot be quantized
named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import formats
from tvm_lowbit.quantizers.embedding import SMALL_TABLE_BYTES, QEmbedding, embedding_bytes, quantize_embeddings

FORMATS = ("int8", "int4-g0", "int4-g8", "int8-g16")


class Tokens(nn.Module):
    """Word and position embeddings, a Linear on top: ``[n, seq]`` int64 ids -> ``[n, seq, out]``."""

    def __init__(self, vocab: int = 64, dim: int = 32, out: int = 16) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(16, dim)
        self.proj = nn.Linear(dim, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        return self.proj(self.word(ids) + self.position(pos)[None])


class Lookup(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) * 2.0


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def numpy_lookup(table: torch.Tensor, fmt: str, ids: np.ndarray) -> np.ndarray:
    """The fake-quant lookup from the format's integer weight, in NumPy: float32(w_int[ids] * w_scale[ids])."""
    tw = formats.parse_format(fmt).quantize(table.detach())
    w_int = tw.w_int.numpy().astype(np.float64)
    scale = tw.w_scale.numpy().astype(np.float64)
    return (w_int[ids] * scale[ids][..., None]).astype(np.float32)  # exact product, rounded once


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_lookup_is_the_dequantized_table(fmt: str) -> None:
    torch.manual_seed(0)
    m = Lookup(50, 24)
    table = m.emb.weight.detach().clone()
    done, skipped = quantize_embeddings(m, {"emb": fmt})
    assert done == {"emb": formats.parse_format(fmt).name} and skipped == []
    q = m.emb
    assert isinstance(q, QEmbedding)
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        got = q(ids).numpy()
    ref = numpy_lookup(table, fmt, ids.numpy())
    assert bits_equal(got, ref)
    # the table really is integers of the format, and reading .weight gives the same dequantized rows
    qmax = 127 if fmt.startswith("int8") else 7
    assert torch.equal(q.table_int, torch.round(q.table_int))
    if fmt in ("int8", "int4-g0"):
        assert float(q.table_int.abs().max()) <= qmax
    assert bits_equal(q.weight[ids].detach().numpy(), got)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_gather_equals_fake_quant_bit_for_bit(fmt: str) -> None:
    torch.manual_seed(1)
    m = Lookup(300, 32).eval()  # rows a multiple of every group: no ragged group padding in the byte ratios
    with torch.no_grad():
        float_art = tvm_lowbit.compile(m, torch.randint(0, 300, (2, 9)).numpy(), "x86-host")
    quantize_embeddings(m, {"emb": fmt})
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        want = m(ids).numpy()
    art = tvm_lowbit.compile(m, ids.numpy(), "x86-host")
    got = np.asarray(art.run(ids.numpy()))
    assert bits_equal(got, want)
    assert list(art.report.embeddings.values()) == [_storage(fmt)]
    # the float table is gone: codes (+ scale codes) and a float32 scale per row
    assert art.weight_bytes == m.emb.storage_bytes()
    assert art.weight_bytes < float_art.weight_bytes / (3 if fmt.startswith("int8") else 5)
    assert not float_art.report.embeddings  # a float table is not integers: it stays as it is


def _storage(fmt: str) -> str:
    f = formats.parse_format(fmt)
    return f"int{f.bits}" + (f"-g{f.group_size}" if f.group_size else " per row")


def test_quantize_takes_the_tables_and_compiles_them() -> None:
    """Through ``tvm_lowbit.quantize``: the word table (above SMALL_TABLE_BYTES) int8 by default, the small
    position table named and kept float; compiled equal to the fake-quant model; weight bytes shrink."""
    torch.manual_seed(2)
    vocab = SMALL_TABLE_BYTES // (4 * 32) + 8
    model = Tokens(vocab=vocab).eval()
    calib = torch.randint(0, vocab, (16, 6))
    cfg = tvm_lowbit.FGQ(group_size=4, first_layer="fgq", last_layer="fgq")
    qf = tvm_lowbit.quantize(model, cfg, calib, embeddings="float", progress=False)
    q = tvm_lowbit.quantize(model, cfg, calib, progress=False)
    assert isinstance(q.word, QEmbedding) and isinstance(q.position, nn.Embedding)
    assert isinstance(model.word, nn.Embedding)  # the caller's model is untouched
    rep = q.tvm_lowbit_report
    assert rep.quantized["word"].startswith("int8")
    small = [s for s in rep.left_float if s.path == "position"]
    assert small and small[0].cls == "Embedding" and "small table" in small[0].reason
    x = torch.randint(0, vocab, (2, 6))
    with torch.no_grad():
        want = q(x).numpy()
    art = tvm_lowbit.compile(q, x.numpy(), "x86-host")
    assert bits_equal(np.asarray(art.run(x.numpy())), want)
    assert art.report.lowered == ["proj"] and len(art.report.embeddings) == 1
    art_f = tvm_lowbit.compile(qf, x.numpy(), "x86-host")
    table = 4 * vocab * 32
    assert art_f.weight_bytes - art.weight_bytes == table - q.word.storage_bytes()
    assert embedding_bytes(q)[0] < embedding_bytes(qf)[0] / 3


def test_onnx_gather_compiles_bit_for_bit() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from tvm.relax.frontend.onnx import from_onnx

    from tvm_lowbit.compiler import build
    from tvm_lowbit.passes.embedding import quantize_embedding_takes

    rng = np.random.default_rng(3)
    table = rng.standard_normal((64, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
         helper.make_node("Mul", ["rows", "two"], ["out"])],
        "gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, 16])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.float32(2.0), "two")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    mod = from_onnx(proto, shape_dict={"ids": [2, 5]}, keep_params_in_input=False)
    for fmt in ("int8", "int4-g8"):
        qmod, infos = quantize_embedding_takes(mod, fmt)
        assert [i.name for i in infos.values()] == ["gather.0"]
        art = build(qmod, "x86-host", infos, (2, 5))
        ids = rng.integers(0, 64, (2, 5)).astype(np.int64)
        want = numpy_lookup(torch.from_numpy(table), fmt, ids) * np.float32(2.0)
        assert bits_equal(np.asarray(art.run(ids)), want)
        assert art.report.embeddings == {"gather.0": _storage(fmt)} and not art.report.fallback
        assert art.weight_bytes < table.nbytes / 3


def test_what_cannot_be_quantized_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.normed = nn.Embedding(40, 8, max_norm=1.0)
            self.bag = nn.EmbeddingBag(40, 8)
            self.direct = nn.Embedding(40, 8)  # its table read by the parent, not through its forward

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.normed(ids).sum(1) + self.bag(ids) + self.direct.weight[ids].sum(1)

    ids = torch.randint(0, 40, (2, 5))
    with pytest.raises(ValueError, match=r"embedding 'normed' \(Embedding\) cannot be quantized: max_norm"):
        quantize_embeddings(Odd(), {"normed": "int8"})
    with pytest.raises(ValueError, match=r"embedding 'bag' \(EmbeddingBag\) cannot be quantized: EmbeddingBag"):
        quantize_embeddings(Odd(), {"bag": "int8"})
    with pytest.raises(ValueError, match=r"embedding 'direct' \(Embedding\) cannot be quantized: not called by forward"):
        quantize_embeddings(Odd(), {"direct": "int8"}, example=ids)
    with pytest.raises(ValueError, match=r"no embedding module 'nope'"):
        quantize_embeddings(Odd(), {"nope": "int8"})
    with pytest.raises(ValueError, match=r"embedding format 'ternary'.*int8"):
        quantize_embeddings(Odd(), "ternary")
    m = Odd()
    done, skipped = quantize_embeddings(m, {"normed": "float", "direct": "int4-g0"})
    assert done == {"direct": "int4-g0"} and [(s.path, s.chosen) for s in skipped] == [("normed", True)]
    # one format for all: every table is either quantized or named with its class and reason
    done, skipped = quantize_embeddings(Odd(), "int8", example=ids)
    assert done == {} and all(s.chosen and "small table" in s.reason for s in skipped if s.path != "bag")
    monkeypatch.setattr("tvm_lowbit.quantizers.embedding.SMALL_TABLE_BYTES", 0)
    done, skipped = quantize_embeddings(Odd(), "int8", example=ids)
    assert done == {}
    why = {s.path: (s.cls, s.reason) for s in skipped}
    assert why["normed"][0] == "Embedding" and "max_norm" in why["normed"][1]
    assert why["bag"][0] == "EmbeddingBag" and why["direct"][0] == "Embedding" and "not called" in why["direct"][1]
