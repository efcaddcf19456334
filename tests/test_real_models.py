"""Third-party model code: modules whose own forward pads, standardizes or scales around their weight use,
depthwise ReLU6 blocks, a BERT-like encoder fed token ids and masks, strict Auto budgets."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tvm_lowbit
from tvm_lowbit import FGQ, quantize
from tvm_lowbit.quantizers import inputs
from tvm_lowbit.quantizers.auto import Auto, parse_budget
from tvm_lowbit.quantizers.layers import QConv2d, QLinear, quant_layer, quant_layers
from tvm_lowbit.quantizers.surgery import analyze


# ---- third-party-style modules ----------------------------------------------------------------

class SameConv(nn.Conv2d):
    """TensorFlow "same" padding computed in its own forward, conv called through F.conv2d directly (as
    efficientnet_lite_pytorch's Conv2dStaticSamePadding does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        ph = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((ow - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class WSConv(nn.Conv2d):
    """Weight standardization in its own forward (BiT / NF-nets style), through _conv_forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class ScaledLinear(nn.Linear):
    """Scales its output in its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.linear(x, self.weight, self.bias)


class MatmulLinear(nn.Linear):
    """Uses its weight through torch.matmul: no F.linear call to wrap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t()) + self.bias


class SameNet(nn.Module):
    """Stem with TF-same stride-2 padding on an odd input (27 -> 14: the 52-vs-54 failure), a
    depthwise ReLU6 block, a weight-standardized conv, a scaled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SameConv(3, 8, 3, stride=2, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = SameConv(8, 8, 3, stride=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.ws = WSConv(8, 12, 3, padding=1)
        self.pw = nn.Conv2d(12, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = ScaledLinear(16, 10)
        self.extra = MatmulLinear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu6(self.bn1(self.dw(x)))
        x = F.relu(self.ws(x))
        x = F.relu6(self.bn2(self.pw(x))).mean((2, 3))
        return self.head(x) + 0.1 * self.extra(x)


def _trained_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give the batch norms non-trivial statistics (a few train-mode passes)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


@pytest.fixture(scope="module")
def same_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(48, 3, 27, 27)
    return _trained_bn(SameNet(), x), x


def test_own_forward_kept_padding_standardization_scaling(same_net: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = same_net
    q = quantize(model, FGQ(group_size=4, first_layer="fgq", last_layer="fgq"), x, progress=False)
    layers = quant_layers(q)
    assert set(layers) == {"stem", "dw", "ws", "pw", "head"}
    assert type(q.stem) is SameConv and type(q.ws) is WSConv and type(q.head) is ScaledLinear  # classes kept
    assert isinstance(layers["stem"], QConv2d) and layers["stem"].padding == (0, 0)  # the module pads itself
    # the weight-standardized conv's integer weight approximates the *standardized* weight
    w = q.ws.weight.detach()
    std = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
    deq = layers["ws"].dequantized_weight()
    assert float((deq - std).norm() / std.norm()) < 0.6  # ternary error, on the standardized scale
    assert float((deq - w).norm() / w.norm()) > 3.0  # the raw weight is ~10x smaller
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert got.shape == ref.shape == (48, 10)
    assert float(F.cosine_similarity(ref, got, dim=-1).mean()) > 0.9
    # the matmul-based linear is left float and named with its class and reason
    report = q.tvm_lowbit_report
    named = {s.path: s for s in report.left_float}
    assert named["extra"].cls == "MatmulLinear" and "cannot be wrapped" in named["extra"].reason
    # batch norms after the same-padded convs are folded (found through torch.export)
    assert isinstance(q.bn0, nn.Identity) and isinstance(q.bn1, nn.Identity) and isinstance(q.bn2, nn.Identity)


def test_int8_on_same_padded_depthwise_net_is_close(same_net: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = same_net
    cfg = Auto(budget="agree>=0", formats=("int8",), overrides={"extra": "float"}, rounding="nearest")
    q = quantize(model, cfg, x[:32], x[32:], progress=False)
    assert set(quant_layers(q)) == {"stem", "dw", "ws", "pw", "head"}
    assert all(m.weight_format == "int8" for m in quant_layers(q).values())
    with torch.no_grad():
        cos = F.cosine_similarity(model(x[32:]), q(x[32:]), dim=-1)
    assert float(cos.min()) > 0.98
    assert q.tvm_lowbit_auto.cos_min == pytest.approx(float(cos.min()), abs=1e-5)


def test_quantized_third_party_model_exports_with_the_lowered_chain(same_net: tuple[nn.Module, torch.Tensor]) -> None:
    """torch.export of the wrapped model gives the quantize -> conv -> epilogue chain with the integer
    weight constant (what the lowering matches) and the module's own padding before it."""
    model, x = same_net
    q = quantize(model, FGQ(group_size=4, first_layer="fgq"), x, progress=False)
    ep = torch.export.export(q, (x[:4],))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "aten.pad.default" in targets and "aten.round.default" in targets and "aten.clamp.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x[:4]), q(x[:4]), rtol=0, atol=0)


# ---- a BERT-like encoder fed token ids and an attention mask ------------------------------------

class TinyBert(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(16, d)
        self.ln0 = nn.LayerNorm(d)
        self.heads = heads
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d), "o": nn.Linear(d, d),
                "ln1": nn.LayerNorm(d), "f1": nn.Linear(d, 4 * d), "f2": nn.Linear(4 * d, d), "ln2": nn.LayerNorm(d)}))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        x = self.ln0(self.emb(input_ids) + self.pos(torch.arange(t).expand(b, t)))
        bias = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        for blk in self.blocks:
            h = self.heads
            q = blk["q"](x).reshape(b, t, h, -1).transpose(1, 2)
            k = blk["k"](x).reshape(b, t, h, -1).transpose(1, 2)
            v = blk["v"](x).reshape(b, t, h, -1).transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, -1)
            x = blk["ln1"](x + blk["o"]((a @ v).transpose(1, 2).reshape(b, t, -1)))
            x = blk["ln2"](x + blk["f2"](F.gelu(blk["f1"](x))))
        m = attention_mask[..., None].float()
        return (x * m).sum(1) / m.sum(1)  # mean pooling over real tokens


def _tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    return TinyBert().eval()


def test_token_id_dict_inputs_pass_untouched(bert: nn.Module) -> None:
    calib = _tokens(32, 0)
    assert calib["input_ids"].dtype == torch.int64
    q = quantize(bert, FGQ(group_size=4, first_layer="fgq", last_layer="fgq"), calib, progress=False)
    assert len(quant_layers(q)) == 12 and all(isinstance(m, QLinear) for m in quant_layers(q).values())
    named = {s.path: s.cls for s in q.tvm_lowbit_report.left_float}
    assert named.get("emb") == "Embedding" and named.get("pos") == "Embedding"
    val = _tokens(16, 1)
    with torch.no_grad():
        cos = F.cosine_similarity(bert(**val), q(**val), dim=-1)
    assert float(cos.mean()) > 0.8


def test_cos_budget_on_an_embedding_model(bert: nn.Module) -> None:
    calib, val = _tokens(32, 0), _tokens(16, 1)
    q = quantize(bert, Auto(budget="cos>=0.99", formats=("int8", "float"), rounding="nearest", max_evals=4,
                            use_cache=False), calib, val, progress=False)
    res = q.tvm_lowbit_auto
    assert res.met and res.cos_min >= 0.99 and res.budget.kind == "cos"
    with torch.no_grad():
        cos = F.cosine_similarity(bert(**val), q(**val), dim=-1)
    assert float(cos.min()) == pytest.approx(res.cos_min, abs=1e-5)


def test_tuple_inputs_and_integer_tensors() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 4)

        def forward(self, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1) * scale)))

    torch.manual_seed(0)
    m = Two().eval()
    data = [((torch.randint(0, 10, (8, 5)), torch.rand(8, 1) + 0.5), torch.zeros(8)) for _ in range(3)]
    q = quantize(m, FGQ(group_size=4, first_layer="fgq", last_layer="fgq"), data, progress=False)
    assert set(quant_layers(q)) == {"fc1", "fc2"}
    whole = inputs.gather(inputs.Batches([d[0] for d in data]), 8)
    assert isinstance(whole, tuple) and whole[0].dtype == torch.int64 and inputs.batch_len(whole) == 24


