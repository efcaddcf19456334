#!/usr/bin/env python3
"""VTA benchmark: per-layer cycles, GEMM-core utilization and weight bytes from the cycle model, and a
bit-exactness check of the functional simulator against the NumPy integer reference.

Models: the built-in ResNet-20 quantized with FGQ (N=4, 8-bit activations, 7-bit alpha codes so that
ternary x alpha fits int8 exactly), and -- for the narrow-weight core variants -- the retrained TWN model
on the int8 core and on a 2-bit ternary core, and INQ 4-bit on the int8 core and on a 4-bit shift-add
core.  Everything is measured on the fly:

    python scripts/bench_vta.py                          # vta-sim (PYNQ timing), batch 1
    python scripts/bench_vta.py --target vta-ultra96 --batch 4 --json vta.json

``--json PATH`` writes ``{"rows": [{"model", "layer", "cycles", "gemm_bound_cycles", "utilization",
"weight_bytes", "matches_reference"}, ...]}`` (each row also has ``compute_ceiling`` -- GEMM / (GEMM + reset +
ALU) cycles, what the ISA allows with every DMA and start-up cost hidden -- and ``schedule``) and a per-model
``summary``.  Floors checked at the end (exit status 1 if one fails):
every row matches the reference; the built-in model's conv layers reach 70% of the GEMM bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_lowbit import FGQ, data, quantize  # noqa: E402
from tvm_lowbit.models.resnet import load_pretrained  # noqa: E402
from tvm_lowbit.targets import load_target  # noqa: E402
from tvm_lowbit.vta.config import VTAConfig  # noqa: E402
from tvm_lowbit.vta.model import Partition, plan, vta_forward  # noqa: E402

RETRAINED = Path(__file__).resolve().parent.parent / "tvm_lowbit" / "zoo" / "retrained"
FLOOR = 0.70


def check_layers(q: nn.Module, part: Partition, x: np.ndarray, batch: int) -> dict[str, bool]:
    """Run ``x`` batch by batch with the VTA layers on the simulator and on the NumPy reference;
    per layer, whether every int8 output (and, overall, the logits) were identical."""
    ok = {n: True for n in part.layers}
    for i in range(0, len(x) - batch + 1, batch):
        xb = torch.from_numpy(x[i:i + batch])
        rec = {}
        for ex in ("sim", "reference"):
            rec[ex] = {}
            with vta_forward(q, part, ex, rec[ex]) as m, torch.no_grad():
                rec[ex]["__out__"] = m(xb).numpy()
        for n in part.layers:
            ok[n] &= bool(np.array_equal(rec["sim"][n], rec["reference"][n]))
        if not np.array_equal(rec["sim"]["__out__"], rec["reference"]["__out__"]):
            ok = {n: False for n in ok}
    return ok


def rows_for(model_name: str, q: nn.Module, cfg: VTAConfig, calib: np.ndarray | None, x: np.ndarray,
             batch: int) -> tuple[list[dict], Partition]:
    part = plan(q, x[:batch], cfg, calib=calib, progress=True)
    ok = check_layers(q, part, x, batch)
    rows = []
    for name, layer in part.layers.items():
        rows.append({"model": model_name, "layer": name, "cycles": layer.cycles.total_cycles,
                     "gemm_bound_cycles": layer.gemm_bound_cycles,
                     "utilization": round(layer.gemm_bound_cycles / layer.cycles.total_cycles, 4),
                     "weight_bytes": layer.weight_bytes, "matches_reference": ok[name],
                     # what the ISA allows even with every DMA / issue / start-up cost hidden
                     "compute_ceiling": round(layer.cycles.compute_ceiling, 4),
                     "schedule": layer.lowered.tiling.order
                     + (" +prefetched weights" if layer.lowered.info.get("weights_preloaded") else "")})
    return rows, part


def agreement(q: nn.Module, part: Partition, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(top-1 of the fake-quant model, top-1 of the VTA model, % of images where they agree)."""
    with torch.no_grad():
        fq = np.concatenate([q(torch.from_numpy(x[i:i + 250])).argmax(1).numpy() for i in range(0, len(x), 250)])
        with vta_forward(q, part, "torch") as m:
            vt = np.concatenate([m(torch.from_numpy(x[i:i + 250])).argmax(1).numpy() for i in range(0, len(x), 250)])
    return 100 * float((fq == y).mean()), 100 * float((vt == y).mean()), 100 * float((fq == vt).mean())


def print_rows(rows: list[dict]) -> None:
    print(f"{'model':44s} {'layer':20s} {'cycles':>8s} {'GEMM bound':>10s} {'util':>6s} {'ceiling':>7s} "
          f"{'weight B':>9s} {'exact':>6s}  schedule")
    for r in rows:
        print(f"{r['model']:44s} {r['layer']:20s} {r['cycles']:8d} {r['gemm_bound_cycles']:10d} "
              f"{100 * r['utilization']:5.1f}% {100 * r['compute_ceiling']:6.1f}% {r['weight_bytes']:9d} "
              f"{'yes' if r['matches_reference'] else 'NO':>6s}  {r['schedule']}")


