"""The VTA backend (``"kind": "vta"`` targets): ``tvm_lowbit.vta.compile`` puts a ResNet's whole body on the
accelerator (integer-only, host only at the stem and the classifier; other models: per-layer partition); it
takes nn.Modules only and has nothing for MetaSchedule to tune."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_lowbit.backends.base import Backend, Schedules
from tvm_lowbit.errors import CompileError
from tvm_lowbit.passes.layer_info import LayerInfo
from tvm_lowbit.targets import TargetSpec
from tvm_lowbit.tune import TuneError
from tvm_lowbit.vta.body import VTABodyArtifact
from tvm_lowbit.vta.compile import VTAArtifact, compile_for_cli, compile_vta


class VTABackend(Backend):
    kind = "vta"

    def compile(self, qmodel: nn.Module, example_input: torch.Tensor | np.ndarray, spec: TargetSpec, *,
                expose_acc: bool = False, verbose: bool = False,
                schedules: Schedules = None) -> VTAArtifact | VTABodyArtifact:
        # the example input also calibrates the body's power-of-two scales (compile_vta takes calib= for more
        # images); the VTA layers' accumulators never reach the host graph and their schedules are the
        # programs themselves: expose_acc and schedules do not apply
        return compile_vta(qmodel, example_input, spec, verbose=verbose)

    def build(self, mod: Any, spec: TargetSpec, infos: dict[str, LayerInfo] | None, input_shape: tuple[int, ...],
              *, expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> VTAArtifact:
        raise CompileError(f"{spec.name} is a VTA target: compile the quantized nn.Module with "
                           "tvm_lowbit.compile(qmodel, x, target) (a .pt2 or ONNX model cannot be planned for VTA yet)")

    def tune_module(self, mod: Any, spec: TargetSpec, **kw: Any) -> Any:
        raise TuneError(self.tune_refusal(spec))

    def tune_refusal(self, spec: TargetSpec) -> str:
        return (f"{spec.name} is a VTA target: its layers run as VTA programs planned by the cycle model and the rest "
                "on the host with default schedules, so there is nothing to tune; tune a CPU target")

    def compile_for_cli(self, model: nn.Module, fgq: Any, calib: np.ndarray, spec: TargetSpec, batch: int,
                        schedules: Schedules) -> VTAArtifact | VTABodyArtifact:
        return compile_for_cli(model, fgq, calib, spec, batch)

    def cli_refusal(self, spec: TargetSpec, source: str, schedules: str | None) -> str | None:
        if schedules is not None:
            return f"--schedules {schedules}: tuned schedules apply to .pt2 and built-in models on CPU targets"
        if source != "model":
            return (f"{spec.name} is a VTA target: compile a built-in model (or tvm_lowbit.compile(qmodel, x, "
                    f"{spec.name!r}) from Python); planning a .pt2/ONNX file for VTA is not supported yet")
        return None
