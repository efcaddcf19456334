"""``tvm_lowbit.compile``: a quantized model -> Relax -> integer kernels -> a runnable, exportable artifact.

Pipeline (printable with ``pipeline_description()``):
  1. import: ``torch.export`` + ``from_exported_program`` (weights bound as constants), or ONNX
  2. ``FoldRequantize``: drop re-quantizers that reproduce their input codes exactly (PACT exports)
  3. ``LowerTernary``: fake-quant layers -> grouped-ternary kernels over packed 2-bit weights
  4. ``ApplyKernelSchedules``: the kernels' default schedule for the target
  5. ``tvm.compile`` (Relax default pipeline: legalize the float ops, fuse, lower, build)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_lowbit.passes.ternary import LayerInfo, LoweringReport, weight_key
from tvm_lowbit.quantizers.layers import quant_layers
from tvm_lowbit.targets import TargetSpec, load_target

PIPELINE = ["import (torch.export / ONNX) -> Relax", "FoldConstant", "FoldRequantize", "LowerTernary",
            "ApplyKernelSchedules", "tvm.compile (Relax default pipeline)"]


class CompileError(RuntimeError):
    pass


def pipeline_description() -> str:
    return " -> ".join(PIPELINE)


def layer_infos(qmodel: nn.Module) -> dict[str, LayerInfo]:
    return {weight_key(m.w_int.numpy()): LayerInfo(name, m.group_size, m.weight_format)
            for name, m in quant_layers(qmodel).items()}


def _constants_bytes(func: Any) -> int:
    """Bytes of the distinct tensor constants of a Relax function (what the artifact stores)."""
    import tvm
    from tvm import relax

    sizes: dict[int, int] = {}

    def visit(e: Any) -> None:
        if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "numpy"):
            sizes[e.__hash__()] = e.value.numpy().nbytes

    relax.analysis.post_order_visit(func, visit)
    return sum(sizes.values())


def _strip_single_tuple(mod: Any) -> Any:
    """``main`` returns a 1-tuple after torch import; return the tensor itself (RPC clients need that)."""
    from tvm import relax

    f = mod["main"]
    if isinstance(f.ret_ty, relax.TupleType) and len(f.ret_ty.fields) == 1:
        body = relax.SeqExpr(f.body.blocks, relax.TupleGetItem(f.body.body, 0))
        mod["main"] = relax.Function(f.params, body, f.ret_ty.fields[0], f.is_pure, f.attrs)
    return mod


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

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if tuple(x.shape) != tuple(self.input_shape):
            raise ValueError(f"input shape {tuple(x.shape)} does not match the compiled shape {self.input_shape}; "
                             "compile again with an example input of the shape you will run")
        return x

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        import tvm

        out = self._machine()["main"](tvm.runtime.tensor(self._check(x)))
        if hasattr(out, "numpy"):
            return [out.numpy()]
        return [o.numpy() for o in out]

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model output for one input batch of the compiled shape."""
        return self.run_all(x)[0]

    def median_ms(self, x: np.ndarray, repeat: int = 20) -> float:
        import tvm

        vm = self._machine()
        vm.set_input("main", tvm.runtime.tensor(self._check(x)))
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


