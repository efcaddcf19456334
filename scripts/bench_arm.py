#!/usr/bin/env python3
"""Guest instructions and estimated Pi cycles per inference on the emulated Raspberry Pi boards, counted inside
the library that does the work: our model.so, or ONNX Runtime's library for the int8 runtime people use today.

For each model, target (rasp4b = Pi 4, qemu -cpu cortex-a72; rasp5 = Pi 5, cortex-a76 with dotprod) and variant:

  tvm-fp32    the float model through TVM's default pipeline (untuned)
  tvm-fgq-n4  FGQ grouped ternary, N=4, 8-bit activations (first conv int8 per channel, classifier ternary)
  tvm-pow2    the retrained power-of-two INQ model (tvm_lowbit/zoo/retrained/inq-b5.pt): shift-add kernels
              (resnet20 only: the checkpoint is a resnet20)
  tvm-auto    the Auto per-layer mix (mobilenet only): tvm_lowbit.Auto(budget=0.5, sensitivity_images=256),
              its default formats, GPTQ rounding and 8-bit activations; calibration: the --calib images, budget
              checked on the first 2000 held-out training images (models.mobilenet.validation_split): at most a
              0.5-point top-1 drop against FP32 there. The mix (Auto's summary) is printed.
  ort-fp32    the same float model exported to ONNX, run by the aarch64 onnxruntime wheel (MLAS), one thread
  ort-int8    that ONNX model through onnxruntime's quantize_static: QDQ, per-channel int8 weights, int8
              activations (s8s8), MinMax calibration on Fashion-MNIST training images (resnet18-224: random
              but fixed inputs, see below)

Models (--models): resnet20 and mobilenet are the trained Fashion-MNIST checkpoints (1x1x28x28); resnet18-224 is
an untrained ResNet-18 at ImageNet shape (1x3x224x224, tvm_lowbit.models.resnet_imagenet, seed 0), calibrated on
random-but-fixed normal inputs: fine for counting, its outputs mean nothing.

A TVM row whose build applied a tuned-schedule database (at least one workload) is named with a "-tuned" suffix
(tvm-fgq-n4-tuned). --schedules shipped (the default) applies tvm_lowbit/schedules/<target>/ as ``compile`` does
by default (a database marked MEASURED_UNDER_EMULATION is not applied; one tuned with the cycle estimate,
MEASURED_BY_ESTIMATE, is); --schedules none builds with the default schedules; --schedules shipped,none does both
in one run (one quantization; a shipped build that applied nothing is the none build, measured once). Each tuned
build prints compile's tuning report (workloads applied, kept at the default, vetoed for executing more
instructions than the default). ratio_vs_fp32 compares with the
untuned tvm-fp32 row when there is one.

TVM variants are compiled for the target, bundled (tvm_lowbit.deploy.bundle) and run by the C++ runner with one
TVM thread; every board run is checked against the same model compiled for and run on the host (the runner's
--expect). ORT variants run in the board's Python (scripts/board/src/ort_run.py) on a sysroot with the Pi's
/proc/cpuinfo, with the settings that make counts repeatable (ORT_DISABLE_TELEMETRY, one thread, fixed
PYTHONHASHSEED, equal-length arguments, an uncounted warm-up run); their output is checked against host
onnxruntime on the same .onnx. The TCG plugin (scripts/board/src/icount.c) counts executed guest instructions
inside the measured library, by class (insn_classes), and records its executed blocks. The count with 1 + K
inferences minus the count with 1 inference, divided by K, is the per-inference count: load and first-call costs
cancel; the 1-inference count is taken twice and must repeat exactly.

est_cycles: the recorded blocks timed by llvm-mca with the core's scheduling model (tvm_lowbit.cost.mca: Pi 4 =
LLVM's Cortex-A57 model, Pi 5 = its Neoverse N1 model), executions x steady-state cycles, per inference. It
ignores caches, DRAM, branch misses and overlap between blocks; est_ms = est_cycles / clock (1.8 GHz Pi 4, 2.4 GHz
Pi 5). The instruction count is a proxy for code quality and the estimate one for a core's pipeline; neither is a
measured Pi latency.

    bash scripts/board/setup.sh                                 # once
    python scripts/bench_arm.py --json arm.json                 # resnet20, every variant, both boards
    python scripts/bench_arm.py --models resnet20,resnet18-224 --variants tvm-fgq-n4,ort-int8,ort-fp32
    python scripts/bench_arm.py --quick                         # CI: resnet20, tvm-fgq-n4 + ort-int8, K=1
    python scripts/bench_arm.py --schedules none --variants tvm-fgq-n4  # default schedules, no database

Floor checked at the end (resnet20): tvm-fgq-n4 executes at most 0.5x the instructions of tvm-fp32 on rasp4b.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_lowbit.cost import Block, CostError, estimate, read_blocks  # noqa: E402
from tvm_lowbit.cost import core as cost_core  # noqa: E402
from tvm_lowbit.deploy.board import ORT_LIBRARY, BoardError, icount_plugin, qemu_cpu, require_ort, run_ort  # noqa: E402

TARGETS = ("rasp4b", "rasp5")
MODELS = ("resnet20", "mobilenet", "resnet18-224")
VARIANTS = ("tvm-fp32", "tvm-fgq-n4", "tvm-pow2", "tvm-auto", "ort-fp32", "ort-int8")
# the models each TVM variant exists for (others: every model)
VARIANT_MODELS = {"tvm-pow2": ("resnet20",), "tvm-auto": ("mobilenet",)}
# tvm-auto: the budget (max top-1 drop in points against FP32), the held-out images it is checked on, and the
# calibration images of the sensitivity pass (fewer than Auto's 512 default: the bench's --calib is 256)
AUTO_BUDGET, AUTO_VAL_IMAGES, AUTO_SENSITIVITY_IMAGES = 0.5, 2000, 256
SCHEDULES = ("shipped", "none")
TUNED = "-tuned"  # suffix of a TVM row whose build applied a tuned-schedule database
CLASSES = ("dot", "widening_mul", "load_store", "simd_other", "scalar_float", "other")
# the contract: the first five are the original fields
FIELDS = ("model", "variant", "target", "model_insns", "ratio_vs_fp32", "ratio_vs_ort_int8", "insn_classes",
          "est_cycles", "ratio_vs_ort_int8_cycles", "est_ms", "unmodelled_insns", "isa", "library", "weights",
          "calibration")
POW2_CHECKPOINT = Path(__file__).resolve().parent.parent / "tvm_lowbit" / "zoo" / "retrained" / "inq-b5.pt"
FLOOR = 0.5
ORT_JITTER = 1000  # instructions the 1-inference ORT count may vary between identical runs (seen: 30)
ORT_REL_TOLERANCE = 0.05  # int8 kernels round differently on aarch64 and x86: a loose check of the same model


@dataclass
class Bench:
    """One model: its float module, example input, calibration set and where its weights and calibration
    come from."""

    name: str
    fp32: nn.Module
    x: np.ndarray
    calib: np.ndarray
    weights: str
    calibration: str


def load_model(name: str, n_calib: int) -> Bench:
    from tvm_lowbit import data
    from tvm_lowbit.models import load_pretrained
    from tvm_lowbit.models.mobilenet import calibration_split
    from tvm_lowbit.models.resnet_imagenet import resnet18

    if name == "resnet20":
        return Bench(name, load_pretrained(), data.load("test", limit=1)[0], data.calibration_set(n_calib),
                     "trained (Fashion-MNIST)", "Fashion-MNIST train")
    if name == "mobilenet":
        return Bench(name, load_pretrained("mobilenet"), data.load("test", limit=1)[0], calibration_split(n_calib),
                     "trained (Fashion-MNIST)", "Fashion-MNIST train")
    if name == "resnet18-224":
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
        calib = rng.standard_normal((min(n_calib, 16), 3, 224, 224), dtype=np.float32)
        return Bench(name, resnet18(seed=0), x, calib, "random (seed 0)", "random fixed (seed 0)")
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def tvm_model(variant: str, bench: Bench) -> nn.Module:
    from tvm_lowbit import quantize
    from tvm_lowbit.quantizers.auto import Auto
    from tvm_lowbit.quantizers.fgq import FGQ

    if variant == "tvm-fp32":
        return bench.fp32
    if variant == "tvm-fgq-n4":
        return quantize(bench.fp32, FGQ(group_size=4, act_bits=8, first_layer="int8", last_layer="fgq"),
                        bench.calib, progress=False)
    if variant == "tvm-pow2":
        ckpt = torch.load(POW2_CHECKPOINT, map_location="cpu", weights_only=False)  # our own committed file
        return ckpt["qmodel"].eval()
    if variant == "tvm-auto":
        from tvm_lowbit.models.mobilenet import validation_split

        if bench.name != "mobilenet":
            raise ValueError(f"tvm-auto is defined for mobilenet only (its held-out split), not {bench.name}")
        q = quantize(bench.fp32, Auto(budget=AUTO_BUDGET, sensitivity_images=AUTO_SENSITIVITY_IMAGES), bench.calib,
                     validation_split(AUTO_VAL_IMAGES), progress=False)
        print(f"{bench.name} tvm-auto: {q.tvm_lowbit_auto.summary()}", flush=True)
        return q
    raise ValueError(variant)


def export_onnx(bench: Bench, directory: Path) -> tuple[Path, Path]:
    """(fp32 .onnx, int8 QDQ .onnx) of the float model. The legacy exporter folds BatchNorm into the convs;
    onnxruntime's quant_pre_process (its recommended step before quantization) folds constants and drops the
    Identity nodes the exporter leaves on some weights, without which ORT runs most quantized convs of
    resnet18-224 as DequantizeLinear + float Conv; quantize_static: QDQ, per-channel int8 weights, int8
    activations, MinMax calibration on bench.calib. Both rows run the pre-processed float model's files."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    raw = directory / f"{bench.name}-export.onnx"
    fp32, int8 = directory / f"{bench.name}-fp32.onnx", directory / f"{bench.name}-int8.onnx"
    torch.onnx.export(bench.fp32.eval(), (torch.from_numpy(bench.x),), str(raw), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], do_constant_folding=True)
    quant_pre_process(str(raw), str(fp32))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": bench.calib[i:i + 1]} for i in range(len(bench.calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return fp32, int8


