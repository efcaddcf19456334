#!/usr/bin/env python3
"""Fashion-MNIST test top-1 of the built-in ResNet-20: FP32, FGQ (N x activation bits), the models
retrained by scripts/train_quantized.py (INQ, PACT, SQ, TWN, BWN; committed in tvm_lowbit/zoo/retrained,
evaluated here, not retrained) and a
per-layer ternary (TWN, one alpha per layer) baseline with the same activation quantization, the same
calibration and the same batch-norm re-estimation, so only the weight grouping differs.

The compact model (``--models mobilenet``, MobileNetV2-style) gets uniform FGQ N=4, uniform int4 and
int8 weights on every layer, and the per-layer mix that ``Auto`` finds under an accuracy budget on
the held-out validation split (the last 5000 training images, never trained on); the mix is then
compiled for this x86 host (predictions compared with its fake-quant model on every test image) and
cross-compiled for the Pi targets.  Every row carries ``avg_weight_bits``: 8 * the bytes of every
Conv2d/Linear weight as compiled (codes, scale codes, per-channel scales; float layers at 32 bits)
divided by the number of weights.

Everything is measured on the fly (nothing is hard-coded):

    python scripts/bench_accuracy.py                       # full 10k test set, 2048 calibration images
    python scripts/bench_accuracy.py --limit 1000 --json acc.json
    # FGQ's alpha width and stem (issue 17): 7-bit alpha codes make alpha * t an int8 (the VNNI kernels)
    python scripts/bench_accuracy.py --models resnet20 --retrained skip --group-sizes 4 --act-bits 8 \
        --alpha-bits 8,7 --first-layer int8,float

ResNet-20 also gets an ``ort-int8`` row (unless ``--no-ort``): onnxruntime's static int8 of the same FP32
model (QDQ, per-channel int8 weights, uint8 activations, MinMax on the same calibration images; run at
batch 1 on every test image), the runtime a user would otherwise deploy.
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
from tvm_lowbit.formats import avg_weight_bits  # noqa: E402
from tvm_lowbit.models.mobilenet import calibration_split, validation_split  # noqa: E402
from tvm_lowbit.models.resnet import load_pretrained  # noqa: E402
from tvm_lowbit.quantizers import FGQ, quantize  # noqa: E402
from tvm_lowbit.quantizers.auto import Auto, WeightMaker, build_mixed  # noqa: E402
from tvm_lowbit.quantizers.fgq import selected_layers  # noqa: E402
from tvm_lowbit.quantizers.surgery import execution_order  # noqa: E402

RETRAINED = Path(__file__).resolve().parent.parent / "tvm_lowbit" / "zoo" / "retrained"
RETRAINED_ORDER = {n: i for i, n in enumerate(("inq-b5", "inq-b4", "inq-b3", "inq-b2", "pact-w4a4", "pact-w2a2",
                                                  "twn", "sq-twn", "bwn", "sq-bwn"))}
GROUP_SIZES = (4, 8, 16, 32, 64)
ACT_BITS = (8, 4)
FIELDS = ("model", "scheme", "config", "top1", "fp32_top1", "drop_pp", "avg_weight_bits")
PI_TARGETS = {"rasp4b": "AArch64", "rasp5": "AArch64", "rasp3b": "ARM"}  # readelf -h machine of the export


ORT_INT8 = "ort-int8"


def ort_int8_top1(model: nn.Module, calib: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Top-1 % of onnxruntime's static int8 model (``baselines.ort_int8``: QDQ, per-channel int8 weights,
    uint8 activations, MinMax on the same calibration images) on the test images, and its average weight
    bits (8 x its int8 initializer bytes / the Conv2d and Linear weights of the FP32 model)."""
    from tvm_lowbit.baselines import ort_int8

    ort = ort_int8(model, x[:1], calib)
    pred = np.array([int(ort.run(x[i:i + 1]).argmax()) for i in range(len(x))])
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return 100.0 * float((pred == y).mean()), 8.0 * ort.weight_bytes / n


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


