#!/usr/bin/env python3
"""Fashion-MNIST test top-1 of the built-in ResNet-20: FP32, FGQ (N x activation bits), the models
retrained by scripts/train_quantized.py (INQ, PACT, SQ, TWN, BWN; committed in tvm_lowbit/zoo/retrained,
evaluated here, not retrained) and a
per-layer ternary (TWN, one alpha per layer) baseline with the same activation quantization, the same
calibration and the same batch-norm re-estimation, so only the weight grouping differs.

Everything is measured on the fly (nothing is hard-coded):

    python scripts/bench_accuracy.py                       # full 10k test set, 2048 calibration images
    python scripts/bench_accuracy.py --limit 1000 --json acc.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_lowbit import data, qmath  # noqa: E402
from tvm_lowbit.models.resnet import load_pretrained  # noqa: E402
from tvm_lowbit.quantizers import FGQ, quantize  # noqa: E402
from tvm_lowbit.quantizers.fgq import selected_layers  # noqa: E402

RETRAINED = Path(__file__).resolve().parent.parent / "tvm_lowbit" / "zoo" / "retrained"
RETRAINED_ORDER = {n: i for i, n in enumerate(("inq-b5", "inq-b4", "inq-b3", "inq-b2", "pact-w4a4", "pact-w2a2",
                                                  "twn", "sq-twn", "bwn", "sq-bwn"))}
GROUP_SIZES = (4, 8, 16, 32, 64)
ACT_BITS = (8, 4)
FIELDS = ("model", "scheme", "config", "top1", "fp32_top1", "drop_pp")


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    correct = 0
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / x.shape[0]


def per_layer_ternary(model: nn.Module, config: FGQ, calib: np.ndarray) -> nn.Module:
    """A copy of ``model`` whose layers FGQ would quantize hold TWN per-layer ternary weights
    (one alpha per tensor).  FGQ's exact group solver reproduces such weights exactly (every non-zero
    of a group has the same magnitude), so quantizing this copy with ``config`` gives the per-layer
    baseline through the same activation / BN pipeline."""
    m = copy.deepcopy(model)
    for name in selected_layers(m, config, torch.from_numpy(calib[:1])):
        layer = m.get_submodule(name)
        layer.weight.data = qmath.ternarize_per_layer(layer.weight.data)
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    ap.add_argument("--calib", type=int, default=2048,
                    help="training images for calibration and BN re-estimation (default 2048)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retrained", choices=("include", "only", "skip"), default="include",
                    help="rows of the retrained models in tvm_lowbit/zoo/retrained (made by "
                         "scripts/train_quantized.py): include (default), only, or skip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    x, y = data.load("test", limit=args.limit)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    calib = data.calibration_set(args.calib)
    model = load_pretrained("resnet20")

    jobs: list[tuple[str, str, object]] = [("fp32", "fp32", None)]
    if args.retrained != "only":
        jobs += [("fgq", f"N{n}-a{a}", FGQ(group_size=n, act_bits=a)) for n in GROUP_SIZES for a in ACT_BITS]
        jobs += [("ternary-per-layer", f"a{a}", FGQ(group_size=64, act_bits=a)) for a in ACT_BITS]
    if args.retrained != "skip":
        for path in sorted(RETRAINED.glob("*.pt"), key=lambda p: RETRAINED_ORDER.get(p.stem, 99)):
            ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own committed files
            jobs.append((ckpt["scheme"], ckpt["config"], ckpt["qmodel"]))

    print(f"resnet20 on {x.shape[0]} Fashion-MNIST test images, {args.calib} calibration images; "
          f"{len(jobs)} configurations", flush=True)
    rows: list[dict[str, object]] = []
    fp32 = float("nan")
    for i, (scheme, name, cfg) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        if cfg is None:
            acc = fp32 = top1(model, x_t, y_t)
        elif isinstance(cfg, nn.Module):  # a retrained, exported fake-quant model
            acc = top1(cfg.eval(), x_t, y_t)
        else:
            src = per_layer_ternary(model, cfg, calib) if scheme == "ternary-per-layer" else model
            if scheme == "ternary-per-layer":
                cfg = replace(cfg, threshold="exact")
            acc = top1(quantize(src, cfg, calib, progress=False), x_t, y_t)
        rows.append({"model": "resnet20", "scheme": scheme, "config": name, "top1": round(acc, 2),
                     "fp32_top1": round(fp32, 2), "drop_pp": round(fp32 - acc, 2)})
        print(f"[{i:2d}/{len(jobs)}] {scheme:18s} {name:8s} top1 {acc:6.2f}  drop {fp32 - acc:5.2f} pp  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    print()
    print(f"{'model':9s} {'scheme':18s} {'config':8s} {'top1':>6s} {'fp32':>6s} {'drop_pp':>7s}")
    for r in rows:
        print(f"{r['model']:9s} {r['scheme']:18s} {r['config']:8s} {r['top1']:6.2f} {r['fp32_top1']:6.2f} "
              f"{r['drop_pp']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [{k: r[k] for k in FIELDS} for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
