"""End-to-end: quantize -> torch.export -> Relax -> LowerIntegerLayers -> build; bit-exact integer accumulators."""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from helpers import builtin_fgq
from tvm_lowbit import FGQ, data, qmath, quantize
from tvm_lowbit.compiler import CompileError, load_artifact
from tvm_lowbit.kernels.avx2 import has_avx2
from tvm_lowbit.kernels.vnni import vnni_lanes
from tvm_lowbit.models import load_pretrained
from tvm_lowbit.quantizers.layers import QConv2d, quant_layer, quant_layers
from tvm_lowbit.targets import TargetError, load_target


def reference_accumulators(qmodel: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each quantized layer's int accumulators, from its input codes by the NumPy integer reference."""
    accs: dict[str, np.ndarray] = {}
    hooks = []
    for name, layer in quant_layers(qmodel).items():
        def hook(m, args, name=name):
            q = m.quantize_input(args[0]).numpy().astype(np.int64)
            w = m.w_int.numpy().astype(np.int64)
            if isinstance(m, QConv2d):
                accs[name] = qmath.conv2d_int_np(q, w, m.stride, m.padding, m.dilation, m.groups)
            else:
                accs[name] = qmath.dense_int_np(q, w)
        hooks.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        out = qmodel(torch.from_numpy(x)).numpy()
    for h in hooks:
        h.remove()
    accs["__out__"] = out
    return accs


def check_bit_exact(qmodel: nn.Module, x: np.ndarray, target: object = "x86") -> tvm_lowbit.compiler.Artifact:
    art = tvm_lowbit.compile(qmodel, x, target, expose_acc=True)
    assert not art.report.fallback, art.report.text()
    outs = art.run_all(x)
    ref = reference_accumulators(qmodel, x)
    assert len(outs) == 1 + len(art.report.lowered)
    for name, acc in zip(art.report.lowered, outs[1:]):
        assert acc.dtype == np.int32, name
        np.testing.assert_array_equal(acc.astype(np.int64), ref[name], err_msg=f"accumulators of {name}")
    np.testing.assert_allclose(outs[0], ref["__out__"], rtol=1e-5, atol=1e-5)
    return art


@pytest.fixture(scope="module")
def builtin_q() -> nn.Module:
    # 8-bit alpha codes (FGQ's default is 7): the AVX2 kernels, not the folded VNNI ones (the next test's)
    return quantize(load_pretrained(), FGQ(group_size=4, act_bits=8, alpha_bits=8), data.calibration_set(128),
                    progress=False)


def test_builtin_model_accumulators_bit_exact(builtin_q: nn.Module) -> None:
    x, _ = data.load("test", limit=2)
    art = check_bit_exact(builtin_q, x)
    assert len(art.report.lowered) == len(quant_layers(builtin_q)) == 21  # the int8 stem + 20 ternary layers
    if has_avx2(art.target.tvm_target()):  # every ternary layer of ResNet-20 fits the AVX2 dot-product kernels
        ternary = [n for n in art.report.lowered if n != "conv1"]  # 8-bit alpha codes: not the folded VNNI ones
        assert {n: art.report.fast_kernels.get(n) for n in ternary} == {n: "avx2" for n in ternary}
    if vnni_lanes(art.target.tvm_target()):  # the signed int8 stem runs on vpdpbusd
        assert art.report.kernel_names["conv1"] == "int_conv2d_vnni"


def test_builtin_model_7bit_alpha_takes_the_folded_vnni_kernels() -> None:
    q = builtin_fgq(FGQ(group_size=4, act_bits=8, alpha_bits=7), 256)  # quantized once a session (test_board, test_fgq)
    x, _ = data.load("test", limit=2, offset=5)
    art = check_bit_exact(q, x)  # NHWC end to end on a VNNI host
    if vnni_lanes(art.target.tvm_target()):
        assert set(art.report.fast_kernels.values()) == {"avx512vnni"}


def test_ternary_classifier_at_batch_1_takes_the_lut_kernel() -> None:
    from tvm_lowbit.kernels import lut

    q = quantize(load_pretrained(), FGQ(group_size=4, act_bits=8, last_layer="fgq"), data.calibration_set(128),
                 progress=False)
    x, _ = data.load("test", limit=1, offset=11)
    art = check_bit_exact(q, x)
    if has_avx2(art.target.tvm_target()):
        assert art.report.fast_kernels["fc"] == "lut" and lut.LUT_MAX_ROWS >= 1
        x8, _ = data.load("test", limit=8, offset=11)  # 8 rows: above the rule's limit (the dot-product kernels
        assert check_bit_exact(q, x8).report.fast_kernels.get("fc") != "lut"  # take 10 outputs, padded, on VNNI)


def test_builtin_model_bit_exact_without_avx2(builtin_q: nn.Module) -> None:
    # an x86 CPU without AVX2 gets the generic integer kernels, with the same accumulators
    host = load_target("x86-host")
    spec = dataclasses.replace(host, target_dict={**host.target_dict, "mcpu": "x86-64"})
    x, _ = data.load("test", limit=2, offset=3)
    art = check_bit_exact(builtin_q, x, spec)
    assert art.report.fast_kernels == {} and len(art.report.lowered) == 21


def test_builtin_model_n64_bit_exact() -> None:
    # N=64 makes accumulator bounds exceed float32's exact range: the float64 fake-quant path
    # (with 8-bit alpha codes: 7-bit ones keep N=64's bounds inside float32)
    q = quantize(load_pretrained(), FGQ(group_size=64, act_bits=8, alpha_bits=8), data.calibration_set(128),
                 progress=False)
    assert any(m.acc_dtype == torch.float64 for m in quant_layers(q).values())
    x, _ = data.load("test", limit=2, offset=7)
    check_bit_exact(q, x)


@pytest.fixture(scope="module")
def builtin_art(builtin_q: nn.Module) -> tvm_lowbit.compiler.Artifact:
    """``builtin_q`` compiled for x86 at batch 100 (default options)."""
    x, _ = data.load("test", limit=100, offset=2000)
    return tvm_lowbit.compile(builtin_q, x)


def test_builtin_model_predictions_agree_with_fake_quant(builtin_q: nn.Module, builtin_art) -> None:
    x, _ = data.load("test", limit=400, offset=2000)
    art = builtin_art
    assert art.report.requant_fused, "consecutive quantized convs should requantize inside the kernel"
    with torch.no_grad():
        ref = builtin_q(torch.from_numpy(x)).numpy().argmax(1)
    got = np.concatenate([art.run(x[i:i + 100]).argmax(1) for i in range(0, 400, 100)])
    assert (got == ref).mean() >= 0.999


class Variants(nn.Module):
    """Every operator variant the pass handles, plus float ops that must stay float around it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.c_stride = nn.Conv2d(6, 10, 3, stride=2, padding=1)            # ragged: 6 % 4 != 0
        self.bn = nn.BatchNorm2d(10)
        self.c_dil = nn.Conv2d(10, 8, 3, padding=2, dilation=2, bias=False)
        self.c_grp = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)                 # depthwise: groups over taps
        self.c_1x1 = nn.Conv2d(16, 12, 1)
        self.c_rect = nn.Conv2d(12, 12, (1, 3), padding=(0, 1))
        self.ln = nn.LayerNorm(12)
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.c_stride(x)))
        x = self.c_dil(x)                                   # signed output feeds the grouped conv
        y = torch.relu(self.c_dw(torch.relu(self.c_grp(x))))
        x = torch.cat([x, y], dim=1)                        # concatenation
        x = self.c_rect(torch.relu(self.c_1x1(x))) + 0.5    # residual-style float add
        x = nn.functional.max_pool2d(x, 2)
        t = x.flatten(2).transpose(1, 2)                    # [B, T, C] tokens
        t = self.ln(t)
        t = t + self.fc2(nn.functional.gelu(self.fc1(t)))   # transformer-style MLP on [B, T, K]
        t = torch.softmax(t, dim=-1).mean(1)
        return self.head(t)


@pytest.mark.parametrize("group_size,act_bits", [(4, 8), (64, 4)])
def test_operator_variants_bit_exact(group_size: int, act_bits: int) -> None:
    torch.manual_seed(group_size)
    model = Variants().eval()
    calib = torch.randn(32, 3, 12, 12)
    q = quantize(model, FGQ(group_size=group_size, act_bits=act_bits, first_layer="fgq", last_layer="fgq"),
                 calib, progress=False)
    x = torch.randn(2, 3, 12, 12).numpy()
    art = check_bit_exact(q, x)
    assert len(art.report.lowered) == 10


def test_odd_channel_counts_take_the_padded_vnni_kernels() -> None:
    """K = 10, 12, 20 (no multiple of 8): on a VNNI host the 8-lane kernels with the weight tile padded to 8
    output channels; accumulators and outputs bit-exact."""
    torch.manual_seed(4)
    q = quantize(Variants().eval(), FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq", alpha_bits=7),
                 torch.randn(32, 3, 12, 12), progress=False)
    art = check_bit_exact(q, torch.randn(2, 3, 12, 12).numpy())
    if vnni_lanes(art.target.tvm_target()) == 16:
        names = art.report.kernel_names
        assert {names[k] for k in ("c_stride", "c_1x1", "c_rect")} == {"ternary_conv2d_avxvnni"}, names
        assert {names[k] for k in ("fc1", "fc2")} == {"ternary_dense_avxvnni"}, names


def test_grouped_convs_take_the_vnni_kernel() -> None:
    """RegNetX's grouped 3x3 convs (16 channels per group): on the VNNI kernel, bit-exact, in the NHWC region."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU(),
                          nn.Conv2d(64, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Conv2d(32, 16, 1)).eval()
    q = quantize(model, FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq", alpha_bits=7),
                 torch.randn(32, 8, 10, 10), progress=False)
    art = check_bit_exact(q, torch.randn(2, 8, 10, 10).numpy())
    if vnni_lanes(art.target.tvm_target()) == 16:
        assert art.report.kernel_names["2"] == "ternary_conv2d_vnni", art.report.kernel_reasons["2"]
        assert art.report.kernel_names["4"] == "ternary_conv2d_vnni", art.report.kernel_reasons["4"]


def test_unlowerable_layer_falls_back_with_a_report() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 3)).eval()
    q = quantize(model, FGQ(first_layer="fgq"), torch.randn(16, 4, 6, 6), progress=False)
    quant_layer(q, "2").w_int[0, 0, 0, 0] = 3.0  # no longer alpha_q * t in its group
    quant_layer(q, "2").w_int[0, 1, 0, 0] = -5.0
    x = torch.randn(1, 4, 6, 6).numpy()
    art = tvm_lowbit.compile(q, x)
    assert [name for name, _ in art.report.fallback] == ["2"]
    assert "not grouped-ternary" in art.report.fallback[0][1]
    with torch.no_grad():
        np.testing.assert_allclose(art.run(x), q(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


def test_export_and_load_back(builtin_art, tmp_path) -> None:
    x, _ = data.load("test", limit=100)
    art = builtin_art
    out = art.export(tmp_path / "art")
    again = load_artifact(out)
    np.testing.assert_array_equal(again.run(x), art.run(x))
    assert again.weight_bytes == art.weight_bytes > 0


@pytest.mark.parametrize("target,machine", [("rasp4b", "AArch64"), ("rasp3b", "ARM")])
def test_cross_compile_exports_board_library(builtin_q: nn.Module, tmp_path, target: str, machine: str) -> None:
    x, _ = data.load("test", limit=1)
    art = tvm_lowbit.compile(builtin_q, x, target)
    out = art.export(tmp_path / target)
    header = subprocess.run(["readelf", "-h", str(out / "model.so")], capture_output=True, text=True).stdout
    assert machine in header
    with pytest.raises(CompileError, match="cannot run on this host"):
        art.run(x)


def test_bad_target_and_bad_input_are_clear() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    q = quantize(model, FGQ(first_layer="fgq"), torch.randn(8, 1, 8, 8), progress=False)
    with pytest.raises(TargetError, match="unknown target 'pi9'.*rasp4b"):
        tvm_lowbit.compile(q, torch.randn(1, 1, 8, 8), "pi9")
    art = tvm_lowbit.compile(q, torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="does not match the compiled shape"):
        art.run(np.zeros((1, 1, 9, 9), np.float32))


@pytest.mark.parametrize("scheme", ["pact", "sq-twn", "sq-bwn", "inq"])
def test_retrained_models_compile_bit_exact(scheme: str, tmp_path) -> None:
    from tvm_lowbit.quantizers.inq import INQ
    from tvm_lowbit.quantizers.pact import PACT
    from tvm_lowbit.quantizers.sq import SQ

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 5)).eval()
    cfg = {"pact": PACT(act_bits=4, weight_bits=4), "sq-twn": SQ(inner="twn", schedule=(1.0,)),
           "sq-bwn": SQ(inner="bwn", schedule=(1.0,)), "inq": INQ(bits=4, portions=(1.0,))}[scheme]
    hook = cfg.attach(model)
    for _ in hook.stages():  # no training steps: the export path is what is under test
        pass
    calib = torch.randn(16, 3, 8, 8)
    q = hook.export(calib)
    art = check_bit_exact(q, calib[:2].numpy())
    assert art.report.lowered and not art.report.fallback
    if scheme == "pact":  # the exported PACT clip and the next layer's quantizer fold into one requant
        assert art.report.requant_folded >= 1 and art.report.requant_fused, art.report
        # 4-bit DoReFa codes (odd, up to +-15) are stored as packed int8, not as ternary groups of one
        assert set(art.report.kernels.values()) == {"int8"}, art.report.kernels
    # the same pipeline builds for the board (aarch64, linked with the cross g++)
    board = tvm_lowbit.compile(q, calib[:1], "rasp4b")
    assert board.report.kernels == art.report.kernels
    header = subprocess.run(["readelf", "-h", str(board.export(tmp_path / "rasp4b") / "model.so")],
                            capture_output=True, text=True).stdout
    assert "AArch64" in header


