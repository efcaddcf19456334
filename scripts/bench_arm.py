#!/usr/bin/env python3
"""Guest instructions per inference on the emulated Raspberry Pi boards, counted inside the model library.

For each target (rasp4b = Pi 4, qemu -cpu cortex-a72; rasp5 = Pi 5, cortex-a76 with dotprod) and variant:

  tvm-fp32    the float model through TVM's default pipeline (untuned)
  tvm-fgq-n4  FGQ grouped ternary, N=4, 8-bit activations (first conv float, classifier ternary)
  tvm-pow2    the retrained power-of-two INQ model (tvm_lowbit/zoo/retrained/inq-b5.pt): shift-add kernels

the model is compiled for the target, bundled (tvm_lowbit.deploy.bundle) and run by the C++ runner on the
emulated board with one TVM thread, under the TCG plugin that counts executed guest instructions per ELF file
(scripts/board/src/icount.c). The count inside model.so with 1 + K inferences minus the count with 1 inference,
divided by K, is the per-inference count: load and first-call costs cancel. With one thread it is
deterministic (the script runs the 1-inference count twice and fails if they differ). Every run also checks
the board's output against the same model compiled for and run on the host (the runner's --expect). The count
is a proxy for code quality, not for Pi latency: qemu models no caches and no pipeline.

    bash scripts/board/setup.sh                 # once
    python scripts/bench_arm.py --json arm.json # ~5 min on 2 loaded cores

Floor checked at the end: tvm-fgq-n4 executes at most 0.5x the instructions of tvm-fp32 on rasp4b.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_lowbit.deploy.board import BoardError, icount_plugin, qemu_cpu  # noqa: E402

TARGETS = ("rasp4b", "rasp5")
VARIANTS = ("tvm-fp32", "tvm-fgq-n4", "tvm-pow2")
FIELDS = ("model", "variant", "target", "model_insns", "ratio_vs_fp32")
POW2_CHECKPOINT = Path(__file__).resolve().parent.parent / "tvm_lowbit" / "zoo" / "retrained" / "inq-b5.pt"
FLOOR = 0.5


def build_variants(calib: np.ndarray) -> dict[str, Callable[[], nn.Module]]:
    from tvm_lowbit import quantize
    from tvm_lowbit.models import load_pretrained
    from tvm_lowbit.quantizers.fgq import FGQ

    def pow2() -> nn.Module:
        ckpt = torch.load(POW2_CHECKPOINT, map_location="cpu", weights_only=False)  # our own committed file
        return ckpt["qmodel"].eval()

    return {"tvm-fp32": load_pretrained,
            "tvm-fgq-n4": lambda: quantize(load_pretrained(), FGQ(group_size=4, act_bits=8, first_layer="float",
                                                                  last_layer="fgq"), calib, progress=False),
            "tvm-pow2": pow2}


def count_model_insns(bundle: Path, cpu: str, runs: int) -> tuple[int, str]:
    """(instructions executed inside model.so, the runner's check line against the host's output)."""
    from tvm_lowbit.deploy.bundle import run_bundle_emulated

    out = bundle / f"icount-{runs}.json"
    r = run_bundle_emulated(bundle, cpu, runs=runs, plugin=f"{icount_plugin()},out={out},match=/model.so")
    if r.returncode != 0:  # 3: the board's output differs from the host's
        raise BoardError(f"the runner failed on -cpu {cpu} (rc {r.returncode}): {(r.stdout + r.stderr).strip()[-500:]}")
    check = next(line for line in r.stdout.splitlines() if line.startswith("max_abs_diff"))
    return int(json.loads(out.read_text())["matched_insns"]), check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--runs", type=int, default=3, help="K: extra inferences whose count is averaged (default 3)")
    ap.add_argument("--calib", type=int, default=256, help="FGQ calibration images (default 256)")
    ap.add_argument("--json", type=Path, default=None, help="write {'rows': [...]} here")
    args = ap.parse_args()
    targets, variants = args.targets.split(","), args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(1)

    import tvm_lowbit
    from tvm_lowbit import data
    from tvm_lowbit.deploy.bundle import export_bundle
    from tvm_lowbit.deploy.remote import REL_TOLERANCE

    try:
        cpus = {t: qemu_cpu(t) for t in targets}
        icount_plugin()
    except BoardError as e:
        print(f"bench_arm: {e}", file=sys.stderr)
        return 2
    calib = data.calibration_set(args.calib)
    x = data.load("test", limit=1)[0]
    makers = build_variants(calib)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-arm-") as tmp:
        for variant in variants:
            model = makers[variant]()
            host_out = tvm_lowbit.compile(model, x, "x86-host").run(x)
            for target in targets:
                t0 = time.perf_counter()
                art = tvm_lowbit.compile(model, x, target)
                # the runner checks every board run against the host's output: a count of wrong code is no count
                bundle = export_bundle(art, Path(tmp) / f"{variant}-{target}", x, host_out,
                                       REL_TOLERANCE * max(float(np.abs(host_out).max()), 1.0))
                once, check = count_model_insns(bundle, cpus[target], 1)
                again, _ = count_model_insns(bundle, cpus[target], 1)
                if once != again:
                    raise SystemExit(f"bench_arm: {variant} on {target}: instruction counts differ between two "
                                     f"identical runs ({once} vs {again}); was TVM_NUM_THREADS=1 honoured?")
                more, _ = count_model_insns(bundle, cpus[target], 1 + args.runs)
                per = (more - once) // args.runs
                rows.append({"model": "resnet20", "variant": variant, "target": target, "model_insns": per})
                print(f"{variant:11s} {target:7s} (-cpu {cpus[target]}): {per:,d} instructions per inference in "
                      f"model.so; vs host: {check} ({time.perf_counter() - t0:.0f} s)", flush=True)
    fp32 = {r["target"]: r["model_insns"] for r in rows if r["variant"] == "tvm-fp32"}
    for r in rows:
        r["ratio_vs_fp32"] = round(r["model_insns"] / fp32[r["target"]], 4) if r["target"] in fp32 else None
    print()
    print(f"{'model':9s} {'variant':11s} {'target':7s} {'model_insns':>14s} {'ratio_vs_fp32':>14s}")
    for r in rows:
        ratio = "" if r["ratio_vs_fp32"] is None else f"{r['ratio_vs_fp32']:.3f}"
        print(f"{r['model']:9s} {r['variant']:11s} {r['target']:7s} {r['model_insns']:14,d} {ratio:>14s}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [{k: r[k] for k in FIELDS} for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    floor = [r for r in rows if r["variant"] == "tvm-fgq-n4" and r["target"] == "rasp4b" and r["ratio_vs_fp32"]]
    for r in floor:
        ok = r["ratio_vs_fp32"] <= FLOOR
        print(f"floor: tvm-fgq-n4 on rasp4b executes {r['ratio_vs_fp32']:.3f}x the instructions of tvm-fp32 "
              f"(must be <= {FLOOR}): {'PASS' if ok else 'FAIL'}")
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
