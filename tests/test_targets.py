"""Targets as data: lookup, aliases, clear errors."""

from __future__ import annotations

import pytest

from tvm_lowbit import targets


def test_missing_cross_compiler_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets.shutil, "which", lambda _name: None)
    with pytest.raises(targets.TargetError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        targets.load_target("rasp4b").compiler_path()
    assert targets.load_target("x86").compiler_path() is None  # the host needs no cross compiler


def test_every_target_file_builds_a_tvm_target() -> None:
    for name in targets.available():
        spec = targets.load_target(name)
        assert str(spec.tvm_target().kind) == "llvm"
    assert targets.load_target("pi4").name == "rasp4b"
    with pytest.raises(targets.TargetError, match="unknown target 'pi9'"):
        targets.load_target("pi9")
