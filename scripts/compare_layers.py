"""Compiled vs fake-quant, layer by layer, on a zoo model (docs/results-models.md, "Compiled vs fake-quant,
layer by layer"): the codes every ``QuantLayer``'s input quantizer gives in PyTorch, an independent int64
conv/linear of those codes (``qmath.conv2d_int_np``), and the x86 build's int32 accumulators
(``expose_acc=True``), compared bit for bit, layer by layer, on every evaluation view; then the logits.
``--target rasp5``: the same on the emulated Pi 5 (``--board-views`` views): the build's outputs (the logits
and every layer's accumulators, exact in float32 below 2^24) are concatenated into the one output the
bundle runner writes.

    python scripts/compare_layers.py --model efficientnet_b0 --variant fgq-n4 --size 32 --eval-views 2 \\
        --calib-views 2 --batch 4

Same models, views and quantization as ``bench_models.py`` (its ``load_cnn`` and ``quantize_variant``: ``--variant
auto`` runs bench_models' CNN Auto search, so the mix is the one its ``auto`` rows compile); the fake-quant model
runs on all evaluation views in one batch, as ``bench_models.py`` does for up to 16.  Prints the mix (weight
formats of the integer layers, every float layer named), one line per layer whose accumulators differ (view,
position, values), a summary, and exits 1 if any layer or argmax differs.

``--codes``: also return the codes every lowered layer's kernel read (its first operand, beside its
accumulators) from the build (the ``--target``'s lowering and schedules, without the x86-only float-op passes
``tvm_lowbit.compile`` adds, which keep the bits), and per layer compare (a) those codes with PyTorch's, telling
for the codes that differ how far PyTorch's ``x / scale`` was from a rounding midpoint, and (b) the
accumulators with an int64 reference of the build's own codes.  (b) equal and (a) not says the integer layer is
exact and its input differs because the float ops before it round differently in TVM.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models  # noqa: E402  (the sibling script: same models, views and quantizer settings)

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

import tvm_lowbit  # noqa: E402
from tvm_lowbit import tune  # noqa: E402
from tvm_lowbit.artifact import Artifact  # noqa: E402
from tvm_lowbit.backends.cpu import schedules_dir  # noqa: E402
from tvm_lowbit.importer import import_torch, layer_infos  # noqa: E402
from tvm_lowbit.passes.apply_kernel_schedules import apply_default_schedules  # noqa: E402
from tvm_lowbit.passes.lower_integer_layers import lower_integer_layers  # noqa: E402
from tvm_lowbit.passes.normalize_take import normalize_take  # noqa: E402
from tvm_lowbit.targets import load_target  # noqa: E402
from tvm_lowbit import qmath  # noqa: E402
from tvm_lowbit.passes.torch_sigmoid import TORCH_CPU_ENV  # noqa: E402
from tvm_lowbit.quantizers.layers import QUANT_ATTR, QConv2d, quant_layers, wrap_module  # noqa: E402
from tvm_lowbit.safe_io import OutputError, check_output_file, temp_sibling  # noqa: E402


def record_codes(q: torch.nn.Module, x: torch.Tensor, ratios: dict[str, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The fake-quant logits of ``x`` (one batch) and the codes each layer's input quantizer gave; with
    ``ratios``, also each quantizer's float32 ``x / scale`` (what it rounded), in ``ratios``."""
    codes: dict[str, np.ndarray] = {}
    layers = quant_layers(q)

    def wrap(name: str, orig):  # noqa: ANN001, ANN202
        def quantize_input(t: torch.Tensor) -> torch.Tensor:
            c = orig(t)
            codes[name] = c.detach().numpy().copy()
            if ratios is not None:
                ratios[name] = (t.detach().to(torch.float32) / float(np.float32(layers[name].scale_value))).numpy()
            return c
        return quantize_input

    for name, m in layers.items():
        m.quantize_input = wrap(name, m.quantize_input)
    try:
        with torch.no_grad():
            out = q(x).float().numpy()
    finally:
        for m in layers.values():
            del m.quantize_input
    return out, codes


