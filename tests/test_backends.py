"""Backends keyed by target kind: dispatch from compile / build / the CLI, refusals, and the module layering
(no compiler <-> tune <-> vta.compile cycle, the package importable without TVM)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

import tvm_lowbit
from tvm_lowbit import backends, targets
from tvm_lowbit.artifact import Artifact
from tvm_lowbit.backends import CPUBackend, VTABackend, backend_for
from tvm_lowbit.cli import main
from tvm_lowbit.compiler import build
from tvm_lowbit.errors import CompileError

PKG = Path(tvm_lowbit.__file__).resolve().parent


def test_every_target_has_its_kinds_backend() -> None:
    for name in targets.available():
        spec = targets.load_target(name)
        want = VTABackend if name.startswith("vta-") else CPUBackend
        assert isinstance(backend_for(spec), want), name
        assert spec.kind == want.kind and spec.is_vta == (want is VTABackend)


class ToyBackend(backends.Backend):
    """Records what it was asked; compiles nothing."""

    kind = "toy"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def compile(self, qmodel: nn.Module, example_input: Any, spec: targets.TargetSpec, **kw: Any) -> Artifact:
        self.calls.append(("compile", spec.name))
        return Artifact(spec, None, tuple(np.shape(example_input)))

    def build(self, mod: Any, spec: targets.TargetSpec, infos: Any, input_shape: tuple[int, ...],
              **kw: Any) -> Artifact:
        self.calls.append(("build", spec.name))
        return Artifact(spec, None, input_shape)

    def tune_module(self, mod: Any, spec: targets.TargetSpec, **kw: Any) -> Any:
        raise AssertionError("not called here")


def test_a_new_kind_is_one_backend_and_one_register(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "toy-board.json"
    path.write_text(json.dumps({"name": "toy-board", "kind": "toy", "arch": "x86_64", "target": {"kind": "llvm"}}))
    spec = targets.load_target(str(path))
    with pytest.raises(targets.TargetError, match="kind 'toy', which no backend compiles for; kinds: cpu, vta"):
        backend_for(spec)
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    toy = backends.register(ToyBackend())
    with pytest.raises(ValueError, match="kind 'toy' is already compiled by ToyBackend; pass replace=True"):
        backends.register(ToyBackend())
    assert backends.register(toy) is toy
    x = np.zeros((1, 3), np.float32)
    art = tvm_lowbit.compile(nn.Linear(3, 2), x, str(path))
    assert art.target.name == "toy-board" and art.input_shape == (1, 3)
    build(None, spec, {}, (1, 3))
    assert toy.calls == [("compile", "toy-board"), ("build", "toy-board")]


def test_vta_refuses_an_imported_module_and_tuning() -> None:
    with pytest.raises(CompileError, match="vta-sim is a VTA target: compile the quantized nn.Module"):
        build(None, "vta-sim", {}, (1, 1, 28, 28))
    from tvm_lowbit.tune import TuneError

    spec = targets.load_target("vta-sim")
    with pytest.raises(TuneError, match="vta-sim is a VTA target: .* nothing to tune"):
        backend_for(spec).tune_module(None, spec)


@pytest.mark.parametrize("argv, message", [
    (["compile", "m.pt2", "--target", "vta-sim", "--out", "o"], "planning a .pt2/ONNX file for VTA is not supported"),
    (["compile", "m.onnx", "--target", "vta-pynq", "--out", "o"], "planning a .pt2/ONNX file for VTA"),
    (["compile", "resnet20", "--target", "vta-sim", "--out", "o", "--schedules", "d"],
     "--schedules d: tuned schedules apply to .pt2 and built-in models on CPU targets"),
    (["compile", "m.onnx", "--out", "o", "--schedules", "d"], "--schedules d: tuned schedules apply to .pt2"),
    (["tune", "resnet20", "--target", "vta-sim"], "vta-sim is a VTA target: .* nothing to tune"),
])
def test_cli_asks_the_backend_before_any_work(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tvm-lowbit: error: ") and re.search(message, err), err


def _module_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported tvm_lowbit module, imported inside a function) for every import in ``path``."""
    out: list[tuple[str, bool]] = []

    def walk(node: ast.AST, in_fn: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(ch, ast.ImportFrom) and ch.module and ch.module.startswith("tvm_lowbit"):
                out.extend([(ch.module, fn)] + [(f"{ch.module}.{a.name}", fn) for a in ch.names])
            elif isinstance(ch, ast.Import):
                out.extend((a.name, fn) for a in ch.names if a.name.startswith("tvm_lowbit"))
            walk(ch, fn)

    walk(ast.parse(path.read_text()), False)
    return out


def test_compiler_tune_and_vta_compile_do_not_import_each_other_back() -> None:
    # the layering: errors, targets < importer, artifact < tune < backends < compiler < cli
    lower = {"tune.py": {"tvm_lowbit.compiler", "tvm_lowbit.backends"},
             "vta/compile.py": {"tvm_lowbit.compiler", "tvm_lowbit.backends", "tvm_lowbit.tune"},
             "artifact.py": {"tvm_lowbit.compiler", "tvm_lowbit.backends", "tvm_lowbit.tune"},
             "importer.py": {"tvm_lowbit.compiler", "tvm_lowbit.backends", "tvm_lowbit.tune", "tvm_lowbit.artifact"},
             "targets/__init__.py": {"tvm_lowbit.compiler", "tvm_lowbit.backends", "tvm_lowbit.tune"}}
    for rel, banned in lower.items():
        found = {m for m, _ in _module_imports(PKG / rel) if any(m == b or m.startswith(b + ".") for b in banned)}
        assert not found, f"{rel} imports {sorted(found)}"
    for rel in ("compiler.py", "artifact.py", "importer.py", "errors.py", "tune.py", "cli.py", "vta/compile.py",
                *(f"backends/{p.name}" for p in (PKG / "backends").glob("*.py"))):
        private = [m for m, _ in _module_imports(PKG / rel) if m.rsplit(".", 1)[-1].startswith("_")]
        assert not private, f"{rel} imports private names {private}"


def test_import_tvm_lowbit_and_targets_do_not_import_tvm() -> None:
    code = ("import sys, tvm_lowbit, tvm_lowbit.targets, tvm_lowbit.errors; "
            "tvm_lowbit.targets.load_target('rasp4b'); assert 'tvm' not in sys.modules, 'tvm imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_targets_dir_env_override(tmp_path: Path) -> None:
    (tmp_path / "mine.json").write_text(json.dumps({"name": "mine", "arch": "x86_64", "target": {"kind": "llvm"}}))
    code = "from tvm_lowbit import targets; print(targets.available(), targets.load_target('mine').kind)"
    env = {**os.environ, "TVM_LOWBIT_TARGETS": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.split() == ["['mine']", "cpu"], r.stdout + r.stderr

