#!/usr/bin/env python3
"""Retrain the built-in ResNet-20 with the training quantizers and save the exported fake-quant models
that ``scripts/bench_accuracy.py --retrained`` evaluates (so the table reproduces without retraining).

Every run starts from the FP32 checkpoint (``tvm_lowbit/zoo/resnet20_fmnist.pt``) and uses the built-in
trainer (``tvm_lowbit.quantizers.train``): SGD nesterov, weight decay 5e-4, cosine learning rate
(restarted every stage unless the run says ``cosine-run``), random flips and 2-pixel crops.  Budgets are
equal within each comparison: SQ-TWN and plain TWN (and SQ-BWN / BWN) get the same total epochs, plain
TWN/BWN in one stage.

Runs (``--runs NAME,...``; see ``runs()``):
  inq-b5, inq-b4, inq-b2  INQ, the 4-step portions 50/75/87.5/100 %, one set per layer (the paper)
  inq-b3                  INQ with the paper's 8-step 3-bit portions and one power-of-two set per
                          output channel (the 4-step, per-layer run lost 1.75 points; with the 8 steps
                          alone it still lost 1.7)
  pact-w4a4, pact-w2a2    PACT, 4 stages' worth of epochs in one stage
  sq-twn, twn             SQ-TWN vs TWN as the paper runs them: every conv and linear quantized,
                          one cosine over SQ's four stages (cosine-run)
  sq-twn-code             sq-twn with the reference code's selection rule (SQ(rule="code"))
  sq-bwn, bwn             SQ-BWN vs BWN: first conv and classifier float, cosine restarted per stage

The committed checkpoints were made with (each records its epochs, subset and device):
    python scripts/train_quantized.py --runs inq-b5,inq-b4,inq-b2,pact-w4a4,pact-w2a2,sq-bwn,bwn --epochs 2   # H100
    python scripts/train_quantized.py --runs inq-b3,sq-twn,twn --epochs 1 --subset 30000 --threads 1    # 2-core CPU
Seeds: ``--seeds 1,2`` repeats a run with other seeds (NAME-seedN.pt); the README's multi-seed SQ table
used ``--runs sq-twn,twn,sq-twn-code --seeds 1,2 --epochs 1 --subset 30000 --threads 1``.
On a loaded 2-core CPU one thread per run is much faster than two (OpenMP spin-waits); a 30,000-image
epoch of ResNet-20 takes 2-8 minutes here depending on the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_lowbit import data  # noqa: E402
from tvm_lowbit.models.resnet import load_pretrained  # noqa: E402
from tvm_lowbit.quantizers.inq import INQ, PAPER_PORTIONS  # noqa: E402
from tvm_lowbit.quantizers.pact import PACT  # noqa: E402
from tvm_lowbit.quantizers.sq import SQ  # noqa: E402
from tvm_lowbit.quantizers.train import flip_crop, train  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "tvm_lowbit" / "zoo" / "retrained"
SQ_STAGES = (0.5, 0.75, 0.875, 1.0)


def runs(epochs: int) -> dict[str, tuple[str, str, object, int, float, str]]:
    """name -> (scheme, config, quantizer config, epochs per stage, lr, lr schedule)."""
    r: dict[str, tuple[str, str, object, int, float, str]] = {}
    for b in (5, 4, 2):
        r[f"inq-b{b}"] = ("inq", f"b{b}", INQ(bits=b), epochs, 0.01, "cosine")
    r["inq-b3"] = ("inq", "b3", INQ(bits=3, portions=PAPER_PORTIONS[3], granularity="channel"),
                   epochs, 0.01, "cosine")
    for k in (4, 2):
        r[f"pact-w{k}a{k}"] = ("pact", f"w{k}a{k}", PACT(act_bits=k, weight_bits=k, alpha_init=3.0), 4 * epochs, 0.02,
                               "cosine")
    every = dict(first_layer="sq", last_layer="sq")  # the paper quantizes every layer
    r["sq-twn"] = ("sq-twn", "r50-75-87.5-100", SQ(inner="twn", schedule=SQ_STAGES, **every), epochs, 0.02,
                   "cosine-run")
    # one stage: "cosine" is the same single cosine as SQ's cosine-run, over the same number of steps
    r["sq-twn-code"] = ("sq-twn", "r50-75-87.5-100-code", SQ(inner="twn", schedule=SQ_STAGES, rule="code", **every),
                        epochs, 0.02, "cosine-run")  # the reference code's selection rule (papers.md 2.3)
    r["twn"] = ("twn", "r100", SQ(inner="twn", schedule=(1.0,), **every), 4 * epochs, 0.02, "cosine")
    r["sq-bwn"] = ("sq-bwn", "r50-75-87.5-100", SQ(inner="bwn", schedule=SQ_STAGES), epochs, 0.02, "cosine")
    r["bwn"] = ("bwn", "r100", SQ(inner="bwn", schedule=(1.0,)), 4 * epochs, 0.02, "cosine")  # same epochs in total
    return r


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be >= 0")
    return seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="all")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per stage (4 stages; single-stage runs get 4x)")
    ap.add_argument("--subset", type=int, default=None, help="training images (default: all 60,000)")
    ap.add_argument("--calib", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seeds", type=_seeds, default=[0],
                    help="comma-separated seeds (torch init/data order and SQ's selection); seed 0 saves NAME.pt, "
                         "seed N saves NAME-seedN.pt")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    table = runs(args.epochs)
    names = list(table) if args.runs == "all" else args.runs.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; available: {', '.join(table)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    xtr, ytr = data.load("train")
    xte, yte = data.load("test")
    calib = data.calibration_set(args.calib)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, seed in ((n, s) for n in names for s in args.seeds):
        scheme, config, cfg, epochs, lr, schedule = table[name]
        if isinstance(cfg, SQ):
            cfg = dataclasses.replace(cfg, seed=seed)
        torch.manual_seed(seed)
        model = load_pretrained()
        t0 = time.time()
        print(f"== {name} seed {seed}: {cfg} , {epochs} epochs per stage, lr {lr} ({schedule})", flush=True)
        summary = train(model, cfg, (xtr, ytr), (xte[:2000], yte[:2000]), epochs_per_stage=epochs, lr=lr,
                        lr_schedule=schedule, subset=args.subset, device=args.device, seed=seed,
                        augment=flip_crop(pad_value=-data.MEAN / data.STD))
        hook = summary["hook"]
        model.cpu()
        qmodel = hook.export(calib)
        path = args.out / (f"{name}.pt" if seed == 0 else f"{name}-seed{seed}.pt")
        tmp = path.with_suffix(".tmp")
        torch.save({"qmodel": qmodel, "scheme": scheme, "config": config, "quantizer": repr(cfg),
                    "epochs_per_stage": epochs, "lr": lr, "lr_schedule": schedule,
                    "subset": args.subset, "seed": seed, "device": str(summary.get("device", args.device)),
                    "seconds": time.time() - t0, "stage_accuracy": summary.get("history")}, tmp)
        tmp.replace(path)
        print(f"   saved {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f} s; "
              f"stages: {json.dumps(summary.get('history'), default=str)[:300]}", flush=True)


if __name__ == "__main__":
    main()
