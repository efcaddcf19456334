"""VTA at model level: exact weight folding, the VTA/host partition, and end to end through Relax
(simulator == NumPy integer reference, bit for bit), the CLI, and the narrow-weight core variants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from helpers import builtin_fgq
from tvm_lowbit import FGQ, data, quantize
from tvm_lowbit.errors import CompileError
from tvm_lowbit.quantizers.layers import quant_layers
from tvm_lowbit.targets import load_target
from tvm_lowbit.vta.compile import check_against_reference
from tvm_lowbit.vta.model import plan, vta_forward
from tvm_lowbit.vta.quant import NotVTAExact, acc_bounds, fold_weights, plan_layer, zero_point

CFG = load_target("vta-sim").vta_config()


@pytest.fixture(scope="module")
def builtin_q() -> nn.Module:
    """The built-in ResNet-20 with FGQ N=4, 8-bit activations and 7-bit alpha codes (what VTA runs)."""
    torch.set_num_threads(1)
    return builtin_fgq(FGQ(group_size=4, act_bits=8, alpha_bits=7, first_layer="float"), 64)  # once a session


def test_ternary_weights_fold_exactly_into_int8(builtin_q: nn.Module) -> None:
    for name, layer in quant_layers(builtin_q).items():
        w = layer.w_int.numpy()
        w8, sigma = fold_weights(w)
        assert not sigma.any() and np.abs(w8).max() <= 127, name
        np.testing.assert_array_equal(w8, w, err_msg=name)
        # and it really is ternary x alpha code: at most one magnitude per group of 4 input channels
        assert layer.tw.alpha_q.max() <= 127


def test_weight_folding_rules() -> None:
    t = np.array([[1, -1, 0, 1], [0, 1, -1, 1]])
    # 8-bit alpha codes: 255 needs 9 bits and no power of two divides it out
    with pytest.raises(NotVTAExact, match="output channel 0: weights .*255"):
        fold_weights(t * np.array([[255], [3]]))
    w8, sigma = fold_weights(t * np.array([[254], [3]]))       # all codes even: exact with one shift
    assert sigma.tolist() == [1, 0] and np.array_equal(w8 << sigma[:, None], t * np.array([[254], [3]]))
    inq = np.array([[1, 128, 0, -4], [2, 128, -64, 0]])       # INQ 5-bit: 1 and 128 in one channel
    with pytest.raises(NotVTAExact, match="output channel 0"):
        fold_weights(inq)
    w8, sigma = fold_weights(inq[1:])
    assert sigma.tolist() == [1] and np.abs(w8).max() == 64
    w8, sigma = fold_weights(inq[1:], "pow2")
    assert sigma.tolist() == [1]
    w8, sigma = fold_weights(np.array([[4, -4, 0], [0, 1, -1]]), "ternary")
    assert sigma.tolist() == [2, 0] and set(np.unique(w8)) <= {-1, 0, 1}
    with pytest.raises(NotVTAExact):
        fold_weights(np.array([[4, -2, 0]]), "ternary")


def test_zero_points_and_worst_case_bound() -> None:
    assert zero_point(8, False) == 128 and zero_point(8, True) == 0 and zero_point(7, False) == 0
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 144))
    hi, lo = acc_bounds(w, -128, 127)
    x = rng.integers(-128, 128, (1000, 144))
    acc = x @ w.T
    assert (acc <= hi).all() and (acc >= lo).all()
    extreme = np.where(w > 0, 127, -128)                        # the input reaching the upper bound
    assert ((extreme * w).sum(1) == hi).all()
    m = plan_layer("l", "dense", w, 8, False, "bound")
    assert m.requant.clip is None
    m.reference(np.where(w[:1] > 0, 255, 0))                    # shift-only requant never leaves int8


def test_partition_and_simulator_match_reference(builtin_q: nn.Module) -> None:
    x, _ = data.load("test", limit=1)
    part = plan(builtin_q, x, CFG, calib=data.calibration_set(32))
    assert len(part.layers) == 20                                # every quantized conv, shortcuts included
    assert [n for n, _ in part.host] == ["conv1", "fc"]          # the float stem and classifier
    assert "20 layer(s), 99.6% of the conv/linear MACs" in part.text()
    recs = {}
    for ex in ("sim", "reference", "torch"):
        recs[ex] = {}
        with vta_forward(builtin_q, part, ex, recs[ex]) as m, torch.no_grad():
            recs[ex]["__out__"] = m(torch.from_numpy(x)).numpy()
    for name in part.layers:
        assert recs["sim"][name].dtype == np.int8
        np.testing.assert_array_equal(recs["sim"][name], recs["reference"][name], err_msg=name)
        np.testing.assert_array_equal(recs["torch"][name], recs["reference"][name], err_msg=name)
    np.testing.assert_array_equal(recs["sim"]["__out__"], recs["reference"]["__out__"])
    for layer in part.layers.values():
        assert 0 < layer.gemm_bound_cycles <= layer.cycles.total_cycles
    # some programs find their weights prefetched by the previous layer's (checked by the simulator
    # above); run out of order, such a layer is refused instead of computing with stale weights
    chained = [n for n, l in part.layers.items() if l.lowered.info.get("weights_preloaded")]
    assert chained
    assert any(l.lowered.info.get("uops_preloaded") for l in part.layers.values())  # micro-ops prefetched too
    vl = part.layers[chained[0]]
    with pytest.raises(RuntimeError, match="expects its weights in weight SRAM"):
        vl.run(np.zeros(vl.input_shape, np.int64), "sim", seed=12345)   # a simulator nothing ran on


def test_cli_compile_vta_sim_end_to_end(tmp_path, capsys) -> None:
    """The CLI compiles ResNet-20 to the integer-only body: 18 VTA layers (the shortcuts fused into the
    blocks' second convs), host only at the stem and the head, checked against the reference."""
    from tvm_lowbit.cli import main

    out = tmp_path / "art"
    main(["compile", "resnet20", "--target", "vta-sim", "--out", str(out), "--calib-size", "64", "--batch", "2"])
    text = capsys.readouterr().out
    assert ("all 18 VTA layers (every body tensor in DRAM) on the simulator equal the NumPy integer reference, "
            "and the logits are bit-identical") in text
    assert "integer-only body, 18 layer(s) on VTA" in text
    assert "host round trips between the first and the last VTA layer: 0" in text
    assert "scales calibrated on 64 image(s)" in text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "vta" and meta["body"] == "integer" and meta["host_roundtrips"] == 0
    assert len(meta["layers"]) == 18 and (out / "model.so").is_file()
    assert [o["where"] for o in meta["ops"]] == ["host"] + ["vta"] * 18 + ["host"]
    first = meta["layers"]["layer1.0.conv1"]
    assert (out / "vta" / "layer1.0.conv1.insn.bin").stat().st_size == 16 * first["insn_count"]
    assert first["input"] == meta["first"] and meta["layers"]["layer3.2.conv2"]["output"] == meta["last"]
    # the activations live in the one DRAM image: every tensor's buffer inside it
    dram = (out / "vta" / "dram.bin").stat().st_size
    assert all(t["offset"] + t["nbytes"] <= dram for t in meta["tensors"].values())
    with pytest.raises(CompileError, match="holds VTA programs"):
        tvm_lowbit.load_artifact(out)


class _Tiny(nn.Module):
    """float conv -> quantized conv -> float linear -> quantized linear -> float linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 24, 3, padding=1)
        self.l0 = nn.Linear(24 * 16, 40)
        self.l1 = nn.Linear(40, 48)
        self.l2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(torch.relu(self.c0(x))))
        x = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
        return self.l2(torch.relu(self.l1(torch.relu(self.l0(x)))))


def test_tiny_model_through_relax_and_host_fallback() -> None:
    torch.manual_seed(0)
    model = _Tiny().eval()
    calib = torch.randn(64, 3, 8, 8).numpy()
    q = quantize(model, FGQ(group_size=4, act_bits=8, alpha_bits=7, first_layer="float"), calib, progress=False)
    # not a ResNet: the integer-only body cannot take it; the per-layer partition runs it, saying why
    with pytest.warns(UserWarning, match=r"_Tiny has no layer1\.\.layer4 stages .*its own VTA program"):
        art = tvm_lowbit.compile(q, calib[:3], "vta-sim")        # dispatches to VTA; no calibration: bound shifts
    assert "_Tiny has no layer1..layer4" in art.report.text()
    assert art.report.host_roundtrips == 2
    assert "host round trips between the first and the last VTA layer: 2" in art.report.text()
    assert list(art.partition.layers) == ["c1", "l0", "l1"]
    assert art.partition.layers["l1"].math.kind == "dense"
    assert check_against_reference(art, calib[:3]) == 3
    rec = {}
    with vta_forward(q, art.partition, "reference", rec) as m, torch.no_grad():
        want = m(torch.from_numpy(calib[:3])).numpy()
    np.testing.assert_allclose(art.run(calib[:3]), want, rtol=1e-5, atol=1e-5)
    # 8-bit alpha codes do not fit int8 weights: those layers stay on the host, with the reason
    q8 = quantize(model, FGQ(group_size=4, act_bits=8, alpha_bits=8, first_layer="float"), calib, progress=False)
    part = plan(q8, calib[:3], CFG)
    why = dict(part.host)
    assert not part.layers and "not exact on VTA" in why["c1"] and "255" in why["c1"]



@pytest.mark.parametrize("zoo,path,ratio", [("twn", "ternary", 4), ("inq-b4", "pow2", 2)])
def test_narrow_weight_core_variants(zoo: str, path: str, ratio: int) -> None:
    from pathlib import Path

    ckpt = Path(tvm_lowbit.__file__).parent / "zoo" / "retrained" / f"{zoo}.pt"
    q = torch.load(ckpt, map_location="cpu", weights_only=False)["qmodel"].eval()
    x, _ = data.load("test", limit=1)
    base = plan(q, x, CFG)
    narrow = plan(q, x, CFG.with_weight_path(path))
    assert list(base.layers) == list(narrow.layers) and len(narrow.layers) >= 20
    wb = sum(l.weight_bytes for l in base.layers.values())
    assert sum(l.weight_bytes for l in narrow.layers.values()) * ratio == wb
    assert CFG.with_weight_path(path).sram_bytes["wgt"] * ratio == CFG.sram_bytes["wgt"]
    assert sum(l.cycles.total_cycles for l in narrow.layers.values()) < sum(l.cycles.total_cycles for l in base.layers.values())
    name = "layer3.1.conv1"
    rec_s, rec_r = {}, {}
    for ex, rec in (("sim", rec_s), ("reference", rec_r)):
        with vta_forward(q, narrow, ex, rec) as m, torch.no_grad():
            m(torch.from_numpy(x))
    assert all(np.array_equal(rec_s[n], rec_r[n]) for n in rec_r) and name in rec_r
