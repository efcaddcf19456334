"""``tvm_lowbit.compile`` for a VTA target.

A ResNet of BasicBlocks compiles to the integer-only body (:mod:`tvm_lowbit.vta.body`: the whole body on
VTA, host only at the stem and the pooling + classifier).  Any other model gets the per-layer partition
(:func:`compile_per_layer`), with a warning naming why:

1. :func:`tvm_lowbit.vta.model.plan` picks the layers VTA runs exactly and lowers them to programs.
2. The model is imported to Relax (``torch.export``); in it, each VTA layer's integer op
   (``conv2d(q, W_int)`` / ``matmul(q, W_int^T)``, found by its weight) becomes
   ``R.call_dps_packed("tvm_lowbit.vta.<id>.<layer>", q) -> int8`` followed by the host-side
   reconstruction of the accumulator (``(y * 2^s + mid + zp * sum(w8)) * 2^sigma``, float64, exact);
   the layer's float epilogue and everything else stay in the graph and are compiled by TVM for the
   target's host CPU (x86 here for ``vta-sim``; the Cortex-A9/A53 of the boards).
3. The packed functions run the layers' programs on the functional simulator (or, with
   ``executor="reference"``, the NumPy integer reference: same host graph, so the logits of the two
   must be bit-identical).
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_lowbit.errors import CompileError
from tvm_lowbit.importer import import_torch
from tvm_lowbit.passes.layer_info import weight_key
from tvm_lowbit.quantizers.api import quantize
from tvm_lowbit.targets import TargetSpec, load_target
from tvm_lowbit.vta import integer
from tvm_lowbit.vta.body import VTABodyArtifact, check_body, compile_body
from tvm_lowbit.vta.model import Partition, VTALayer, plan
from tvm_lowbit.vta.runtime import SimulatedArtifact, build_host, compare

_IDS = itertools.count()


@dataclass
class VTAReport:
    """What ``tvm-lowbit compile`` prints: the VTA/host split and the host ops left in the graph."""

    partition: Partition
    host_ops: dict[str, int] = field(default_factory=dict)
    note: str = ""   # why the model got the per-layer partition instead of the integer-only body

    @property
    def lowered(self) -> list[str]:
        return list(self.partition.layers)

    @property
    def fallback(self) -> list[tuple[str, str]]:
        return list(self.partition.host)

    @property
    def kernels(self) -> dict[str, str]:
        return {n: "vta" for n in self.partition.layers}

    @property
    def host_roundtrips(self) -> int:
        """Every VTA layer after the first gets its input from the host (its predecessor's epilogue)."""
        return max(len(self.partition.layers) - 1, 0)

    def text(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.host_ops.items(), key=lambda kv: -kv[1]))
        return ((self.note + "\n" if self.note else "") + self.partition.text()
                + (f"\nhost graph ops: {ops}" if ops else "")
                + f"\nhost round trips between the first and the last VTA layer: {self.host_roundtrips} (per-layer "
                "partition: each layer's epilogue runs on the host)")


def _bindings(func: Any) -> dict[int, Any]:
    from tvm import relax

    out = {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                out[b.var.__hash__()] = b.value
    return out


def _const(e: Any, bindings: dict[int, Any]) -> np.ndarray | None:
    import tvm
    from tvm import relax

    if isinstance(e, relax.Var):
        e = bindings.get(e.__hash__(), e)
    if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "numpy"):
        return e.value.numpy()
    return None