# ---- reading graphs: torch.export, and what happens when it fails ------------------------------

class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        if float(y.sum()) > -1e9:
            y = y * 1.0
        return self.fc(y)


def test_export_failure_is_said_and_unfolded_batch_norms_named() -> None:
    torch.manual_seed(0)
    m = _trained_bn(Branchy(), torch.randn(8, 3, 6, 6))
    graph = analyze(m, torch.randn(1, 3, 6, 6))
    assert not graph.exported and graph.order == ["conv", "fc"] and graph.bn_pairs == {}
    assert any("torch.export failed" in n and "bn" in n for n in graph.notes)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = quantize(m, FGQ(group_size=4, first_layer="fgq", last_layer="fgq"), torch.randn(16, 3, 6, 6),
                     progress=False)
    assert any("torch.export failed" in str(x.message) and "bn" in str(x.message) for x in w)
    assert isinstance(q.bn, nn.BatchNorm2d)  # not folded, still computed
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert float(F.cosine_similarity(m(x), q(x), dim=-1).min()) > 0.9


def test_export_reads_conv_bn_pairs_and_order() -> None:
    torch.manual_seed(0)
    m = SameNet().eval()
    graph = analyze(m, torch.randn(1, 3, 27, 27))
    assert graph.exported
    assert graph.order == ["stem", "dw", "ws", "pw", "head"]
    assert graph.bn_pairs == {"stem": "bn0", "dw": "bn1", "pw": "bn2"}
    assert graph.uses["ws"].padding == (1, 1) and graph.uses["stem"].stride == (2, 2)