def compiled_checks(q: nn.Module, x: np.ndarray, batch: int = 100) -> dict[str, object]:
    """Compile ``q`` for this host, run every image, compare predictions with the fake-quant model; then
    cross-compile and export for each Pi target and read the library's ELF machine."""
    import subprocess
    import tempfile

    import tvm_lowbit
    from tvm_lowbit import evaluate

    out: dict[str, object] = {}
    t0 = time.perf_counter()
    art = tvm_lowbit.compile(q, x[:batch], "x86-host")
    pred = evaluate.predictions(art, x, progress=True)
    with torch.inference_mode():
        ref = torch.cat([q(torch.from_numpy(x[i:i + 500])).argmax(1) for i in range(0, len(pred), 500)]).numpy()
    out["x86-host"] = {"images": int(len(pred)), "agree_with_fake_quant_pct": round(100.0 * float((pred == ref).mean()), 3),
                       "lowered": len(art.report.lowered), "fallback": len(art.report.fallback),
                       "kernels": sorted(set(art.report.kernels.values())), "weight_bytes": art.weight_bytes,
                       "seconds": round(time.perf_counter() - t0, 1)}
    print(f"  x86-host: {art.report.text()}; compiled predictions equal the fake-quant model's on "
          f"{out['x86-host']['agree_with_fake_quant_pct']}% of {len(pred)} test images", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for target, machine in PI_TARGETS.items():
            t0 = time.perf_counter()
            a = tvm_lowbit.compile(q, x[:1], target)
            lib = a.export(Path(tmp) / target) / "model.so"
            header = subprocess.run(["readelf", "-h", str(lib)], capture_output=True, text=True).stdout
            got = next((ln.split(":", 1)[1].strip() for ln in header.splitlines() if "Machine:" in ln), "?")
            out[target] = {"elf_machine": got, "expected": machine, "ok": machine in got,
                           "lowered": len(a.report.lowered), "fallback": len(a.report.fallback),
                           "seconds": round(time.perf_counter() - t0, 1)}
            print(f"  {target}: exported model.so, ELF machine {got!r}, {len(a.report.lowered)} layers lowered, "
                  f"{len(a.report.fallback)} in float", flush=True)
    return out


def mobilenet_rows(args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> tuple[list[dict[str, object]], dict]:
    """FP32, uniform FGQ N=4, uniform int4 / int8, and the Auto mix of the compact model."""
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    model = load_pretrained("mobilenet")
    calib = calibration_split(args.calib)
    val = validation_split()
    names = execution_order(model, torch.from_numpy(calib[:1]))
    rows: list[dict[str, object]] = []
    fp32 = top1(model, x_t, y_t, batch=64)  # a depthwise-separable net runs fastest at small batches

    def add(scheme: str, config: str, q: nn.Module, t0: float) -> None:
        acc = top1(q, x_t, y_t, batch=64)
        rows.append({"model": "mobilenet", "scheme": scheme, "config": config, "top1": round(acc, 2),
                     "fp32_top1": round(fp32, 2), "drop_pp": round(fp32 - acc, 2),
                     "avg_weight_bits": round(avg_weight_bits(q), 2)})
        print(f"[mobilenet] {scheme:10s} {config:24s} top1 {acc:6.2f}  drop {fp32 - acc:5.2f} pp  "
              f"{avg_weight_bits(q):5.2f} bits  ({time.perf_counter() - t0:.0f} s)", flush=True)

    add("fp32", "fp32", model, time.perf_counter())
    print(f"[mobilenet] calibration: {len(calib)} training images; validation for Auto: the {len(val[0])} held-out "
          "training images", flush=True)
    t0 = time.perf_counter()
    add("fgq", "N4-a8", quantize(model, FGQ(group_size=4, act_bits=8), calib, progress=False), t0)
    for fmt in ("int4", "int8"):
        t0 = time.perf_counter()
        add("uniform", f"{fmt}-all-a8", build_mixed(model, dict.fromkeys(names, fmt), calib), t0)
    t0 = time.perf_counter()
    gptq = WeightMaker(model, "gptq", torch.from_numpy(calib[:256]), names)  # what Auto(rounding="gptq") uses
    add("uniform", "int4-all-a8-gptq", build_mixed(model, dict.fromkeys(names, "int4"), calib, weights=gptq), t0)
    t0 = time.perf_counter()
    try:
        budget: float | str = float(args.auto_budget)
    except ValueError:
        budget = args.auto_budget
    cfg = Auto(budget=budget, rounding=args.auto_rounding)
    q = quantize(model, cfg, calib, val)
    res = q.tvm_lowbit_auto
    print(res.sensitivity.table())
    print(res.table())
    print(res.summary(), flush=True)
    add("auto", f"{res.budget}-val{len(val[0])}-{args.auto_rounding}", q, t0)
    extra: dict[str, object] = {"auto": {"formats": res.formats, "val_top1": res.top1, "val_fp32_top1": res.fp32_top1,
                                         "val_agree_pct": res.agree, "weight_bytes": res.weight_bytes,
                                         "evaluations": len(res.evaluations)}}
    if args.heatmap:
        print(f"wrote {res.sensitivity.plot(args.heatmap, 'mobilenet: log10 output KL vs FP32, one layer quantized')}")
    if not args.no_compile:
        extra["compiled"] = compiled_checks(q, x)
    return rows, extra


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
    ap.add_argument("--group-sizes", default=",".join(map(str, GROUP_SIZES)), help="FGQ rows: group sizes N")
    ap.add_argument("--act-bits", default=",".join(map(str, ACT_BITS)), help="FGQ rows: activation bits")
    ap.add_argument("--alpha-bits", default="8",
                    help="FGQ rows: alpha code widths (comma list; rows other than 8 say -alphaB)")
    ap.add_argument("--first-layer", default="int8",
                    help="FGQ rows: first-layer policies (comma list of int8, float, fgq; rows other than FGQ's "
                         "default int8 say -firstP)")
    ap.add_argument("--models", default="resnet20,mobilenet", help="comma-separated: resnet20, mobilenet")
    ap.add_argument("--auto-budget", default="0.5",
                    help="Auto's budget for the compact model: max top-1 drop (points) on the validation split, "
                         "or agree>=X (default 0.5)")
    ap.add_argument("--auto-rounding", default="gptq", choices=("nearest", "gptq"))
    ap.add_argument("--heatmap", type=Path, default=None, help="write the compact model's sensitivity heat map (PNG)")
    ap.add_argument("--no-ort", action="store_true", help="skip the onnxruntime int8 row of ResNet-20")
    ap.add_argument("--no-compile", action="store_true", help="skip compiling the Auto mix (x86 run + Pi builds)")
    args = ap.parse_args()
    models = {m.strip() for m in args.models.split(",") if m.strip()}
    if not models <= {"resnet20", "mobilenet"}:
        ap.error(f"--models: unknown model(s) {', '.join(sorted(models - {'resnet20', 'mobilenet'}))}")
    torch.set_num_threads(args.threads)

    x, y = data.load("test", limit=args.limit)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    calib = data.calibration_set(args.calib)
    model = load_pretrained("resnet20")

    jobs: list[tuple[str, str, object]] = [("fp32", "fp32", None)] if "resnet20" in models else []
    if args.retrained != "only" and "resnet20" in models:
        sizes = [int(v) for v in args.group_sizes.split(",") if v]
        acts = [int(v) for v in args.act_bits.split(",") if v]
        alphas = [int(v) for v in args.alpha_bits.split(",") if v]
        firsts = [v for v in args.first_layer.split(",") if v]
        jobs += [("fgq", f"N{n}-a{a}" + (f"-alpha{ab}" if ab != 8 else "") + (f"-first{fl}" if fl != "int8" else ""),
                  FGQ(group_size=n, act_bits=a, alpha_bits=ab, first_layer=fl))
                 for n in sizes for a in acts for ab in alphas for fl in firsts]
        if args.group_sizes == ",".join(map(str, GROUP_SIZES)):
            jobs += [("ternary-per-layer", f"a{a}", FGQ(group_size=64, act_bits=a)) for a in acts]
        if not args.no_ort:
            jobs.append(("ort-int8", "qdq-s8-pc", ORT_INT8))
    if args.retrained != "skip" and "resnet20" in models:
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
            bits = avg_weight_bits(model)
        elif cfg == ORT_INT8:  # onnxruntime static int8 of the same FP32 model, same calibration images
            acc, bits = ort_int8_top1(model, calib, x, y)
        elif isinstance(cfg, nn.Module):  # a retrained, exported fake-quant model
            acc = top1(cfg.eval(), x_t, y_t)
            bits = avg_weight_bits(cfg)
        else:
            src = per_layer_ternary(model, cfg, calib) if scheme == "ternary-per-layer" else model
            if scheme == "ternary-per-layer":
                cfg = replace(cfg, threshold="exact")
            qm = quantize(src, cfg, calib, progress=False)
            acc = top1(qm, x_t, y_t)
            bits = avg_weight_bits(qm)
        rows.append({"model": "resnet20", "scheme": scheme, "config": name, "top1": round(acc, 2),
                     "fp32_top1": round(fp32, 2), "drop_pp": round(fp32 - acc, 2), "avg_weight_bits": round(bits, 2)})
        print(f"[{i:2d}/{len(jobs)}] {scheme:18s} {name:8s} top1 {acc:6.2f}  drop {fp32 - acc:5.2f} pp  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    extra: dict[str, object] = {}
    if "mobilenet" in models:
        more, extra = mobilenet_rows(args, x, y)
        rows += more

    print()
    print(f"{'model':9s} {'scheme':18s} {'config':24s} {'top1':>6s} {'fp32':>6s} {'drop_pp':>7s} {'w bits':>6s}")
    for r in rows:
        print(f"{r['model']:9s} {r['scheme']:18s} {r['config']:24s} {r['top1']:6.2f} {r['fp32_top1']:6.2f} "
              f"{r['drop_pp']:7.2f} {r['avg_weight_bits']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [{k: r[k] for k in FIELDS} for r in rows], **extra}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