def partition_relax(mod: Any, layers: dict[str, VTALayer], prefix: str) -> tuple[Any, dict[str, str]]:
    """Replace the integer op of every layer in ``layers`` by a VTA call; returns the module and the
    packed-function name of each layer.  A layer whose op is not found raises (never silently kept)."""
    from tvm import relax
    from tvm.ir import Op

    conv_op, matmul_op, perm_op = (Op.get(f"relax.{n}") for n in ("nn.conv2d", "matmul", "permute_dims"))
    by_key = {}
    for name, vl in layers.items():
        w = vl.math.w_int
        by_key[weight_key(w)] = name
    fnames = {name: f"{prefix}.{name}" for name in layers}
    func = mod["main"]
    bindings = _bindings(func)

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self) -> None:
            super().__init__(mod)
            self.found: set[str] = set()

        def _layer_of(self, call: Any) -> str | None:
            if not isinstance(call, relax.Call):
                return None
            if call.op.same_as(conv_op):
                w = _const(call.args[1], bindings)
            elif call.op.same_as(matmul_op):
                arg = call.args[1]
                inner = bindings.get(arg.__hash__()) if isinstance(arg, relax.Var) else None
                if isinstance(inner, relax.Call) and inner.op.same_as(perm_op):
                    w = _const(inner.args[0], bindings)
                else:
                    w = _const(arg, bindings)
                    w = w.T if w is not None and w.ndim == 2 else None
            else:
                return None
            return None if w is None else by_key.get(weight_key(w))

        def visit_var_binding_(self, binding: Any) -> None:
            name = self._layer_of(binding.value)
            if name is None:
                return super().visit_var_binding_(binding)
            vl = layers[name]
            self.found.add(name)
            bb = self.builder_
            data = self.visit_expr(binding.value.args[0])
            out_ty = binding.var.ty
            shape = [int(d) for d in out_ty.shape]
            y8 = bb.emit(relax.call_dps_packed(fnames[name], [data], out_ty=relax.TensorType(shape, "int8")))
            m = vl.math
            bshape = (1, -1) if m.kind == "dense" else (1, -1, 1, 1)
            s = m.requant.lane_shifts(m.w8.shape[0]).astype(np.float64)
            corr = np.where(s > 0, np.exp2(s - 1), 0.0) + m.zp * m.wsum.astype(np.float64)
            f = bb.emit(relax.op.astype(y8, "float64"))
            f = bb.emit(relax.op.multiply(f, relax.const(np.exp2(s).reshape(bshape), "float64")))
            f = bb.emit(relax.op.add(f, relax.const(corr.reshape(bshape), "float64")))
            if np.any(m.sigma):
                f = bb.emit(relax.op.multiply(f, relax.const(np.exp2(m.sigma.astype(np.float64)).reshape(bshape), "float64")))
            out = bb.emit(relax.op.astype(f, out_ty.dtype))
            if not isinstance(binding.var, relax.DataflowVar):
                out = bb.emit_output(out)
            self.set_var_remap(binding.var, out)

    rw = Rewriter()
    new_func = rw.visit_expr(func)
    missing = set(layers) - rw.found
    if missing:
        raise RuntimeError(f"the integer op of VTA layer(s) {', '.join(sorted(missing))} was not found in the "
                           "imported Relax graph (was the model changed after planning?)")
    gv = mod.get_global_var("main")
    rw.builder_.update_func(gv, new_func)
    out = relax.transform.DeadCodeElimination(["main"])(rw.builder_.get())
    return out, fnames


def host_op_counts(func: Any) -> dict[str, int]:
    from tvm import relax

    counts: dict[str, int] = {}

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and hasattr(e.op, "name"):
            n = e.op.name.replace("relax.", "")
            if n in ("call_dps_packed", "astype", "multiply", "add", "reshape", "permute_dims", "divide", "round",
                     "clip", "nn.conv2d", "matmul", "nn.relu", "nn.avg_pool2d", "nn.adaptive_avg_pool2d",
                     "nn.max_pool2d", "nn.batch_norm", "mean"):
                counts[n] = counts.get(n, 0) + 1

    relax.analysis.post_order_visit(func, visit)
    return counts


