"""A compiled model (:class:`Artifact`): run it, time it, export it; :func:`load_artifact` reads an export back.

Backends return an ``Artifact`` (or a subclass with their own files, like ``vta.body.VTABodyArtifact``).

Thread safety: one ``Artifact`` may be shared by several threads; ``run``, ``run_all`` and ``median_ms``
give each thread its own Relax VM (a TVM VM keeps its registers per VM, so one VM used by two threads at
once corrupts them).  ``export`` may run beside them.  Subclasses with state of their own
(the simulated VTA artifacts, ``vta.runtime.SimulatedArtifact``) serialize their runs with one process-wide lock.

Exports are checked: ``meta.json`` records the sha256 of every file (``"files"``) and :func:`load_artifact`
verifies them, and the schema of ``meta.json``, before it loads ``model.so``; an export made before the hashes
existed (no ``"files"``) is refused with a request to export it again.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvm_lowbit import safe_io
from tvm_lowbit.errors import CompileError
from tvm_lowbit.passes.report import LoweringReport
from tvm_lowbit.targets import TargetError, TargetSpec, load_target

META_FORMAT = 2  # 2: "files" (sha256 of every file) and the MARKER file
INPUT_DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")


@dataclass(frozen=True)
class InputSpec:
    """One input of a compiled model: the name of its parameter (the model's ``forward`` argument for a
    PyTorch model: ``input_ids``, ``attention_mask``), its shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def module_inputs(func: Any) -> tuple[InputSpec, ...]:
    """The inputs of a Relax function (``main``'s parameters), in call order."""
    return tuple(InputSpec(str(p.name), tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in func.params)


@dataclass
class Artifact:
    """A compiled model: run it, time it, export it (``load_artifact`` reads it back).  Safe to share
    between threads: each thread runs on its own VM."""

    target: TargetSpec
    executable: Any
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    report: LoweringReport = field(default_factory=LoweringReport)
    weight_bytes: int = 0
    num_outputs: int = 1
    compile_seconds: float = 0.0
    tuning: Any = None  # tune.ApplyReport when a tuned-schedule database was applied
    inputs: tuple[InputSpec, ...] = ()  # every input, in call order (empty: the one input_shape/input_dtype)
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False, compare=False)

    def _machine(self) -> Any:
        """This thread's VM (created on first use in each thread)."""
        if not self.target.is_host:
            raise CompileError(f"this artifact is built for {self.target.name} ({self.target.arch}); it cannot run on "
                               "this host: export it and run it on the board (tvm-lowbit deploy)")
        vm = getattr(self._local, "vm", None)
        if vm is None:
            import tvm
            from tvm import relax

            vm = self._local.vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return vm

    def input_specs(self) -> tuple[InputSpec, ...]:
        """Every input, in call order (an artifact of a single-input model: that one input)."""
        return self.inputs or (InputSpec("x", tuple(self.input_shape), self.input_dtype),)

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """The single input as the compiled array (a float input is cast to the compiled float dtype)."""
        spec = self.input_specs()[0]
        if len(self.input_specs()) > 1:
            raise ValueError(f"this model takes {len(self.input_specs())} inputs ({self._names()}): pass a dict "
                             "{name: array} or a tuple in that order")
        return self._check_one(spec, x)

    def _names(self) -> str:
        return ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in self.input_specs())

    def _check_one(self, spec: InputSpec, x: Any) -> np.ndarray:
        a = np.asarray(x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else x)
        want = np.dtype(spec.dtype)
        single_float = len(self.input_specs()) == 1 and want.kind == "f"  # cast as before: images of any dtype
        same_kind = a.dtype.kind == want.kind or {a.dtype.kind, want.kind} <= {"i", "u"}
        if a.dtype != want and not single_float and not same_kind:
            raise ValueError(f"input {spec.name!r}: dtype {a.dtype} does not match the compiled {spec.dtype}; "
                             f"pass {spec.dtype} (the model's inputs: {self._names()})")
        a = np.ascontiguousarray(a, dtype=want)
        if tuple(a.shape) != tuple(spec.shape):
            what = "input shape" if len(self.input_specs()) == 1 else f"input {spec.name!r}: shape"
            raise ValueError(f"{what} {tuple(a.shape)} does not match the compiled shape {tuple(spec.shape)}; "
                             "compile again with an example input of the shape you will run")
        return a

    def check_inputs(self, x: Any) -> list[np.ndarray]:
        """The model's inputs from one array (a single-input model), a tuple/list in call order, or a dict
        by name; a ``ValueError`` naming the input when a name, count, dtype or shape does not match."""
        specs = self.input_specs()
        if isinstance(x, dict):
            names = [s.name for s in specs]
            if sorted(map(str, x)) != sorted(names):
                raise ValueError(f"input names {sorted(map(str, x))} do not match the compiled inputs {names}; "
                                 f"pass exactly these ({self._names()})")
            return [self._check_one(s, x[s.name]) for s in specs]
        if isinstance(x, (tuple, list)):
            if len(x) != len(specs):
                raise ValueError(f"{len(x)} inputs given, the model takes {len(specs)} ({self._names()})")
            return [self._check_one(s, v) for s, v in zip(specs, x)]
        if len(specs) != 1:
            raise ValueError(f"one array given, the model takes {len(specs)} inputs ({self._names()}): pass a "
                             "dict {name: array} or a tuple in that order")
        return [self._check_one(specs[0], x)]

    def run_all(self, x: Any) -> list[np.ndarray]:
        """Every output for one input batch: an array (single-input model), a tuple or a dict of arrays."""
        import tvm

        out = self._machine()["main"](*(tvm.runtime.tensor(a) for a in self.check_inputs(x)))
        if hasattr(out, "numpy"):
            return [out.numpy()]
        return [o.numpy() for o in out]

    def run(self, x: Any) -> np.ndarray:
        """The model output for one input batch of the compiled shape (see :meth:`run_all`)."""
        return self.run_all(x)[0]

    def median_ms(self, x: Any, repeat: int = 20) -> float:
        import tvm

        vm = self._machine()
        vm.set_input("main", *(tvm.runtime.tensor(a) for a in self.check_inputs(x)))
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

    def meta(self) -> dict[str, Any]:
        """The ``meta.json`` entries every artifact has (``export`` adds the files' hashes)."""
        return {"format": META_FORMAT, "target": self.target.name, "target_dict": self.target.target_dict,
                "arch": self.target.arch, "input_shape": list(self.input_shape), "input_dtype": self.input_dtype,
                "num_outputs": self.num_outputs, "weight_bytes": self.weight_bytes,
                "lowered": self.report.lowered, "fallback": self.report.fallback, "kernels": self.report.kernels,
                "inputs": [s.as_json() for s in self.input_specs()]}

    def export(self, directory: str | os.PathLike[str], force: bool = False) -> Path:
        """Write ``model.so`` and ``meta.json`` into the folder ``directory``, atomically: the files are
        written into a new sibling folder and renamed into place (nothing is left on failure).

        ``directory`` must be new, empty, or an earlier export (it holds ``safe_io.MARKER``); any other
        folder with files is refused (``safe_io.OutputError``) unless ``force=True`` replaces it."""
        out = safe_io.check_output_dir(directory, force, what="export folder")
        with safe_io.staging_dir(out) as tmp:
            extra = self._write_files(tmp)
            write_meta(tmp, {**self.meta(), **extra})
            safe_io.publish_dir(tmp, out, force)
        return out


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """``meta.json`` for the files in ``directory`` now, with their sha256 under ``"files"``."""
    meta = {**meta, "format": META_FORMAT, "files": safe_io.hash_tree(directory)}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


