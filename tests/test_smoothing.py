"""SmoothQuant-style smoothing (exact in float, helps static int8 activations with outlier channels) and
Auto's budget check on held-out inputs (a split of the calibration data, a margin, overlap reported)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit.quantizers.auto import Auto, Budget, build_mixed, shared_rows
from tvm_lowbit.quantizers.smoothing import SCALE_ATTR, is_smoothed, smooth


class Block(nn.Module):
    """A post-LN FFN block: the LayerNorm output feeds a Linear *and* the residual (no LN fold exists)."""

    def __init__(self, d: int = 32, ff: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.inp(x))
        return self.down(nn.functional.gelu(self.up(h))) + h


def outlier_block() -> Block:
    """Outlier channels as in BERT-style encoders: two LayerNorm outputs and two GELU outputs ~25x
    larger than the rest, read by small weights."""
    torch.manual_seed(0)
    b = Block().eval()
    with torch.no_grad():
        b.norm.weight[[3, 17]] = 25.0
        b.up.weight[:, [3, 17]] *= 0.04
        b.up.bias[[5, 40]] = 25.0
        b.down.weight[:, [5, 40]] *= 0.04
    return b


def data(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def test_smoothing_keeps_the_float_function_and_flattens_input_ranges() -> None:
    model, x = outlier_block(), data()
    sm, rep = smooth(model, x, alpha=0.8)
    assert set(rep.scales) == {"inp", "up", "down"}
    assert not is_smoothed(model.up) and is_smoothed(sm.up)  # the caller's model is untouched
    with torch.no_grad():
        ref, got = model(x), sm(x)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(sm.up.weight, model.up.weight)
        # the input the weight use sees: the LayerNorm output divided by s, outlier channels flattened
        h = model.norm(model.inp(x))
        seen = (h / getattr(sm.up, SCALE_ATTR)).abs().amax(0)
        orig = h.abs().amax(0)
    assert float(seen.max() / seen.median()) < 0.5 * float(orig.max() / orig.median())
    with pytest.raises(ValueError, match="already smoothed"):
        smooth(sm, x)
    with pytest.raises(ValueError, match="alpha"):
        smooth(model, x, alpha=1.5)
    only, rep2 = smooth(model, x, layers=("down",))
    assert set(rep2.scales) == {"down"} and not is_smoothed(only.up)


def test_smoothing_lowers_static_int8_error_on_outlier_channels() -> None:
    # only the layers with outlier inputs: smoothing a layer without them narrows its per-tensor range
    # to what the calibration inputs reached in every channel, and unseen inputs then saturate
    model, x, xv = outlier_block(), data(256), data(32, seed=2)
    sm, _ = smooth(model, x, alpha=0.8, layers=("up", "down"))
    cfg = Auto(budget="cos>=0", formats=("int8",), bias_correction=False, rounding="nearest")
    with torch.no_grad():
        ref = model(xv)
        err = {name: float(torch.square(build_mixed(m, {n: "int8" for n in ("up", "down")}, x, cfg)(xv)
                                         - ref).mean())
               for name, m in (("plain", model), ("smoothed", sm))}
    assert err["smoothed"] < 0.5 * err["plain"], err


def test_smoothed_model_compiles_and_matches_its_fake_quant() -> None:
    model, x = outlier_block(), data()
    sm, _ = smooth(model, x, alpha=0.8)
    q = tvm_lowbit.quantize(sm, Auto(budget="cos>=0", formats=("int8",), rounding="nearest"), x, x[:16],
                            progress=False)
    with torch.no_grad():
        want = q(x[:8]).numpy()
    got = np.asarray(tvm_lowbit.compile(q, x[:8].numpy(), "x86-host").run(x[:8].numpy()))
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_budget_margin_tightens_each_kind() -> None:
    assert Budget("cos", 0.98).met(0, 0, 0.984) and not Budget("cos", 0.98).met(0, 0, 0.984, margin=0.005)
    assert Budget("agree", 90).met(0, 91) and not Budget("agree", 90).met(0, 91, margin=2)
    assert Budget("drop", 1.0).met(0.8, 0) and not Budget("drop", 1.0).met(0.8, 0, margin=0.5)
    with pytest.raises(ValueError, match="margin"):
        Auto(margin=-1)
    with pytest.raises(ValueError, match="holdout"):
        Auto(holdout=1.0)


def test_auto_without_val_data_checks_the_budget_on_held_out_calibration_inputs() -> None:
    model = outlier_block()
    x = data(64)
    x[48:] *= 40.0  # the last quarter: far outside what the first 48 inputs calibrate to
    cfg = Auto(budget="cos>=-1", formats=("int8",), rounding="nearest", bias_correction=False)
    held = tvm_lowbit.quantize(model, cfg, x, progress=False).tvm_lowbit_auto
    assert held.val_images == 16 and "held out" in held.val_source and held.val_overlap == 0
    # the same inputs as calibration and check: they fit the scales, the check reads far better (and says so)
    seen = tvm_lowbit.quantize(model, cfg, x, x[48:], progress=False).tvm_lowbit_auto
    assert seen.val_overlap == 16 and "also calibration inputs" in seen.summary()
    assert held.cos_min < seen.cos_min - 0.05, (held.cos_min, seen.cos_min)
    with pytest.raises(ValueError, match="needs validation data"):
        tvm_lowbit.quantize(model, Auto(budget=1.0), x, progress=False)
    with pytest.raises(ValueError, match="cannot be split"):
        tvm_lowbit.quantize(model, cfg, x[:1], progress=False)


def test_shared_rows_counts_equal_inputs_of_any_form() -> None:
    a = torch.arange(12.).reshape(4, 3)
    assert shared_rows(a, a[1:3]) == 2 and shared_rows(a, a + 100) == 0
    ids, mask = torch.arange(8).reshape(4, 2), torch.ones(4, 2, dtype=torch.long)
    assert shared_rows({"ids": ids, "mask": mask}, {"ids": ids[:2], "mask": mask[:2]}) == 2
    assert shared_rows((ids, mask), (ids[:2], 1 - mask[:2])) == 0