def concat_outputs(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[tuple[int, ...]]]:
    """``mod`` whose ``main`` returns its tuple of outputs as one float32 tensor [batch, sum of sizes] (each
    output cast to float32 and flattened per input), and the outputs' shapes."""
    old = mod["main"]
    shapes = [tuple(int(d) for d in f.shape.values) for f in old.ret_ty.fields]
    bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}))
    gv = bb.add_func(old.without_attr("global_symbol"), "main_tuple")
    x = relax.Var("x", old.params[0].ty)
    with bb.function("main", [x]):
        with bb.dataflow():
            tup = bb.emit(relax.Call(gv, [x]))
            parts = [bb.emit(relax.op.reshape(bb.emit(relax.op.astype(bb.emit(relax.TupleGetItem(tup, i)), "float32")),
                                              [shp[0], -1])) for i, shp in enumerate(shapes)]
            out = bb.emit_output(relax.op.concat(parts, axis=1))
        bb.emit_func_output(out)
    return bb.get(), shapes


@relax.expr_functor.mutator
class ExposeInputs(relax.PyExprMutator):
    """Beside every accumulator output of an ``expose_acc`` build, the codes its kernel read (the call's
    first operand) as an int32 output; ``exposed`` holds them in the accumulators' order."""

    def __init__(self, mod: tvm.IRModule, accs: list[relax.Expr]) -> None:
        super().__init__(mod)
        self.order = {a.__hash__(): i for i, a in enumerate(accs)}
        self.exposed: list[relax.Var | None] = [None] * len(accs)
        self.values = {b.var.__hash__(): b.value for blk in mod["main"].body.blocks for b in blk.bindings}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        super().visit_var_binding_(binding)
        i = self.order.get(binding.var.__hash__())
        if i is not None:
            call = binding.value
            while isinstance(call, relax.Var):  # the output var is bound to the kernel call's dataflow var
                call = self.values[call.__hash__()]
            x = self.visit_expr(call.args[1].fields[0])  # call_tir(kernel, (codes, ...))
            self.exposed[i] = self.builder_.emit_output(relax.op.astype(x, "int32"))


def expose_inputs(mod: tvm.IRModule, n_acc: int) -> tvm.IRModule:
    """``mod`` (lowered with ``expose_acc``: its outputs end with ``n_acc`` accumulators) whose ``main`` also
    returns, after them, the codes each of those kernels read (:class:`ExposeInputs`)."""
    func = mod["main"]
    ret = func.body.body
    fields = ret.fields if isinstance(ret, relax.Tuple) else None
    if fields is None:
        raise ValueError("expose_inputs: main does not return a tuple of outputs; lower it with expose_acc=True")
    mut = ExposeInputs(mod, list(fields[len(fields) - n_acc:]))
    new = mut.visit_expr(func)
    outs = list(new.body.body.fields) + list(mut.exposed)
    new = relax.Function(new.params, relax.SeqExpr(new.body.blocks, relax.Tuple(outs)),
                         relax.TupleType([o.ty for o in outs]), new.is_pure, new.attrs)
    mut.builder_.update_func(mod.get_global_var("main"), new)
    return mut.builder_.get()


