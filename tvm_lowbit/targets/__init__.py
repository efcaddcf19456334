"""Compilation targets, described as data: one JSON file each in this package's folder
(``tvm_lowbit/targets/*.json``, installed with the package; ``TVM_LOWBIT_TARGETS`` names another folder).

A file's ``"kind"`` (default ``"cpu"``) picks the backend that compiles for it (``tvm_lowbit.backends``)."""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS_DIR = Path(os.environ.get("TVM_LOWBIT_TARGETS", Path(__file__).resolve().parent))
ALIASES = {"x86": "x86-host", "host": "x86-host", "rasp4": "rasp4b", "rasp3": "rasp3b", "pi4": "rasp4b",
           "pi5": "rasp5", "pi3": "rasp3b"}


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    arch: str
    target_dict: dict[str, Any]
    cross_compiler: str | None = None
    apt_package: str | None = None
    qemu_cpu: str | None = None
    vta: dict[str, Any] | None = None  # a VTA accelerator preset ("kind": "vta"); target_dict is then its host CPU
    kind: str = "cpu"  # the backend (tvm_lowbit.backends) that compiles for this target

    def __post_init__(self) -> None:
        if self.vta is not None and self.kind == "cpu":  # a spec made in code with a VTA preset
            object.__setattr__(self, "kind", "vta")

    @property
    def is_host(self) -> bool:
        return self.cross_compiler is None

    @property
    def is_vta(self) -> bool:
        return self.vta is not None

    def vta_config(self) -> Any:
        """The accelerator configuration (``tvm_lowbit.vta.config.VTAConfig``) of a VTA target."""
        if self.vta is None:
            raise TargetError(f"target {self.name!r} has no VTA accelerator; use one of the vta-* targets")
        from tvm_lowbit.vta.config import VTAConfig, VTAConfigError

        try:
            return VTAConfig.from_dict(self.vta, name=self.name)
        except VTAConfigError as e:
            raise TargetError(str(e)) from e

    def tvm_target(self) -> Any:
        import tvm

        d = dict(self.target_dict)
        if d.get("mcpu") == "@host":
            d["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        if d.get("num-cores") == "@host":
            d["num-cores"] = os.cpu_count() or 1
        return tvm.target.Target(d)

    def compiler_path(self) -> str | None:
        """The cross C++ compiler for ``export_library``, or a clear error if it is not installed."""
        if self.cross_compiler is None:
            return None
        path = shutil.which(self.cross_compiler)
        if path is None:
            raise TargetError(f"target {self.name!r} needs the cross compiler {self.cross_compiler!r} to export a "
                              f"library, and it is not installed: run `apt-get install {self.apt_package}` "
                              "(scripts/setup.sh installs it)")
        return path


def available() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.json"))


def load_target(spec: str | TargetSpec) -> TargetSpec:
    """A target by name (``x86-host``, ``rasp4b``, ``rasp5``, ``rasp3b``, or an alias) or by JSON file path."""
    if isinstance(spec, TargetSpec):
        return spec
    name = ALIASES.get(spec, spec)
    path = Path(name) if name.endswith(".json") else TARGETS_DIR / f"{name}.json"
    if not path.is_file():
        raise TargetError(f"unknown target {spec!r}; available: {', '.join(available())} "
                          f"(or a path to a target JSON file like those in {TARGETS_DIR})")
    d = json.loads(path.read_text())
    try:
        return TargetSpec(name=d["name"], description=d.get("description", ""), arch=d["arch"],
                          target_dict=d["target"], cross_compiler=d.get("cross_compiler"),
                          apt_package=d.get("apt_package"), qemu_cpu=d.get("qemu_cpu"),
                          vta=d["vta"] if d.get("kind") == "vta" else None, kind=d.get("kind", "cpu"))
    except KeyError as e:
        raise TargetError(f"{path}: target file lacks the field {e}") from e


def host_arch() -> str:
    return platform.machine()
