"""``tvm_lowbit.compile``: a quantized model -> Relax -> integer kernels -> a runnable, exportable artifact.

Pipeline of the CPU backend (``tvm_lowbit.backends.cpu``), printed by ``pipeline_description()``:
  1. import: ``torch.export`` + ``from_exported_program`` (weights bound as constants), or ONNX
  2. ``tvm_lowbit.passes.lowering_pipeline``, one ``tvm.transform.Sequential``: canonicalize, fold constants,
     ``FoldRequantize``, ``LowerIntegerLayers`` (fake-quant layers -> the integer kernels the kernel registry
     picks for the target), a tuned database if one applies, ``ApplyKernelSchedules``
  3. ``tvm.compile`` (Relax default pipeline: legalize the float ops, fuse, lower, build)

The target's backend (``tvm_lowbit.backends.backend_for``, chosen by the target file's ``"kind"``) does the
work: the CPU one above, or the VTA one (``tvm_lowbit.vta.compile``). This module is the public entry:
``compile``, ``build``, ``compile_saved``, ``save_quantized``, ``load_saved``; ``Artifact`` and
``load_artifact`` live in ``tvm_lowbit.artifact``, the importers in ``tvm_lowbit.importer``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_lowbit.artifact import Artifact, load_artifact
from tvm_lowbit.backends import backend_for
from tvm_lowbit.backends.base import Schedules
from tvm_lowbit.errors import CompileError
from tvm_lowbit.importer import import_exported, import_torch, layer_infos
from tvm_lowbit.passes.layer_info import LayerInfo
from tvm_lowbit.targets import TargetSpec, load_target

__all__ = ["Artifact", "CompileError", "build", "compile", "compile_saved", "import_exported",
           "import_torch", "layer_infos", "load_artifact", "load_saved", "pipeline_description", "save_quantized"]

IMPORT_STEP = "import (torch.export / ONNX) -> Relax"
BUILD_STEP = "tvm.compile (Relax default pipeline)"


def pipeline_description(target: str | TargetSpec = "x86-host") -> str:
    """The passes ``compile`` runs for a CPU ``target``, by name (the lowering is
    ``tvm_lowbit.passes.lowering_pipeline``; print that object for every pass's options)."""
    from tvm_lowbit.passes.pipeline import lowering_pipeline  # imports TVM: only when asked

    names = [p.info.name for p in lowering_pipeline(load_target(target).tvm_target()).passes]
    return " -> ".join([IMPORT_STEP, *names, BUILD_STEP])


def build(mod: Any, target: str | TargetSpec, infos: dict[str, LayerInfo] | None, input_shape: tuple[int, ...],
          *, expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> Artifact:
    """Lower, schedule and build a Relax module imported from a fake-quant model (by the target's backend).

    ``schedules``: a MetaSchedule database folder (``tvm-lowbit tune``) to apply; ``None`` uses
    ``tvm_lowbit/schedules/<target>/`` when it exists and was not measured under emulation
    (``tune.EMULATED_MARK``); ``False`` keeps the default schedules."""
    spec = load_target(target)
    return backend_for(spec).build(mod, spec, infos, input_shape, expose_acc=expose_acc, verbose=verbose,
                                   schedules=schedules)


def compile(qmodel: nn.Module, example_input: torch.Tensor | np.ndarray, target: str | TargetSpec = "x86-host",
            *, expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> Artifact:
    """Compile a model returned by ``tvm_lowbit.quantize`` (or a float model: everything stays float)."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"compile() takes a torch.nn.Module (from tvm_lowbit.quantize), got {type(qmodel).__name__}")
    spec = load_target(target)  # a bad target name fails before the slow import
    return backend_for(spec).compile(qmodel, example_input, spec, expose_acc=expose_acc, verbose=verbose,
                                     schedules=schedules)


# --------------------------------------------------------------------------------------------
# Saved quantized models: torch.export .pt2 with the layer table alongside
# --------------------------------------------------------------------------------------------

_META = "tvm_lowbit.json"


def save_quantized(qmodel: nn.Module, example_input: torch.Tensor | np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save a quantized model as a ``torch.export`` program (.pt2) that ``tvm-lowbit compile`` reads."""
    x = torch.as_tensor(np.asarray(example_input, dtype=np.float32))
    ep = torch.export.export(qmodel.eval(), (x,))
    meta = {"layers": {k: {"name": v.name, "group_size": v.group_size, "weight_format": v.weight_format}
                       for k, v in layer_infos(qmodel).items()},
            "input_shape": list(x.shape), "config": getattr(qmodel, "tvm_lowbit_config", {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.export.save(ep, str(tmp), extra_files={_META: json.dumps(meta)})
    tmp.replace(path)
    return path


def load_saved(path: str | os.PathLike[str]) -> tuple[Any, dict[str, LayerInfo], tuple[int, ...]]:
    """A saved quantized model (``save_quantized``) as (Relax module, layer table, input shape)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        raise CompileError("an ONNX file is quantized first: use `tvm-lowbit compile --onnx MODEL.onnx` "
                           "(tvm_lowbit.onnx_quant.quantize_onnx) with a calibration set")
    extra = {_META: ""}
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except Exception as e:
        raise CompileError(f"{path} is not a torch.export program (.pt2): {type(e).__name__}: {e}") from e
    meta = json.loads(extra[_META]) if extra[_META] else {}
    infos = {k: LayerInfo(v["name"], int(v["group_size"]), v.get("weight_format", "ternary"))
             for k, v in meta.get("layers", {}).items()}
    shape = tuple(meta.get("input_shape") or [int(d) for d in ep.example_inputs[0][0].shape])
    return import_exported(ep), infos, shape


def compile_saved(path: str | os.PathLike[str], target: str | TargetSpec = "x86-host", *,
                  verbose: bool = False, schedules: Schedules = None) -> Artifact:
    """Compile a saved quantized model: a ``.pt2`` from ``save_quantized`` (or any torch.export program);
    ``schedules`` as for :func:`build`; a backend that cannot take a saved model says so."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    spec = load_target(target)
    mod, infos, shape = load_saved(path)
    return build(mod, spec, infos, shape, verbose=verbose, schedules=schedules)
