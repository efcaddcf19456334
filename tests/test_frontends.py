"""ONNX models, saved .pt2 models and the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import tvm_lowbit
from tvm_lowbit import FGQ, quantize
from tvm_lowbit.compiler import CompileError, compile_saved, load_artifact, save_quantized
from tvm_lowbit.onnx_quant import quantize_onnx, quantize_onnx_module


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                      nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():  # non-trivial batch-norm statistics, as a trained model has
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def to_onnx(model: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(shape),), buf, input_names=["x"], output_names=["y"], dynamo=False,
                      opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def test_onnx_model_is_quantized_and_lowered() -> None:
    model = small_cnn()
    proto = to_onnx(model, (1, 1, 12, 12))
    calib = np.random.default_rng(0).normal(size=(64, 1, 12, 12)).astype(np.float32)
    cfg = FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq")
    fq, infos = quantize_onnx_module(proto, cfg, calib, batch=4)
    assert sorted(i.name for i in infos.values()) == ["conv2d.0", "conv2d.1", "conv2d.2", "matmul.0", "matmul.1"]
    art = quantize_onnx(proto, cfg, calib, batch=4)
    assert sorted(art.report.lowered) == sorted(i.name for i in infos.values()) and not art.report.fallback
    # the compiled integer model computes what the fake-quant Relax graph computes, in float, in TVM
    vm = relax.VirtualMachine(tvm.compile(fq, target="llvm"), tvm.cpu())
    x = calib[:4]
    np.testing.assert_allclose(art.run(x), vm["main"](tvm.runtime.tensor(x)).numpy(), rtol=1e-5, atol=1e-5)
    # and stays close to the float model
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(art.run(x) - ref).max() < 0.5 * np.abs(ref).max()


def test_onnx_bad_input() -> None:
    proto = to_onnx(small_cnn(), (1, 1, 12, 12))
    with pytest.raises(ValueError, match="non-empty"):
        quantize_onnx_module(proto, FGQ(), np.zeros((0, 1, 12, 12), np.float32))
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        quantize_onnx("/nonexistent.onnx", FGQ(), np.zeros((4, 1, 12, 12), np.float32))


def test_saved_pt2_round_trip(tmp_path: Path) -> None:
    model = small_cnn()
    calib = torch.randn(32, 1, 12, 12)
    q = quantize(model, FGQ(first_layer="fgq"), calib, progress=False)
    path = save_quantized(q, calib[:2], tmp_path / "q.pt2")
    art = compile_saved(path)
    assert len(art.report.lowered) == 4 and not art.report.fallback
    assert "0" in art.report.lowered  # names come from the layer table saved in the .pt2
    with torch.no_grad():
        np.testing.assert_allclose(art.run(calib[:2].numpy()), q(calib[:2]).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(CompileError, match="not a torch.export program"):
        (tmp_path / "bad.pt2").write_bytes(b"nonsense")
        compile_saved(tmp_path / "bad.pt2")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvm_lowbit.cli", *args], capture_output=True, text=True, timeout=900)


def test_cli_compile_builtin_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "art"
    r = run_cli("compile", "resnet20", "--target", "x86", "--out", str(out), "--calib-size", "64")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "20 layer(s) lowered" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["target"] == "x86-host" and meta["input_shape"] == [1, 1, 28, 28]
    art = load_artifact(out)
    assert art.run(np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)

    r = run_cli("compile", "resnet20", "--target", "pi9", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown target 'pi9'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("compile", "resnet20", "--group-size", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "group_size must be an integer >= 1" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("compile", "nosuchmodel", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown built-in model" in r.stderr
    assert not (tmp_path / "x").exists()  # failed commands leave nothing behind
