"""``tvm_lowbit.compile`` for a VTA target, integer-only body (the default for ResNets; see
docs/design/vta-integer.md): the host graph is ``stem -> VTA body -> head``.

1. :func:`tvm_lowbit.vta.integer.from_resnet` converts the fake-quant model (power-of-two scales from the
   calibration data) and :func:`tvm_lowbit.vta.integer.lower_net` lowers every body layer into one DRAM
   layout: layer i's output buffer is layer i+1's input, nothing returns to the host in between.
2. The host parts are imported to Relax (``torch.export``): the stem (ending with its int8 codes of the
   first body tensor) and the head (dequantization, global pooling, classifier).  ``main`` calls the stem,
   then ``R.call_dps_packed("tvm_lowbit.vta.<id>.body", codes) -> int8`` (the last body tensor), then the
   head; TVM builds it for the target's host CPU.
3. The packed function runs all body programs in order on the functional simulator over one DRAM (or,
   with ``executor="reference"``, the NumPy integer reference: same host graph, so the two executors'
   logits must be bit-identical, and so must every body tensor).
4. ``export`` writes ``model.so``, ``vta/dram.bin`` and one ``vta/<layer>.insn.bin`` per layer;
   :func:`load_body` reads them back and runs them on the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_lowbit import safe_io
from tvm_lowbit.artifact import read_meta
from tvm_lowbit.errors import CompileError
from tvm_lowbit.importer import import_torch, strip_single_tuple
from tvm_lowbit.passes.report import LoweringReport
from tvm_lowbit.targets import TargetError, load_target
from tvm_lowbit.vta import integer, isa
from tvm_lowbit.vta.integer import CODE_MAX, IntNet, NetProgram, Step, run_steps
from tvm_lowbit.vta.program import Buffer, Program
from tvm_lowbit.vta.runtime import EXECUTORS, SimulatedArtifact, build_host, compare


@dataclass
class BodyReport:
    """Which op runs where (``ops``: (op, "host" | "vta", what), in execution order) and the body's cycles."""

    netp: NetProgram
    ops: list[tuple[str, str, str]]

    @property
    def host_roundtrips(self) -> int:
        return self.netp.net.host_roundtrips()

    @property
    def lowered(self) -> list[str]:
        return [op for op, where, _ in self.ops if where == "vta"]

    @property
    def fallback(self) -> list[tuple[str, str]]:
        return [(op, f"on the host: {what}") for op, where, what in self.ops if where == "host"]

    @property
    def kernels(self) -> dict[str, str]:
        return {n: "vta" for n in self.lowered}

    def text(self) -> str:
        p = self.netp
        cyc = p.total_cycles
        gb = sum(p.gemm_bound(n) for n in p.programs)
        lines = [f"VTA ({p.cfg.name}): integer-only body, {len(p.programs)} layer(s) on VTA, {cyc:,d} cycles "
                 f"({cyc / p.cfg.clock_mhz:.0f} us at {p.cfg.clock_mhz:g} MHz), GEMM utilization "
                 f"{100 * gb / max(cyc, 1):.1f}%; activations stay in VTA's layout in DRAM; host round trips "
                 f"between the first and the last VTA layer: {self.host_roundtrips}"]
        lines += [f"  {where:4s} {op:16s} {what}" for op, where, what in self.ops]
        return "\n".join(lines)


class _StemCodes(nn.Module):
    """Host: the model's stem, then the int8 codes of the first body tensor (as float32)."""

    def __init__(self, net: IntNet) -> None:
        super().__init__()
        self.model = net.model  # registers the stem's parameters
        self.stem = net.stem
        self.inv_scale = 2.0 ** -net.exps[net.first]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(self.stem(x) * self.inv_scale), 0, CODE_MAX)


class _Head(nn.Module):
    """Host: the last body tensor's codes (as float32) -> dequantize, pooling, classifier."""

    def __init__(self, net: IntNet) -> None:
        super().__init__()
        self.model = net.model
        self.head = net.head
        self.scale = 2.0 ** net.exps[net.last]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.head(codes * self.scale)


def host_graph(net: IntNet, x: np.ndarray, shapes: dict[str, tuple[int, int, int, int]], fname: str) -> Any:
    """The Relax module ``main(x) = head(call_dps_packed(fname, stem(x)))`` (stem and head imported from torch)."""
    from tvm import relax

    first, last = shapes[net.first], shapes[net.last]
    stem = strip_single_tuple(import_torch(_StemCodes(net), torch.from_numpy(x)))
    head = strip_single_tuple(import_torch(_Head(net), torch.zeros(last)))
    bb = relax.BlockBuilder()
    gs = bb.add_func(stem["main"].without_attr("global_symbol"), "host_stem")
    gh = bb.add_func(head["main"].without_attr("global_symbol"), "host_head")
    inp = relax.Var("x", relax.TensorType(list(x.shape), "float32"))
    with bb.function("main", [inp]):
        with bb.dataflow():
            codes = bb.emit(relax.op.astype(bb.emit(relax.Call(gs, [inp])), "int8"))
            if [int(d) for d in codes.ty.shape] != list(first):
                raise CompileError(f"the host stem imported from torch gives {list(codes.ty.shape)}, the body "
                                   f"expects {list(first)} (a stem op the import changed?)")
            y8 = bb.emit(relax.call_dps_packed(fname, [codes], out_ty=relax.TensorType(list(last), "int8")))
            out = bb.emit_output(bb.emit(relax.Call(gh, [bb.emit(relax.op.astype(y8, "float32"))])))
        bb.emit_func_output(out)
    return bb.get()


