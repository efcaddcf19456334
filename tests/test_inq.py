"""INQ: the power-of-two set, the projection, the training hook (freezing, order, partitions,
resume) and export -> compile bit-exact through the power-of-two kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tvm_lowbit import qmath
from tvm_lowbit.quantizers import INQ, INQQuantizer
from tvm_lowbit.quantizers.hooks import HookOrderError
from tvm_lowbit.quantizers.layers import quant_layers


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN()


def _train(model: nn.Module, hook: INQQuantizer, steps: int, seed: int = 0, lr: float = 0.05,
           opt: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 1, 16, 16, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        hook.before_step()
        opt.step()
        hook.after_step()
    return opt


# -- the set and the projection ------------------------------------------------------------------

@pytest.mark.parametrize("s,bits,n1", [(1.0, 5, 0), (0.75, 5, 0), (0.7499, 5, -1), (1.4999, 2, 0), (1.5, 2, 1),
                                       (3.0, 4, 2), (0.01, 3, -7)])
def test_n1_n2_formula(s: float, bits: int, n1: int) -> None:
    assert qmath.pow2_exponents(s, bits) == (n1, n1 + 1 - 2 ** (bits - 1) // 2)
    assert n1 == math.floor(math.log2(4 * s / 3))
    # s maps to 2^n1: nothing overflows and the largest weight is the largest level
    got, n2 = qmath.pow2_exponents(s, bits)
    assert float(qmath.project_pow2(torch.tensor([s]), got, n2)) == 2.0 ** got


@pytest.mark.parametrize("bits", [0, 1, 6, 8, 2.0, "5"])
def test_bits_outside_2_to_5_are_rejected(bits) -> None:
    with pytest.raises(ValueError, match="2..5"):
        qmath.check_pow2_bits(bits)
    with pytest.raises(ValueError, match="bits"):
        INQ(bits=bits)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-4.0, 4.0, allow_nan=False, width=32), min_size=1, max_size=40),
       st.integers(2, 5), st.floats(0.05, 4.0))
def test_projection_is_nearest_rounding(ws: list[float], bits: int, s: float) -> None:
    n1, n2 = qmath.pow2_exponents(s, bits)
    w = torch.tensor(ws, dtype=torch.float64).clamp(-1.5 * 2.0 ** n1 + 1e-9, 1.5 * 2.0 ** n1 - 1e-9)
    q = qmath.project_pow2(w, n1, n2)
    levels = torch.from_numpy(qmath.pow2_levels(n1, n2))
    allv = torch.cat([-levels[1:].flip(0), levels])  # zero once
    dist = (w[:, None] - allv[None, :]).abs()
    best = dist.min(1).values
    assert torch.all((q - w).abs() == best)            # a nearest value ...
    assert torch.all(torch.isin(q, allv))
    tie = (dist == best[:, None]).sum(1) > 1
    assert torch.all(q[tie].abs() >= w[tie].abs())     # ... and on a tie the larger magnitude (paper's rule)


def test_projection_midpoints_map_up() -> None:
    n1, n2 = 0, -3
    mids = torch.tensor([2.0 ** -4, 1.5 * 2 ** -3, 1.5 * 2 ** -1, -1.5 * 2 ** -2])
    assert qmath.project_pow2(mids, n1, n2).tolist() == [2.0 ** -3, 2.0 ** -2, 1.0, -0.5]
    assert qmath.project_pow2(torch.tensor([2.0 ** -4 - 1e-9], dtype=torch.float64), n1, n2).item() == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_distinct_magnitudes_per_sign(bits: int) -> None:
    torch.manual_seed(bits)
    pw = qmath.pow2_quantize_weight(torch.randn(64, 32, 3, 3), bits)
    w = pw.w_int
    for sign in (1, -1):
        mags = torch.unique(w[w * sign > 0])
        assert 1 <= mags.numel() <= 2 ** (bits - 2)
    assert pw.code_bits == (8 if bits == 5 else 4)
    assert qmath.decompose_pow2(w.numpy()) is not None
    np.testing.assert_array_equal(qmath.pow2_values(qmath.unpack_pow2(pw.packed_codes(), 9 * 32, pw.code_bits),
                                                    pw.code_bits), qmath.pow2_flat(w.numpy()))


# -- the hook --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(portions=(0.5, 0.5, 1.0)), "strictly increasing"),
    (dict(portions=(0.75, 0.5, 1.0)), "strictly increasing"),
    (dict(portions=(0.5, 0.9)), "end at 1.0"),
    (dict(portions=()), "empty"),
    (dict(portions=(0.0, 1.0)), r"\(0, 1\]"),
    (dict(strategy="smallest"), "pruning, random"),
    (dict(first_layer="fgq"), "float, inq"),
    (dict(overrides={"fc*": {"bits": 7}}), "2..5"),
    (dict(overrides={"fc*": {"group_size": 4}}), "bits"),
])
def test_config_validation(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        INQ(**kw)


def test_hook_order_errors() -> None:
    model = _model()
    hook = INQ().attach(model)
    with pytest.raises(HookOrderError, match="begin_stage"):
        hook.before_step()
    with pytest.raises(HookOrderError, match="begin_stage"):
        hook.after_step()
    with pytest.raises(HookOrderError, match="last stage"):
        hook.export(torch.randn(4, 1, 16, 16))
    hook.begin_stage(0)
    with pytest.raises(HookOrderError, match="end_stage"):
        hook.begin_stage(1)
    hook.end_stage()
    with pytest.raises(HookOrderError, match="already ran"):
        hook.begin_stage(0)
    with pytest.raises(HookOrderError, match="attach"):
        INQQuantizer(INQ()).before_step()


def test_frozen_weights_bit_identical_with_momentum_and_weight_decay() -> None:
    model = _model()
    hook = INQ(bits=4, portions=(0.5, 1.0)).attach(model)
    assert set(hook.layers) == {"conv1", "conv2", "fc1", "fc2"}
    hook.begin_stage(0)
    frozen = {n: st.frozen.clone() for n, st in hook.layers.items()}
    before = {n: model.get_submodule(n).weight.detach().clone() for n in hook.layers}
    bias_before = model.fc1.bias.detach().clone()
    opt = _train(model, hook, 1)
    # the gradient mask: frozen entries have zero gradient, free ones (generically) not
    for n in hook.layers:
        g = model.get_submodule(n).weight.grad
        assert torch.all(g[frozen[n]] == 0)
        assert torch.count_nonzero(g[~frozen[n]]) > 0
    _train(model, hook, 4, seed=1, opt=opt)
    for n, st in hook.layers.items():
        w = model.get_submodule(n).weight.detach()
        assert torch.equal(w[frozen[n]], before[n][frozen[n]]), n                  # bit-identical
        assert not torch.equal(w[~frozen[n]], before[n][~frozen[n]]), n            # the others train
        lv = torch.from_numpy(qmath.pow2_levels(st.n1, st.n2)).float()
        assert torch.all(torch.isin(w[frozen[n]].abs(), lv))
    assert not torch.equal(model.fc1.bias.detach(), bias_before)                   # biases stay float
    hook.end_stage()


def test_partition_fractions_pruning_vs_random() -> None:
    portions = (0.3, 0.6, 0.9, 1.0)
    model = _model()
    hook = INQ(portions=portions, strategy="pruning").attach(model)
    w0 = model.fc1.weight.detach().abs().clone()
    for i, sigma in enumerate(portions):
        hook.begin_stage(i)
        for n, st in hook.layers.items():
            assert int(st.frozen.sum()) == math.floor(sigma * st.frozen.numel() + 0.5), (n, i)
        if i == 0:  # the largest magnitudes go first
            fz = hook.layers["fc1"].frozen
            assert w0[fz].min() >= w0[~fz].max()
        hook.end_stage()
    model = _model()
    hook = INQ(portions=portions, strategy="random", seed=3).attach(model)
    for i, sigma in enumerate(portions):
        hook.begin_stage(i)
        frac = hook.quantized_fraction()["fc1"]  # 8192 weights: binomial std < 0.006
        assert abs(frac - sigma) < 0.025, (i, frac)
        hook.end_stage()
    assert all(f == 1.0 for f in hook.quantized_fraction().values())


def test_resume_from_state_dict() -> None:
    cfg = INQ(bits=3, portions=(0.5, 0.75, 1.0), strategy="random", seed=5)
    model = _model()
    hook = cfg.attach(model)
    hook.begin_stage(0)
    _train(model, hook, 2, seed=0)
    hook.end_stage()
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "inq": hook.state_dict()}  # between stages
    for stage in hook.stages():
        _train(model, hook, 2, seed=stage)
    ref = {n: model.get_submodule(n).weight.detach().clone() for n in hook.layers}

    model2 = _model(seed=1)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    hook2 = cfg.attach(model2)
    hook2.load_state_dict(ckpt["inq"])
    assert hook2.stage == 0 and not hook2.in_stage
    for n in hook.layers:
        assert (hook2.layers[n].n1, hook2.layers[n].n2) == (hook.layers[n].n1, hook.layers[n].n2)
    for stage in hook2.stages():
        assert stage >= 1
        _train(model2, hook2, 2, seed=stage)
    for n in hook.layers:
        assert torch.equal(model2.get_submodule(n).weight.detach(), ref[n]), n
    with pytest.raises(ValueError, match="portions"):
        INQ(portions=(0.5, 1.0)).attach(_model()).load_state_dict(ckpt["inq"])


def test_channel_granularity_places_a_set_per_output_channel() -> None:
    model = _model()
    with torch.no_grad():
        model.conv2.weight[3] *= 0.01  # a small filter: a per-layer set would round it all to zero
    w0 = model.conv2.weight.detach().clone()
    hook = INQ(bits=3, portions=(1.0,), granularity="channel").attach(model)
    for _ in hook.stages():
        pass
    w = model.conv2.weight.detach()
    for k in range(w.shape[0]):
        n1, n2 = qmath.pow2_exponents(float(w0[k].abs().max()), 3)
        want = qmath.project_pow2(w0[k], n1, n2).to(torch.float32)
        assert torch.equal(w[k], want), k
    assert w[3].abs().max() > 0
    per_layer = qmath.project_pow2(w0[3], *qmath.pow2_exponents(float(w0.abs().max()), 3))
    assert per_layer.abs().max() == 0
    pw = hook.pow2_weights()["conv2"]
    assert torch.equal(pw.dequantized(), w) and len(set(pw.w_scale.tolist())) > 1
    with pytest.raises(ValueError, match="granularity"):
        INQ(granularity="group")


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_export_compile_bit_exact(granularity: str) -> None:
    from test_compile import check_bit_exact

    model = _model()
    hook = INQ(bits=5, portions=(0.5, 1.0), overrides={"fc2": {"bits": 3}}, granularity=granularity).attach(model)
    for stage in hook.stages():
        _train(model, hook, 3, seed=stage, lr=0.01)
    calib = torch.randn(32, 1, 16, 16)
    qmodel = hook.export(calib)
    layers = quant_layers(qmodel)
    assert set(layers) == {"conv1", "conv2", "fc1", "fc2"}
    assert all(m.weight_format == "pow2" for m in layers.values())
    assert isinstance(qmodel.bn1, nn.Identity) and isinstance(qmodel.bn2, nn.Identity)  # folded
    # the fake-quant model is the trained float model with its power-of-two weights
    model.eval()
    with torch.no_grad():
        for n, m in layers.items():
            np.testing.assert_array_equal(m.dequantized_weight().numpy(), model.get_submodule(n).weight.numpy())
    x = torch.randn(2, 1, 16, 16).numpy()
    art = check_bit_exact(qmodel, x)
    assert sorted(art.report.lowered) == sorted(layers)
    assert set(art.report.kernels.values()) == {"pow2"}
    assert "power-of-two" in art.report.text()
