#!/usr/bin/env python3
"""Train the built-in zoo model on Fashion-MNIST and write tvm_lowbit/zoo/<model>_fmnist.pt.

Recipe: SGD (momentum 0.9, nesterov, weight decay 5e-4), one-cycle learning rate (peak 0.1),
batch 128, random horizontal flips and random 2-pixel crops, fixed seeds. Runs on a CUDA GPU
when one is present (about 6 s an epoch on an H100) and on the CPU otherwise (about 16 min an
epoch on 2 cores, so the CPU default is fewer epochs).

The compact model: ``--model mobilenet --epochs 10 --threads 1 --holdout 5000`` (about 50 min on the
shared 2-core CPU; the last 5000 training images are held out as the validation split).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_lowbit import data  # noqa: E402
from tvm_lowbit.models.mobilenet import mobilenet  # noqa: E402
from tvm_lowbit.models.resnet import checkpoint_path, resnet20  # noqa: E402

BUILDERS = {"resnet20": resnet20, "mobilenet": mobilenet}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop (2-pixel zero padding) of a [B, 1, 28, 28] batch in [0, 1]."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (2, 2, 2, 2))
    oh = torch.randint(0, 5, (b,), generator=gen, device=x.device)
    ow = torch.randint(0, 5, (b,), generator=gen, device=x.device)
    ar = torch.arange(28, device=x.device)
    rows = (oh[:, None] + ar)[:, :, None]
    cols = (ow[:, None] + ar)[:, None, :]
    return xp[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols][:, None]


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb = (x[i:i + batch] - data.MEAN) / data.STD
            correct += int((model(xb).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / x.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", choices=sorted(BUILDERS))
    ap.add_argument("--epochs", type=int, default=None, help="default: 20 on a GPU, 2 on the CPU")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help=f"default: {checkpoint_path()}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    ap.add_argument("--holdout", type=int, default=0,
                    help="keep the last N training images out of training (a validation split, e.g. for the per-layer precision search)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or (20 if dev.type == "cuda" else 2)
    out = args.out or checkpoint_path(args.model)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    tr_img, tr_lab = data.load_split("train")
    te_img, te_lab = data.load_split("test")
    keep = len(tr_img) - args.holdout
    xtr = torch.from_numpy(tr_img[:keep].copy()).to(dev).float().div_(255.0)[:, None]
    ytr = torch.from_numpy(tr_lab[:keep]).to(dev)
    xte = torch.from_numpy(te_img.copy()).to(dev).float().div_(255.0)[:, None]
    yte = torch.from_numpy(te_lab).to(dev)

    model = BUILDERS[args.model]().to(dev)
    if args.model == "mobilenet":  # depthwise convs train ~1.6x faster in NHWC on the CPU
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = (xtr.shape[0] + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=epochs, steps_per_epoch=steps)
    print(f"training {args.model} on {dev} for {epochs} epochs ({steps} steps each)", flush=True)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(xtr.shape[0], generator=gen, device=dev)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs}", leave=False, mininterval=2.0)
        loss_sum = 0.0
        for s in bar:
            idx = perm[s * args.batch:(s + 1) * args.batch]
            xb = (augment(xtr[idx], gen) - data.MEAN) / data.STD
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
            if s % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        acc = evaluate(model, xte, yte)
        print(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / steps:.4f}  test top-1 {acc:.2f}%  "
              f"({time.time() - t0:.0f} s)", flush=True)
    acc = evaluate(model, xte, yte)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "model": args.model, "test_top1": acc, "epochs": epochs, "seed": args.seed,
                "device": str(dev), "holdout": args.holdout, "recipe": "SGD nesterov wd5e-4 one-cycle lr0.1 bs128 flip+crop2"}, tmp)
    tmp.replace(out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB): test top-1 {acc:.2f}%")


if __name__ == "__main__":
    main()
