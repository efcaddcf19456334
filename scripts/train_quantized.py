#!/usr/bin/env python3
"""Retrain the built-in ResNet-20 with the training quantizers and save the exported fake-quant models
that ``scripts/bench_accuracy.py --retrained`` evaluates (so the table reproduces without retraining).

Every run starts from the FP32 checkpoint (``tvm_lowbit/zoo/resnet20_fmnist.pt``) and uses the built-in
trainer (``tvm_lowbit.quantizers.train``): SGD nesterov, weight decay 5e-4, cosine learning rate
restarted every stage, random flips and 2-pixel crops.  Budgets are equal within each comparison:
SQ-TWN and plain TWN (and SQ-BWN / BWN) get the same total epochs, plain TWN/BWN in one stage.

    python scripts/train_quantized.py --runs inq-b5,inq-b3 --epochs 2      # on a GPU: ~6 s an epoch
    python scripts/train_quantized.py --runs all --subset 6000 --epochs 1   # a 2-core CPU budget
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_lowbit import data  # noqa: E402
from tvm_lowbit.models.resnet import load_pretrained  # noqa: E402
from tvm_lowbit.quantizers.inq import INQ  # noqa: E402
from tvm_lowbit.quantizers.pact import PACT  # noqa: E402
from tvm_lowbit.quantizers.sq import SQ  # noqa: E402
from tvm_lowbit.quantizers.train import flip_crop, train  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "tvm_lowbit" / "zoo" / "retrained"
SQ_STAGES = (0.5, 0.75, 0.875, 1.0)


def runs(epochs: int) -> dict[str, tuple[str, str, object, int, float]]:
    """name -> (scheme, config, quantizer config, epochs per stage, lr)."""
    r: dict[str, tuple[str, str, object, int, float]] = {}
    for b in (5, 4, 3, 2):
        r[f"inq-b{b}"] = ("inq", f"b{b}", INQ(bits=b), epochs, 0.01)
    for k in (4, 2):
        r[f"pact-w{k}a{k}"] = ("pact", f"w{k}a{k}", PACT(act_bits=k, weight_bits=k, alpha_init=3.0), 4 * epochs, 0.02)
    for inner in ("twn", "bwn"):
        r[f"sq-{inner}"] = (f"sq-{inner}", "r50-75-87.5-100", SQ(inner=inner, schedule=SQ_STAGES), epochs, 0.02)
        r[inner] = (inner, "r100", SQ(inner=inner, schedule=(1.0,)), 4 * epochs, 0.02)  # same epochs in total
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="all")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per stage (4 stages; single-stage runs get 4x)")
    ap.add_argument("--subset", type=int, default=None, help="training images (default: all 60,000)")
    ap.add_argument("--calib", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    table = runs(args.epochs)
    names = list(table) if args.runs == "all" else args.runs.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; available: {', '.join(table)}")
    xtr, ytr = data.load("train")
    xte, yte = data.load("test")
    calib = data.calibration_set(args.calib)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        scheme, config, cfg, epochs, lr = table[name]
        torch.manual_seed(0)
        model = load_pretrained()
        t0 = time.time()
        print(f"== {name}: {cfg} , {epochs} epochs per stage, lr {lr}", flush=True)
        summary = train(model, cfg, (xtr, ytr), (xte[:2000], yte[:2000]), epochs_per_stage=epochs, lr=lr,
                        subset=args.subset, device=args.device, augment=flip_crop(pad_value=-data.MEAN / data.STD))
        hook = summary["hook"]
        model.cpu()
        qmodel = hook.export(calib)
        path = args.out / f"{name}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"qmodel": qmodel, "scheme": scheme, "config": config, "quantizer": repr(cfg),
                    "epochs_per_stage": epochs, "lr": lr,
                    "subset": args.subset, "device": str(summary.get("device", args.device)),
                    "seconds": time.time() - t0, "stage_accuracy": summary.get("history")}, tmp)
        tmp.replace(path)
        print(f"   saved {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f} s; "
              f"stages: {json.dumps(summary.get('history'), default=str)[:300]}", flush=True)


if __name__ == "__main__":
    main()