def summaries(rows: list[dict]) -> dict[str, dict]:
    """Per model: every layer's cycles and GEMM bound summed (the layers run one after the other)."""
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["model"], {"layers": 0, "cycles": 0, "gemm_bound_cycles": 0, "layers_at_floor": 0})
        s["layers"] += 1
        s["cycles"] += r["cycles"]
        s["gemm_bound_cycles"] += r["gemm_bound_cycles"]
        s["layers_at_floor"] += r["utilization"] >= FLOOR
    for s in out.values():
        s["utilization"] = round(s["gemm_bound_cycles"] / s["cycles"], 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="vta-sim", help="a VTA preset: vta-sim (default), vta-pynq, vta-ultra96, vta-zcu104")
    ap.add_argument("--batch", type=int, default=1, help="images per VTA program (default 1)")
    ap.add_argument("--images", type=int, default=4, help="test images run on the simulator vs the reference (default 4)")
    ap.add_argument("--agree-images", type=int, default=1000, help="test images for the top-1 agreement (default 1000)")
    ap.add_argument("--calib", type=int, default=512, help="calibration images (default 512)")
    ap.add_argument("--no-variants", action="store_true", help="skip the ternary / shift-add core variants")
    ap.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = load_target(args.target).vta_config()
    print(cfg.describe(), flush=True)
    calib = data.calibration_set(args.calib)
    x, y = data.load("test", limit=max(args.agree_images, args.images))
    images = x[:max(args.images, args.batch)]

    fgq = FGQ(group_size=4, act_bits=8, alpha_bits=7)
    q = quantize(load_pretrained(), fgq, calib, progress=False)
    main_name = f"resnet20 fgq-n4-a8-alpha7 ({cfg.name}, b{args.batch})"
    rows, part = rows_for(main_name, q, cfg, calib, images, args.batch)
    print(part.text())
    if args.agree_images > 0:
        fq_top1, vta_top1, agree = agreement(q, part, x[:args.agree_images], y[:args.agree_images])
        print(f"top-1 on {args.agree_images} test images: fake-quant {fq_top1:.2f}%, VTA model {vta_top1:.2f}%, "
              f"same prediction on {agree:.2f}%", flush=True)

    variant_summary = []
    if not args.no_variants:
        for zoo, path in (("twn", "ternary"), ("inq-b4", "pow2")):
            ckpt = RETRAINED / f"{zoo}.pt"
            if not ckpt.is_file():
                print(f"(skipping the {path} core: {ckpt} is missing)")
                continue
            zq = torch.load(ckpt, map_location="cpu", weights_only=False)["qmodel"].eval()
            for vcfg in (cfg, cfg.with_weight_path(path)):
                vrows, vpart = rows_for(f"{zoo} ({vcfg.name}, b{args.batch})", zq, vcfg, calib, images[:args.batch],
                                        args.batch)
                rows += vrows
                variant_summary.append((zoo, vcfg, sum(r["weight_bytes"] for r in vrows), sum(r["cycles"] for r in vrows),
                                        len(vrows)))

    print()
    print_rows(rows)
    if variant_summary:
        print("\nweight path: bytes of weights moved per inference / weight SRAM of the core / cycles of the VTA layers")
        for zoo, vcfg, wb, cyc, n in variant_summary:
            print(f"  {zoo:7s} {vcfg.name:22s} {vcfg.weight_path:8s} {wb:9,d} B  {vcfg.sram_bytes['wgt'] // 1024:4d} KiB  "
                  f"{cyc:9,d} cycles ({n} layers)")
    summary = summaries(rows)
    print("\noverall (all VTA layers of a model, one after the other):")
    for model, sm in summary.items():
        print(f"  {model:44s} {sm['cycles']:9,d} cycles, GEMM bound {sm['gemm_bound_cycles']:9,d}: "
              f"{100 * sm['utilization']:.1f}% utilization; {sm['layers_at_floor']}/{sm['layers']} layers >= "
              f"{100 * FLOOR:.0f}%")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
        print(f"\nwrote {len(rows)} rows to {args.json}")

    exact = all(r["matches_reference"] for r in rows)
    convs = [r for r in rows if r["model"] == main_name]
    low = [r for r in convs if r["utilization"] < FLOOR]
    print(f"\nfloor: every row matches the reference: {'MET' if exact else 'NOT MET'}")
    below = ", ".join(f"{r['layer']} {100 * r['utilization']:.1f}% (ISA ceiling {100 * r['compute_ceiling']:.1f}%)"
                      for r in low)
    print(f"floor: the built-in model's conv layers reach {100 * FLOOR:.0f}% of the GEMM bound: "
          f"{'MET' if not low else 'NOT MET'} ({len(convs) - len(low)}/{len(convs)} layers"
          + (f"; below: {below})" if low else ")"))
    print(f"({time.time() - t0:.0f} s)")
    return 0 if exact and not low else 1


if __name__ == "__main__":
    sys.exit(main())