def board_build(q: torch.nn.Module, x: np.ndarray, target: str,
                tuned: bool = True, codes: bool = False) -> tuple[Artifact, list[tuple[int, ...]]]:
    """The ``expose_acc`` build for ``target`` as the CPU backend makes it (its tuned schedules, then the
    default ones), with its outputs concatenated (:func:`concat_outputs`); ``codes``: the layers' input
    codes too (:func:`expose_inputs`)."""
    spec = load_target(target)
    tgt = spec.tvm_target()
    mod = normalize_take(import_torch(q, torch.from_numpy(x)))
    mod, report = lower_integer_layers(mod, layer_infos(q), expose_acc=True, target=tgt)
    if codes and report.lowered:
        mod = expose_inputs(mod, len(report.lowered))
    db_dir = schedules_dir(spec, None if tuned else False)
    tuning = None
    if db_dir is not None:
        mod, tuning = tune.apply_database(mod, tgt, db_dir)
    mod = apply_default_schedules(mod, tgt)
    mod, shapes = concat_outputs(mod)
    ex = tvm.compile(mod, target=tgt)
    return Artifact(spec, ex, tuple(x.shape), "float32", report, 0, 1, 0.0, tuning), shapes


def to_nchw(got: np.ndarray, like: np.ndarray) -> list[np.ndarray]:
    """The layouts ``got`` (codes a kernel read: NCHW, or NHWC for a native-NHWC kernel) may stand for in
    ``like``'s NCHW shape: one, or both where the shape cannot tell."""
    if got.ndim != 4:
        return [got]
    t = got.transpose(0, 3, 1, 2)
    return [g for g in (got, t) if g.shape == like.shape]


def int_ref(m: torch.nn.Module, c: np.ndarray) -> np.ndarray:
    """The layer's int64 accumulators of the codes ``c``."""
    w = m.w_int.numpy().astype(np.int64)
    c = c.astype(np.int64)
    return qmath.conv2d_int_np(c, w, m.stride, m.padding, m.dilation, m.groups) if isinstance(m, QConv2d) else c @ w.T


def midpoint_ulps(r: np.ndarray) -> np.ndarray:
    """How far each ``x / scale`` is from the nearest rounding midpoint (k + 0.5), in float32 ulps of that
    midpoint."""
    r = r.astype(np.float64)
    mid = np.round(r - 0.5) + 0.5
    return np.abs(r - mid) / np.spacing(np.abs(mid).astype(np.float32)).astype(np.float64)


def mix_text(q: torch.nn.Module, names: list[str]) -> str:
    """The weight formats of the lowered layers and every layer the quantizer left float, named."""
    rep = getattr(q, "tvm_lowbit_report", None)
    fmts: dict[str, int] = {}
    for n in names:
        f = rep.quantized.get(n, "?") if rep is not None else "?"
        fmts[f] = fmts.get(f, 0) + 1
    floats = [str(f) for f in rep.left_float] if rep is not None else []
    lines = [f"integer layers: {len(names)} ({', '.join(f'{n} {f}' for f, n in sorted(fmts.items()))}); "
             f"float layers: {len(floats)}"]
    auto = getattr(q, "tvm_lowbit_auto", None)
    if auto is not None:
        lines.append(auto.summary())
    return "\n".join(lines + [f"  float: {f}" for f in floats])