@pytest.mark.parametrize("target", ["rasp5", "rasp4b"])
def test_pi_lowering_with_the_integer_requantization_is_exact_on_the_host(target: str) -> None:
    """A model lowered for the Pi (the aarch64 folded-alpha kernels, their integer requantization where
    kernels.requant proves it) and compiled unscheduled for this host: every layer's accumulators equal the
    reference of the fake-quant codes.  The integer form's int64 offsets must reach the kernel as int64:
    ``relax.const`` makes an int64 array int32, which wrapped them and made MobileNetV2 and EfficientNet-B0
    wrong on the Pi 5 from the layer after the first integer requantization."""
    import tvm
    from tvm import relax

    from tvm_lowbit.importer import import_torch, layer_infos
    from tvm_lowbit.passes.lower_integer_layers import lower_integer_layers

    torch.manual_seed(2)
    # the 1x1 projection (batch norm, no ReLU: signed codes) takes the integer requantization (seed 2), the
    # next layer reads its codes
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU6(), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16),
                          nn.Conv2d(16, 32, 1), nn.ReLU6(), nn.Conv2d(32, 16, 1)).eval()
    x = torch.randn(8, 3, 8, 8)
    q = quantize(model, FGQ(group_size=4), x, progress=False)
    mod, report = lower_integer_layers(import_torch(q, x[:2]), layer_infos(q), expose_acc=True,
                                       target=load_target(target).tvm_target())
    assert report.epilogue_forms.get("2") == "integer" and "4" in report.lowered, report.epilogue_forms
    assert not report.fallback, report.text()
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}))
    outs = [o.numpy() for o in relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x[:2].numpy()))]
    ref = reference_accumulators(q, x[:2].numpy())
    for name, acc in zip(report.lowered, outs[1:]):
        np.testing.assert_array_equal(acc.astype(np.int64), ref[name], err_msg=f"accumulators of {name}")
    np.testing.assert_allclose(outs[0], ref["__out__"], rtol=1e-5, atol=1e-5)  # the last conv is float