@dataclass
class VTAArtifact(SimulatedArtifact):
    """A model compiled for a VTA target with the per-layer partition: the host executable plus one VTA
    program per VTA layer.  ``run`` executes it here with the VTA layers on the functional simulator
    (``executor="reference"``: on the NumPy integer reference instead); ``outputs`` keeps each VTA layer's
    last int8 output."""

    partition: Partition | None = None
    functions: dict[str, str] = field(default_factory=dict)

    def register(self) -> None:
        import tvm_ffi

        for name, fname in self.functions.items():
            vl = self.partition.layers[name]

            def run(x: Any, out: Any, vl: VTALayer = vl, name: str = name) -> None:
                q = x.numpy()
                codes = np.rint(q)
                if not np.array_equal(codes, q):
                    raise ValueError(f"VTA layer {name}: its input is not integer activation codes")
                y = vl.run(codes.astype(np.int64), self.executor, self.seed)
                self.outputs[name] = y
                out.copyfrom(np.ascontiguousarray(y, np.int8))

            tvm_ffi.register_global_func(fname, run, override=True)

    def cycles(self) -> dict[str, int]:
        return {n: l.cycles.total_cycles for n, l in self.partition.layers.items()}

    def median_ms(self, x: np.ndarray, repeat: int = 20) -> float:
        """Accelerator time of the VTA layers from the cycle model (the simulator's wall time means
        nothing); the host part is not included."""
        return sum(self.cycles().values()) / (self.partition.cfg.clock_mhz * 1e3)

    def _write_files(self, directory: Path) -> dict[str, Any]:
        """``model.so`` (the host graph, calling the VTA layers by name), ``vta/<layer>.insn.bin`` and
        ``vta/<layer>.dram.bin`` (instructions; DRAM image with weights and micro-ops); the ``meta.json``
        entries give the buffer layout, zero point, shifts, tiling and cycles of each VTA layer.
        ``export`` (inherited) writes them atomically."""
        extra = super()._write_files(directory)
        vdir = directory / "vta"
        vdir.mkdir()
        layers = {}
        for name, vl in self.partition.layers.items():
            prog = vl.lowered.program
            (vdir / f"{name}.insn.bin").write_bytes(prog.insn_bytes())
            (vdir / f"{name}.dram.bin").write_bytes(prog.dram_image().tobytes())
            layers[name] = {"function": self.functions[name], "insn_count": len(prog.insns),
                            "dram_bytes": prog.dram_bytes,
                            "buffers": {b.name: {"offset": b.offset, "nbytes": b.nbytes, "elem_bytes": b.elem_bytes}
                                        for b in prog.buffers.values()},
                            "input_shape": list(vl.input_shape), "zero_point": vl.math.zp,
                            "shift": vl.math.requant.lane_shifts(vl.math.w8.shape[0]).tolist(),
                            "clip": vl.math.requant.clip, "sigma": vl.math.sigma.tolist(),
                            "tiling": vl.lowered.tiling.__dict__, "cycles": vl.cycles.total_cycles,
                            # weight chain: run the layer programs in this file's order
                            "weights_prefetched_by_previous": bool(vl.lowered.info.get("weights_preloaded")),
                            "uops_prefetched_by_previous": bool(vl.lowered.info.get("uops_preloaded")),
                            "prefetches_next_weights": bool(vl.lowered.info.get("prefetches_next")),
                            "prefetches_next_uops": bool(vl.lowered.info.get("prefetches_next_uops"))}
        return {**extra, "kind": "vta", "vta": self.target.vta, "body": "per-layer", "layers": layers,
                "host_roundtrips": self.report.host_roundtrips}


def compile_vta(qmodel: nn.Module, example: np.ndarray | torch.Tensor, target: str | TargetSpec = "vta-sim", *,
                calib: np.ndarray | None = None, requant: str = "auto", target_utilization: float = 0.7,
                verbose: bool = False, progress: bool = False, search: bool = True) -> VTAArtifact | VTABodyArtifact:
    """Compile a quantized model for a VTA target.

    A ResNet of BasicBlocks gets the **integer-only body** (:mod:`tvm_lowbit.vta.body`): every layer from
    the first block to the last on VTA, activations kept in VTA's layout in DRAM, power-of-two scales
    calibrated on ``calib`` (default: the example input); only the stem and the pooling + classifier run on
    the host.  A model the conversion cannot take (another graph, an op it does not know) is compiled with
    the per-layer partition instead (:func:`compile_per_layer`: each quantized conv/dense on VTA, its float
    epilogue on the host), with a one-line warning saying why.  ``requant`` and ``target_utilization``
    apply to the per-layer partition; ``search=False`` skips the cycle model's tiling search (tests)."""
    spec = load_target(target)
    if not spec.is_vta:
        raise CompileError(f"target {spec.name!r} is not a VTA target")
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"compile() takes a torch.nn.Module (from tvm_lowbit.quantize), got {type(qmodel).__name__}")
    t0 = time.time()
    x = np.asarray(example, np.float32)
    cal = x if calib is None else np.asarray(calib, np.float32)
    try:
        net = integer.from_resnet(qmodel, cal)
    except integer.NotVTAInteger as e:
        note = (f"VTA: {e}; the integer-only body cannot take it, so each quantized layer runs as its own VTA "
                "program with its float epilogue on the host in between")
        warnings.warn(note, stacklevel=2)
        art = compile_per_layer(qmodel, x, spec, calib=calib, requant=requant, target_utilization=target_utilization,
                                progress=progress)
        art.report.note = note
    else:
        art = compile_body(net, x, spec, f"tvm_lowbit.vta.{os.getpid()}_{next(_IDS)}.body",
                           calib_images=len(cal), progress=progress, search=search)
    art.compile_seconds = time.time() - t0
    if verbose:
        print(art.report.text())
    return art


