"""The FGQ quantizer: configuration errors, model handling, calibration edge cases, integer exactness
and a quick accuracy check on the built-in ResNet-20."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from helpers import builtin_fgq
from tvm_lowbit import qmath
from tvm_lowbit.quantizers import FGQ, quantize
from tvm_lowbit.quantizers.input_checks import accept_degenerate
from tvm_lowbit.quantizers.layers import QConv2d, QLinear, quant_layer, quant_layers


class Tiny(nn.Module):
    """conv-BN-ReLU, a depthwise conv, a grouped conv, a conv with a ragged channel count, an FC."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise: Cg = 1, taps grouped
        self.bn2 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)  # Cg = 2, with bias
        self.ragged = nn.Conv2d(12, 10, 3, padding=1, bias=False)  # Cg = 12 -> 4+4+4 with N=4, 8+4 with N=8
        self.bn3 = nn.BatchNorm2d(10)
        self.mid = nn.Conv2d(10, 6, 1)  # C = 10: ragged groups for N=4 (4+4+2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.bn3(self.ragged(x)))
        x = torch.relu(self.mid(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for bn in (m.bn1, m.bn2, m.bn3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def _calib(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)


CFG = FGQ(group_size=4, act_bits=8)


def _q(model: nn.Module, cfg: FGQ = CFG, calib: object = None) -> nn.Module:
    return quantize(model, cfg, _calib() if calib is None else calib, progress=False)


# ------------------------------------------------------------------------------------------------
# configuration and input errors
# ------------------------------------------------------------------------------------------------

def test_unknown_scheme_and_options() -> None:
    m = _tiny()
    with pytest.raises(TypeError, match="pass a configuration object"):
        quantize(m, "fgq", _calib(), progress=False)
    with pytest.raises(TypeError, match="unknown quantization scheme"):
        quantize(m, object(), _calib(), progress=False)
    with pytest.raises(TypeError):
        FGQ(groupsize=4)  # type: ignore[call-arg]  # a misspelt option
    with pytest.raises(ValueError, match="unknown threshold"):
        FGQ(threshold="median")
    with pytest.raises(ValueError, match="unknown calibration"):
        FGQ(calibration="kl")
    with pytest.raises(ValueError, match="first_layer"):
        FGQ(first_layer="int4")
    with pytest.raises(ValueError, match="unknown option"):
        FGQ(overrides={"conv*": {"bits": 4}})
    with pytest.raises(ValueError, match="use 'float' or a dict"):
        FGQ(overrides={"conv*": "ternary"})


@pytest.mark.parametrize("kw,msg", [({"group_size": 0}, "group_size must be an integer >= 1"),
                                    ({"act_bits": 1}, "act_bits must be an integer in 2..8"),
                                    ({"act_bits": 9}, "act_bits must be an integer in 2..8"),
                                    ({"overrides": {"fc": {"act_bits": 9}}}, "act_bits")])
def test_bad_numbers(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        FGQ(**kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_layer(bad: float) -> None:
    m = _tiny()
    with torch.no_grad():
        m.ragged.weight[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"layer 'ragged'.*NaN/Inf.*overrides"):
        _q(m)


def test_no_quantizable_layer_and_empty_calibration() -> None:
    with pytest.raises(ValueError, match="no quantizable layer"):
        quantize(nn.Sequential(nn.ReLU(), nn.Flatten()), FGQ(), _calib(), progress=False)
    lone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 4))  # first == last: both policies float
    with pytest.raises(ValueError, match="no layer left to quantize"):
        quantize(lone, FGQ(first_layer="float"), _calib(), progress=False)
    with pytest.raises(ValueError, match="calibration data is empty"):
        _q(_tiny(), calib=np.zeros((0, 3, 12, 12), np.float32))
    with pytest.raises(ValueError, match="calibration data is empty"):
        _q(_tiny(), calib=[])
    with pytest.raises(TypeError, match="calibration data must be"):
        _q(_tiny(), calib=3.0)


# ------------------------------------------------------------------------------------------------
# model handling
# ------------------------------------------------------------------------------------------------

def test_callers_model_is_not_modified() -> None:
    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    types = {n: type(x) for n, x in m.named_modules()}
    m.train()  # the quantizer must not change the training flag either
    _q(m)
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {n: type(x) for n, x in m.named_modules()} == types
    assert m.training


def test_first_last_policies_and_overrides() -> None:
    m = _tiny()
    q = _q(m)
    assert quant_layer(q, "conv1").weight_format == "int8"  # first: int8 per channel
    assert isinstance(q.fc, nn.Linear) and "fc" not in quant_layers(q)  # last: float
    assert set(quant_layers(q)) == {"conv1", "dw", "grouped", "ragged", "mid"}
    q = _q(m, FGQ(group_size=4, first_layer="float"))
    assert isinstance(q.conv1, nn.Conv2d) and "conv1" not in quant_layers(q)  # first: float
    assert set(quant_layers(q)) == {"dw", "grouped", "ragged", "mid"}

    q = _q(m, FGQ(group_size=4, first_layer="fgq", last_layer="fgq"))
    assert isinstance(quant_layer(q, "conv1"), QConv2d) and isinstance(quant_layer(q, "fc"), QLinear)
    assert quant_layer(q, "conv1").act_signed  # the normalised network input is signed
    assert not quant_layer(q, "mid").act_signed and not quant_layer(q, "fc").act_signed  # after a ReLU: unsigned

    q = _q(m, FGQ(group_size=4, overrides={"r*": "float", "mid": {"group_size": 8, "act_bits": 4}}))
    assert isinstance(q.ragged, nn.Conv2d) and "ragged" not in quant_layers(q)
    assert quant_layer(q, "mid").group_size == 8 and quant_layer(q, "mid").act_bits == 4 and quant_layer(q, "grouped").act_bits == 8
    # later patterns win
    q = _q(m, FGQ(group_size=4, overrides={"*": "float", "dw": {}}))
    assert set(quant_layers(q)) == {"dw"}


@pytest.mark.parametrize("n", [1, 4, 8, 64])
def test_depthwise_grouped_ragged_quantize_and_run(n: int) -> None:
    m = _tiny()
    cfg = FGQ(group_size=n, first_layer="fgq", last_layer="fgq")
    q = _q(m, cfg)
    assert quant_layer(q, "dw").tw.layout.along == "taps" and quant_layer(q, "dw").groups == 8
    assert quant_layer(q, "grouped").groups == 4 and quant_layer(q, "grouped").w_int.shape == (12, 2, 3, 3)
    assert quant_layer(q, "ragged").w_int.shape == (10, 12, 3, 3)
    for layer in quant_layers(q).values():
        assert layer.calibrated and set(layer.tw.t.unique().tolist()) <= {-1, 0, 1}
        # w_int really is alpha_q * t in the weight's shape
        assert torch.equal(layer.w_int, layer.tw.w_int.float())
        assert layer.group_size == min(n, layer.tw.layout.seg_len)
    x = torch.from_numpy(_calib(8, seed=1))
    with torch.no_grad():
        y, y_ref = q(x), m(x)
    assert y.shape == y_ref.shape and torch.isfinite(y).all()
    if n <= 4:  # a fine-grained ternary net stays close to the float net
        cos = nn.functional.cosine_similarity(y.flatten(), y_ref.flatten(), dim=0)
        assert float(cos) > 0.8


# ------------------------------------------------------------------------------------------------
# calibration edge cases
# ------------------------------------------------------------------------------------------------

class DeadRelu(nn.Module):
    """The second conv sees only zeros (ReLU of a strongly negative tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.a.bias.fill_(-1e3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "mse_out"])
def test_all_zero_and_constant_activations(method: str) -> None:
    torch.manual_seed(0)
    m = DeadRelu().eval()
    q = _q(m, FGQ(group_size=4, first_layer="fgq", calibration=method))
    assert not quant_layer(q, "b").act_signed and quant_layer(q, "b").scale_value > 0  # all-zero input: unsigned, a valid scale
    x = torch.from_numpy(_calib(4))
    torch.testing.assert_close(q(x), m(x), rtol=0, atol=1e-5)  # zeros quantize exactly
    const = np.full((16, 3, 12, 12), 0.7, np.float32)  # a constant calibration input
    q = _q(m, FGQ(group_size=4, first_layer="fgq", calibration=method), calib=accept_degenerate(const))
    assert not quant_layer(q, "a").act_signed and torch.isfinite(q(torch.from_numpy(const))).all()
    # 0.7 itself is represented to within half a step
    assert abs(round(0.7 / quant_layer(q, "a").scale_value) * quant_layer(q, "a").scale_value - 0.7) <= quant_layer(q, "a").scale_value / 2 + 1e-7


def test_signed_unsigned_detection() -> None:
    q = _q(_tiny(), FGQ(group_size=4, first_layer="fgq"))
    assert quant_layer(q, "conv1").act_signed
    assert all(not quant_layer(q, n).act_signed for n in ("dw", "grouped", "ragged", "mid"))
    pos = np.abs(_calib())  # a non-negative network input is detected as unsigned
    q = _q(_tiny(), FGQ(group_size=4, first_layer="fgq"), calib=pos)
    assert not quant_layer(q, "conv1").act_signed


# ------------------------------------------------------------------------------------------------
# integer exactness
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dw", "grouped", "ragged"])
def test_accumulators_equal_integer_reference(name: str) -> None:
    q = _q(_tiny(), FGQ(group_size=4, act_bits=8))
    layer: QConv2d = quant_layer(q, name)
    seen: dict[str, torch.Tensor] = {}
    original = layer._integer_op

    def spy(qin: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        acc = original(qin, w)
        seen["q"], seen["acc"] = qin.detach().clone(), acc.detach().clone()
        return acc

    h = layer.register_forward_hook(lambda _m, args, out: seen.update(x=args[0].detach().clone(), y=out.detach()))
    layer._integer_op = spy  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            q(torch.from_numpy(_calib(4, seed=2)))
    finally:
        h.remove()
        del layer._integer_op
    codes = qmath.quantize_act_np(seen["x"].numpy(), layer.scale_value, layer.act_bits, layer.act_signed)
    np.testing.assert_array_equal(seen["q"].numpy().astype(np.int64), codes)
    ref = qmath.conv2d_int_np(codes, layer.w_int.numpy().astype(np.int64), layer.stride, layer.padding,
                              layer.dilation, layer.groups)
    assert np.abs(ref).max() > 0
    np.testing.assert_array_equal(seen["acc"].numpy().astype(np.int64), ref)
    y = qmath.epilogue_np(ref, layer.out_scale.numpy(), layer.out_bias.numpy(), False, 1)
    np.testing.assert_array_equal(seen["y"].numpy(), y)


# ------------------------------------------------------------------------------------------------
# accuracy on the built-in model (a subset: fast)
# ------------------------------------------------------------------------------------------------

def test_resnet20_accuracy_subset() -> None:
    data = pytest.importorskip("tvm_lowbit.data")
    from tvm_lowbit.models.resnet import load_pretrained

    try:
        x, y = data.load("test", limit=1000)
        q = builtin_fgq(FGQ(group_size=4, act_bits=8), 256)  # a copy of the session's (tests/test_board.py)
    except data.DataMissingError as e:
        pytest.skip(str(e))
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    model = load_pretrained()

    def top1(m: nn.Module) -> float:
        with torch.no_grad():
            return 100.0 * float((m(x_t).argmax(1) == y_t).float().mean())

    fp32 = top1(model)
    acc = top1(q)
    assert fp32 > 90
    assert acc >= fp32 - 1.5, (acc, fp32)
    # the check has teeth: a model whose alphas are all zero (broken quantization) falls to chance
    for layer in quant_layers(q).values():
        layer.w_int.zero_()
    assert top1(q) < 30


def test_bias_correction_matches_output_means() -> None:
    """Layers without a following batch norm ('grouped', 'mid', 'fc') get their per-channel output
    mean pulled back to the float model's; with the option off they keep the plain bias."""
    m = _tiny()
    calib = _calib(64)
    cfg = FGQ(group_size=64, act_bits=4, last_layer="fgq")
    on, off = _q(m, cfg, calib), _q(m, replace(cfg, bias_correction=False), calib)
    x = torch.from_numpy(calib)
    with torch.no_grad():
        y_ref, y_on, y_off = m(x).mean(0), on(x).mean(0), off(x).mean(0)
    assert torch.equal(quant_layer(off, "fc").bias, m.fc.bias.detach())
    assert not torch.equal(quant_layer(on, "fc").bias, m.fc.bias.detach())
    # the last layer's output mean on the calibration data matches the float model's
    torch.testing.assert_close(y_on, y_ref, rtol=0, atol=1e-4)
    assert float((y_off - y_ref).abs().max()) > float((y_on - y_ref).abs().max())


def test_first_layer_defaults_to_int8_per_channel() -> None:
    """FGQ's default stem is int8 with one scale per output channel; first_layer='float' keeps it float."""
    from tvm_lowbit.quantizers.layers import quant_layers

    m = _tiny()
    layers = quant_layers(_q(m, FGQ(group_size=4)))
    first = next(iter(layers.values()))
    assert first.weight_format == "int8"
    assert all(l.weight_format.startswith("ternary") for l in list(layers.values())[1:])
    kept = quant_layers(_q(m, FGQ(group_size=4, first_layer="float")))
    assert len(kept) == len(layers) - 1