# ``meta.json`` fields: name -> (accepted types, required); checked before anything is loaded
_INT = (int,)
META_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": (_INT, True), "target": ((str,), True), "input_shape": ((list,), True), "files": ((dict,), True),
    "target_dict": ((dict,), False), "arch": ((str,), False), "input_dtype": ((str,), False),
    "num_outputs": (_INT, False), "weight_bytes": (_INT, False), "lowered": ((list,), False),
    "fallback": ((list,), False), "kernels": ((dict,), False), "kind": ((str,), False),
    "inputs": ((list,), False),
}


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """``meta`` (a parsed ``meta.json``) checked field by field, or a ``CompileError`` naming the field."""
    def bad(what: str) -> CompileError:
        return CompileError(f"{path}: {what}; the artifact is damaged or not from this version: export it again")

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__}")
    if "files" not in meta and "target" in meta:
        raise bad("no \"files\" field (the sha256 of each file, written since meta format 2): it was exported by "
                  "an older tvm_lowbit and cannot be verified")
    for name, (types, required) in META_SCHEMA.items():
        if name not in meta:
            if required:
                raise bad(f"missing field {name!r}")
            continue
        v = meta[name]
        if not isinstance(v, types) or isinstance(v, bool):
            raise bad(f"field {name!r} should be {' or '.join(t.__name__ for t in types)}, got {type(v).__name__}")
    if meta["format"] > META_FORMAT:
        raise bad(f"meta format {meta['format']} is newer than this tvm_lowbit reads ({META_FORMAT})")
    shape = meta["input_shape"]
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise bad(f"field 'input_shape' should be a list of positive integers, got {shape!r}")
    if meta.get("input_dtype", "float32") not in INPUT_DTYPES:
        raise bad(f"field 'input_dtype' {meta['input_dtype']!r} is not a dtype the artifacts use")
    for spec in meta.get("inputs", []):
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec.get("dtype") in INPUT_DTYPES
                and isinstance(spec.get("shape"), list) and all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec["shape"])):
            raise bad(f"field 'inputs' should be a list of {{name, shape, dtype}}, got {spec!r}")
    for name in ("num_outputs", "weight_bytes"):
        if name in meta and meta[name] < (1 if name == "num_outputs" else 0):
            raise bad(f"field {name!r} is {meta[name]}")
    files = meta["files"]
    if not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()):
        raise bad("field 'files' should map file names to sha256 hex digests")
    if "model.so" not in files:
        raise bad("field 'files' has no entry for model.so")
    if not all(isinstance(x, str) for x in meta.get("lowered", [])):
        raise bad("field 'lowered' should be a list of layer names")
    if not all(isinstance(x, list) and len(x) == 2 and all(isinstance(s, str) for s in x)
               for x in meta.get("fallback", [])):
        raise bad("field 'fallback' should be a list of [layer, reason] pairs")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.get("kernels", {}).items()):
        raise bad("field 'kernels' should map layer names to kernel names")
    return meta


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """An artifact folder's ``meta.json``, parsed and schema-checked (``CompileError`` naming file and field)."""
    d = Path(directory)
    meta_path = d / "meta.json"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such artifact folder")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} is not a tvm_lowbit artifact (no meta.json)")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CompileError(f"{meta_path}: not valid JSON ({type(e).__name__}: {e}); the artifact is damaged: "
                           "export it again") from None
    return check_meta(meta, meta_path)