# ---- budgets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("good,text", [(1, "drop<=1pp"), ("drop<=0.5", "drop<=0.5pp"), ("agree >= 99.5%", "agree>=99.5%"),
                                       ("cos>=0.99", "cos>=0.99"), ("COS >= 0.98", "cos>=0.98")])
def test_budgets_parse(good: object, text: str) -> None:
    assert str(parse_budget(good)) == text


@pytest.mark.parametrize("bad,match", [
    ("agree<=50", "agree>=X"), ("drop>=1", "drop<=X"), ("cos<=0.9", "cos>=X"), ("nan", "budget"),
    ("drop<=-1", "0..100"), ("agree>=120", "0..100"), ("cos>=1.5", "-1..1"), ("cos>=nan", "cos"),
    ("drop<=inf", "0..100"), (float("nan"), "0..100"), (-1, "0..100"), ("drop<<1", "budget"), ("top1", "budget")])
def test_bad_budgets_are_one_line_errors_before_any_work(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        Auto(budget=bad)  # the config refuses it: nothing has run yet
    assert "\n" not in str(e.value)


# ---- activation calibration and modes ----------------------------------------------------------

def test_entropy_clip_cuts_a_long_tail() -> None:
    from tvm_lowbit.quantizers.calibrate import clip_value

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100000, generator=g).abs(), torch.tensor([60.0])])  # one huge outlier
    c = clip_value(x, 0.0, 60.0, 8, False, "entropy", 99.99)
    assert 2.0 < c < 20.0  # the outlier is clipped, the bulk kept
    assert clip_value(x, 0.0, 60.0, 8, False, "minmax", 99.99) == 60.0


def test_best_calibration_picks_per_tensor_and_reports_the_method(same_net: tuple[nn.Module, torch.Tensor]) -> None:
    from tvm_lowbit import qmath
    from tvm_lowbit.quantizers import calibrate

    model, x = same_net
    q = quantize(model, FGQ(group_size=4, first_layer="fgq", calibration="best", bn_reestimate=False,
                            bias_correction=False), x, progress=False)
    layers = quant_layers(q)
    rep = calibrate.calibrate_activations(q, layers, x, {n: ("best", 99.99) for n in layers}, progress=False)
    assert all(r["method"] in calibrate.INPUT_METHODS for r in rep.values())
    # on a layer input with a long tail, the chosen clip's output error is the smallest of the four methods'
    layer = layers["pw"]
    g = torch.Generator().manual_seed(1)
    xin = torch.relu(torch.randn(8, 12, 7, 7, generator=g)) ** 3
    samples = xin.flatten()
    lo, hi = float(xin.min()), float(xin.max())
    clip, meth = calibrate.clip_value_best(layer, xin, samples, lo, hi, False, 99.99)
    w = layer.dequantized_weight()
    ref = F.conv2d(xin, w)

    def out_err(c: float) -> float:
        s = qmath.scale_for_range(c, 8, False)
        return float(torch.square(F.conv2d(torch.clamp(torch.round(xin / s), 0, 255) * s, w) - ref).mean())

    errs = {m: out_err(calibrate.clip_value(samples, lo, hi, 8, False, m, 99.99)) for m in calibrate.INPUT_METHODS}
    assert out_err(clip) == pytest.approx(min(errs.values()), rel=1e-6) and errs[meth] == min(errs.values())
    assert max(errs.values()) > 2 * min(errs.values())  # the choice matters on this input


