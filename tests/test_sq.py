"""SQ: selection math, counts, inner quantizers, gradients, export (fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tvm_lowbit.quantizers.hooks import HookOrderError
from tvm_lowbit.quantizers.layers import QuantLayer, quant_layers
from tvm_lowbit.quantizers.sq import (SQ, bwn_twn_codes, quantize_rows, quantized_count, relative_errors, roulette,
                                      select_channels, selection_probabilities)

from ddp_worker import TinyNet, synthetic  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _chi2_ok(counts: np.ndarray, p: np.ndarray, crit: float) -> float:
    exp = counts.sum() * p
    stat = float(((counts - exp) ** 2 / exp).sum())
    assert stat < crit, f"chi-square {stat:.2f} >= {crit} (counts {counts}, expected {exp})"
    return stat


def test_config_validation():
    with pytest.raises(ValueError, match="end at 1.0"):
        SQ(schedule=(0.5, 0.75))
    with pytest.raises(ValueError, match="increasing"):
        SQ(schedule=(0.75, 0.5, 1.0))
    with pytest.raises(ValueError, match="inner"):
        SQ(inner="xnor")
    with pytest.raises(ValueError, match="prob"):
        SQ(prob="cubic")
    with pytest.raises(ValueError, match="linear"):
        SQ(rule="code", prob="softmax")
    with pytest.raises(ValueError, match="first_layer"):
        SQ(first_layer="fgq")
    assert SQ(schedule=[0.5, 1]).schedule == (0.5, 1.0)


def test_roulette_single_draw_frequencies_match_p():
    p = np.array([0.05, 0.15, 0.3, 0.5])
    rng = np.random.default_rng(1)
    counts = np.bincount([int(roulette(p, 1, rng)[0]) for _ in range(20000)], minlength=4)
    _chi2_ok(counts, p, 18.47)  # df=3, p=0.9996


def test_roulette_without_replacement_second_draw():
    """Second draw is distributed as p renormalized over what is left: P(j second) = sum_i p_i p_j / (1 - p_i)."""
    p = np.array([0.1, 0.2, 0.3, 0.4])
    rng = np.random.default_rng(2)
    draws = np.array([roulette(p, 2, rng) for _ in range(20000)])
    assert (draws[:, 0] != draws[:, 1]).all()
    second = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(4) if i != j) for j in range(4)])
    _chi2_ok(np.bincount(draws[:, 1], minlength=4), second, 18.47)
    assert sorted(roulette(p, 4, rng).tolist()) == [0, 1, 2, 3]


def test_roulette_zero_weights_and_draw_count():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    out = roulette(np.array([0.0, 0.0, 1.0, 0.0]), 3, rng_a)
    assert out[0] == 2 and len(set(out.tolist())) == 3
    roulette(np.array([0.3, 0.3, 0.4, 0.0]), 3, rng_b)
    assert rng_a.random() == rng_b.random()  # same number of uniforms whatever p is


def test_probabilities():
    e = np.array([0.05, 0.1, 0.2, 0.4])
    np.testing.assert_allclose(selection_probabilities(e, "linear", 0.0), [8 / 15, 4 / 15, 2 / 15, 1 / 15])
    np.testing.assert_allclose(selection_probabilities(e, "constant"), 0.25)
    assert np.isfinite(selection_probabilities(np.array([0.0, 0.5]), "softmax")).all()
    s = selection_probabilities(e, "sigmoid")
    assert np.all(np.diff(s) < 0) and abs(s.sum() - 1) < 1e-12


@pytest.mark.parametrize("m", [1, 5, 6, 10, 16])
@pytest.mark.parametrize("r", [0.5, 0.75, 0.875, 1.0])
def test_counts_paper_and_code_rules(m, r):
    rng = np.random.default_rng(0)
    e = rng.uniform(0.1, 0.6, m)
    paper = select_channels(e, r, rng, "paper")
    assert paper.sum() == math.floor(r * m + 0.5)
    code = select_channels(e, r, rng, "code")
    assert code.sum() == m - int((1 - r) * m)
    assert quantized_count(0.875, 6, "code") == 6 and quantized_count(0.875, 6, "paper") == 5


def test_code_rule_keeps_high_error_channels_float():
    e = np.array([0.05, 0.1, 0.2, 0.4])
    rng = np.random.default_rng(3)
    fp = np.zeros(4)
    for _ in range(8000):
        fp += ~select_channels(e, 0.75, rng, "code")  # one FP channel, p ~ e
    _chi2_ok(fp, e / e.sum(), 18.47)


def test_bwn_and_twn_rules():
    w = torch.tensor([[0.0, -1.0, 2.0, -3.0], [0.5, 0.5, -0.5, 0.0]], dtype=torch.float64)
    t, a = bwn_twn_codes(w, "bwn")
    assert t.tolist() == [[1, -1, 1, -1], [1, 1, -1, 1]]  # sign(0) = +1
    np.testing.assert_allclose(a, [1.5, 0.375])
    t, a = bwn_twn_codes(w, "twn")
    delta = 0.7 * float((w - w.mean()).abs().mean())  # per layer, mean-centred
    sel = w.abs() > delta
    assert torch.equal(t, torch.sign(w) * sel)
    np.testing.assert_allclose(a, [(w[0].abs() * sel[0]).sum() / sel[0].sum(), 0.0 if not sel[1].any()
                                   else (w[1].abs() * sel[1]).sum() / sel[1].sum()])
    # a channel with nothing above delta is all zero, with alpha 0
    w2 = torch.tensor([[5.0, -5.0, 5.0], [0.01, -0.01, 0.0]], dtype=torch.float64)
    t2, a2 = bwn_twn_codes(w2, "twn")
    assert a2[1] == 0 and not t2[1].any()
    q = quantize_rows(w2, "twn")
    e = relative_errors(w2, q)
    assert abs(float(e[1]) - 1.0) < 1e-12 and float(e[0]) == 0.0
    assert float(relative_errors(torch.zeros(1, 3), torch.zeros(1, 3))[0]) == 0.0


def _step(model, hook, x, y, opt):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    hook.before_step()
    opt.step()
    hook.after_step()


@pytest.mark.parametrize("rule", ["paper", "code"])
def test_hook_quantizes_the_selected_rows(rule):
    torch.manual_seed(0)
    model = TinyNet()
    hook = SQ(inner="twn", schedule=(0.5, 0.875, 1.0), rule=rule).attach(model)
    assert hook.layers == ["conv2", "conv3"]
    x, y = synthetic(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for stage in hook.stages():
        for _ in range(2):
            _step(model, hook, x, y, opt)
            for name, mask in hook.selections().items():
                m = mask.numel()
                assert int(mask.sum()) == quantized_count(hook.ratio, m, rule)
                conv = model.get_submodule(name)
                w = hook.real_weight(name).detach()
                q = quantize_rows(w, "twn")
                expect = torch.where(mask[:, None, None, None], q, w)
                assert torch.equal(conv.weight, expect)
        hook.end_epoch()
    assert all(bool(m.all()) for m in hook.selections().values())


@pytest.mark.parametrize("inner", ["bwn", "twn", "fgq"])
def test_ratio_one_is_plain_inner_quantizer(inner):
    torch.manual_seed(1)
    model = TinyNet()
    hook = SQ(inner=inner, schedule=(1.0,), group_size=4).attach(model)
    hook.begin_stage()
    w = hook.real_weight("conv2").detach()
    if inner == "fgq":
        from tvm_lowbit import qmath
        ref = qmath.ternarize_weight(w, 4).dequantized()
    else:  # independent implementation of BWN / TWN
        w2 = w.reshape(w.shape[0], -1)
        if inner == "bwn":
            ref = (w2.abs().mean(1, keepdim=True) * torch.where(w2 >= 0, 1.0, -1.0)).reshape(w.shape)
        else:
            d = 0.7 * (w - w.mean()).abs().mean()
            keep = (w2.abs() > d).float()
            alpha = (w2.abs() * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
            ref = (alpha * torch.sign(w2) * keep).reshape(w.shape)
    torch.testing.assert_close(model.conv2.weight, ref, rtol=1e-6, atol=1e-7)


def test_straight_through_gradients():
    torch.manual_seed(2)
    model = TinyNet()
    hook = SQ(inner="bwn", schedule=(0.5, 1.0)).attach(model)
    hook.begin_stage()
    x, y = synthetic(8)
    F.cross_entropy(model(x), y).backward()
    g_real = hook.real_weight("conv2").grad.clone()
    # reference: the same forward with the hybrid weight as a leaf
    hybrid = model.conv2.weight.detach().clone().requires_grad_(True)
    with torch.no_grad():
        a = model.relu1(model.bn1(model.conv1(x)))
    out = F.conv2d(a, hybrid, None, 1, 1)
    out2 = model.relu2(model.bn2(out))
    out3 = model.relu3(model.bn3(model.conv3(out2)))
    F.cross_entropy(model.fc(torch.flatten(model.pool(out3), 1)), y).backward()
    assert g_real.shape == hook.real_weight("conv2").shape
    torch.testing.assert_close(g_real, hybrid.grad)  # identity to W for quantized and FP rows alike


def test_selection_is_seeded_and_checkpointed():
    def run(seed, state=None):
        torch.manual_seed(0)
        model = TinyNet()
        hook = SQ(schedule=(0.5, 1.0), seed=seed).attach(model)
        if state is not None:
            hook.load_state_dict(state)
            hook.resample()
        else:
            hook.begin_stage()
        return hook, {k: v.clone() for k, v in hook.selections().items()}

    h1, s1 = run(7)
    _, s2 = run(7)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    st = h1.state_dict()
    h1.resample()
    after = h1.selections()
    _, s3 = run(99, st)
    assert all(torch.equal(after[k], s3[k]) for k in after)


def test_export_before_last_stage_and_order_errors():
    model = TinyNet()
    hook = SQ(schedule=(0.5, 1.0)).attach(model)
    with pytest.raises(HookOrderError, match="outside a stage"):
        hook.after_step()
    hook.begin_stage()
    with pytest.raises(HookOrderError, match="last stage"):
        hook.export(synthetic(8)[0], progress=False)


@pytest.mark.parametrize("inner", ["twn", "bwn", "fgq"])
def test_export_fake_quant_model(inner):
    torch.manual_seed(3)
    model = TinyNet()
    hook = SQ(inner=inner, schedule=(1.0,)).attach(model)
    x, y = synthetic(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in hook.stages():
        _step(model, hook, x, y, opt)
    model.eval()
    q = hook.export(x, progress=False)
    layers = quant_layers(q)
    assert set(layers) == {"conv2", "conv3"}
    for name, layer in layers.items():
        assert isinstance(layer, QuantLayer) and layer.weight_format == "ternary" and layer.act_bits == 8
        w_ref = model.get_submodule(name).weight.detach()
        torch.testing.assert_close(layer.dequantized_weight(), w_ref, rtol=1e-5, atol=1e-6)
        vals = set(layer.w_int.unique().tolist())
        if inner == "bwn":
            assert vals <= {-1.0, 1.0}
        elif inner == "twn":
            assert vals <= {-1.0, 0.0, 1.0}
    assert q.tvm_lowbit_config["scheme"] == "sq"
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
