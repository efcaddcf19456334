"""The batched calibration search and the in-place fake-quant arithmetic give what the plain per-candidate
forms give: the same clip choices (bit for bit), the same activation codes and epilogue outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvm_lowbit import qmath
from tvm_lowbit.formats import parse_format
from tvm_lowbit.quantizers import calibrate
from tvm_lowbit.quantizers.layers import QuantLayer, make_quant_layer


def _layer(kind: str, seed: int) -> tuple[QuantLayer, torch.Tensor]:
    """A random int8 layer (1x1 conv, depthwise 3x3, dense 3x3 stride 2, or linear) and a long-tailed input."""
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        mod: nn.Module = nn.Linear(24, 10)
        x = torch.randn(40, 24, generator=g)
    else:
        mod = {"pw": nn.Conv2d(12, 20, 1), "dw": nn.Conv2d(12, 12, 3, padding=1, groups=12),
               "s2": nn.Conv2d(12, 8, 3, stride=2, padding=1)}[kind]
        x = torch.randn(6, 12, 9, 9, generator=g)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.relu(x) ** 3 if seed % 2 else x * (1 + 4 * (torch.rand(x.shape, generator=g) > 0.98))
    return make_quant_layer(kind, mod, parse_format("int8").quantize(mod.weight.detach()), 8), x


def _old_error(layer: QuantLayer, x: torch.Tensor, clip: float, signed: bool) -> float:
    """The per-candidate form: quantize, run the layer, compare with the layer on the float input."""
    w = layer.dequantized_weight()
    zero = torch.zeros_like(layer.bias)
    s = qmath.scale_for_range(clip, 8, signed)
    lo, hi = qmath.act_range(8, signed)
    xq = torch.clamp(torch.round(x / np.float32(s)), lo, hi) * s
    return float(torch.square(layer.float_op(xq, w, zero) - layer.float_op(x, w, zero)).double().mean())


@pytest.mark.parametrize("kind", ["pw", "dw", "s2", "linear"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_best_choice_equals_the_per_candidate_search(kind: str, seed: int) -> None:
    layer, x = _layer(kind, seed)
    signed = bool(x.min() < 0)
    lo, hi = float(x.min()), float(x.max())
    samples = x.flatten()
    clips = {m: calibrate.clip_value(samples, lo, hi, 8, signed, m, 99.99) for m in calibrate.INPUT_METHODS}
    old = {m: _old_error(layer, x, c, signed) for m, c in clips.items()}
    want = min(old, key=lambda k: (old[k], list(clips).index(k)))
    got_clip, got = calibrate.clip_value_best(layer, x, samples, lo, hi, signed, 99.99)
    assert (got, got_clip) == (want, clips[want])
    new = calibrate.output_errors(layer, x, list(clips.values()), signed)
    assert new == pytest.approx(list(old.values()), rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("kind", ["pw", "dw", "linear"])
def test_batched_mse_out_equals_the_per_candidate_grid(kind: str) -> None:
    layer, x = _layer(kind, 5)
    signed = bool(x.min() < 0)
    lo, hi = float(x.min()), float(x.max())
    peak = max(abs(lo), abs(hi)) if signed else hi
    grid = np.linspace(0.02, 1.0, 80)
    old = [_old_error(layer, x, peak * float(f), signed) for f in grid]
    got = calibrate.clip_value_output(layer, x, lo, hi, signed)
    assert got == peak * float(grid[int(np.argmin(old))])
    # chunked (two candidates a call) and whole give the same errors; duplicates are measured once
    cands = [peak * float(f) for f in grid[::9]] + [peak, peak]
    whole = calibrate.output_errors(layer, x, cands, signed)
    chunked = calibrate.output_errors(layer, x, cands, signed, max_elements=2 * x.numel())
    assert chunked == pytest.approx(whole, rel=1e-6) and whole[-1] == whole[-2]


def test_best_with_coinciding_clips_keeps_the_first_method() -> None:
    layer, _ = _layer("pw", 0)
    x = torch.ones(2, 12, 3, 3)  # every method clips at 1.0: a four-way tie
    clip, meth = calibrate.clip_value_best(layer, x, x.flatten(), 1.0, 1.0, False, 99.99)
    assert (clip, meth) == (1.0, "minmax")


def test_in_place_activation_codes_and_epilogue_are_bit_identical() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 7, generator=g) * 3
    for signed in (True, False):
        s = qmath.scale_for_range(2.5, 8, signed)
        lo, hi = qmath.act_range(8, signed)
        want = torch.clamp(torch.round(x / np.float32(s)), lo, hi)
        assert torch.equal(qmath.quantize_act(x, s, 8, signed), want)
    acc = torch.round(torch.randn(3, 5, 7, 7, generator=g) * 1000)
    scale, bias = torch.rand(5, generator=g) * 1e-3, torch.randn(5, generator=g)
    shape = [1, -1, 1, 1]
    want = (acc.double() * scale.double().reshape(shape) + bias.double().reshape(shape)).float()
    got = qmath.epilogue(acc, scale, bias, relu=False, channel_dim=1)
    assert torch.equal(got, want)
    assert torch.equal(qmath.epilogue(acc, scale, bias, relu=True, channel_dim=1), torch.relu(want))
    assert torch.equal(acc, torch.round(acc))  # the input is left untouched


def test_straight_through_paths_keep_their_gradients() -> None:
    x = torch.randn(4, 6, requires_grad=True)
    y = qmath.epilogue(x * 2, torch.ones(6), torch.zeros(6), relu=False, channel_dim=-1)
    y.sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, torch.full_like(x, 2.0))
    assert qmath.quantize_act(x, 0.1, 8, True).requires_grad


@pytest.mark.parametrize("kind", ["pw", "dw", "s2", "linear"])
def test_fast_statistics_path_is_close_to_the_exact_layer(kind: str) -> None:
    layer, x = _layer(kind, 1)
    layer.set_activation(qmath.scale_for_range(float(x.abs().max()), 8, bool(x.min() < 0)), bool(x.min() < 0))
    with torch.no_grad():
        exact = layer(x)
        layer.fast = True
        fast = layer(x)
    assert torch.allclose(fast, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


def test_keep_freed_memory_is_set_once_and_can_be_turned_off() -> None:
    import subprocess
    import sys

    code = "from tvm_lowbit.quantizers.memory import keep_freed_memory as k; print(k(), k())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "TVM_LOWBIT_KEEP_MEMORY": "0"}).stdout.split()
    assert off == ["False", "False"]
    if sys.platform.startswith("linux"):
        assert on == ["True", "True"]


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6),
                                  nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, (3, 1), stride=(1, 2), padding=(1, 0))])
def test_gptq_statistics_gather_the_patches_unfold_gives(conv: nn.Conv2d, monkeypatch: pytest.MonkeyPatch) -> None:
    from tvm_lowbit.quantizers import rounding
    from tvm_lowbit.quantizers.surgery import analyze

    monkeypatch.setattr(rounding, "ROWS_PER_BATCH", 60)  # 20 random positions per image: the subsampled path
    model = nn.Sequential(conv).eval()
    x = torch.randn(3, 6, 11, 11, generator=torch.Generator().manual_seed(0))
    uses = analyze(model, x[:1]).uses
    (name,) = uses
    got = rounding.input_hessians(model, [name], x, batch_size=3, uses=uses)[name]
    gen = torch.Generator().manual_seed(0)  # the reference: unfold whole maps, keep the same random positions
    parts = []
    for img in x:
        cols = F.unfold(img[None], conv.kernel_size, conv.dilation, conv.padding, conv.stride)[0]
        if cols.shape[1] > 20:
            cols = cols[:, torch.randperm(cols.shape[1], generator=gen)[:20]]
        parts.append(cols.reshape(conv.groups, -1, cols.shape[1]).transpose(1, 2))
    p = torch.cat(parts, 1)
    want = (p.transpose(1, 2) @ p).double() / p.shape[1]
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


class _ConvBnNet(nn.Module):
    """conv -> batch norm -> ReLU twice, then a Linear with no batch norm after it (bias-corrected)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