def test_dynamic_per_token_linear_is_exact_integer_math(bert: nn.Module) -> None:
    calib = _tokens(16, 0)
    q = quantize(bert, FGQ(group_size=4, first_layer="fgq", last_layer="fgq", act_mode="dynamic"), calib,
                 progress=False)
    layers = quant_layers(q)
    assert all(m.dynamic for m in layers.values())
    assert any("per-token dynamic" in n and "stay float when compiled" in n for n in q.tvm_lowbit_report.notes)
    layer = layers["blocks.0.f2"]
    got: dict[str, torch.Tensor] = {}
    h = layer.register_forward_hook(lambda _m, a, o: got.update(x=a[0].detach(), y=o.detach()))
    with torch.no_grad():
        q(**_tokens(4, 3))
    h.remove()
    x = got["x"].numpy().astype(np.float32)
    peak = np.abs(x).max(-1, keepdims=True)
    s = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.round(x / s), -127, 127).astype(np.int64)  # independent integer reference
    acc = codes @ layer.w_int.numpy().astype(np.int64).T
    y = (acc.astype(np.float32).astype(np.float64) * s.astype(np.float64) * layer.out_scale.numpy().astype(np.float64)
         + layer.out_bias.numpy().astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(y, got["y"].numpy())


def test_act_mode_auto_goes_dynamic_only_where_static_fails(bert: nn.Module) -> None:
    # an outlier channel in the input of one layer (as BERT's LayerNorm outputs have): static per-tensor fails there
    model = TinyBert().eval()
    model.load_state_dict(bert.state_dict())
    with torch.no_grad():
        model.blocks[0]["ln1"].weight[3] = 40.0
    calib, val = _tokens(32, 0), _tokens(16, 1)
    cfg = dict(group_size=4, first_layer="fgq", last_layer="fgq", bn_reestimate=False)
    static = quantize(model, FGQ(**cfg), calib, progress=False)
    auto = quantize(model, FGQ(**cfg, act_mode="auto"), calib, progress=False)
    dyn = {n for n, m in quant_layers(auto).items() if m.dynamic}
    assert dyn and dyn != set(quant_layers(auto))
    assert {"blocks.0.f1"} <= dyn  # the layer fed by the outlier channel
    with torch.no_grad():
        ref = model(**val)
        c_static = F.cosine_similarity(ref, static(**val), dim=-1).mean()
        c_auto = F.cosine_similarity(ref, auto(**val), dim=-1).mean()
    assert float(c_auto) > float(c_static)


def test_positional_token_inputs_as_tuples_and_lists_of_tuples(bert: nn.Module) -> None:
    """(ids, mask) as a model with two positional inputs takes them: a tuple of [n, t] tensors, or a list
    of (ids, mask) batches (a DataLoader's (ids, mask, label) too); validation the same way."""
    c, v = _tokens(24, 0), _tokens(8, 1)
    pair = (c["input_ids"], c["attention_mask"])
    cfg = FGQ(group_size=4, first_layer="fgq", last_layer="fgq")
    a = quantize(bert, cfg, pair, progress=False)
    b = quantize(bert, cfg, [(pair[0][:12], pair[1][:12], torch.zeros(12)), (pair[0][12:], pair[1][12:])],
                 progress=False)
    val = (v["input_ids"], v["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(a(*val), b(*val))
    q = quantize(bert, Auto(budget="cos>=0.9", formats=("int8",), rounding="nearest"), [pair], [val], progress=False)
    assert q.tvm_lowbit_auto.val_images == 8 and q.tvm_lowbit_auto.met


def test_corrections_are_kept_only_when_they_help_on_held_out_inputs(bert: nn.Module) -> None:
    """Bias correction and BN re-estimation are fitted on the first 3/4 of the calibration inputs and
    kept only if the output error on the last 1/4 does not grow: the final model is never worse there
    than the one built without them."""
    from tvm_lowbit.quantizers.surgery import damage, output_rows

    calib = _tokens(32, 0)
    check = [inputs.take(calib, 24)]
    cfg = FGQ(group_size=4, first_layer="fgq", last_layer="fgq", act_bits=4)
    on = quantize(bert, cfg, calib, progress=False)
    off = quantize(bert, FGQ(group_size=4, first_layer="fgq", last_layer="fgq", act_bits=4, bias_correction=False),
                   calib, progress=False)
    ref = output_rows(bert, check)
    notes = " ".join(on.tvm_lowbit_report.notes)
    assert "bias correction kept" in notes or "bias correction dropped" in notes
    assert damage(ref, output_rows(on, check)) <= damage(ref, output_rows(off, check)) + 1e-12
    same_net_model = SameNet().eval()
    x = torch.randn(32, 3, 27, 27)
    q = quantize(_trained_bn(same_net_model, x), FGQ(group_size=4, act_bits=4), x, progress=False)
    assert any("batch-norm re-estimation" in n for n in q.tvm_lowbit_report.notes)


def test_batchnorm_reestimation_is_relative_to_the_float_network(same_net: tuple[nn.Module, torch.Tensor]) -> None:
    """BN re-estimation shifts the float statistics by what quantization changed: on calibration inputs
    from another distribution (the EfficientNet-Lite2 case: 12 photos that are not ImageNet), an
    unquantized copy keeps its statistics exactly, and a quantized one moves its means by the measured
    input shift, not to the calibration data's own statistics."""
    from tvm_lowbit.quantizers.surgery import correct_batchnorm

    model, _ = same_net
    other = 3.0 * torch.rand(16, 3, 27, 27) + 1.0  # far from the statistics the BNs hold
    same = copy.deepcopy(model)
    assert correct_batchnorm(model, same, other) == 3
    for (_, a), (_, b) in zip(model.named_buffers(), same.named_buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    ref = copy.deepcopy(model)
    q2 = copy.deepcopy(model)
    with torch.no_grad():
        q2.dw.weight.mul_(1.5)  # a "quantization" that scales bn1's input by 1.5
    correct_batchnorm(ref, q2, other)
    assert torch.allclose(q2.bn1.running_var, model.bn1.running_var * 2.25, rtol=1e-4)
    with torch.no_grad():
        shift = 0.5 * model.dw(F.relu6(model.bn0(model.stem(other)))).mean((0, 2, 3))
    assert torch.allclose(q2.bn1.running_mean, model.bn1.running_mean + shift, atol=1e-4)


def test_proxy_sensitivity_measures_one_probe_per_layer(same_net: tuple[nn.Module, torch.Tensor], tmp_path) -> None:
    """The proxy pass measures one format per layer (equal to the full pass's value there) and scales the
    others by the layer's own output error: per layer, the order of the damages is the order of the
    output errors, and every value is finite and >= 0."""
    from tvm_lowbit.quantizers.sensitivity import layer_sensitivity

    model, x = same_net
    fmts = ("ternary", "int4", "int8")
    full = layer_sensitivity(model, x[:16], fmts, cache_dir=tmp_path, progress=False, mode="full")
    proxy = layer_sensitivity(model, x[:16], fmts, cache_dir=tmp_path, progress=False, mode="proxy")
    assert not proxy.from_cache and proxy.info["mode"] == "proxy"
    for n in full.layers:
        same = [f for f in fmts if math.isclose(full.kl[n][f], proxy.kl[n][f], rel_tol=1e-9, abs_tol=1e-15)]
        assert len(same) >= 1, (n, full.kl[n], proxy.kl[n])
        assert all(math.isfinite(v) and v >= 0 for v in proxy.kl[n].values())
    with pytest.raises(ValueError, match="sensitivity mode"):
        layer_sensitivity(model, x[:16], fmts, progress=False, mode="fast")
    assert Auto(sensitivity="proxy").sensitivity_mode(3) == "proxy"
    assert Auto().sensitivity_mode(3) == "full" and Auto().sensitivity_mode(65) == "proxy"
    with pytest.raises(ValueError, match="Auto sensitivity"):
        Auto(sensitivity="fast")