@dataclass
class Count:
    insns: int
    classes: dict[str, int]
    blocks: dict[Block, int]


def measure(run: Callable[[str], None], folder: Path, tag: str, match: str) -> Count:
    """One plugin run: ``run(plugin_argument)`` executes the program; the counts inside ``match``."""
    out, blocks = folder / f"icount-{tag}.json", folder / f"blocks-{tag}.txt"
    run(f"{icount_plugin()},out={out},match={match},blocks={blocks}")
    counts = json.loads(out.read_text())
    return Count(int(counts["matched_insns"]), {k: int(v) for k, v in counts["matched_classes"].items()},
                 read_blocks(blocks))


def per_inference(run: Callable[[str, int], None], folder: Path, match: str, cpu: str, k: int, what: str,
                  jitter: int = 0) -> tuple[int, dict[str, int], int, int]:
    """(instructions, instructions by class, estimated cycles, unmodelled instructions) per inference:
    (count(1 + K) - count(1)) / K, with count(1) taken twice and required to repeat within ``jitter``
    instructions. The cycle estimate weighs each block by its executions in the K extra inferences, so blocks
    of loading and the first call (which cancel) are never timed."""
    once = measure(lambda p: run(p, 1), folder, "1a", match)
    again = measure(lambda p: run(p, 1), folder, "1b", match)
    if abs(once.insns - again.insns) > jitter:
        raise SystemExit(f"bench_arm: {what}: instruction counts differ between two identical runs ({once.insns} vs "
                         f"{again.insns}, more than {jitter}); is the run single-threaded?")
    more = measure(lambda p: run(p, 1 + k), folder, "k", match)
    classes = {c: (more.classes[c] - once.classes[c]) // k for c in CLASSES}
    extra = {b: n - once.blocks.get(b, 0) for b, n in more.blocks.items()}
    est = estimate({b: n for b, n in extra.items() if n}, cost_core(cpu))
    return (more.insns - once.insns) // k, classes, round(est.cycles / k), est.unmodelled_insns // k


def isa_of(classes: dict[str, int]) -> str:
    """Which instructions did the multiply-accumulate work, from the class counts."""
    if classes["dot"]:
        return "neon+sdot"
    if classes["widening_mul"]:
        return "neon smull/smlal"
    if classes["simd_other"] > classes["scalar_float"]:
        return "neon"
    return "scalar fp"


def base_variant(variant: str) -> str:
    """The variant without the "-tuned" suffix."""
    return variant[:-len(TUNED)] if variant.endswith(TUNED) else variant


def row_variant(variant: str, tuning: Any) -> str:
    """The row's variant name: "-tuned" appended when the build applied a database (``Artifact.tuning``, a
    ``tune.ApplyReport``) with at least one workload."""
    return variant + TUNED if tuning is not None and tuning.applied else variant


def bench_tvm(variant: str, bench: Bench, targets: list[str], k: int, tmp: Path,
              schedules: tuple[str, ...] = ("shipped",)) -> list[dict[str, Any]]:
    import tvm_lowbit
    from tvm_lowbit.deploy.bundle import export_bundle, run_bundle_emulated
    from tvm_lowbit.deploy.remote import REL_TOLERANCE

    model = tvm_model(variant, bench)
    host_out = tvm_lowbit.compile(model, bench.x, "x86-host").run(bench.x)
    rows = []
    for target, setting in [(t, s) for t in targets for s in schedules]:
        t0 = time.perf_counter()
        cpu = qemu_cpu(target)
        # shipped: compile's default (tvm_lowbit/schedules/<target>/ unless marked as timed under emulation)
        art = tvm_lowbit.compile(model, bench.x, target, schedules=None if setting == "shipped" else False)
        name = row_variant(variant, art.tuning)
        if art.tuning is not None:  # which workloads took a record; which kept the default schedule, and why
            print(f"{bench.name} {variant} on {target}: {art.tuning.text()}", flush=True)
        if any(r["variant"] == name and r["target"] == target for r in rows):
            print(f"{bench.name} {variant} on {target}: --schedules {setting} builds the default schedules again "
                  "(measured once)", flush=True)
            continue
        # the runner checks every board run against the host's output: a count of wrong code is no count
        bundle = export_bundle(art, tmp / f"{bench.name}-{name}-{target}", bench.x, host_out,
                               REL_TOLERANCE * max(float(np.abs(host_out).max()), 1.0))

        def run(plugin: str, runs: int) -> None:
            r = run_bundle_emulated(bundle, cpu, runs=runs, plugin=plugin)
            if r.returncode != 0:  # 3: the board's output differs from the host's
                raise BoardError(f"the runner failed on -cpu {cpu} (rc {r.returncode}): "
                                 f"{(r.stdout + r.stderr).strip()[-500:]}")

        insns, classes, cycles, unmodelled = per_inference(run, bundle, "/model.so", cpu, k,
                                                           f"{bench.name} {variant} on {target}")
        rows.append(row(bench, name, target, "model.so", insns, classes, cycles, unmodelled))
        print(f"{bench.name:12s} {name:16s} {target:7s} (-cpu {cpu}): {insns:,d} instructions, {cycles:,d} est. "
              f"cycles per inference in model.so ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def bench_ort(variant: str, bench: Bench, onnx_file: Path, targets: list[str], k: int,
              tmp: Path) -> list[dict[str, Any]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    host_out = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": bench.x})[0]
    x_path = tmp / f"{bench.name}-input.bin"
    np.ascontiguousarray(bench.x, dtype=np.float32).tofile(x_path)
    rows = []
    for target in targets:
        t0 = time.perf_counter()
        cpu = qemu_cpu(target)
        folder = tmp / f"{bench.name}-{variant}-{target}"
        folder.mkdir()
        out_path = folder / "output.bin"

        def run(plugin: str | None, runs: int) -> None:
            r = run_ort(onnx_file, x_path, bench.x.shape, out_path, cpu, runs, plugin=plugin)
            if r.returncode != 0:
                raise BoardError(f"onnxruntime failed on -cpu {cpu} (rc {r.returncode}): "
                                 f"{(r.stdout + r.stderr).strip()[-800:]}")

        run(None, 1)  # uncounted warm-up: the board Python compiles its .pyc files once
        board_out = np.fromfile(out_path, dtype=np.float32).reshape(host_out.shape)
        diff = float(np.abs(board_out - host_out).max())
        if diff > ORT_REL_TOLERANCE * max(float(np.abs(host_out).max()), 1.0):
            raise SystemExit(f"bench_arm: {bench.name} {variant} on {target}: the board's onnxruntime output differs "
                             f"from the host's by {diff:.4g}")
        # the 1-inference ORT count can vary by a few dozen instructions between identical runs (seen: 30 of
        # 67 M for resnet20 fp32; source not found): allowed, it is at most ORT_JITTER / K per inference
        insns, classes, cycles, unmodelled = per_inference(run, folder, ORT_LIBRARY, cpu, k,
                                                           f"{bench.name} {variant} on {target}", ORT_JITTER)
        rows.append(row(bench, variant, target, ORT_LIBRARY.strip("/") + ".so", insns, classes, cycles, unmodelled))
        print(f"{bench.name:12s} {variant:16s} {target:7s} (-cpu {cpu}): {insns:,d} instructions, {cycles:,d} est. "
              f"cycles per inference in onnxruntime; max |board - host| {diff:.3g} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def row(bench: Bench, variant: str, target: str, library: str, insns: int, classes: dict[str, int], cycles: int,
        unmodelled: int) -> dict[str, Any]:
    clock = cost_core(qemu_cpu(target)).clock_hz
    return {"model": bench.name, "variant": variant, "target": target, "model_insns": insns, "insn_classes": classes,
            "est_cycles": cycles, "est_ms": round(cycles / clock * 1e3, 3), "unmodelled_insns": unmodelled,
            "isa": isa_of(classes), "library": library, "weights": bench.weights, "calibration": bench.calibration}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    def by(variant: str, key: str) -> dict[tuple[str, str], int]:
        """``key`` of ``variant``'s row per (model, target): the untuned row when there is one, else the tuned."""
        tuned = {(r["model"], r["target"]): r[key] for r in rows if r["variant"] == variant + TUNED}
        return {**tuned, **{(r["model"], r["target"]): r[key] for r in rows if r["variant"] == variant}}

    fp32, ort_insns, ort_cycles = by("tvm-fp32", "model_insns"), by("ort-int8", "model_insns"), by("ort-int8",
                                                                                                    "est_cycles")
    for r in rows:
        where = (r["model"], r["target"])
        r["ratio_vs_fp32"] = round(r["model_insns"] / fp32[where], 4) if where in fp32 else None
        r["ratio_vs_ort_int8"] = round(r["model_insns"] / ort_insns[where], 4) if where in ort_insns else None
        r["ratio_vs_ort_int8_cycles"] = (round(r["est_cycles"] / ort_cycles[where], 4)
                                         if ort_cycles.get(where) else None)


def print_tables(rows: list[dict[str, Any]]) -> None:
    def ratio(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    print()
    print(f"{'model':12s} {'variant':16s} {'target':7s} {'model_insns':>14s} {'ratio_vs_fp32':>13s} "
          f"{'vs_ort_int8':>11s} {'est_cycles':>14s} {'vs_ort_int8_cyc':>15s} {'est_ms':>9s}  isa")
    for r in rows:
        print(f"{r['model']:12s} {r['variant']:16s} {r['target']:7s} {r['model_insns']:14,d} "
              f"{ratio(r['ratio_vs_fp32']):>13s} {ratio(r['ratio_vs_ort_int8']):>11s} {r['est_cycles']:14,d} "
              f"{ratio(r['ratio_vs_ort_int8_cycles']):>15s} {r['est_ms']:9.3f}  {r['isa']}")
    print()
    print("instructions per inference by class (millions)")
    print(f"{'model':12s} {'variant':16s} {'target':7s} " + " ".join(f"{c:>12s}" for c in CLASSES))
    for r in rows:
        print(f"{r['model']:12s} {r['variant']:16s} {r['target']:7s} "
              + " ".join(f"{r['insn_classes'][c] / 1e6:12.3f}" for c in CLASSES))
    notes = sorted({f"{r['model']}: weights {r['weights']}, calibration {r['calibration']}" for r in rows})
    print()
    for n in notes:
        print(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20", help=f"comma list of {', '.join(MODELS)} (default resnet20)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--runs", type=int, default=3, help="K: extra inferences whose count is averaged (default 3)")
    ap.add_argument("--calib", type=int, default=256, help="calibration images, FGQ and ORT (default 256; "
                    "resnet18-224 uses at most 16)")
    ap.add_argument("--quick", action="store_true", help="CI: resnet20, tvm-fgq-n4 and ort-int8, K=1, 32 "
                    "calibration images")
    ap.add_argument("--schedules", default="shipped",
                    help="TVM variants: 'shipped' applies tvm_lowbit/schedules/<target>/ as compile does by default "
                    "(rows then named <variant>-tuned), 'none' the default schedules, 'shipped,none' both "
                    "(default shipped)")
    ap.add_argument("--json", type=Path, default=None, help="write {'rows': [...]} here")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="measure nothing: print the table of the rows in these --json files (a later file's row "
                    "replaces an earlier one of the same model, variant and target), ratios recomputed")
    args = ap.parse_args()
    if args.merge:
        merged: dict[tuple[str, str, str], dict[str, Any]] = {}
        for f in args.merge:
            for r in json.loads(f.read_text())["rows"]:
                merged[(r["model"], r["variant"], r["target"])] = r
        return report(list(merged.values()), args.json)
    if args.quick:
        args.models, args.variants, args.runs, args.calib = "resnet20", "tvm-fgq-n4,ort-int8", 1, 32
    models, targets, variants = args.models.split(","), args.targets.split(","), args.variants.split(",")
    schedules = tuple(args.schedules.split(","))
    if not schedules or any(s not in SCHEDULES for s in schedules) or len(set(schedules)) != len(schedules):
        ap.error(f"--schedules {args.schedules!r}: a comma list of {', '.join(SCHEDULES)}")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if not 1 <= args.runs <= 998:
        ap.error("--runs must be 1..998")
    torch.set_num_threads(1)
    try:
        cpus = [qemu_cpu(t) for t in targets]
        icount_plugin()
        if any(v.startswith("ort-") for v in variants):
            for cpu in cpus:
                require_ort(cpu)
        for cpu in cpus:
            cost_core(cpu)
    except (BoardError, CostError) as e:
        print(f"bench_arm: {e}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-arm-") as tmp_name:
        tmp = Path(tmp_name)
        for name in models:
            bench = load_model(name, args.calib)
            onnx_files = export_onnx(bench, tmp) if any(v.startswith("ort-") for v in variants) else None
            for variant in variants:
                if name not in VARIANT_MODELS.get(variant, (name,)):
                    print(f"{name}: no {variant} row (defined for {', '.join(VARIANT_MODELS[variant])} only)")
                    continue
                if variant.startswith("ort-"):
                    assert onnx_files is not None
                    rows += bench_ort(variant, bench, onnx_files[variant == "ort-int8"], targets, args.runs, tmp)
                else:
                    rows += bench_tvm(variant, bench, targets, args.runs, tmp, schedules)
    return report(rows, args.json)


def report(rows: list[dict[str, Any]], json_path: Path | None) -> int:
    """Ratios, the tables, the --json file and the floor check."""
    add_ratios(rows)
    print_tables(rows)
    if json_path:
        json_path.write_text(json.dumps({"rows": [{k: r.get(k) for k in FIELDS} for r in rows]}, indent=2) + "\n")
        print(f"wrote {json_path}")
    floor = [r for r in rows if r["model"] == "resnet20" and base_variant(r["variant"]) == "tvm-fgq-n4"
             and r["target"] == "rasp4b" and r["ratio_vs_fp32"]]
    for r in floor:
        ok = r["ratio_vs_fp32"] <= FLOOR
        print(f"floor: {r['variant']} on rasp4b executes {r['ratio_vs_fp32']:.3f}x the instructions of tvm-fp32 "
              f"(must be <= {FLOOR}): {'PASS' if ok else 'FAIL'}")
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