def load_artifact(directory: str | os.PathLike[str]) -> Artifact:
    """Load an exported artifact (host-architecture artifacts only; board ones go through deploy).

    ``meta.json`` is schema-checked and every file's sha256 verified before ``model.so`` is loaded, so a
    damaged or truncated library is a ``CompileError``/``safe_io.IntegrityError`` naming it, never a crash."""
    d = Path(directory)
    meta = read_meta(d)
    if meta.get("kind") == "vta":
        how = ("load it with tvm_lowbit.vta.body.load_body(path) to run it on the simulator" if meta.get("body")
               else "compile again with tvm_lowbit.compile to simulate it")
        raise CompileError(f"{d} holds VTA programs ({meta['target']}): its host graph calls the VTA runtime, "
                           f"which load_artifact does not provide; {how}")
    try:
        spec = load_target(meta["target"])
    except TargetError as e:
        raise CompileError(f"{d / 'meta.json'}: field 'target': {e}") from None
    safe_io.verify_tree(d, meta["files"])
    lib = None
    if spec.is_host:
        import tvm

        try:
            lib = tvm.runtime.load_module(str(d / "model.so"))
        except Exception as e:  # noqa: BLE001 - TVM's loader errors name no file
            raise CompileError(f"{d / 'model.so'}: TVM cannot load it ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[-1:] or ''}); export it again") from None
    rep = LoweringReport(lowered=meta.get("lowered", []), fallback=[tuple(x) for x in meta.get("fallback", [])],
                         kernels=dict(meta.get("kernels", {})))
    inputs = tuple(InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in meta.get("inputs", []))
    return Artifact(spec, lib, tuple(meta["input_shape"]), meta.get("input_dtype", "float32"), rep,
                    meta.get("weight_bytes", 0), meta.get("num_outputs", 1), inputs=inputs)