def save_quantized(q: torch.nn.Module, path: Path) -> None:
    """``torch.save`` of a fake-quant model: its wrapped modules' bound ``forward`` (not picklable) left out."""
    wrapped = [m for m in q.modules() if QUANT_ATTR in m._modules]
    fwd = [m.__dict__.pop("forward") for m in wrapped]
    tmp = temp_sibling(path, ".pt")  # written whole, then renamed: a failed save never leaves half a file
    try:
        torch.save(q, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        for m, f in zip(wrapped, fwd):
            m.forward = f


def load_quantized(path: Path) -> torch.nn.Module:
    """A model ``save_quantized`` wrote, its wrapped modules wrapped again."""
    q = torch.load(path, weights_only=False)
    for m in q.modules():
        if QUANT_ATTR in m._modules:
            wrap_module(m, getattr(m, QUANT_ATTR))
    return q.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", default="fgq-n4", choices=["fgq-n4", "int8", "auto"],
                    help="auto: bench_models.py's CNN Auto (its quantize_variant), the mix its auto rows compile")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--eval-views", type=int, default=2)
    ap.add_argument("--calib-views", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="batch the x86 build is compiled for")
    ap.add_argument("--target", default="x86-host", help="x86-host, or rasp5 (run on the emulated Pi 5)")
    ap.add_argument("--board-views", type=int, default=4, help="views run on the emulated board")
    ap.add_argument("--no-tuned", action="store_true", help="board target: the default schedules only (no tuned "
                    "MetaSchedule database)")
    ap.add_argument("--torch-cpu", default=None, help="PyTorch CPU capability the float-op passes follow "
                    "(TVM_LOWBIT_TORCH_CPU; default this host's; 'none': TVM's own sigmoid and mean)")
    ap.add_argument("--codes", action="store_true", help="also compare the codes each layer read in the build with "
                    "PyTorch's, and the accumulators with a reference of the build's own codes (see above)")
    ap.add_argument("--auto-check-views", type=int, default=bench_models.AUTO_CHECK_VIEWS, help="auto: as "
                    "bench_models.py's flag (views per calibration photo the budget is checked on)")
    ap.add_argument("--auto-confidence", type=float, default=bench_models.AUTO_CONFIDENCE, help="auto: as "
                    "bench_models.py's flag (standard errors to spare on the check views)")
    ap.add_argument("--quantized", type=Path, default=None, help="a file for the quantized model: loaded when it "
                    "exists (same --model/--variant/views), else written (torch.save), so a second run skips the search")
    a = ap.parse_args(argv)
    if a.torch_cpu:
        os.environ[TORCH_CPU_ENV] = a.torch_cpu
    bench_models.AUTO_CHECK_VIEWS, bench_models.AUTO_CONFIDENCE = a.auto_check_views, a.auto_confidence
    if a.quantized is not None and not a.quantized.is_file():
        try:  # checked before the search, not after it
            check_output_file(a.quantized, what="--quantized")
        except OutputError as e:
            ap.error(str(e))

    t0 = time.process_time()
    case = bench_models.load_cnn(a.model, a.size, a.eval_views, a.calib_views)
    if a.quantized is not None and a.quantized.is_file():
        q = load_quantized(a.quantized)
        print(f"quantized model loaded from {a.quantized}")
    else:
        q = bench_models.quantize_variant(a.variant, case)
        if a.quantized is not None:
            save_quantized(q, a.quantized)
    x = case.evalx
    ratios: dict[str, np.ndarray] | None = {} if a.codes else None
    want, codes = record_codes(q, x, ratios)
    layers = quant_layers(q)
    x86 = a.target in ("x86", "x86-host")
    if x86 and not a.codes:
        art = tvm_lowbit.compile(q, x[:a.batch].numpy(), "x86-host", expose_acc=True)

        def run(chunk: np.ndarray, _i: int) -> list[np.ndarray]:
            return art.run_all(chunk)
    else:
        if not x86:
            x, want = x[:a.board_views], want[:a.board_views]
        art, shapes = board_build(q, x[:a.batch].numpy(), "x86-host" if x86 else a.target, tuned=not a.no_tuned,
                                  codes=a.codes)
        sizes = [int(np.prod(sh[1:])) for sh in shapes]
        ends = np.cumsum(sizes)
        flat = None if x86 else bench_models.run_on_board(art, x.numpy(), a.batch, a.target)  # [views, sum of sizes]

        def run(chunk: np.ndarray, i: int) -> list[np.ndarray]:
            rows = art.run_all(chunk)[0] if flat is None else flat[i:i + len(chunk)]
            rows = np.concatenate([rows, np.repeat(rows[-1:], len(chunk) - len(rows), axis=0)])
            return [rows[:, e - n:e].reshape((len(chunk),) + sh[1:]) for n, e, sh in zip(sizes, ends, shapes)]
    names = list(art.report.lowered)
    print(f"{a.model} {a.variant} ({a.target}): {len(names)} layers lowered, fallback {list(art.report.fallback)}; "
          f"{len(x)} views, batch {a.batch}")
    print(mix_text(q, names))
    bad_layers, outs = 0, []
    differ: set[str] = set()
    code_diff: dict[str, tuple[int, float, float, int]] = {}  # layer -> (codes differing, most ulps and most
    # fraction of a step PyTorch's x / scale was from a midpoint there, largest |build - PyTorch| code)
    kernel_bad: set[str] = set()
    for i in range(0, len(x), a.batch):
        chunk = x[i:i + a.batch].numpy()
        n = len(chunk)
        if n < a.batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], a.batch - n, axis=0)])
        res = run(chunk, i)
        outs.append(res[0][:n])
        for k, name in enumerate(names):
            acc = res[1 + k]
            m = layers[name]
            c = codes[name][i:i + n]
            ref = int_ref(m, c)
            diff = np.argwhere(acc[:n].astype(np.int64) != ref)
            if len(diff):
                bad_layers += 1
                differ.add(name)
                j = tuple(diff[0])
                print(f"  {name}: views {i}..{i + n - 1}: {len(diff)} of {ref.size} accumulators differ; first at "
                      f"{(j[0] + i,) + j[1:]}: build {acc[j]} vs reference {ref[j]}")
            if not a.codes:
                continue
            # the build's own codes: which layout, if ambiguous, is the one whose reference is the build's
            cands = to_nchw(res[1 + len(names) + k][:n], c)
            if not cands:
                raise ValueError(f"{name}: the build's codes {res[1 + len(names) + k].shape} do not match PyTorch's "
                                 f"{c.shape} in NCHW or NHWC")
            refs = [int_ref(m, bc) for bc in cands]
            ok = [t for t, r in enumerate(refs) if np.array_equal(acc[:n].astype(np.int64), r)]
            bc = cands[ok[0] if ok else 0]
            if not ok:
                kernel_bad.add(name)
                print(f"  {name}: views {i}..{i + n - 1}: accumulators differ from the reference of the build's own codes")
            wrong = bc != c
            if wrong.any():
                r = ratios[name][i:i + n][wrong]
                far = float(midpoint_ulps(r).max())
                step = float(np.abs(r.astype(np.float64) - (np.round(r.astype(np.float64) - 0.5) + 0.5)).max())
                jump = int(np.abs(bc[wrong].astype(np.int64) - c[wrong].astype(np.int64)).max())
                cnt, most, most_step, most_jump = code_diff.get(name, (0, 0.0, 0.0, 0))
                code_diff[name] = (cnt + int(wrong.sum()), max(most, far), max(most_step, step), max(most_jump, jump))
    for name, (cnt, far, step, jump) in code_diff.items():
        print(f"  {name}: {cnt} of {codes[name][:len(x)].size} input codes differ from PyTorch's, by at most {jump}; "
              f"PyTorch's x / scale was at most {step:.3g} of a step ({far:.3g} ulps) from a rounding midpoint there")
    got = np.concatenate(outs)
    agree = 100.0 * float((got.argmax(1) == want.argmax(1)).mean())
    print(f"{a.model} {a.variant}: layer/chunk pairs with differing accumulators: {bad_layers}; logits max |diff| "
          f"{float(np.abs(got - want).max()):.3g}, bit-identical views {int((got == want).all(1).sum())}/{len(x)}, "
          f"argmax agree {agree:.1f} %; {time.process_time() - t0:.0f} CPU s (this process)")
    print(f"{a.model} {a.variant} ({a.target}): integer layers compared {len(names)}, layers whose accumulators differ "
          f"from the reference of PyTorch's codes {len(differ)}"
          + (f"; with --codes: layers whose input codes differ from PyTorch's {len(code_diff)} "
             f"({sum(v[0] for v in code_diff.values())} codes), layers whose accumulators differ from the reference of "
             f"the build's own codes {len(kernel_bad)}" if a.codes else ""))
    return 0 if bad_layers == 0 and agree == 100.0 and not kernel_bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
