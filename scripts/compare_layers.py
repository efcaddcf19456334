"""Compiled vs fake-quant, layer by layer, on a zoo model (docs/results-models.md, "Compiled vs fake-quant,
layer by layer"): the codes every ``QuantLayer``'s input quantizer gives in PyTorch, an independent int64
conv/linear of those codes (``qmath.conv2d_int_np``), and the x86 build's int32 accumulators
(``expose_acc=True``), compared bit for bit, layer by layer, on every evaluation view; then the logits.
``--target rasp5``: the same on the emulated Pi 5 (``--board-views`` views): the build's outputs (the logits
and every layer's accumulators, exact in float32 below 2^24) are concatenated into the one output the
bundle runner writes.

    python scripts/compare_layers.py --model efficientnet_b0 --variant fgq-n4 --size 32 --eval-views 2 \\
        --calib-views 2 --batch 4

Same models, views and quantization as ``bench_models.py`` (its ``load_cnn`` and ``quantize_variant``); the
fake-quant model runs on all evaluation views in one batch, as ``bench_models.py`` does for up to 16.
Prints one line per layer whose accumulators differ (view, position, values), a summary, and exits 1 if
any layer or argmax differs.
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
from tvm_lowbit.quantizers.layers import QConv2d, quant_layers  # noqa: E402


def record_codes(q: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The fake-quant logits of ``x`` (one batch) and the codes each layer's input quantizer gave."""
    codes: dict[str, np.ndarray] = {}
    layers = quant_layers(q)

    def wrap(name: str, orig):  # noqa: ANN001, ANN202
        def quantize_input(t: torch.Tensor) -> torch.Tensor:
            c = orig(t)
            codes[name] = c.detach().numpy().copy()
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


def board_build(q: torch.nn.Module, x: np.ndarray, target: str,
                tuned: bool = True) -> tuple[Artifact, list[tuple[int, ...]]]:
    """The ``expose_acc`` build for ``target`` as the CPU backend makes it (its tuned schedules, then the
    default ones), with its outputs concatenated (:func:`concat_outputs`)."""
    spec = load_target(target)
    tgt = spec.tvm_target()
    mod = normalize_take(import_torch(q, torch.from_numpy(x)))
    mod, report = lower_integer_layers(mod, layer_infos(q), expose_acc=True, target=tgt)
    db_dir = schedules_dir(spec, None if tuned else False)
    tuning = None
    if db_dir is not None:
        mod, tuning = tune.apply_database(mod, tgt, db_dir)
    mod = apply_default_schedules(mod, tgt)
    mod, shapes = concat_outputs(mod)
    ex = tvm.compile(mod, target=tgt)
    return Artifact(spec, ex, tuple(x.shape), "float32", report, 0, 1, 0.0, tuning), shapes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", default="fgq-n4", choices=["fgq-n4", "int8", "auto"])
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
    a = ap.parse_args(argv)
    if a.torch_cpu:
        os.environ[TORCH_CPU_ENV] = a.torch_cpu

    t0 = time.process_time()
    case = bench_models.load_cnn(a.model, a.size, a.eval_views, a.calib_views)
    q = bench_models.quantize_variant(a.variant, case)
    x = case.evalx
    want, codes = record_codes(q, x)
    layers = quant_layers(q)
    if a.target in ("x86", "x86-host"):
        art = tvm_lowbit.compile(q, x[:a.batch].numpy(), "x86-host", expose_acc=True)

        def run(chunk: np.ndarray, _i: int) -> list[np.ndarray]:
            return art.run_all(chunk)
    else:
        x, want = x[:a.board_views], want[:a.board_views]
        art, shapes = board_build(q, x[:a.batch].numpy(), a.target, tuned=not a.no_tuned)
        flat = bench_models.run_on_board(art, x.numpy(), a.batch, a.target)  # [views, sum of sizes]
        sizes = [int(np.prod(sh[1:])) for sh in shapes]
        ends = np.cumsum(sizes)

        def run(chunk: np.ndarray, i: int) -> list[np.ndarray]:
            rows = flat[i:i + len(chunk)]
            rows = np.concatenate([rows, np.repeat(rows[-1:], len(chunk) - len(rows), axis=0)])
            return [rows[:, e - n:e].reshape((len(chunk),) + sh[1:]) for n, e, sh in zip(sizes, ends, shapes)]
    names = list(art.report.lowered)
    print(f"{a.model} {a.variant} ({a.target}): {len(names)} layers lowered, fallback {list(art.report.fallback)}; "
          f"{len(x)} views, batch {a.batch}")
    bad_layers, outs = 0, []
    for i in range(0, len(x), a.batch):
        chunk = x[i:i + a.batch].numpy()
        n = len(chunk)
        if n < a.batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], a.batch - n, axis=0)])
        res = run(chunk, i)
        outs.append(res[0][:n])
        for name, acc in zip(names, res[1:]):
            m = layers[name]
            w = m.w_int.numpy().astype(np.int64)
            c = codes[name][i:i + n].astype(np.int64)
            ref = qmath.conv2d_int_np(c, w, m.stride, m.padding, m.dilation, m.groups) if isinstance(m, QConv2d) \
                else c @ w.T
            diff = np.argwhere(acc[:n].astype(np.int64) != ref)
            if len(diff):
                bad_layers += 1
                j = tuple(diff[0])
                print(f"  {name}: views {i}..{i + n - 1}: {len(diff)} of {ref.size} accumulators differ; first at "
                      f"{(j[0] + i,) + j[1:]}: build {acc[j]} vs reference {ref[j]}")
    got = np.concatenate(outs)
    agree = 100.0 * float((got.argmax(1) == want.argmax(1)).mean())
    print(f"{a.model} {a.variant}: layer/chunk pairs with differing accumulators: {bad_layers}; logits max |diff| "
          f"{float(np.abs(got - want).max()):.3g}, bit-identical views {int((got == want).all(1).sum())}/{len(x)}, "
          f"argmax agree {agree:.1f} %; {time.process_time() - t0:.0f} CPU s (this process)")
    return 0 if bad_layers == 0 and agree == 100.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
