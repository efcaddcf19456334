#!/usr/bin/env python3
"""VTA benchmark: a ResNet whose whole body runs on VTA as integer-only layers (``tvm_lowbit.vta.integer``):
per-layer cycles, GEMM-core utilization and DMA/compute overlap from the cycle model, a bit-exactness check
of the functional simulator against the NumPy integer reference, and an end-to-end estimate that adds the
host's share (stem, pooling, classifier) on the board's CPU.

    python scripts/bench_vta.py --model resnet20                    # built-in Fashion-MNIST ResNet-20
    python scripts/bench_vta.py --model resnet20 --agree-images 10000   # + top-1 on the whole test set
    python scripts/bench_vta.py --model resnet18-224 --json r18.json    # random-weight ResNet-18, 224x224
    python scripts/bench_vta.py --model resnet18-224 --core ternary-wide
    python scripts/bench_vta.py --model resnet20 --quick                # CI: fewer images, no accuracy run

``--json PATH`` writes ``{"rows": [...], "summary": {...}}``: one row per VTA layer (``model``, ``layer``,
``cycles``, ``gemm_bound_cycles``, ``utilization``, ``weight_bytes``, ``matches_reference``,
``compute_ceiling`` -- GEMM / (GEMM + reset + ALU) cycles, what the ISA allows with every DMA and start-up
cost hidden -- ``schedule``, ``dma_overlap``, ``core``) and a row with ``layer`` = ``total`` (``cycles``,
``utilization`` of the GEMM bound, ``host_roundtrips`` -- host ops between the first and the last VTA layer
-- ``core``, the end-to-end estimate; on a non-int8 core also ``int8_cycles`` and ``ratio_to_int8``).
Floors checked at the end (exit status 1 if one fails): every simulated layer matches the reference; for
resnet18-224 on the int8 core: <= 7.73 M cycles, >= 85 % of the GEMM bound, every conv layer >= 70 %, no
host round trip; on the ternary-wide core: at most half the int8 core's cycles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_lowbit import FGQ, data, quantize  # noqa: E402
from tvm_lowbit.models.resnet import load_pretrained  # noqa: E402
from tvm_lowbit.models.resnet_imagenet import resnet18  # noqa: E402
from tvm_lowbit.targets import load_target  # noqa: E402
from tvm_lowbit.vta import integer  # noqa: E402
from tvm_lowbit.vta.config import CORES  # noqa: E402

LAYER_FLOOR = 0.70
R18_CYCLES = 7_730_000      # upstream VTA's ResNet-18 in the cycle-accurate simulator (apache/tvm-vta#30)
R18_UTIL = 0.85
# the board CPU's throughput for the host part (float convolution / dense MACs per second): an ESTIMATE for
# the PYNQ's 2x Cortex-A9 at 650 MHz with NEON (~1 fp32 MAC per cycle per core at 50 % efficiency), not measured
HOST_GMACS = 0.65


def build(model: str, core: str, calib_n: int, quick: bool) -> tuple[torch.nn.Module, integer.IntNet, tuple, np.ndarray]:
    """(fake-quant model, integer net, input shape of one image, calibration images)."""
    fgq = FGQ(group_size=4, act_bits=8, alpha_bits=7)
    if model == "resnet20":
        calib = data.calibration_set(calib_n)
        q = quantize(load_pretrained(), fgq, calib, progress=False)
        shape = (1, 28, 28)
    else:  # random weights: the cycles, not the accuracy, are measured
        hw = 64 if quick else 224
        calib = np.random.default_rng(0).standard_normal((2, 3, hw, hw)).astype(np.float32)
        q = quantize(resnet18(), fgq, calib, progress=False)
        shape = (3, hw, hw)
    net = integer.from_resnet(q, calib, batch=8)
    if core == "ternary-wide":
        net = integer.ternarize(net)
    return q, net, shape, calib


def host_macs(q: torch.nn.Module, shape: tuple) -> int:
    """MACs of the host part: the stem conv and the classifier."""
    _, h, w = shape
    c1 = q.conv1
    oh = (h + 2 * c1.padding[0] - c1.kernel_size[0]) // c1.stride[0] + 1
    ow = (w + 2 * c1.padding[1] - c1.kernel_size[1]) // c1.stride[1] + 1
    return oh * ow * c1.out_channels * c1.in_channels * c1.kernel_size[0] * c1.kernel_size[1] + q.fc.weight.numel()


def check(netp: integer.NetProgram, codes: np.ndarray, layers: list[str] | None) -> dict[str, bool]:
    """Simulator vs NumPy reference, per layer (on ``layers`` only, fed the reference's inputs)."""
    ref = integer.reference(netp.net, codes)
    inputs = {}
    if layers is not None:
        for l in netp.net.layers:
            if l.name in layers:
                inputs[l.inp] = ref[l.inp]
                if l.sc_inp:
                    inputs[l.sc_inp] = ref[l.sc_inp]
    out = netp.run(codes, layers=layers, inputs=inputs)
    return {l.name: bool(np.array_equal(out[l.out], ref[l.out])) for l in netp.net.layers if l.out in out
            and (layers is None or l.name in layers)}


def accuracy(q: torch.nn.Module, net: integer.IntNet, n: int) -> tuple[float, float, float]:
    x, y = data.load("test", limit=n)
    fq, it = [], []
    with torch.no_grad():
        for i in range(0, len(x), 500):
            xb = torch.from_numpy(x[i:i + 500])
            fq.append(q(xb).argmax(1).numpy())
            it.append(integer.torch_forward(net, xb).argmax(1).numpy())
    fq, it = np.concatenate(fq), np.concatenate(it)
    return 100 * float((fq == y).mean()), 100 * float((it == y).mean()), 100 * float((fq == it).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", choices=("resnet20", "resnet18-224"))
    ap.add_argument("--core", default="int8", choices=CORES, help="int8 (the preset's core) or ternary-wide")
    ap.add_argument("--target", default="vta-sim", help="a VTA preset: vta-sim (default), vta-pynq, ...")
    ap.add_argument("--batch", type=int, default=1, help="images per VTA program (default 1)")
    ap.add_argument("--images", type=int, default=1, help="images run on the simulator vs the reference")
    ap.add_argument("--sim-layers", default="all",
                    help="'all', or a comma list of layer names to simulate (each fed the reference's input)")
    ap.add_argument("--agree-images", type=int, default=1000,
                    help="resnet20: test images for the top-1 of the integer model vs fake-quant (0: skip)")
    ap.add_argument("--calib", type=int, default=512, help="calibration images (resnet20)")
    ap.add_argument("--host-gmacs", type=float, default=HOST_GMACS,
                    help=f"board CPU GMAC/s for the host share (default {HOST_GMACS}: an estimate for the PYNQ)")
    ap.add_argument("--quick", action="store_true", help="CI: resnet18 at 64x64, 128 calibration images, no accuracy")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.calib, args.agree_images = min(args.calib, 128), 0
    t0 = time.time()
    cfg = load_target(args.target).vta_config().core(args.core)
    print(cfg.describe(), flush=True)
    q, net, shape, calib = build(args.model, args.core, args.calib, args.quick)
    label = f"{args.model}{'@64' if args.quick and args.model != 'resnet20' else ''} ({cfg.name}, b{args.batch})"
    shapes = net.shapes(args.batch, shape[1:], shape[0])
    netp = integer.lower_net(net, cfg, shapes, progress=True)
    print("\npartition (in execution order):")
    for op, where, what in net.ops():
        print(f"  {where:4s} {op:16s} {what}")
    print(f"host round trips between the first and the last VTA layer: {net.host_roundtrips()}")

    # simulator vs reference
    layers = None if args.sim_layers == "all" else [s.strip() for s in args.sim_layers.split(",")]
    if args.model == "resnet20":
        x = data.load("test", limit=max(args.images, 1) * args.batch)[0]
    else:
        x = np.random.default_rng(1).standard_normal((max(args.images, 1) * args.batch,) + shape).astype(np.float32)
    ok: dict[str, bool] = {}
    ts = time.time()
    for i in range(0, len(x), args.batch):
        for name, good in check(netp, net.stem_codes(x[i:i + args.batch]), layers).items():
            ok[name] = ok.get(name, True) and good
    print(f"simulated {len(ok)} layer(s) on {len(x)} image(s) in {time.time() - ts:.0f} s", flush=True)

    rows = []
    for l in net.layers:
        c = netp.cycles[l.name]
        gb = netp.gemm_bound(l.name)
        rows.append({"model": label, "layer": l.name, "cycles": c.total_cycles, "gemm_bound_cycles": gb,
                     "utilization": round(gb / c.total_cycles, 4), "weight_bytes": len(netp.programs[l.name].program.constants["wgt"])
                     + len(netp.programs[l.name].program.constants.get("wgt_sc", b"")),
                     "matches_reference": ok.get(l.name), "compute_ceiling": round(c.compute_ceiling, 4),
                     "schedule": netp.programs[l.name].tiling.order + (f" + {l.sc_kind} shortcut" if l.sc_kind else ""),
                     "dma_overlap": round(c.dma_overlap, 4), "core": args.core})
    cyc = sum(r["cycles"] for r in rows)
    gb = sum(r["gemm_bound_cycles"] for r in rows)
    busy = {m: sum(netp.cycles[l.name].busy[m] for l in net.layers) for m in ("load", "compute", "store")}
    dma = busy["load"] + busy["store"]
    overlap = 1.0 if dma == 0 else min(1.0, max(0.0, 1 - (cyc - busy["compute"]) / dma))
    vta_ms = cyc / (cfg.clock_mhz * 1e3)
    hmacs = host_macs(q, shape) * args.batch
    host_ms = hmacs / (args.host_gmacs * 1e9) * 1e3
    simulated = [r["matches_reference"] for r in rows if r["matches_reference"] is not None]
    total = {"model": label, "layer": "total", "cycles": cyc, "gemm_bound_cycles": gb, "utilization": round(gb / cyc, 4),
             "host_roundtrips": net.host_roundtrips(), "core": args.core,
             "matches_reference": bool(simulated) and all(simulated), "layers_simulated": len(simulated),
             "dma_overlap": round(overlap, 4), "busy": busy, "vta_ms": round(vta_ms, 3),
             "host_macs": hmacs, "host_ms_estimate": round(host_ms, 3),
             "end_to_end_ms_estimate": round(vta_ms + host_ms, 3), "host_gmacs_assumed": args.host_gmacs,
             "layers_at_floor": sum(r["utilization"] >= LAYER_FLOOR for r in rows), "layers": len(rows)}

    print(f"\n{'layer':18s} {'cycles':>9s} {'GEMM bound':>10s} {'util':>6s} {'ceiling':>7s} {'overlap':>7s} "
          f"{'weight B':>9s} {'exact':>6s}  schedule")
    for r in rows:
        ex = {True: "yes", False: "NO", None: "-"}[r["matches_reference"]]
        print(f"{r['layer']:18s} {r['cycles']:9d} {r['gemm_bound_cycles']:10d} {100 * r['utilization']:5.1f}% "
              f"{100 * r['compute_ceiling']:6.1f}% {100 * r['dma_overlap']:6.1f}% {r['weight_bytes']:9d} {ex:>6s}  "
              f"{r['schedule']}")
    print(f"{'total':18s} {cyc:9d} {gb:10d} {100 * gb / cyc:5.1f}% {'':7s} {100 * overlap:6.1f}%")
    print(f"\n{label}: {cyc:,d} cycles = {vta_ms:.2f} ms at {cfg.clock_mhz:g} MHz, GEMM utilization {100 * gb / cyc:.1f}%, "
          f"DMA/compute overlap {100 * overlap:.1f}% (busy: " + ", ".join(f"{m} {v:,d}" for m, v in busy.items()) + ")")
    print(f"end-to-end estimate: VTA {vta_ms:.2f} ms + host {host_ms:.2f} ms ({hmacs / 1e6:.1f} M MACs of stem + "
          f"classifier at an assumed {args.host_gmacs} GMAC/s) = {vta_ms + host_ms:.2f} ms per batch of {args.batch}")

    if args.core != "int8" and not args.quick:  # the int8 core on the same network, cycle model only
        base = load_target(args.target).vta_config()
        _, inet, _, _ = build(args.model, "int8", args.calib, args.quick)
        icyc = integer.lower_net(inet, base, shapes, progress=True).total_cycles
        total.update({"int8_cycles": icyc, "ratio_to_int8": round(cyc / icyc, 4)})
        print(f"{args.core} vs int8 ({base.name}): {cyc:,d} vs {icyc:,d} cycles = {cyc / icyc:.3f}x")
    if args.model == "resnet20" and args.agree_images > 0:
        fq, it, agree = accuracy(q, net, args.agree_images)
        total.update({"top1_fake_quant": round(fq, 2), "top1_vta_integer": round(it, 2), "accuracy_images": args.agree_images})
        print(f"top-1 on {args.agree_images} test images: fake-quant FGQ {fq:.2f}%, integer VTA model {it:.2f}% "
              f"({it - fq:+.2f} pp), same prediction on {agree:.2f}%")
    rows.append(total)
    if args.json:
        partition = [{"op": op, "where": where, "what": what} for op, where, what in net.ops()]
        args.json.write_text(json.dumps({"rows": rows, "summary": {label: total}, "partition": partition}, indent=2))
        print(f"\nwrote {len(rows)} rows to {args.json}")

    exact = bool(simulated) and all(simulated)
    print(f"\nfloor: every simulated layer matches the integer reference bit for bit: {'MET' if exact else 'NOT MET'} "
          f"({len(simulated)} layers)")
    fail = not exact
    if args.model == "resnet18-224" and args.core == "int8" and not args.quick:
        low = [r for r in rows[:-1] if r["utilization"] < LAYER_FLOOR]
        for what, good in ((f"<= {R18_CYCLES / 1e6:.2f} M cycles ({cyc / 1e6:.3f} M)", cyc <= R18_CYCLES),
                           (f">= {100 * R18_UTIL:.0f}% of the GEMM bound ({100 * gb / cyc:.1f}%)", gb / cyc >= R18_UTIL),
                           (f"every conv layer >= {100 * LAYER_FLOOR:.0f}% ({len(rows) - 1 - len(low)}/{len(rows) - 1}"
                            + ("; below: " + ", ".join(f"{r['layer']} {100 * r['utilization']:.1f}%" for r in low) if low else "")
                            + ")", not low),
                           (f"no host round trip between the stem and the pooling ({net.host_roundtrips()})",
                            net.host_roundtrips() == 0)):
            print(f"floor: {what}: {'MET' if good else 'NOT MET'}")
            fail |= not good
    if "ratio_to_int8" in total and args.model == "resnet18-224":
        good = total["ratio_to_int8"] <= 0.5
        print(f"floor: the {args.core} core runs it in at most half the int8 core's cycles "
              f"({total['ratio_to_int8']:.3f}x): {'MET' if good else 'NOT MET'}")
        fail |= not good
    print(f"({time.time() - t0:.0f} s)")
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
