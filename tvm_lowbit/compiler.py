"""``tvm_lowbit.compile``: a quantized model -> Relax -> integer kernels -> a runnable, exportable artifact.

Pipeline of the CPU backend (``tvm_lowbit.backends.cpu``), printed by ``pipeline_description()``:
  1. import: ``torch.export`` + ``from_exported_program`` (weights bound as constants), or ONNX
  2. ``tvm_lowbit.passes.lowering_pipeline``, one ``tvm.transform.Sequential``: canonicalize, fold constants,
     ``FoldRequantize``, ``LowerIntegerLayers`` (fake-quant layers -> the integer kernels the kernel registry
     picks for the target), a tuned database if one applies, ``ApplyKernelSchedules``
  3. ``tvm.compile`` (Relax default pipeline: legalize the float ops, fuse, lower, build; on x86 with
     ``tvm_lowbit.ScheduleFloatOps`` after the fusion: the float ops parallel and vectorized, same results)

The target's backend (``tvm_lowbit.backends.backend_for``, chosen by the target file's ``"kind"``) does the
work: the CPU one above, or the VTA one (``tvm_lowbit.vta.compile``). This module is the public entry:
``compile``, ``build``, ``compile_saved``, ``save_quantized``, ``load_saved``; ``Artifact`` and
``load_artifact`` live in ``tvm_lowbit.artifact``, the importers in ``tvm_lowbit.importer``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tvm_lowbit import safe_io
from tvm_lowbit.artifact import Artifact, load_artifact
from tvm_lowbit.backends import backend_for
from tvm_lowbit.backends.base import Schedules
from tvm_lowbit.errors import CompileError
from tvm_lowbit.importer import (EXPORT_LOCK, example_batch, export_torch, import_exported, import_torch,
                                 layer_infos)
from tvm_lowbit.passes.layer_info import LayerInfo
from tvm_lowbit.targets import TargetSpec, load_target

__all__ = ["Artifact", "CompileError", "build", "compile", "compile_saved", "import_exported",
           "import_torch", "layer_infos", "load_artifact", "load_saved", "pipeline_description", "save_quantized"]

IMPORT_STEP = "import (torch.export / ONNX) -> Relax"
BUILD_STEP = "tvm.compile (Relax default pipeline; x86: + tvm_lowbit.ScheduleFloatOps)"
TUNED_STEP = "tune.apply_database (a tuned MetaSchedule database, when one applies)"


def pipeline_description(target: str | TargetSpec = "x86-host") -> str:
    """The passes ``compile`` runs for a CPU ``target``, by name (the lowering is
    ``tvm_lowbit.passes.lowering_pipeline``; print that object for every pass's options)."""
    from tvm_lowbit.passes.pipeline import lowering_pipeline  # imports TVM: only when asked

    names = [p.info.name for p in lowering_pipeline(load_target(target).tvm_target()).passes]
    # the compiler applies a tuned database between the lowering and the default schedules (schedule_passes)
    names.insert(len(names) - 1, TUNED_STEP)
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


def compile(qmodel: nn.Module, example_input: Any, target: str | TargetSpec = "x86-host",
            *, expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> Artifact:
    """Compile a model returned by ``tvm_lowbit.quantize`` (or a float model: everything stays float).

    ``example_input``: what one call of the model takes, at the batch size to compile for: a tensor or array
    (any dtype; float64 becomes float32), a tuple (positional inputs) or a dict (keyword inputs, e.g.
    ``{"input_ids": ids, "attention_mask": mask}``); the artifact then runs on the same structure."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"compile() takes a torch.nn.Module (from tvm_lowbit.quantize), got {type(qmodel).__name__}")
    spec = load_target(target)  # a bad target name fails before the slow import
    if not isinstance(example_batch(example_input), torch.Tensor) and backend_for(spec).kind != "cpu":
        raise CompileError(f"target {spec.name} takes a model with one input tensor; this example input is a "
                           f"{type(example_input).__name__}: compile for a CPU target (x86-host, rasp5, ...)")
    return backend_for(spec).compile(qmodel, example_input, spec, expose_acc=expose_acc, verbose=verbose,
                                     schedules=schedules)


# --------------------------------------------------------------------------------------------
# Saved quantized models: torch.export .pt2 with the layer table alongside
# --------------------------------------------------------------------------------------------

_META = "tvm_lowbit.json"
SAVED_FORMAT = 2  # 2: "weights_sha256" (the content hash of every tensor) in the metadata


def program_tensors(ep: Any) -> dict[str, torch.Tensor]:
    """Every tensor an exported program carries (parameters, buffers, lifted constants), by name."""
    out = {f"state_dict.{k}": v for k, v in ep.state_dict.items() if isinstance(v, torch.Tensor)}
    out.update({f"constants.{k}": v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return out


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def program_inputs(ep: Any) -> list[dict[str, Any]]:
    """The user inputs of an exported program: ``{name, shape, dtype}`` in call order."""
    names = set(ep.graph_signature.user_inputs)
    out = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names and isinstance(node.meta.get("val"), torch.Tensor):
            v = node.meta["val"]
            out.append({"name": node.name, "shape": [int(d) for d in v.shape],
                        "dtype": str(v.dtype).replace("torch.", "")})
    return out


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """A ``ValueError`` naming the first floating-point tensor with a NaN or an Inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {name} {tuple(t.shape)} has {bad} NaN/Inf value(s); "
                             "fix the model's weights (or the file is damaged)")


def save_quantized(qmodel: nn.Module, example_input: Any, path: str | os.PathLike[str],
                   force: bool = False) -> Path:
    """Save a quantized model as a ``torch.export`` program (.pt2) that ``tvm-lowbit compile`` reads.

    The metadata records the sha256 of every tensor (``load_saved`` checks it); float weights must be finite;
    the file is written under a unique temporary name and renamed, and an existing file is replaced only
    when it is a ``.pt2`` (or with ``force``)."""
    path = safe_io.check_output_file(path, force, what="output file", ours=(".pt2",))
    ep = export_torch(qmodel, example_input)  # a tensor, a tuple or a dict of inputs (see compile)
    inputs = program_inputs(ep)
    tensors = program_tensors(ep)
    check_finite(tensors, f"the model to save as {path}")
    meta = {"format": SAVED_FORMAT, "weights_sha256": tensors_sha256(tensors),
            "layers": {k: {"name": v.name, "group_size": v.group_size, "weight_format": v.weight_format}
                       for k, v in layer_infos(qmodel).items()},
            "input_shape": inputs[0]["shape"] if inputs else [], "inputs": inputs,
            "config": getattr(qmodel, "tvm_lowbit_config", {})}
    tmp = safe_io.temp_sibling(path, ".pt2")
    try:
        with EXPORT_LOCK:
            torch.export.save(ep, str(tmp), extra_files={_META: json.dumps(meta)})
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _saved_meta(text: str, path: Path) -> dict[str, Any]:
    """The saved model's metadata, checked (a ``CompileError`` naming the file and the field)."""
    try:
        meta = json.loads(text) if text else {}
    except ValueError as e:
        raise CompileError(f"{path}: its {_META} is not valid JSON ({e}); the file is damaged: save it again") from None
    ok = isinstance(meta, dict) and isinstance(meta.get("layers", {}), dict) and all(
        isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("group_size"), int)
        and v["group_size"] >= 0 and isinstance(v.get("weight_format", ""), str)
        for v in meta.get("layers", {}).values())
    if not ok:
        raise CompileError(f"{path}: field 'layers' of its {_META} is not a table of layers "
                           "({name, group_size >= 0, weight_format}); the file is damaged: save it again")
    shape = meta.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and shape and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise CompileError(f"{path}: field 'input_shape' of its {_META} should be a list of positive integers, "
                           f"got {shape!r}; the file is damaged: save it again")
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise CompileError(f"{path}: field 'weights_sha256' of its {_META} is not a sha256 hex digest")
    return meta