def import_torch(model: nn.Module, example: torch.Tensor) -> Any:
    try:
        ep = torch.export.export(model.eval(), (example,))
    except Exception as e:
        raise CompileError(f"torch.export failed on the model with an input of shape {tuple(example.shape)}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return import_exported(ep)


def import_exported(ep: Any) -> Any:
    from tvm.relax.frontend.torch import from_exported_program

    try:
        return from_exported_program(ep, keep_params_as_input=False)
    except Exception as e:
        msg = str(e).splitlines()
        raise CompileError("TVM's PyTorch importer cannot convert the model: "
                           f"{type(e).__name__}: {msg[0] if msg else ''} (unsupported operator?)") from e


def build(mod: Any, target: str | TargetSpec, infos: dict[str, LayerInfo] | None, input_shape: tuple[int, ...],
          *, expose_acc: bool = False, verbose: bool = False,
          schedules: str | os.PathLike[str] | bool | None = None) -> Artifact:
    """Lower, schedule and build a Relax module imported from a fake-quant model.

    ``schedules``: a MetaSchedule database folder (``tvm-lowbit tune``) to apply; ``None`` uses
    ``schedules/<target>/`` when it exists and was not measured under emulation (``tune.EMULATED_MARK``);
    ``False`` keeps the default schedules."""
    import tvm

    from tvm_lowbit.passes import apply_default_schedules, lower_ternary

    spec = load_target(target)
    if spec.is_vta:
        raise CompileError(f"{spec.name} is a VTA target: compile the quantized nn.Module with "
                           "tvm_lowbit.compile(qmodel, x, target) (a .pt2 or ONNX model cannot be planned for VTA yet)")
    t0 = time.time()
    tgt = spec.tvm_target()
    mod, report = lower_ternary(mod, infos, expose_acc=expose_acc, target=tgt)
    if not expose_acc:
        mod = _strip_single_tuple(mod)
    weight_bytes = _constants_bytes(mod["main"])
    tuning = None
    db_dir = _schedules_dir(spec, schedules, verbose)
    if db_dir is not None:  # tuned schedules first; the kernels without a record get their default below
        from tvm_lowbit.tune import apply_database

        try:
            mod, tuning = apply_database(mod, tgt, db_dir)
        except Exception as e:  # noqa: BLE001 - a database problem must not stop a build that works without it
            if schedules not in (None, True):
                raise CompileError(f"cannot apply the tuning database {db_dir}: {type(e).__name__}: {e}") from e
            print(f"warning: tuned schedules in {db_dir} not applied ({type(e).__name__}: {e}); "
                  "default schedules used", file=sys.stderr)
        if verbose and tuning is not None:
            print(tuning.text())
    mod = apply_default_schedules(mod, tgt)
    try:
        ex = tvm.compile(mod, target=tgt)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise CompileError(f"TVM failed to build the model for {spec.name}: {type(e).__name__}: "
                           f"{msg[-1] if msg else ''}") from e
    ret = mod["main"].ret_ty
    n_out = len(ret.fields) if hasattr(ret, "fields") else 1
    art = Artifact(spec, ex, tuple(input_shape), "float32", report, weight_bytes, n_out, time.time() - t0, tuning)
    if verbose:
        print(report.text())
    return art


def _schedules_dir(spec: TargetSpec, schedules: str | os.PathLike[str] | bool | None,
                   verbose: bool = False) -> Path | None:
    if schedules is False:
        return None
    if schedules is None or schedules is True:
        from tvm_lowbit.tune import SCHEDULES_DIR, WORKLOAD_FILE, emulated_default

        if (note := emulated_default(spec.name)) is not None:
            if verbose:
                print(f"note: {note}")
            return None
        d = SCHEDULES_DIR / spec.name
        return d if (d / WORKLOAD_FILE).is_file() else None
    d = Path(schedules)
    if not d.is_dir():
        raise CompileError(f"schedules={str(d)!r}: no such tuning database folder (make one with `tvm-lowbit tune`)")
    return d


def compile(qmodel: nn.Module, example_input: torch.Tensor | np.ndarray, target: str | TargetSpec = "x86-host",
            *, expose_acc: bool = False, verbose: bool = False,
            schedules: str | os.PathLike[str] | bool | None = None) -> Artifact:
    """Compile a model returned by ``tvm_lowbit.quantize`` (or a float model: everything stays float)."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"compile() takes a torch.nn.Module (from tvm_lowbit.quantize), got {type(qmodel).__name__}")
    spec = load_target(target)  # a bad target name fails before the slow import
    if spec.is_vta:  # accelerator targets partition the model between VTA and the host (tvm_lowbit.vta)
        from tvm_lowbit.vta.compile import compile_vta

        return compile_vta(qmodel, example_input, spec, verbose=verbose)  # type: ignore[return-value]
    x = torch.as_tensor(np.asarray(example_input, dtype=np.float32))
    mod = import_torch(qmodel, x)
    return build(mod, spec, layer_infos(qmodel), tuple(x.shape), expose_acc=expose_acc, verbose=verbose,
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
                  verbose: bool = False, schedules: str | os.PathLike[str] | bool | None = None) -> Artifact:
    """Compile a saved quantized model: a ``.pt2`` from ``save_quantized`` (or any torch.export program);
    ``schedules`` as for :func:`build`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    spec = load_target(target)
    mod, infos, shape = load_saved(path)
    return build(mod, spec, infos, shape, verbose=verbose, schedules=schedules)