def test_float_reference_gives_the_same_builds_and_computes_the_float_side_once(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    from tvm_lowbit.quantizers import surgery

    torch.manual_seed(0)
    model = _ConvBnNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    calib = torch.randn(32, 3, 8, 8)
    x = torch.randn(5, 3, 8, 8)
    weights = {n: parse_format("int4").quantize(model.get_submodule(n).weight.detach()) for n in ("c1.0", "c2.0", "fc")}
    kw = dict(calibration="mse", bn_reestimate=True, bias_correction=True, batch_size=16, progress=False)
    plain = surgery.build_fake_quant(model, weights, calib, **kw)
    ref = surgery.FloatReference(model)
    first = surgery.build_fake_quant(model, weights, calib, float_ref=ref, **kw)
    made = dict(ref.store)
    assert {k[0] for k in made} == {"rows", "bn", "means"}
    calls = []
    for name in ("output_rows", "batchnorm_input_stats", "float_output_means"):
        real = getattr(surgery, name)
        monkeypatch.setattr(surgery, name, lambda *a, _real=real, _n=name: calls.append((_n, a[0])) or _real(*a))
    second = surgery.build_fake_quant(model, weights, calib, float_ref=ref, **kw)
    assert calls and all(n == "output_rows" and m is not ref.model for n, m in calls)  # the quantized model only
    assert ref.store.keys() == made.keys()
    with torch.no_grad():
        want = plain(x)
        assert torch.equal(first(x), want) and torch.equal(second(x), want)
    assert plain.tvm_lowbit_report.notes == first.tvm_lowbit_report.notes
    with pytest.raises(ValueError, match="float_ref was made from another model"):
        surgery.build_fake_quant(_ConvBnNet().eval(), weights, calib, float_ref=ref, **kw)


def _gptq_by_column(w: torch.Tensor, step: torch.Tensor, lo: int, hi: int, hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ one column at a time, each error passed on to every later column at once (the plain form)."""
    from tvm_lowbit.quantizers.rounding import DAMP

    k = w.shape[0]
    g, d, _ = hessian.shape
    W = w.double().reshape(g, k // g, d).clone()
    S = step.double().reshape(g, k // g, d)
    H = hessian.double() + DAMP * torch.diagonal(hessian.double(), dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(d)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    for j in range(d):
        c = torch.round(W[:, :, j] / S[:, :, j]).clamp(lo, hi)
        codes[:, :, j] = c
        err = (W[:, :, j] - c * S[:, :, j]) / U[:, j, j][:, None]
        W[:, :, j + 1:] -= err[:, :, None] * U[:, j, j + 1:][:, None, :]
    return codes.reshape(w.shape)


@pytest.mark.parametrize("k,d,g", [(24, 300, 1), (16, 128, 1), (40, 9, 40), (12, 130, 3)])
def test_blocked_gptq_equals_the_column_by_column_form(k: int, d: int, g: int) -> None:
    from tvm_lowbit.quantizers.rounding import gptq_codes

    gen = torch.Generator().manual_seed(k * d + g)
    w = torch.randn(k, d, generator=gen)
    x = torch.randn(4 * d + 16, g, d, generator=gen) * torch.rand(d, generator=gen)
    h = torch.einsum("ngd,nge->gde", x, x).double() / x.shape[0]
    step = (w.abs().amax(1, keepdim=True) / 7).expand_as(w)
    got = gptq_codes(w, step, -7, 7, h)
    want = _gptq_by_column(w, step, -7, 7, h)
    assert torch.equal(got, want)
    assert not torch.equal(got, torch.round(w / step).clamp(-7, 7))  # the error feedback moved codes
