"""Compiled vs fake-quant, layer by layer, on a zoo model (docs/results-models.md, "Compiled vs fake-quant,
layer by layer"): the codes every ``QuantLayer``'s input quantizer gives in PyTorch, an independent int64
conv/linear of those codes (``qmath.conv2d_int_np``), and the x86 build's int32 accumulators
(``expose_acc=True``), compared bit for bit, layer by layer, on every evaluation view; then the logits.

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

import tvm_lowbit  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", default="fgq-n4", choices=["fgq-n4", "int8", "auto"])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--eval-views", type=int, default=2)
    ap.add_argument("--calib-views", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="batch the x86 build is compiled for")
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
    art = tvm_lowbit.compile(q, x[:a.batch].numpy(), "x86-host", expose_acc=True)
    names = list(art.report.lowered)
    print(f"{a.model} {a.variant}: {len(names)} layers lowered, fallback {list(art.report.fallback)}; "
          f"{len(x)} views, batch {a.batch}")
    bad_layers, outs = 0, []
    for i in range(0, len(x), a.batch):
        chunk = x[i:i + a.batch].numpy()
        n = len(chunk)
        if n < a.batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], a.batch - n, axis=0)])
        res = art.run_all(chunk)
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
