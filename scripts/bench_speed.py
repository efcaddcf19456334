#!/usr/bin/env python3
"""Batch-1 latency on the x86 host: TVM FP32 (untuned) vs FGQ low-bit TVM builds vs PyTorch vs ORT int8.

Every row reports ``ratio_vs_tvm_fp32`` = its median / the TVM FP32 median of the same model in the
same run, and ``ratio_vs_ort_int8`` = its median / the onnxruntime int8 median of the same run (null when
that variant is not run); the host is shared, so only ratios from one run are comparable. All runtimes use
``--threads`` threads (default 2; ``--threads 1`` compares one core with one core). The FGQ rows quantize
the stem int8 per channel (FGQ's default), every other conv and the classifier ternary with 7-bit alpha
codes (so ``alpha * t`` is an int8 and the VNNI kernels take them).

    python scripts/bench_speed.py --models resnet20,resnet18-224 --repeat 20 --json bench.json
    python scripts/bench_speed.py --models resnet18,mobilenet_v2,efficientnet-lite2,minilm --size 224

Real models (the zoo, ``tvm_lowbit/models``): the torchvision architectures (``zoo.ARCHS``: random weights,
batch norm calibrated on photos, ``--size`` pixels), ``efficientnet-lite2`` (real weights, 260x260) and
``minilm`` (paraphrase-MiniLM-L3-v2, inputs ``input_ids`` and ``attention_mask``, ``--seq`` tokens). The
CNNs calibrate on calibration-photo views; their ``ort-int8`` is static QDQ. MiniLM calibrates on the
calibration sentences; its ``ort-int8`` is ONNX Runtime's dynamic int8 of the shipped ONNX file, its
``torch-fp32`` the PyTorch port, and the TVM rows take the two inputs by name.

The ``*-tuned`` rows (``tvm-fp32-tuned``, ``tvm-fgq-n4-tuned``, ``tvm-pow2-tuned``, not in the default
``--variants``) tune with MetaSchedule first, ``--trials`` trials per variant over all its tasks (shared out
by the ``--scheduler``, gradient-based by default: more trials for the tasks that weigh most), then compile
with that database. pow2 is INQ 5-bit weights projected without retraining (speed only).

``tvm-fgq-n4-libm`` (not in the default ``--variants``) is ``tvm-fgq-n4``'s quantized model built with
``VectorMath`` off (``TVM_LOWBIT_VECMATH=off``: float32 ``exp`` as the C library's scalar calls): the same
outputs bit for bit, so the two rows of one run measure what the vectorized ``exp`` saves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# baselines sets TVM_NUM_THREADS before anything imports tvm
from tvm_lowbit import baselines  # noqa: E402
from tvm_lowbit.baselines import NUM_THREADS, Runner, median_call_ms  # noqa: E402

MODELS = ("resnet20", "resnet18-224")
ZOO_CNNS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0",
            "regnet_x_400mf", "efficientnet-lite2")
ZOO = (*ZOO_CNNS, "minilm")
SIZE = {"size": 224, "seq": 32}  # from --size / --seq
VARIANTS = ("tvm-fp32", "tvm-fgq-n4", "tvm-fgq-n4-libm", "tvm-fgq-n64", "torch-fp32", "ort-int8", "tvm-fp32-tuned", "tvm-fgq-n4-tuned",
            "tvm-pow2-tuned")
TUNE = {"trials": 64, "dir": Path("bench_schedules"), "scheduler": "gradient"}  # from --trials etc.
TARGET = "x86-host"
FIELDS = ("model", "variant", "target", "median_ms", "ratio_vs_tvm_fp32", "weight_bytes", "ratio_vs_ort_int8",
          "cpu_ms")
PROFILE = {"runs": 0}  # from --profile: per-function CPU profile of the TVM rows over this many inferences


class Timed(Protocol):
    """What baselines.Runner and the FGQ artifact both provide."""

    weight_bytes: int

    def median_ms(self, x: np.ndarray, repeat: int = ...) -> float: ...


def load_model(name: str) -> tuple[nn.Module, np.ndarray, np.ndarray, str]:
    """(model, example batch-1 input, calibration batch, note on the calibration data)."""
    if name == "resnet20":
        from tvm_lowbit import data
        from tvm_lowbit.models import load_pretrained

        calib = data.calibration_set(256)
        return load_pretrained(), calib[:1].copy(), calib, "256 Fashion-MNIST training images"
    if name == "resnet18-224":
        from tvm_lowbit.models.resnet_imagenet import resnet18

        # untrained weights and no ImageNet here: a fixed-seed N(0,1) batch is enough for timing
        calib = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
        return resnet18(1000, seed=0), calib[:1].copy(), calib, "32 fixed-seed random-normal images"
    if name in ZOO_CNNS:
        from tvm_lowbit.models import efficientnet_lite, photos, zoo

        if name == "efficientnet-lite2":
            calib = efficientnet_lite.normalize(photos.views("calib", efficientnet_lite.SIZE, 2)).numpy()
            return efficientnet_lite.load(), calib[:1].copy(), calib, f"{len(calib)} calibration-photo views"
        views = photos.views("calib", SIZE["size"], 2)
        calib = zoo.normalize(views).numpy()
        return zoo.load(name, SIZE["size"], calib_images=views), calib[:1].copy(), calib, \
            f"{len(calib)} calibration-photo views at {SIZE['size']}px"
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS + ZOO)}")


class FeedRunner(Runner):
    """A model of several named inputs (a dict feed) timed like ``baselines.Runner``."""

    def __init__(self, fn: Callable[[dict[str, np.ndarray]], Any], weight_bytes: int) -> None:
        super().__init__(fn, weight_bytes)  # type: ignore[arg-type]

    def run(self, x: Any) -> Any:
        return self._fn(x)  # the feed as it is (no float32 cast)

    def median_ms(self, x: Any, repeat: int = 50, warmup: int = 5) -> float:
        return median_call_ms(self._fn, x, repeat, warmup)


def minilm_builders() -> dict[str, Callable[[nn.Module, Any, Any], Timed]]:
    """The variants of the transformer (dict inputs): TVM through ``tvm_lowbit.compile`` with the feed,
    PyTorch eager, ONNX Runtime dynamic int8 of the ONNX file."""
    import tvm_lowbit
    from tvm_lowbit.models import minilm
    from tvm_lowbit.quantizers.fgq import FGQ

    def tvm_fp32(m: nn.Module, x: dict, c: dict) -> Timed:
        return tvm_lowbit.compile(m, x, target=TARGET)

    def quantized(m: nn.Module, c: dict) -> nn.Module:
        key = (id(m), 4)
        if key not in QUANTIZED:
            QUANTIZED[key] = tvm_lowbit.quantize(m, FGQ(group_size=4, act_bits=8, alpha_bits=7, first_layer="fgq",
                                                        last_layer="fgq"), c)
        return QUANTIZED[key]

    def tvm_fgq(m: nn.Module, x: dict, c: dict) -> Timed:
        art = tvm_lowbit.compile(quantized(m, c), x, target=TARGET)
        log(f"  kernels: {kernel_counts(art.report.kernel_names)}; in float: {len(art.report.fallback)}")
        return art

    def tvm_fgq_libm(m: nn.Module, x: dict, c: dict) -> Timed:
        art = without_vecmath(lambda: tvm_lowbit.compile(quantized(m, c), x, target=TARGET))
        log(f"  kernels: {kernel_counts(art.report.kernel_names)}; in float: {len(art.report.fallback)}")
        return art

    def torch_fp32(m: nn.Module, x: dict, c: dict) -> Timed:
        baselines.set_threads()

        def fn(feed: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return m(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()

        return FeedRunner(fn, baselines.fp32_weight_bytes(m))

    def ort_dynamic(m: nn.Module, x: dict, c: dict) -> Timed:
        import tempfile

        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_dynamic(str(minilm.onnx_path()), str(out), weight_type=QuantType.QInt8)
            qbytes = out.read_bytes()
        proto = onnx.load_from_string(qbytes)
        wbytes = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                     if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = NUM_THREADS, 1
        sess = ort.InferenceSession(qbytes, so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        return FeedRunner(lambda feed: sess.run(None, {k: v for k, v in feed.items() if k in names})[0], wbytes)

    return {"tvm-fp32": tvm_fp32, "tvm-fgq-n4": tvm_fgq, "tvm-fgq-n64": tvm_fgq, "torch-fp32": torch_fp32,
            "ort-int8": ort_dynamic, "tvm-fgq-n4-libm": tvm_fgq_libm}


def load_minilm() -> tuple[nn.Module, dict[str, np.ndarray], dict[str, torch.Tensor], str]:
    from tvm_lowbit.models import minilm

    feed = minilm.inputs(minilm.SENTENCES[:1], SIZE["seq"])
    calib = {k: torch.from_numpy(v) for k, v in minilm.inputs(minilm.CALIB_SENTENCES, SIZE["seq"]).items()}
    note = f"{len(minilm.CALIB_SENTENCES)} calibration sentences, {SIZE['seq']} tokens"
    return minilm.load_torch(), feed, calib, note


# first layer int8 per channel (FGQ's default: its 3 or 1 input channels make groups degenerate); every
# other conv and the classifier are FGQ-ternary with 7-bit alpha codes (alpha * t fits int8: the VNNI
# kernels), so weight_bytes counts what a deployed low-bit model stores
FGQ_POLICY = {"first_layer": "int8", "last_layer": "fgq", "alpha_bits": 7}


QUANTIZED: dict[tuple[int, int], nn.Module] = {}  # (id(model), group size) -> FGQ model: *-libm reuses it


def without_vecmath(compile_fn: Callable[[], Timed]) -> Timed:
    """``compile_fn()`` with ``VectorMath`` off (the C library's scalar exp, as before it): the *-libm rows."""
    from tvm_lowbit.passes.vector_math import VECMATH_ENV

    old = os.environ.get(VECMATH_ENV)
    os.environ[VECMATH_ENV] = "off"
    try:
        return compile_fn()
    finally:
        if old is None:
            del os.environ[VECMATH_ENV]
        else:
            os.environ[VECMATH_ENV] = old


def fgq(group_size: int, libm: bool = False) -> Callable[[nn.Module, np.ndarray, np.ndarray], Timed]:
    def build(model: nn.Module, example: np.ndarray, calib: np.ndarray) -> Timed:
        import tvm_lowbit
        from tvm_lowbit.quantizers.fgq import FGQ

        key = (id(model), group_size)
        if key not in QUANTIZED:
            QUANTIZED[key] = tvm_lowbit.quantize(model, FGQ(group_size=group_size, act_bits=8, **FGQ_POLICY), calib)
        qmodel = QUANTIZED[key]
        compile_fn = lambda: tvm_lowbit.compile(qmodel, example, target="x86")  # noqa: E731
        art = without_vecmath(compile_fn) if libm else compile_fn()
        log(f"  kernels: {kernel_counts(art.report.kernel_names)}; in float: {len(art.report.fallback)}")
        return art

    return build


def kernel_counts(names: dict[str, str]) -> str:
    """'ternary_conv2d_vnni x19, int_conv2d_vnni x1': which kernels (hence which ISA) the layers run on."""
    counts: dict[str, int] = {}
    for k in names.values():
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def host_isa() -> str:
    """The widest int8 dot-product ISA of this host (what onnxruntime's MLAS dispatches to by CPUID)."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return next((name for flag, name in (("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2"))
                 if flag in flags), "SSE")


def pow2_model(model: nn.Module, calib: np.ndarray) -> nn.Module:
    """Power-of-two (INQ, 5 bits) weights without retraining: every stage quantizes, no step trains (speed only)."""
    import copy

    from tvm_lowbit.quantizers.inq import INQ

    hook = INQ(bits=5, first_layer="float", last_layer="inq").attach(copy.deepcopy(model))
    for _ in hook.stages():
        pass
    return hook.export(calib)


def tuned(variant: str) -> Callable[[nn.Module, np.ndarray, np.ndarray], Timed]:
    """Tune with MetaSchedule (the same global trial budget for every tuned variant), then compile with the
    database. FP32 goes through the same compiler: with no quantized layer everything stays float."""
    def build(model: nn.Module, example: np.ndarray, calib: np.ndarray) -> Timed:
        import tvm_lowbit
        from tvm_lowbit import tune
        from tvm_lowbit.quantizers.fgq import FGQ

        if variant == "tvm-fp32-tuned":
            qmodel = model.eval()
        elif variant == "tvm-fgq-n4-tuned":
            qmodel = tvm_lowbit.quantize(model, FGQ(group_size=4, act_bits=8, **FGQ_POLICY), calib)
        else:
            qmodel = pow2_model(model, calib)
        work = TUNE["dir"] / f"{example.shape[-1]}px-{variant}"
        rep = tune.tune(qmodel, example, TARGET, trials_per_task=TUNE["trials"], max_trials_global=TUNE["trials"],
                        work_dir=work, seed=0, scheduler=TUNE["scheduler"])
        log(f"  {rep.text()}")
        art = tvm_lowbit.compile(qmodel, example, target=TARGET, schedules=work)
        log(f"  {art.tuning.text()}")
        return art

    return build


BUILDERS: dict[str, Callable[[nn.Module, np.ndarray, np.ndarray], Timed]] = {
    "tvm-fp32": lambda m, x, c: baselines.tvm_fp32(m, x),
    "tvm-fgq-n4": fgq(4),
    "tvm-fgq-n4-libm": fgq(4, libm=True),
    "tvm-fgq-n64": fgq(64),
    "torch-fp32": lambda m, x, c: baselines.torch_fp32(m),
    "ort-int8": lambda m, x, c: baselines.ort_int8(m, x, c),
    "tvm-fp32-tuned": tuned("tvm-fp32-tuned"),
    "tvm-fgq-n4-tuned": tuned("tvm-fgq-n4-tuned"),
    "tvm-pow2-tuned": tuned("tvm-pow2-tuned"),
}


def cpu_ms_per_call(runner: Any, x: Any, calls: int) -> float:
    """Process CPU time (every thread: the runtime's pool workers, spinning or not) per ``run`` call, in ms:
    what one inference costs the shared host, next to the wall-time median."""
    runner.run(x)
    c0 = time.process_time()
    for _ in range(calls):
        runner.run(x)
    return 1e3 * (time.process_time() - c0) / calls


def profile(name: str, variant: str, runner: Any, x: Any) -> None:
    """Log the per-function CPU profile of a compiled TVM model (``tvm_lowbit.profile``)."""
    from tvm_lowbit.profile import profile_calls, profile_table

    if not hasattr(runner, "executable") or not hasattr(runner, "check_inputs"):
        return
    rows = profile_calls(runner.executable, runner.check_inputs(x), runs=PROFILE["runs"])
    log(f"[{name}] {variant}: profile, median per inference of {PROFILE['runs']} runs, process CPU ms:\n"
        + profile_table(rows))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_model(name: str, variants: list[str], repeat: int) -> tuple[list[dict[str, Any]], list[str]]:
    if name == "minilm":
        model, example, calib, calib_note = load_minilm()
        builders: dict[str, Callable[..., Timed]] = minilm_builders()
        shape = {k: v.shape for k, v in example.items()}
    else:
        model, example, calib, calib_note = load_model(name)
        builders, shape = BUILDERS, tuple(example.shape)
    log(f"[{name}] input {shape}, calibration: {calib_note}")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    ref_ms: float | None = None
    # TVM FP32 first: it is the reference for every ratio
    for variant in sorted(variants, key=lambda v: v != "tvm-fp32"):
        try:
            log(f"[{name}] {variant}: building ...")
            t0 = time.perf_counter()
            if variant not in builders:
                raise ValueError(f"variant {variant} is not measured for {name}")
            runner = builders[variant](model, example, calib)
            log(f"[{name}] {variant}: built in {time.perf_counter() - t0:.1f} s; timing {repeat} runs ...")
            ms = float(runner.median_ms(example, repeat=repeat))
            cpu = cpu_ms_per_call(runner, example, max(repeat // 2, 3))
            if PROFILE["runs"] and variant.startswith("tvm-"):
                profile(name, variant, runner, example)
        except Exception as e:  # one broken variant should not lose the other numbers
            log(f"[{name}] {variant}: FAILED: {type(e).__name__}: {e}")
            problems.append(f"{name}/{variant} FAILED")
            continue
        if variant == "tvm-fp32":
            ref_ms = ms
        log(f"[{name}] {variant}: median {ms:.3f} ms, {cpu:.3f} CPU ms per call; load average "
            f"{os.getloadavg()[0]:.1f}")
        rows.append({"model": name, "variant": variant, "target": TARGET, "median_ms": ms,
                     "ratio_vs_tvm_fp32": None if ref_ms is None else ms / ref_ms,
                     "weight_bytes": int(runner.weight_bytes), "cpu_ms": cpu})
    ort = next((r["median_ms"] for r in rows if r["variant"] == "ort-int8"), None)
    for r in rows:
        r["ratio_vs_ort_int8"] = None if ort is None else r["median_ms"] / ort
    return rows, problems


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':<20}{'variant':<18}{'target':<10}{'median_ms':>12}{'vs tvm-fp32':>13}{'vs ort-int8':>13}"
          f"{'weight_bytes':>15}{'cpu_ms':>10}{'cpu vs ort':>12}")
    for r in rows:
        ratio = "-" if r["ratio_vs_tvm_fp32"] is None else f"{r['ratio_vs_tvm_fp32']:.3f}x"
        ort = "-" if r.get("ratio_vs_ort_int8") is None else f"{r['ratio_vs_ort_int8']:.3f}x"
        ort_cpu = next((o["cpu_ms"] for o in rows if o["model"] == r["model"] and o["variant"] == "ort-int8"), None)
        cpu_ratio = "-" if not ort_cpu else f"{r['cpu_ms'] / ort_cpu:.3f}x"
        print(f"{r['model']:<20}{r['variant']:<18}{r['target']:<10}{r['median_ms']:>12.3f}{ratio:>13}{ort:>13}"
              f"{r['weight_bytes']:>15,}{r['cpu_ms']:>10.3f}{cpu_ratio:>12}")


def use_threads(n: int) -> None:
    """Every runtime on ``n`` threads: TVM's pool (TVM_NUM_THREADS, read when TVM starts its pool: nothing has
    run a TVM kernel yet here), torch's intra-op pool and ORT's intra-op threads (``baselines.NUM_THREADS``)."""
    global NUM_THREADS
    if n < 1:
        raise SystemExit(f"--threads must be at least 1, got {n}")
    os.environ["TVM_NUM_THREADS"] = str(n)
    NUM_THREADS = baselines.NUM_THREADS = n
    baselines.set_threads(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS + ZOO)}")
    ap.add_argument("--size", type=int, default=224, help="input size of the torchvision zoo models (default 224)")
    ap.add_argument("--seq", type=int, default=32, help="MiniLM tokens per input (default 32)")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if not v.endswith(("-tuned", "-libm"))),
                    help=f"comma list of {', '.join(VARIANTS)} (default: all but the tuned ones)")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per variant (median reported)")
    ap.add_argument("--threads", type=int, default=NUM_THREADS,
                    help=f"threads of every runtime: TVM, torch, ORT intra-op (default {NUM_THREADS})")
    ap.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    ap.add_argument("--trials", type=int, default=64,
                    help="MetaSchedule trials per *-tuned variant, over all its tasks (the same for FP32 and ours)")
    ap.add_argument("--tune-dir", type=Path, default=Path("bench_schedules"),
                    help="tuning databases of the *-tuned variants (a rerun keeps their records and tunes further)")
    ap.add_argument("--scheduler", choices=("round-robin", "gradient"), default="gradient",
                    help="how MetaSchedule shares the trials among the tasks (tune.tune_module; default gradient)")
    ap.add_argument("--profile", type=int, default=0, metavar="RUNS",
                    help="log a per-function CPU profile of every TVM row over RUNS inferences (tvm_lowbit.profile)")
    args = ap.parse_args(argv)
    PROFILE.update(runs=args.profile)
    TUNE.update(trials=args.trials, dir=args.tune_dir, scheduler=args.scheduler)
    SIZE.update(size=args.size, seq=args.seq)

    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if "tvm-fp32" not in variants:
        log("note: tvm-fp32 not selected, so ratio_vs_tvm_fp32 is null")

    use_threads(args.threads)
    log(f"threads: {NUM_THREADS} for every runtime (TVM_NUM_THREADS, torch.set_num_threads, "
        f"ORT intra_op_num_threads); batch 1; target {TARGET}; TVM FP32 is untuned (default pipeline)")
    log(f"host int8 ISA: {host_isa()} (onnxruntime's MLAS picks its kernels by CPUID; the TVM rows' kernels are "
        "logged per variant: *_vnni = AVX-512 VNNI vpdpbusd, *_avx2 = vpmaddubsw/vpmaddwd)")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for name in models:
        r, p = bench_model(name, variants, args.repeat)
        rows += r
        problems += p

    print(f"\nbatch 1, {NUM_THREADS} threads everywhere, median of {args.repeat} runs; "
          "ratio = median / TVM FP32 median (same model, same run); cpu_ms = process CPU ms per call (all threads); "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print_table(rows)
    if any(r["variant"] == "tvm-fp32" for r in rows):
        # checked on the LLVM IR: no TVMBackendParallelLaunch without a schedule
        print("note: untuned tvm-fp32 (default pipeline, no schedules) emits no parallel loops: it uses 1 thread")
    if problems:
        print("not measured: " + "; ".join(problems))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [{k: r[k] for k in FIELDS} for r in rows]}, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if any("FAILED" in p for p in problems) else 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
