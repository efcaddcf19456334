"""What both VTA artifacts share: a host executable that calls the VTA part by packed-function name, and,
here, those functions backed by the functional simulator (``executor="sim"``) or the NumPy integer reference
(``"reference"``).  :class:`tvm_lowbit.vta.body.VTABodyArtifact` (integer-only body) and
:class:`tvm_lowbit.vta.compile.VTAArtifact` (per-layer partition) fill in :meth:`SimulatedArtifact.register`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tvm_lowbit.artifact import Artifact
from tvm_lowbit.errors import CompileError

EXECUTORS = ("sim", "reference")


def build_host(mod: Any, spec: Any) -> Any:
    """``tvm.compile`` the host graph for the target's CPU, or a one-line ``CompileError``."""
    import tvm

    try:
        return tvm.compile(mod, target=spec.tvm_target())
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise CompileError(f"TVM failed to build the host part for {spec.name}: {type(e).__name__}: "
                           f"{msg[-1] if msg else ''}") from e


@dataclass
class SimulatedArtifact(Artifact):
    """A VTA artifact run here: ``outputs`` keeps the VTA part's int8 results of the last run (by layer or
    tensor name).  The host graph finds the VTA part by packed-function name, so every run registers this
    artifact's functions first, and runs of all VTA artifacts in the process are serialized by one lock
    (``outputs``, ``executor``, the registered functions and the simulated DRAM/SRAM are shared state): one
    artifact may be shared by threads, and two artifacts with the same function names (an export and the
    artifact it was loaded from) do not call each other's.  ``export`` follows ``Artifact.export``'s rules."""

    LOCK: ClassVar[threading.RLock] = threading.RLock()

    executor: str = "sim"
    seed: int | None = 0
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def register(self) -> None:
        """Register the packed functions the host graph calls (subclasses)."""
        raise NotImplementedError

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        with self.LOCK:
            self.register()   # before the VM is made: it looks the functions up then
            return super().run_all(x)

    def _machine(self) -> Any:
        if not self.target.is_host:
            raise CompileError(f"this artifact's host code is built for {self.target.name} ({self.target.arch}); "
                               "export it for the board, or compile for vta-sim to simulate it here")
        return super()._machine()

    def run_both(self, x: np.ndarray) -> tuple[tuple[list[np.ndarray], dict[str, np.ndarray]],
                                                tuple[list[np.ndarray], dict[str, np.ndarray]]]:
        """``x`` run with the VTA part on the simulator, then on the reference: (outputs, VTA results) each."""
        with self.LOCK:
            old = self.executor
            try:
                self.executor = "sim"
                sim = (self.run_all(x), dict(self.outputs))
                self.executor = "reference"
                ref = (self.run_all(x), dict(self.outputs))
            finally:
                self.executor = old
        return sim, ref


def compare(sim: tuple[list[np.ndarray], dict[str, np.ndarray]], ref: tuple[list[np.ndarray], dict[str, np.ndarray]],
            names: dict[str, str]) -> int:
    """Raise unless every VTA result (``names``: result key -> the layer that wrote it) and the model outputs
    of the simulator run equal the reference run's; returns how many layers were compared."""
    for key, layer in names.items():
        a, b = sim[1].get(key), ref[1][key]
        if not np.array_equal(a, b):
            bad = b.size if a is None or a.shape != b.shape else int(np.sum(a != b))
            raise RuntimeError(f"VTA layer {layer}: {bad} of {b.size} simulator outputs differ from the integer "
                               "reference")
    if not all(np.array_equal(a, b) for a, b in zip(sim[0], ref[0])):
        raise RuntimeError("the model outputs differ between the simulator and the integer reference")
    return len(names)
