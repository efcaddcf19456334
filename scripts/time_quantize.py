"""How long quantization takes on a real-size model: FGQ N=4, int8 (Auto with formats=("int8",)) and
Auto, on EfficientNet-Lite2 (real weights, 260x260) or a torchvision architecture at 224x224 with 64 calibration images (issue 16's floor: FGQ or
int8 <= 3 minutes, Auto <= 20 minutes on 2 cores).

    python scripts/time_quantize.py [--model efficientnet_b0] [--calib 64] [--val 64] [--threads 2]
        [--schemes fgq-n4,int8,auto] [--budget agree>=90] [--json out.json]

Random weights (the zoo's torchvision models, batch norms calibrated on photo views) are fine for
timing; calibration and validation inputs are views of the calibration / evaluation photos
(``models/photos.py``).  The table prints wall seconds and process CPU seconds per scheme (on a shared,
oversubscribed machine the CPU seconds bound what an idle 2-core machine needs: wall <= CPU there),
of which system time (page faults of large temporaries, see ``quantizers.memory``), the load average,
and the model's parameter count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tvm_lowbit import FGQ, quantize  # noqa: E402
from tvm_lowbit.formats import avg_weight_bits  # noqa: E402
from tvm_lowbit.models import efficientnet_lite, photos, zoo  # noqa: E402
from tvm_lowbit.quantizers.auto import Auto  # noqa: E402


def build(name: str, n_calib: int, n_val: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, calibration views, validation views): ``efficientnet-lite2`` (real ImageNet weights, 260x260)
    or the zoo's torchvision model (random weights, batch norm calibrated on photo views, 224x224).
    Views are taken evenly over all photos (16 per photo, then the first ``n`` of a fixed shuffle)."""
    pick = lambda x, n: x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]  # noqa: E731
    if name == efficientnet_lite.NAME:
        s = efficientnet_lite.SIZE
        return (efficientnet_lite.load(), pick(efficientnet_lite.normalize(photos.views("calib", s, 16)), n_calib),
                pick(efficientnet_lite.normalize(photos.views("eval", s, 16)), n_val))
    return (zoo.load(name, 224), pick(zoo.normalize(photos.views("calib", 224, 16)), n_calib),
            pick(zoo.normalize(photos.views("eval", 224, 16)), n_val))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_b0", help="a zoo architecture or efficientnet-lite2")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schemes", default="fgq-n4,int8,auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget", default="agree>=90", help="Auto's budget (checked on the calibration views)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, calib, val = build(a.model, a.calib, a.val)
    params = sum(p.numel() for p in model.parameters())
    print(f"{a.model}: {params / 1e6:.2f} M parameters, {len(calib)} calibration and {len(val)} validation views "
          f"{tuple(calib.shape[1:])}, {a.threads} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    # the configurations of scripts/bench_models.py (int8_config, auto_config), without the sensitivity cache
    configs = {"fgq-n4": FGQ(group_size=4),
               "int8": Auto(budget="agree>=0", formats=("int8",), calibration="best", use_cache=False),
               "auto": Auto(budget=a.budget, formats=("int4", "int8", "float"), calibration="best", sensitivity_images=16,
                            max_evals=8, use_cache=False)}
    rows = []
    for scheme in a.schemes.split(","):
        cfg = configs[scheme]
        t0, c0, s0 = time.time(), time.process_time(), os.times().system
        # Auto checks its budget on the calibration views (as bench_models does); agreement is measured on
        # the evaluation views, which no quantizer sees
        q = quantize(model, cfg, calib, calib if isinstance(cfg, Auto) else None)
        dt, cpu, sys_s = time.time() - t0, time.process_time() - c0, os.times().system - s0
        with torch.no_grad():
            agree = 100.0 * float((model(val).argmax(-1) == q(val).argmax(-1)).double().mean())
        rows.append({"model": a.model, "params": params, "scheme": scheme, "quantize_s": round(dt, 1),
                     "cpu_s": round(cpu, 1), "sys_s": round(sys_s, 1), "load_avg": round(os.getloadavg()[0], 1),
                     "avg_weight_bits": round(avg_weight_bits(q), 2), "agree_top1": round(agree, 1),
                     "calib": a.calib, "threads": a.threads})
        print(f"{a.model:18s} {params / 1e6:5.2f} M  {scheme:8s} {dt:8.1f} s wall {cpu:8.1f} s CPU ({sys_s:.1f} s system)  "
              f"{avg_weight_bits(q):5.2f} bits  agree {agree:5.1f}%  (load average {os.getloadavg()[0]:.1f})", flush=True)
    print()
    print(f"{'model':18s} {'params':>8s} {'scheme':8s} {'wall':>9s} {'CPU':>9s} {'load':>5s} {'bits':>6s} {'agree':>7s}")
    for r in rows:
        print(f"{r['model']:18s} {r['params'] / 1e6:7.2f}M {r['scheme']:8s} {r['quantize_s']:8.1f}s {r['cpu_s']:8.1f}s "
              f"{r['load_avg']:5.1f} {r['avg_weight_bits']:6.2f} {r['agree_top1']:6.1f}%")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
