"""A compiled model (:class:`Artifact`): run it, time it, export it; :func:`load_artifact` reads an export back.

Backends return an ``Artifact`` (or a subclass with their own files, like ``vta.compile.VTAArtifact``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvm_lowbit.errors import CompileError
from tvm_lowbit.passes.report import LoweringReport
from tvm_lowbit.targets import TargetSpec, load_target


@dataclass
class Artifact:
    """A compiled model: run it, time it, export it (``load_artifact`` reads it back)."""

    target: TargetSpec
    executable: Any
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    report: LoweringReport = field(default_factory=LoweringReport)
    weight_bytes: int = 0
    num_outputs: int = 1
    compile_seconds: float = 0.0
    tuning: Any = None  # tune.ApplyReport when a tuned-schedule database was applied
    _vm: Any = None

    def _machine(self) -> Any:
        if not self.target.is_host:
            raise CompileError(f"this artifact is built for {self.target.name} ({self.target.arch}); it cannot run on "
                               "this host: export it and run it on the board (tvm-lowbit deploy)")
        if self._vm is None:
            import tvm
            from tvm import relax

            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    def check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if tuple(x.shape) != tuple(self.input_shape):
            raise ValueError(f"input shape {tuple(x.shape)} does not match the compiled shape {self.input_shape}; "
                             "compile again with an example input of the shape you will run")
        return x

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        import tvm

        out = self._machine()["main"](tvm.runtime.tensor(self.check_input(x)))
        if hasattr(out, "numpy"):
            return [out.numpy()]
        return [o.numpy() for o in out]

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model output for one input batch of the compiled shape."""
        return self.run_all(x)[0]

    def median_ms(self, x: np.ndarray, repeat: int = 20) -> float:
        import tvm

        vm = self._machine()
        vm.set_input("main", tvm.runtime.tensor(self.check_input(x)))
        timer = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=1, repeat=max(repeat, 1), min_repeat_ms=0)
        res = timer("main")
        return float(np.median(np.asarray(res.results)) * 1e3)

    def _write_files(self, directory: Path) -> dict[str, Any]:
        """Write the artifact's files (``model.so``) into ``directory``; returns the ``meta.json``
        entries beyond the common ones (subclasses add their own files and entries)."""
        cc = self.target.compiler_path()
        lib = str(directory / "model.so")
        if cc is None:
            self.executable.export_library(lib)
        else:
            self.executable.export_library(lib, cc=cc)
        return {}

    def export(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``model.so`` and ``meta.json`` into ``directory`` atomically (nothing is left on failure)."""
        out = Path(directory)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent if out.parent.exists() else None))
        try:
            extra = self._write_files(tmp)
            meta = {"target": self.target.name, "target_dict": self.target.target_dict, "arch": self.target.arch,
                    "input_shape": list(self.input_shape), "input_dtype": self.input_dtype,
                    "num_outputs": self.num_outputs, "weight_bytes": self.weight_bytes,
                    "lowered": self.report.lowered, "fallback": self.report.fallback,
                    "kernels": self.report.kernels, **extra}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def load_artifact(directory: str | os.PathLike[str]) -> Artifact:
    """Load an exported artifact (host-architecture artifacts only; board ones go through deploy)."""
    import tvm

    d = Path(directory)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} is not a tvm_lowbit artifact (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "vta":
        raise CompileError(f"{d} holds VTA programs ({meta['target']}): its host graph calls the VTA layers by name, "
                           "so it runs only with a VTA runtime; compile again with tvm_lowbit.compile to simulate it")
    spec = load_target(meta["target"])
    lib = tvm.runtime.load_module(str(d / "model.so")) if spec.is_host else None
    rep = LoweringReport(lowered=meta.get("lowered", []), fallback=[tuple(x) for x in meta.get("fallback", [])],
                         kernels=dict(meta.get("kernels", {})))
    return Artifact(spec, lib, tuple(meta["input_shape"]), meta.get("input_dtype", "float32"), rep,
                    meta.get("weight_bytes", 0), meta.get("num_outputs", 1))