def compile_per_layer(qmodel: nn.Module, x: np.ndarray, spec: TargetSpec, *, calib: np.ndarray | None = None,
                      requant: str = "auto", target_utilization: float = 0.7, progress: bool = False) -> VTAArtifact:
    """The per-layer partition (for models the integer-only body cannot take): ``calib`` (model inputs)
    lets the requantization use calibrated shifts where the cycle model allows (``requant="auto"``);
    without it every VTA layer uses the data-free worst-case shift (see :mod:`tvm_lowbit.vta.quant`)."""
    from tvm import relax

    cfg = spec.vta_config()
    part = plan(qmodel, x, cfg, calib=calib, requant=requant, target_utilization=target_utilization,
                progress=progress)
    mod = import_torch(qmodel, torch.from_numpy(x))
    mod = relax.transform.FoldConstant()(mod)
    prefix = f"tvm_lowbit.vta.{os.getpid()}_{next(_IDS)}"
    mod, fnames = partition_relax(mod, part.layers, prefix)
    report = VTAReport(part, host_op_counts(mod["main"]))
    ex = build_host(mod, spec)
    wbytes = sum(l.weight_bytes for l in part.layers.values())
    return VTAArtifact(spec, ex, tuple(x.shape), report=report, weight_bytes=wbytes, partition=part, functions=fnames)


def check_against_reference(art: VTAArtifact | VTABodyArtifact, x: np.ndarray) -> int:
    """Run ``x`` with the VTA layers on the simulator and on the NumPy reference; raise unless every
    VTA layer's int8 output and the final outputs are bit-identical.  Returns the layers checked."""
    if isinstance(art, VTABodyArtifact):
        return check_body(art, x)
    return compare(*art.run_both(x), {n: n for n in art.partition.layers})


def vta_fgq(fgq: Any) -> Any:
    """The VTA flavour of an FGQ config: 7-bit alpha codes, so an alpha code times a ternary weight is an
    int8 weight (what the per-layer partition needs exactly, and what the integer-only body's accuracy was
    measured with: scripts/bench_vta.py)."""
    return fgq if fgq.alpha_bits <= 7 else replace(fgq, alpha_bits=7)


def compile_for_cli(model: nn.Module, fgq: Any, calib: np.ndarray, spec: TargetSpec,
                    batch: int) -> VTAArtifact | VTABodyArtifact:
    """``tvm-lowbit compile MODEL --target vta-*``: FGQ in its VTA flavour, compile (scales calibrated on
    ``calib``), and (when the target runs here) check the simulator against the integer reference on the
    first batch."""
    if fgq.alpha_bits > 7:
        print(f"VTA: quantizing with 7-bit alpha codes instead of {fgq.alpha_bits} (the VTA FGQ config: an alpha "
              "code times a ternary weight fits an int8 weight)", flush=True)
        fgq = vta_fgq(fgq)
    q = quantize(model, fgq, calib)
    art = compile_vta(q, calib[:batch], spec, calib=calib, progress=True)
    if spec.is_host:
        n = check_against_reference(art, np.asarray(calib[:batch], np.float32))
        what = "every body tensor in DRAM" if isinstance(art, VTABodyArtifact) else "their int8 outputs"
        print(f"checked: on {batch} input(s) all {n} VTA layers ({what}) on the simulator equal the NumPy "
              "integer reference, and the logits are bit-identical", flush=True)
    return art