@dataclass
class VTABodyArtifact(SimulatedArtifact):
    """A ResNet compiled for a VTA target with its whole body on VTA: the host executable (stem, head) and
    one VTA program per body layer over one DRAM.  ``run`` executes it here with the body on the functional
    simulator (``executor="reference"``: on the NumPy integer reference); ``outputs`` keeps every body
    tensor's codes (NCHW int64) of the last run."""

    netp: NetProgram | None = None
    function: str = ""

    @property
    def net(self) -> IntNet:
        return self.netp.net

    def _body(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        if self.executor == "reference":
            return integer.reference(self.net, codes)
        if self.executor != "sim":
            raise ValueError(f"unknown VTA executor {self.executor!r}: use one of {', '.join(EXECUTORS)}")
        return self.netp.run(codes, seed=self.seed)

    def register(self) -> None:
        import tvm_ffi

        def run(x: Any, out: Any) -> None:
            t = self._body(x.numpy().astype(np.int64))
            self.outputs = t
            out.copyfrom(np.ascontiguousarray(t[self.net.last], np.int8))

        tvm_ffi.register_global_func(self.function, run, override=True)

    def cycles(self) -> dict[str, int]:
        return {n: c.total_cycles for n, c in self.netp.cycles.items()}

    def median_ms(self, x: np.ndarray, repeat: int = 20) -> float:
        """Accelerator time of the body from the cycle model (the simulator's wall time means nothing);
        the host part (stem, head) is not included."""
        return self.netp.total_cycles / (self.netp.cfg.clock_mhz * 1e3)

    def _write_files(self, directory: Path) -> dict[str, Any]:
        """``model.so`` (the host graph, calling the body by name), ``vta/dram.bin`` (the DRAM image: every
        body tensor's buffer, zero, and every layer's constants) and ``vta/<layer>.insn.bin`` (run them in
        ``meta.json``'s order on that one DRAM: the host writes the first tensor in VTA's layout
        ``(N, C/16, H, W, 16)`` int8, reads the last one back)."""
        extra = super()._write_files(directory)
        vdir = directory / "vta"
        vdir.mkdir()
        p = self.netp
        (vdir / "dram.bin").write_bytes(p.dram().tobytes())
        layers = {}
        for l in self.net.layers:
            prog = p.programs[l.name].program
            (vdir / f"{l.name}.insn.bin").write_bytes(prog.insn_bytes())
            layers[l.name] = {"insn_count": len(prog.insns), "input": l.inp, "output": l.out,
                              "shortcut_input": l.sc_inp, "shortcut": l.sc_kind or None,
                              "bias": list(l.epi.bias), "shift": list(l.epi.shift), "post_shift": l.epi.post_shift,
                              "clip": list(l.epi.clip), "tiling": p.programs[l.name].tiling.__dict__,
                              "cycles": p.cycles[l.name].total_cycles}
        tensors = {n: {"offset": b.offset, "nbytes": b.nbytes, "shape": list(p.shapes[n]),
                       "scale_exponent": self.net.exps[n]} for n, b in p.tensors.items()}
        return {**extra, "kind": "vta", "vta": self.target.vta, "body": "integer", "function": self.function,
                "first": self.net.first, "last": self.net.last, "tensors": tensors, "layers": layers,
                "host_roundtrips": self.report.host_roundtrips,
                "ops": [{"op": op, "where": where, "what": what} for op, where, what in self.report.ops]}


def check_body(art: VTABodyArtifact, x: np.ndarray) -> int:
    """Run ``x`` with the body on the simulator and on the NumPy reference; raise unless every body tensor
    and the logits are bit-identical.  Returns the number of body layers checked."""
    return compare(*art.run_both(x), {l.out: l.name for l in art.net.layers})


def compile_body(net: IntNet, x: np.ndarray, spec: Any, fname: str, *, calib_images: int, progress: bool = False,
                 search: bool = True) -> VTABodyArtifact:
    """Lower ``net``'s body for ``spec`` at the batch of ``x`` and build the host graph around it;
    ``fname``: the packed function the host graph calls (unique per artifact)."""
    cfg = spec.vta_config()
    shapes = net.shapes(x.shape[0], tuple(x.shape[2:]), x.shape[1])
    netp = integer.lower_net(net, cfg, shapes, progress=progress, search=search)
    mod = host_graph(net, x, shapes, fname)
    ex = build_host(mod, spec)
    ops = net.ops()
    ops[0] = (ops[0][0], ops[0][1], ops[0][2] + f"; scales calibrated on {calib_images} image(s)")
    wbytes = sum(len(lp.program.constants["wgt"]) + len(lp.program.constants.get("wgt_sc", b""))
                 for lp in netp.programs.values())
    return VTABodyArtifact(spec, ex, tuple(x.shape), report=BodyReport(netp, ops), weight_bytes=wbytes,
                           netp=netp, function=fname)


# ---- an export read back ---------------------------------------------------------------------

@dataclass
class ExportedBody:
    """A body from an export's files: the DRAM image and each layer's instruction stream, run in order."""

    cfg: Any
    dram: np.ndarray
    steps: list[Step]
    tensors: dict[str, Buffer]
    shapes: dict[str, tuple[int, ...]]
    first: str
    last: str

    def run(self, codes: np.ndarray, seed: int | None = 0) -> dict[str, np.ndarray]:
        return run_steps(self.cfg, self.dram.copy(), self.steps, self.tensors, self.shapes, {self.first: codes}, seed)


@dataclass
class LoadedVTABody(SimulatedArtifact):
    """An integer-body export read back by :func:`load_body`: its ``model.so`` with the body's programs on
    the functional simulator (the NumPy reference needs the model, which an export does not hold)."""

    body: ExportedBody | None = None
    function: str = ""
    cycle_counts: dict[str, int] = field(default_factory=dict)

    def register(self) -> None:
        import tvm_ffi

        def run(x: Any, out: Any) -> None:
            if self.executor != "sim":
                raise ValueError(f"executor {self.executor!r}: a loaded VTA export runs on the simulator only "
                                 "(the reference needs the model: compile it again)")
            t = self.body.run(x.numpy().astype(np.int64), self.seed)
            self.outputs = t
            out.copyfrom(np.ascontiguousarray(t[self.body.last], np.int8))

        tvm_ffi.register_global_func(self.function, run, override=True)

    def cycles(self) -> dict[str, int]:
        return dict(self.cycle_counts)


def load_body(directory: str | Path) -> LoadedVTABody:
    """Read back what :meth:`VTABodyArtifact.export` wrote (``tvm_lowbit.load_artifact`` refuses VTA exports):
    ``meta.json`` schema-checked and every file's sha256 verified first; runnable here for ``vta-sim``."""
    d = Path(directory)
    meta = read_meta(d)
    if meta.get("kind") != "vta" or meta.get("body") != "integer":
        raise CompileError(f"{d}: not an integer-only VTA body export (kind {meta.get('kind')!r}, body "
                           f"{meta.get('body')!r}); load other artifacts with tvm_lowbit.load_artifact")
    try:
        spec = load_target(meta["target"])
    except TargetError as e:
        raise CompileError(f"{d / 'meta.json'}: field 'target': {e}") from None
    if spec.vta != meta.get("vta"):
        raise CompileError(f"{d}: exported for another VTA configuration than {spec.name}'s target file describes "
                           "now: compile it again")
    safe_io.verify_tree(d, meta["files"])
    cfg = spec.vta_config()
    try:
        dram = np.fromfile(d / "vta" / "dram.bin", np.uint8)
        tensors = {n: Buffer(n, int(t["offset"]), int(t["nbytes"]), cfg.inp_elem_bytes)
                   for n, t in meta["tensors"].items()}
        shapes = {n: tuple(int(v) for v in t["shape"]) for n, t in meta["tensors"].items()}
        steps = []
        for name, l in meta["layers"].items():
            raw = (d / "vta" / f"{name}.insn.bin").read_bytes()
            insns = [isa.decode(raw[i:i + 16], cfg) for i in range(0, len(raw), 16)]
            ins = (l["input"],) + ((l["shortcut_input"],) if l["shortcut_input"] else ())
            steps.append(Step(name, Program(cfg, insns, {}, {}, len(dram)), ins, l["output"]))
        body = ExportedBody(cfg, dram, steps, tensors, shapes, meta["first"], meta["last"])
        function, cyc = meta["function"], {n: int(l["cycles"]) for n, l in meta["layers"].items()}
    except (KeyError, TypeError, ValueError) as e:  # ValueError includes isa.ISAError
        raise CompileError(f"{d / 'meta.json'}: the VTA body entries are incomplete or damaged ({type(e).__name__}: "
                           f"{e}): export it again") from None
    lib = None
    if spec.is_host:
        import tvm

        try:
            lib = tvm.runtime.load_module(str(d / "model.so"))
        except Exception as e:  # noqa: BLE001 - TVM's loader errors name no file
            raise CompileError(f"{d / 'model.so'}: TVM cannot load it ({type(e).__name__}); export it again") from None
    rep = LoweringReport(lowered=meta.get("lowered", []), fallback=[tuple(x) for x in meta.get("fallback", [])],
                         kernels=dict(meta.get("kernels", {})))
    return LoadedVTABody(spec, lib, tuple(meta["input_shape"]), meta.get("input_dtype", "float32"), rep,
                         meta.get("weight_bytes", 0), body=body, function=function, cycle_counts=cyc)
