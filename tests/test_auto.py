"""Auto: per-layer sensitivity (cached, table, heat map) and the budgeted search, verified on held-out data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import data
from tvm_lowbit.formats import avg_weight_bits, model_weight_bytes
from tvm_lowbit.models.mobilenet import validation_split
from tvm_lowbit.quantizers.auto import Auto, BudgetError, build_mixed, parse_budget, predictions
from tvm_lowbit.quantizers.layers import quant_layers
from tvm_lowbit.quantizers.sensitivity import layer_sensitivity

FORMATS = ("ternary-n16", "ternary", "int4", "int8", "float")


class Tiny(nn.Module):
    """A small depthwise-separable net that trains to ~80 % on Fashion-MNIST in a few seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32 * 9, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        return self.fc(nn.functional.avg_pool2d(x, 2).flatten(1))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = data.load("train", limit=6000)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(2):
        for i in range(0, len(xt), 100):
            loss = nn.functional.cross_entropy(model(xt[i:i + 100]), yt[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(n)
    return model.eval()


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return data.load("train", limit=256, offset=20000)[0]


@pytest.fixture(scope="module")
def val() -> tuple[np.ndarray, np.ndarray]:
    return validation_split(1000)


def _top1(model: nn.Module, val: tuple[np.ndarray, np.ndarray]) -> float:
    return 100.0 * float((predictions(model, torch.from_numpy(val[0])).numpy() == val[1]).mean())


def test_budget_and_config_errors_are_clear() -> None:
    assert str(parse_budget(1)) == "drop<=1pp" and str(parse_budget("agree >= 99.5%")) == "agree>=99.5%"
    for bad in ("top1", "agree>=120", "drop<<1"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        Auto(formats=("int3",))
    with pytest.raises(ValueError, match="no entry for format"):
        Auto(formats=("int4", "int8"), cost={"int8": 1.0})
    with pytest.raises(ValueError, match="override 'fc'"):
        Auto(overrides={"fc": "fp16"})


def test_budget_without_validation_data_is_refused(tiny: nn.Module, calib: np.ndarray,
                                                   val: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="needs validation data"):
        tvm_lowbit.quantize(tiny, Auto(budget=1.0), calib)
    with pytest.raises(ValueError, match="needs validation labels"):
        tvm_lowbit.quantize(tiny, Auto(budget=1.0), calib, val[0])


def test_sensitivity_cached_table_and_heat_map(tiny: nn.Module, calib: np.ndarray, tmp_path) -> None:
    sens = layer_sensitivity(tiny, calib[:128], FORMATS, cache_dir=tmp_path, progress=False)
    assert sens.layers == ["stem.0", "dw.0", "pw.0", "fc"] and not sens.from_cache
    for n in sens.layers:
        assert sens.kl[n]["float"] == 0.0 and sens.bytes[n]["float"] == 4 * sens.numel[n]
        assert 0 <= sens.kl[n]["int8"] < sens.kl[n]["ternary-n16"]          # 8 bits hurt less than 2.5
        assert sens.bytes[n]["int8"] > sens.bytes[n]["int4"] > sens.bytes[n]["ternary-n16"]
    again = layer_sensitivity(tiny, calib[:128], FORMATS, cache_dir=tmp_path, progress=False)
    assert again.from_cache and again.kl == sens.kl
    other = layer_sensitivity(tiny, calib[:64], FORMATS, cache_dir=tmp_path, progress=False)
    assert not other.from_cache  # other images: another cache key
    assert "dw.0" in sens.table() and "ternary-n16" in sens.table()
    png = sens.plot(tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", ["full", "proxy"])
def test_sensitivity_captures_runs_of_layers_in_one_forward(tiny: nn.Module, calib: np.ndarray, tmp_path,
                                                           monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    from tvm_lowbit.quantizers import sensitivity

    x = torch.from_numpy(calib[:48])
    names = ["stem.0", "dw.0", "pw.0", "fc"]
    batches = [x[:32], x[32:]]
    together = sensitivity.capture_inputs(tiny, names, batches)
    for n in names:  # the same tensors as one capture per layer
        alone = sensitivity.capture_inputs(tiny, [n], batches)[n]
        assert len(together[n]) == 2 and all(torch.equal(a, b) for a, b in zip(together[n], alone))
    sizes = {"a": 10, "b": 30, "c": 70, "d": 5}
    assert sensitivity.capture_chunks(list(sizes), sizes, 40) == [["a", "b"], ["c"], ["d"]]
    assert sensitivity.capture_chunks(list(sizes), sizes, 1 << 30) == [list(sizes)]
    runs = []
    real = sensitivity.capture_inputs
    monkeypatch.setattr(sensitivity, "capture_inputs", lambda m, ns, b: runs.append(list(ns)) or real(m, ns, b))
    kw = dict(use_cache=False, progress=False, mode=mode, batch_size=32)
    big = layer_sensitivity(tiny, x, FORMATS, **kw)
    assert runs == [names]  # every input in one forward
    runs.clear()
    monkeypatch.setattr(sensitivity, "CAPTURE_BYTES", 1)
    one = layer_sensitivity(tiny, x, FORMATS, **kw)
    assert runs == [[n] for n in names]
    assert one.kl == big.kl  # the same damage either way


def test_search_meets_the_budget_on_the_built_model(tiny: nn.Module, calib: np.ndarray,
                                                    val: tuple[np.ndarray, np.ndarray], tmp_path) -> None:
    cfg = Auto(budget=1.0, formats=FORMATS, sensitivity_images=128, max_evals=6, cache_dir=str(tmp_path),
               rounding="gptq", rounding_images=128)
    q = tvm_lowbit.quantize(tiny, cfg, calib, val, progress=False)
    res = q.tvm_lowbit_auto
    assert res.met and res.drop <= 1.0 and len(res.evaluations) <= 6
    # verified on the returned model itself, not on per-layer estimates
    fp32 = _top1(tiny, val)
    assert res.fp32_top1 == pytest.approx(fp32) and res.top1 == pytest.approx(_top1(q, val))
    assert fp32 - _top1(q, val) <= 1.0
    # the model holds the formats the result names, and its size is what the result reports
    assert {n: m.weight_format for n, m in quant_layers(q).items()} == {
        n: f.split("-")[0] for n, f in res.formats.items() if f != "float"}
    assert model_weight_bytes(q)[0] == res.weight_bytes and avg_weight_bits(q) == pytest.approx(res.avg_weight_bits)
    # cheaper than keeping every layer at 8 bits
    int8 = build_mixed(tiny, dict.fromkeys(res.formats, "int8"), calib)
    assert res.weight_bytes < model_weight_bytes(int8)[0]
    assert "meets the budget drop<=1pp" in res.summary()


def test_unreachable_budget_reports_the_best_mix(tiny: nn.Module, calib: np.ndarray,
                                                 val: tuple[np.ndarray, np.ndarray], tmp_path) -> None:
    cfg = Auto(budget="agree>=100", formats=("ternary-n16",), sensitivity_images=64, max_evals=3,
               cache_dir=str(tmp_path))
    with pytest.raises(BudgetError, match=r"unreachable.*costs [\d,]+ \([\d,]+ weight bytes, [\d.]+ avg weight bits\)"
                       ) as err:
        tvm_lowbit.quantize(tiny, cfg, calib, val, progress=False)
    best = err.value.best
    assert not best.met and best.agree < 100 and set(best.formats.values()) == {"ternary-n16"}
    assert best.weight_bytes == model_weight_bytes(err.value.model)[0]


def test_gptq_rounding_keeps_the_grid_and_cuts_output_error(tiny: nn.Module, calib: np.ndarray) -> None:
    from tvm_lowbit import qmath
    from tvm_lowbit.formats import parse_format
    from tvm_lowbit.quantizers.rounding import input_hessians, refine

    layers = ["stem.0", "dw.0", "pw.0", "fc"]
    hess = input_hessians(tiny, layers, torch.from_numpy(calib[:64]))
    for fmt in ("int4", "int4-g0", "int8", "ternary", "ternary-n16"):
        for name in layers:
            w = tiny.get_submodule(name).weight.detach()
            near = parse_format(fmt).quantize(w)
            opt = refine(near, w, hess[name])
            # same scales, codes in range: the compiler decomposes it into the same format
            assert torch.equal(opt.w_scale, near.w_scale)
            if isinstance(opt, qmath.IntWeight):
                back = qmath.decompose_int(opt.w_int.numpy(), opt.bits, opt.group_size)
            else:
                back = qmath.decompose_w_int(opt.w_int.numpy(), opt.group_size)
            assert back is not None and torch.equal(back.w_int, opt.w_int)

            def out_err(tw, h=hess[name], w=w):  # ||X (W - W_q)^T||^2 / rows, over all output channels
                d = (tw.dequantized().double() - w.double()).reshape(h.shape[0], -1, h.shape[1])
                return float(torch.einsum("gkd,gde,gke->", d, h, d))

            assert out_err(opt) < out_err(near), (fmt, name)


def test_cli_auto_refuses_a_user_model_without_validation_data(tmp_path, capsys) -> None:
    from tvm_lowbit.cli import main

    src = tmp_path / "net.py"
    src.write_text("from torch import nn\n\ndef build():\n"
                   "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))\n")
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--scheme", "auto", "--model", f"{src}:build", "--calib-size", "16",
              "--out", str(tmp_path / "q.pt2")])
    assert e.value.code == 2
    assert "--scheme auto needs validation data for your model: pass --val" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--scheme", "auto", "--budget", "agree>=101", "--calib-size", "16",
              "--out", str(tmp_path / "q.pt2")])
    assert "agreement is a percentage in 0..100" in capsys.readouterr().err
