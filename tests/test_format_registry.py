"""The weight-format registry: a toy format registered from this file (one class, one registration line)
is named, quantized, counted, searched by Auto and compiled bit for bit by the existing int4 kernels."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from tvm_lowbit import formats, qmath
from tvm_lowbit.formats import Format, WeightFormat, WeightObject


@dataclass
class SignWeight:
    """+-1 (0 where the weight is 0) times a per-channel scale: mean |w| of the channel."""

    w_int: torch.Tensor    # int32, the weight's shape, values in {-1, 0, 1}
    w_scale: torch.Tensor  # float32 [K]

    format = "sign"
    group_size = 0

    def dequantized(self) -> torch.Tensor:
        return qmath.dequantize(self.w_int, self.w_scale)


class SignFormat(WeightFormat):
    """The toy format: its layers record "sign"; the compiler runs them as int4 per channel."""

    kind = "sign"
    family = "int"
    recorded = ("sign",)
    grammar = ("sign",)
    description = "sign"

    def parse(self, name: str) -> Format | None:
        return Format("sign", self.kind, 1) if name == "sign" else None

    def quantize(self, fmt: Format, w: torch.Tensor) -> WeightObject | None:
        w = w.detach().double()
        scale = w.abs().reshape(w.shape[0], -1).mean(1)
        return SignWeight(torch.sign(w).to(torch.int32), scale.float())  # type: ignore[return-value]

    def decompose(self, weight_format: str | None, w_int: np.ndarray, group_size: int | None
                  ) -> tuple[WeightObject | None, str]:
        if not np.isin(w_int, (-1, 0, 1)).all():
            return None, f"its integer weight {tuple(w_int.shape)} is not +-1"
        return qmath.decompose_int(w_int, 4, 0), ""

    def storage_bytes(self, obj: WeightObject | None, numel: int) -> int:
        tw, _ = self.decompose("sign", obj.w_int.numpy(), 0)  # type: ignore[union-attr]
        return tw.storage_bytes()  # type: ignore[union-attr]


@pytest.fixture
def sign() -> Iterator[WeightFormat]:
    fmt = formats.register_format(SignFormat())  # the one registration line
    yield fmt
    formats.unregister_format("sign")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.avg_pool2d(x, 2).flatten(1))


def test_builtin_names_and_errors() -> None:
    assert [f.kind for f in formats.registered_formats()][:5] == ["ternary", "pow2", "kbit", "int", "float"]
    assert formats.parse_format(" Ternary-N16 ") == Format("ternary-n16", "ternary", 2, 16)
    assert formats.parse_format("int4-g32").name == "int4" and formats.parse_format("pow2-3").bits == 3
    with pytest.raises(ValueError, match=re.escape("use ternary[-nN], pow2-3|pow2-4|pow2-5, int4[-gN], int8[-gN] "
                                                   "or float")):
        formats.parse_format("int")  # the k-bit format of the training quantizers has no name
    with pytest.raises(ValueError, match="already registered"):
        formats.register_format(formats.get_format("pow2"))
    w = np.array([[3.0, 1000.0]])
    assert formats.decompose(None, w, None)[1] == ("its integer weight (1, 2) is not grouped-ternary with group size 64 "
                                                   "and 8-bit alpha codes (nor power-of-two)")
    assert formats.decompose("fp8", w, 0)[1] == "no integer kernel for weight format 'fp8' (known: ternary, pow2, int, int4, int8)"
    tw, _ = formats.decompose("int", np.array([[3.0, 200.0]]), 0)  # beyond int8: ternary groups of one
    assert isinstance(tw, qmath.TernaryWeight) and formats.kernel_family(tw) == "ternary"


def test_toy_format_is_named_decomposed_and_counted(sign: WeightFormat) -> None:
    fmt = formats.parse_format("SIGN")
    assert fmt.spec is sign and not fmt.is_float and fmt.family == "int"
    with pytest.raises(ValueError, match=r"int8\[-gN\], float or sign"):
        formats.parse_format("sign2")
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    sw = fmt.quantize(w)
    assert set(sw.w_int.unique().tolist()) == {-1, 1}
    tw, why = formats.decompose("sign", sw.w_int.numpy(), 0)
    assert why == "" and isinstance(tw, qmath.IntWeight) and tw.bits == 4 and formats.kernel_family(tw) == "int"
    np.testing.assert_array_equal(tw.w_int.numpy(), sw.w_int.numpy())
    assert formats.decompose("sign", 2 * sw.w_int.numpy(), 0) == (None, "its integer weight (6, 3, 3, 3) is not +-1")
    # int4 per channel: two codes a byte per row of 27, one float32 scale per channel
    assert fmt.weight_bytes(w) == formats.weight_bytes(sw, w.numel()) == 6 * 14 + 6 * 4


def test_auto_searches_and_compiles_the_toy_format(sign: WeightFormat, tmp_path) -> None:
    pytest.importorskip("tvm")
    from test_compile import check_bit_exact

    import tvm_lowbit
    from tvm_lowbit.quantizers.auto import Auto
    from tvm_lowbit.quantizers.layers import quant_layers

    torch.manual_seed(0)
    model = Small().eval()
    calib = torch.randn(64, 3, 8, 8)
    val = torch.randn(32, 3, 8, 8)
    cfg = Auto(budget="agree>=0", formats=("sign", "float"), rounding="nearest", sensitivity_images=32,
               cache_dir=str(tmp_path), max_evals=3)
    q = tvm_lowbit.quantize(model, cfg, calib, val, progress=False)
    layers = quant_layers(q)
    assert {n: m.weight_format for n, m in layers.items()} == {"conv": "sign", "fc": "sign"}
    assert q.tvm_lowbit_auto.formats == {"conv": "sign", "fc": "sign"}
    nbytes, count = formats.model_weight_bytes(q)
    assert count == 8 * 27 + 10 * 128
    assert nbytes == (8 * 14 + 8 * 4) + (10 * 64 + 10 * 4) == q.tvm_lowbit_auto.weight_bytes
    art = check_bit_exact(q, calib[:2].numpy())
    assert set(art.report.lowered) == {"conv", "fc"}