def load_saved(path: str | os.PathLike[str]) -> tuple[Any, dict[str, LayerInfo], tuple[int, ...]]:
    """A saved quantized model (``save_quantized``) as (Relax module, layer table, input shape).

    Checked before import: the zip's CRCs, the metadata's schema, the tensors' sha256 (files saved before it
    was recorded, or .pt2 files from elsewhere, load with a warning) and that every float weight is finite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        raise CompileError("an ONNX file is quantized first: use `tvm-lowbit compile --onnx MODEL.onnx` "
                           "(tvm_lowbit.onnx_quant.quantize_onnx) with a calibration set")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CompileError(f"{path} is not a torch.export program (.pt2): not a readable zip archive ({e})") from None
    if bad is not None:
        raise safe_io.IntegrityError(f"{path}: member {bad} fails its CRC check (the file is damaged): save it again")
    extra = {_META: ""}
    try:
        with EXPORT_LOCK:
            ep = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a bad archive
        raise CompileError(f"{path} is not a torch.export program (.pt2): {type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0]}") from None
    meta = _saved_meta(extra[_META], path)
    tensors = program_tensors(ep)
    if meta.get("weights_sha256") is None:
        print(f"warning: {path} records no content hash (saved by an older tvm_lowbit, or not by tvm_lowbit): "
              "its weights cannot be verified; save it again with tvm_lowbit to add one", file=sys.stderr)
    elif tensors_sha256(tensors) != meta["weights_sha256"]:
        raise safe_io.IntegrityError(f"{path}: its weights do not match the sha256 recorded when it was saved "
                                     "(damaged or modified): save it again")
    try:
        check_finite(tensors, str(path))
    except ValueError as e:
        raise CompileError(str(e)) from None
    infos = {k: LayerInfo(v["name"], int(v["group_size"]), v.get("weight_format", "ternary"))
             for k, v in meta.get("layers", {}).items()}
    try:
        shape = tuple(meta.get("input_shape") or [int(d) for d in ep.example_inputs[0][0].shape])
    except (TypeError, IndexError, AttributeError) as e:
        raise CompileError(f"{path}: no input shape in its metadata or example inputs ({e})") from None
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
