"""``tvm_lowbit.compile(..., "vta-sim")`` gives the integer-only body: ResNet-20 compiled through the public API
runs the whole body on the simulator over one DRAM, bit for bit equal to the NumPy integer reference; models
the conversion cannot take get the per-layer partition with a one-line warning naming the block or model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import FGQ, data, quantize
from tvm_lowbit.errors import CompileError
from tvm_lowbit.models import load_pretrained, mobilenet
from tvm_lowbit.models.resnet import BasicBlock, ResNet
from tvm_lowbit.safe_io import IntegrityError
from tvm_lowbit.vta import integer
from tvm_lowbit.vta.body import VTABodyArtifact, load_body
from tvm_lowbit.vta.compile import VTAArtifact, check_against_reference, compile_vta

VTA_FGQ = FGQ(group_size=4, act_bits=8, alpha_bits=7)   # what scripts/bench_vta.py measures


@pytest.fixture(scope="module")
def resnet20_art() -> tuple[nn.Module, VTABodyArtifact, np.ndarray]:
    torch.set_num_threads(1)
    q = quantize(load_pretrained(), VTA_FGQ, data.calibration_set(64), progress=False)
    x, _ = data.load("test", limit=2)
    return q, tvm_lowbit.compile(q, x, "vta-sim"), x


def test_resnet20_whole_body_on_vta(resnet20_art) -> None:
    q, art, x = resnet20_art
    assert isinstance(art, VTABodyArtifact)
    rep = art.report
    assert rep.host_roundtrips == 0 and len(rep.lowered) == 18
    assert [w for _, w, _ in rep.ops] == ["host"] + ["vta"] * 18 + ["host"]
    assert [op for op, _ in rep.fallback] == ["stem", "head"]
    assert "host round trips between the first and the last VTA layer: 0" in rep.text()
    # one VTA program per layer, over one DRAM: layer i's output buffer is layer i+1's input buffer
    p = art.netp
    for a, b in zip(art.net.layers, art.net.layers[1:]):
        assert p.programs[a.name].program.buffers["out"].offset == p.programs[b.name].program.buffers["inp"].offset
    assert sum(art.cycles().values()) == p.total_cycles > 0


def test_resnet20_simulator_bit_exact_vs_reference(resnet20_art) -> None:
    q, art, x = resnet20_art
    assert check_against_reference(art, x) == 18
    art.executor = "sim"
    logits = art.run(x)
    got = dict(art.outputs)
    # independently of the artifact's executors: the NumPy reference on the codes the host stem wrote
    ref = integer.reference(art.net, got[art.net.first])
    for l in art.net.layers:
        np.testing.assert_array_equal(got[l.out], ref[l.out], err_msg=l.name)
    assert ref[art.net.last].max() > 0
    np.testing.assert_allclose(logits, art.net.head_logits(ref[art.net.last]), rtol=1e-5, atol=1e-5)
    # the host stem compiled by TVM writes the codes torch's stem gives (a rare rounding tie may differ)
    stem = art.net.stem_codes(x)
    assert np.mean(stem != got[art.net.first]) < 1e-3
    # the integer model predicts like the fake-quant one on these images
    with torch.no_grad():
        assert (q(torch.from_numpy(x)).argmax(1).numpy() == logits.argmax(1)).all()


def test_body_export_and_load_round_trip(resnet20_art, tmp_path) -> None:
    _, art, x = resnet20_art
    out = art.export(tmp_path / "a")
    assert (out / "vta" / "dram.bin").stat().st_size == art.netp.dram_bytes
    for l in art.net.layers:
        assert (out / "vta" / f"{l.name}.insn.bin").read_bytes() == art.netp.programs[l.name].program.insn_bytes()
    with pytest.raises(CompileError, match="holds VTA programs.*tvm_lowbit.vta.body.load_body"):
        tvm_lowbit.load_artifact(out)
    # the export alone (host library, DRAM image, instruction streams) runs the model, bit for bit
    loaded = load_body(out)
    got = loaded.run(x)
    art.executor = "sim"
    np.testing.assert_array_equal(got, art.run(x))
    assert loaded.outputs.keys() == art.outputs.keys()
    for k, v in art.outputs.items():
        np.testing.assert_array_equal(loaded.outputs[k], v, err_msg=k)
    assert loaded.cycles() == art.cycles()
    loaded.executor = "reference"
    with pytest.raises(ValueError, match="runs on the simulator only"):
        loaded.run(x)
    # a changed byte in the DRAM image is caught before anything runs
    raw = bytearray((out / "vta" / "dram.bin").read_bytes())
    raw[-1] ^= 1
    (out / "vta" / "dram.bin").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="dram.bin"):
        load_body(out)


def test_body_for_a_board_builds_but_runs_there() -> None:
    torch.manual_seed(0)
    model = ResNet(blocks=1, width=16).eval()
    calib = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    q = quantize(model, VTA_FGQ, calib, progress=False)
    art = compile_vta(q, calib[:1], "vta-pynq", calib=calib, search=False)
    assert isinstance(art, VTABodyArtifact) and art.report.host_roundtrips == 0
    with pytest.raises(CompileError, match="host code is built for vta-pynq"):
        art.run(calib[:1])


class _SigmoidBlock(BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x))


class _ExtraOp(ResNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_a_block_with_another_op_gets_the_per_layer_partition() -> None:
    torch.manual_seed(0)
    model = ResNet(blocks=1, width=16).eval()
    model.layer2[0].__class__ = _SigmoidBlock
    calib = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    q = quantize(model, VTA_FGQ, calib, progress=False)
    with pytest.raises(integer.NotVTAInteger, match=r"^block layer2\.0 \(_SigmoidBlock\): its forward is not"):
        integer.from_resnet(q, calib)
    with pytest.warns(UserWarning, match=r"block layer2\.0 .*its own VTA program"):
        art = compile_vta(q, calib[:1], "vta-sim", calib=calib)
    assert isinstance(art, VTAArtifact) and "block layer2.0" in art.report.text()
    assert check_against_reference(art, calib[:1]) == len(art.partition.layers) > 0


def test_models_the_conversion_cannot_take_are_named() -> None:
    calib = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    torch.manual_seed(0)
    q = quantize(_ExtraOp(blocks=1, width=16).eval(), VTA_FGQ, calib, progress=False)
    with pytest.raises(integer.NotVTAInteger, match=r"^_ExtraOp: its forward is not stem -> layer1\.\.layer4"):
        integer.from_resnet(q, calib)
    qm = quantize(mobilenet().eval(), VTA_FGQ, calib, progress=False)   # the built-in compact model
    with pytest.raises(integer.NotVTAInteger, match=r"^MobileNetV2 has no layer1\.\.layer4 stages"):
        integer.from_resnet(qm, calib)
