"""What a backend does for the targets of its kind: compile a quantized model, build an imported Relax module
(a ``.pt2`` or ONNX model) or refuse, tune or refuse, and say which ``tvm-lowbit compile`` inputs it takes.

A target file's ``"kind"`` names its backend (``tvm_lowbit.backends.backend_for``)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_lowbit.artifact import Artifact
from tvm_lowbit.passes.layer_info import LayerInfo
from tvm_lowbit.quantizers.api import quantize
from tvm_lowbit.targets import TargetSpec

# where a `tvm-lowbit compile` model comes from: a built-in name or path/to/file.py:factory, a .pt2, an .onnx
SOURCES = ("model", "pt2", "onnx")
Schedules = str | os.PathLike[str] | bool | None


def source_of(path: str) -> str:
    """The kind of a ``tvm-lowbit compile`` model argument (one of ``SOURCES``)."""
    if path.endswith(".onnx"):
        return "onnx"
    if path.endswith(".pt2"):
        return "pt2"
    return "model"


class Backend(ABC):
    kind: str  # the target files' "kind" this backend compiles for

    @abstractmethod
    def compile(self, qmodel: nn.Module, example_input: torch.Tensor | np.ndarray, spec: TargetSpec, *,
                expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> Artifact:
        """``tvm_lowbit.compile``: a model from ``tvm_lowbit.quantize`` (or a float model) for ``spec``."""

    @abstractmethod
    def build(self, mod: Any, spec: TargetSpec, infos: dict[str, LayerInfo] | None, input_shape: tuple[int, ...],
              *, expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> Artifact:
        """A Relax module imported from a fake-quant model (``.pt2``, ONNX), or a ``CompileError`` saying why
        this backend cannot take one."""

    @abstractmethod
    def tune_module(self, mod: Any, spec: TargetSpec, **kw: Any) -> Any:
        """Tune an imported module (``tvm_lowbit.tune.tune_module``'s options) or raise ``TuneError``."""

    def compile_for_cli(self, model: nn.Module, fgq: Any, calib: np.ndarray, spec: TargetSpec, batch: int,
                        schedules: Schedules) -> Artifact:
        """``tvm-lowbit compile MODEL``: quantize ``model`` with ``fgq`` on ``calib`` and compile it at ``batch``."""
        q = quantize(model, fgq, calib)
        return self.compile(q, calib[:batch], spec, schedules=schedules)

    def cli_refusal(self, spec: TargetSpec, source: str, schedules: str | None) -> str | None:
        """Why ``tvm-lowbit compile`` cannot take a model of this ``source`` (``SOURCES``) with ``--schedules``
        (``None``: automatic or none) for ``spec``, or None when it can."""
        return None

    def tune_refusal(self, spec: TargetSpec) -> str | None:
        """Why targets of this kind cannot be tuned (``tune_module`` raises it), or None when they can."""
        return None

    def schedules_note(self, spec: TargetSpec) -> str | None:
        """What ``tvm-lowbit compile`` says when the target's shipped schedules were not applied, or None."""
        return None
