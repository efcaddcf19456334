"""``int4-g0`` (int4 codes, one float32 scale per output channel, no group scale codes) as a first-class Auto
format on the layer kinds of EfficientNet-Lite2 (``bench_models.py``'s ``CNN_AUTO_FORMATS``).

int4 in groups of 32 stores an 8-bit scale code per group beside the codes, a quarter bit per weight more:
an all-int4 Lite2 counts 4.54 bits as compiled, an all-int4-g0 one 4.17.  Checked here: the bytes Auto
counts for it; Auto's search (sensitivity pass and GPTQ codes on the per-channel grid) takes it; a mix of
int4-g0 next to int4, int8 and float layers (a 3x3 stride-2 stem, 1x1 expand/project convs with K not a
multiple of 16, 3x3 and 5x5 depthwise convs, a residual add, a 1x1 head, the classifier) compiles for x86
with no fallback and every lowered layer's int32 accumulators equal an independent int64 reference from the
codes the fake-quant model fed it; built for rasp5, the bundle on the emulated Pi 5 gives the fake-quant
outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import qmath
from tvm_lowbit.deploy import board as emu
from tvm_lowbit.deploy.bundle import export_bundle, run_bundle_emulated
from tvm_lowbit.formats import avg_weight_bits, model_weight_bytes, parse_format
from tvm_lowbit.quantizers.auto import Auto, build_mixed
from tvm_lowbit.quantizers.layers import QConv2d, quant_layers


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*mods, nn.ReLU6()) if act else nn.Sequential(*mods)


class LiteKinds(nn.Module):
    """EfficientNet-Lite's layer kinds (no squeeze-excitation, ReLU6) in one small network."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, 3, 2)
        self.expand1 = _cbr(16, 36, 1)
        self.dw1 = _cbr(36, 36, 5, groups=36)
        self.project1 = _cbr(36, 24, 1, act=False)   # K = 36
        self.expand2 = _cbr(24, 72, 1)               # K = 24
        self.dw2 = _cbr(72, 72, 3, groups=72)
        self.project2 = _cbr(72, 24, 1, act=False)   # K = 72, into a residual add
        self.head = _cbr(24, 80, 1)
        self.fc = nn.Linear(80, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project1(self.dw1(self.expand1(self.stem(x))))
        x = x + self.project2(self.dw2(self.expand2(x)))
        return self.fc(self.head(x).mean((2, 3)))


# int4-g0 on every layer kind (depthwise 5x5 and 3x3, 1x1 convs with K = 16, 36, 24, the head, the
# classifier), next to int4 in groups of 32 (expand2, K = 24: one short group), an int8 stem and a float
# layer between integer ones (project1).
MIX = {"stem.0": "int8", "expand1.0": "int4-g0", "dw1.0": "int4-g0", "project1.0": "float",
       "expand2.0": "int4", "dw2.0": "int4-g0", "project2.0": "int4-g0", "head.0": "int4-g0", "fc": "int4-g0"}


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _record(codes: dict[str, np.ndarray], name: str, c: torch.Tensor) -> torch.Tensor:
    codes[name] = c.detach().numpy().copy()
    return c


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = LiteKinds().eval()
    _randomize_bn(model)
    return model


@dataclass
class Mixed:
    q: nn.Module
    x: torch.Tensor
    want: np.ndarray             # the fake-quant logits of x
    codes: dict[str, np.ndarray]  # the input codes each integer layer got in PyTorch


@pytest.fixture(scope="module")
def mixed() -> Mixed:
    model = _model()
    g = torch.Generator().manual_seed(2)
    calib = torch.randn(32, 3, 32, 32, generator=g)
    x = torch.randn(4, 3, 32, 32, generator=g)
    q = build_mixed(model, MIX, calib, Auto(formats=("int4-g0", "int4", "int8", "float"), calibration="minmax"))
    codes: dict[str, np.ndarray] = {}
    layers = quant_layers(q)
    for name, m in layers.items():  # the codes each layer's quantizer gives (instance attribute)
        orig = m.quantize_input
        m.quantize_input = lambda t, name=name, orig=orig: _record(codes, name, orig(t))
    with torch.no_grad():
        want = q(x).numpy()
    for m in layers.values():
        del m.quantize_input
    return Mixed(q, x, want, codes)


def test_int4_g0_counts_codes_and_one_scale_per_channel() -> None:
    w = torch.randn(80, 72, 1, 1, generator=torch.Generator().manual_seed(3))
    g0, g32 = parse_format("int4-g0").quantize(w), parse_format("int4").quantize(w)
    assert g0.scale_q is None and g0.group_size == 0 and g32.group_size == 32
    assert g0.storage_bytes() == 80 * 72 // 2 + 4 * 80                  # codes + a float32 scale per channel
    # + an 8-bit code per group, and the codes of a short last group padded to 32 (72 -> 3 groups, 96 codes)
    assert g32.storage_bytes() == 80 * 96 // 2 + 80 * 3 + 4 * 80
    assert int(g0.w_int.abs().max()) == 7
    # the codes times the per-channel scale are the weight rounded to nearest on that grid
    step = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 7
    np.testing.assert_array_equal(g0.w_int.reshape(w.shape).numpy(), torch.round(w / step).numpy().astype(np.int8))


def test_auto_search_takes_int4_g0(tmp_path: Path) -> None:
    """A budget every mix meets: the search returns the cheapest mix, int4-g0 on every layer (GPTQ codes on
    its per-channel grid), and counts its bytes as the built model holds them."""
    model = _model()
    g = torch.Generator().manual_seed(4)
    calib, val = torch.randn(48, 3, 32, 32, generator=g), torch.randn(32, 3, 32, 32, generator=g)
    cfg = Auto(budget="agree>=0", formats=("int4-g0", "int4", "int8", "float"), calibration="minmax",
               sensitivity_images=16, max_evals=8, cache_dir=str(tmp_path), rounding="gptq")
    q = tvm_lowbit.quantize(model, cfg, calib, val, progress=False)
    res = q.tvm_lowbit_auto
    assert res.met and set(res.formats.values()) == {"int4-g0"}, res.formats
    assert all(set(res.sensitivity.kl[n]) >= {"int4-g0", "int4", "int8"} for n in res.formats)
    layers = quant_layers(q)
    assert all(m.weight_format == "int4" and m.group_size == 0 for m in layers.values())
    nbytes, count = model_weight_bytes(q)
    rows = {n: (m.w_int.shape[0], m.w_int[0].numel()) for n, m in layers.items()}  # codes two per byte, per row
    assert nbytes == res.weight_bytes == sum(k * -(-row // 2) + 4 * k for k, row in rows.values())
    assert avg_weight_bits(q) == pytest.approx(8 * nbytes / count)
    # cheaper than the same mix in groups of 32
    g32 = build_mixed(model, dict.fromkeys(res.formats, "int4"), calib)
    assert nbytes < model_weight_bytes(g32)[0]


def test_int4_g0_mix_is_bit_exact_on_the_integer_layers(mixed: Mixed) -> None:
    q, x, want, codes = mixed.q, mixed.x, mixed.want, mixed.codes
    floats = {n for n, f in MIX.items() if f == "float"}
    assert {s.path for s in q.tvm_lowbit_report.left_float} == floats
    layers = quant_layers(q)
    assert set(layers) == set(MIX) - floats
    assert {n for n, m in layers.items() if m.group_size == 0 and m.weight_format == "int4"} == {
        n for n, f in MIX.items() if f == "int4-g0"}

    art = tvm_lowbit.compile(q, x, "x86-host", expose_acc=True)
    assert not art.report.fallback, art.report.fallback
    assert set(art.report.lowered) == set(layers)
    outs = art.run_all(x.numpy())
    for name, acc in zip(art.report.lowered, outs[1:]):
        m = layers[name]
        w = m.w_int.numpy().astype(np.int64)
        c = codes[name].astype(np.int64)
        ref = qmath.conv2d_int_np(c, w, m.stride, m.padding, m.dilation, m.groups) if isinstance(m, QConv2d) \
            else c @ w.T
        np.testing.assert_array_equal(acc.astype(np.int64), ref, err_msg=f"layer {name} ({MIX[name]})")
    np.testing.assert_allclose(outs[0], want, rtol=0, atol=1e-4)
    assert (outs[0].argmax(1) == want.argmax(1)).all()


@pytest.mark.slow
def test_int4_g0_mix_on_an_emulated_pi5(mixed: Mixed, tmp_path: Path, one_thread) -> None:
    """The same mix built for rasp5 (the aarch64 int4 kernels with per-channel scales, their integer
    requantization epilogues) gives the fake-quant logits on the emulated Cortex-A76."""
    try:
        emu.require_board()
    except emu.BoardError as e:
        pytest.skip(str(e))
    x = mixed.x.numpy()
    art = tvm_lowbit.compile(mixed.q, x, "rasp5")
    assert not art.report.fallback, art.report.fallback
    assert set(art.report.lowered) == set(quant_layers(mixed.q))
    bundle = export_bundle(art, tmp_path / "bundle", x, mixed.want, atol=1e-4)
    run = run_bundle_emulated(bundle, emu.qemu_cpu("rasp5"), runs=1)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"max_abs_diff \S+ atol \S+ OK", run.stdout), run.stdout


def test_gptq_act_order_permutes_and_restores_the_columns() -> None:
    """``gptq_codes(act_order=True)`` rounds the columns in descending diag(H) order per conv group: the same
    as plain GPTQ on columns permuted by hand and put back; with a diagonal H (no error feedback) it is
    rounding to nearest; and it cuts the output error of nearest rounding."""
    from tvm_lowbit.quantizers.rounding import gptq_codes

    g = torch.Generator().manual_seed(5)
    groups, rows, d = 3, 4, 10
    w = torch.randn(groups * rows, d, generator=g, dtype=torch.float64)
    x = torch.randn(groups, 200, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, d, dtype=torch.float64)[
        torch.randperm(d, generator=g)]
    h = x.transpose(1, 2) @ x / 200
    step = (w.abs().amax(1, keepdim=True) / 7).expand_as(w).contiguous()
    got = gptq_codes(w, step, -7, 7, h, act_order=True)
    for gi in range(groups):
        perm = torch.argsort(torch.diagonal(h[gi]), descending=True, stable=True)
        sl = slice(gi * rows, (gi + 1) * rows)
        want = gptq_codes(w[sl][:, perm], step[sl][:, perm], -7, 7, h[gi][perm][:, perm][None])
        np.testing.assert_array_equal(got[sl][:, perm].numpy(), want.numpy())
    near = torch.round(w / step).clamp(-7, 7)
    diag = torch.diag_embed(torch.diagonal(h, dim1=1, dim2=2))
    np.testing.assert_array_equal(gptq_codes(w, step, -7, 7, diag, act_order=True).numpy(), near.numpy())

    def out_err(c: torch.Tensor) -> float:
        dlt = (c * step - w).reshape(groups, rows, d)
        return float(torch.einsum("gkd,gde,gke->", dlt, h, dlt))

    assert out_err(got) < out_err(near)
