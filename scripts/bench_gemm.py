#!/usr/bin/env python3
"""One large grouped-ternary GEMM on the x86 host: achieved GOP/s and the fraction of the CPU's AVX2 int8 peak.

    peak GOP/s = cores x GHz x int8 MACs per cycle x 2        (a MAC is 2 operations)

* cores: ``os.cpu_count()`` (the threads TVM uses: TVM_NUM_THREADS is set to it);
* GHz: the mean ``cpu MHz`` of /proc/cpuinfo (the clock the kernel reports; under a hypervisor that is
  the nominal clock, so boost is not counted), or ``--ghz``;
* int8 MACs per cycle per core: 64 = 2 ``vpmaddubsw ymm`` per cycle (two vector multiply pipes on Zen 3 /
  Zen 4 and on Intel since Haswell) x 32 u8 x i8 products each; or ``--macs-per-cycle``.
  (The ``vpmaddwd`` that widens the int16 pairs shares those pipes, so a real dot-product loop tops out at
  half of this peak.)

Kernels (the same math: int8 activation codes [M, K] x ternary weights [N, K] packed 4 per byte with one
8-bit alpha per group of ``--group-size``; int32 accumulators; every result is checked bit-exact against
the numpy integer reference on a slice of rows before timing):

* ``avx2-dot``: ``kernels.avx2`` (the project's vpmaddubsw/vpmaddwd tensor intrinsic), built for an AVX2-only
  CPU (``--mcpu``, default x86-64-v3) so no AVX-512/VNNI instruction is used;
* ``default``: the default ternary dense kernel (``kernels.ternary_dense`` + ``schedule_default``);
* ``vnni``: ``kernels.vnni`` (``vpdpbusd`` with the group alpha folded into int8 weights, decoded from
  the packed 2-bit codes tile by tile), built for ``--vnni-mcpu`` (default: this host's CPU); zmm with
  AVX-512 VNNI, ymm with AVX-VNNI;
* ``ort-int8``: ONNX Runtime's int8 GEMM on the same shape: a float ``MatMul`` by a random [K, N]
  weight, ``quantize_dynamic`` (per-tensor int8 weights, ``MatMulInteger`` with uint8 activations
  quantized on the fly), ``TVM_NUM_THREADS`` intra-op threads (the cores); MLAS picks its kernel by CPUID at run time
  (the script prints which ISA that is on this host).  Its rows time a different quantization (int8 weights,
  4x the bytes of the 2-bit codes), so they are not checked against the ternary reference;
* ``vlut`` / ``vlut-1t``: ``kernels.vlut``, the decode-free lookup-table kernel (``vpermb`` lookups of the
  2-bit codes in 64-byte tables built from the activation nibbles, feeding ``vpdpbusd`` with the alpha
  codes; groups of 4; AVX-512 VBMI + VNNI), built for ``--vnni-mcpu``; ``vlut`` splits the output channels
  over TVM's thread pool, ``vlut-1t`` runs on one thread (no parallel loop);
* ``ort-int8-1t``: the ``ort-int8`` row with one intra-op thread;
* ``lut``: the lookup-table kernel (``kernels.lut``: 81 partial sums per 4 input channels, one lookup per 4
  weights), built for the same CPU; LowerIntegerLayers gives it the x86 dense layers with at most
  ``kernels.lut.LUT_MAX_ROWS`` rows, the rule this script measures with ``--shapes``:

    python scripts/bench_gemm.py --shapes 1x1000x512,4x1000x512,8x1000x512,1x4096x4096 --kernels avx2-dot,lut

The batch-1 4096 x 4096 dense row against onnxruntime int8 (issue 17's floor: >= 1.5x faster):

    python scripts/bench_gemm.py --shapes 1x4096x4096 --kernels vlut,vlut-1t,vnni,ort-int8,ort-int8-1t --repeat 30

Timing: every kernel is built and checked first, then ``--repeat`` rounds each time 3 calls of every kernel
in turn (interleaved, so a change in the machine's load hits all alike); the medians over the rounds are
reported, wall clock and the CPU time of the process (``time.process_time``, all its threads: the TVM
thread pool's spin-waits count, also those a parallel kernel leaves behind while the next one runs).
With an ``ort-int8`` row every row also gets ``ratio_vs_ort_int8`` = its median / the ORT int8 median.
The script ends with the load average.

``--arm``: the emulated Raspberry Pi boards instead of the x86 host (``bash scripts/board/setup.sh`` once).  For
each ``--targets`` core (rasp4b = Pi 4, qemu -cpu cortex-a72; rasp5 = Pi 5, cortex-a76) and shape it counts the
guest instructions and estimates the Pi cycles of one call, the way ``scripts/bench_arm.py`` counts a model:

* ``tbl``: ``kernels.tbl`` (NEON ``tbl`` lookups of the 2-bit codes in 16-byte tables built from the activation
  nibbles, ``smlal`` by the alpha codes; groups of 4, alpha codes of 7 bits), what ``kernels.select`` gives a
  ternary dense layer of at most ``kernels.tbl.MAX_ROWS`` rows on aarch64, the rule these rows measure;
* ``default``: the generic ternary dense kernel (``kernels.ternary_dense`` + ``schedule_default`` for the
  target), what ``kernels.select`` gave every aarch64 dense layer before ``kernels.tbl``;
* ``ort-int8``: onnxruntime's ``quantize_dynamic`` MatMul (``DynamicQuantizeLinear`` + ``MatMulInteger`` + the
  float scaling, int8 weights) run by the aarch64 onnxruntime wheel on the board, one thread, counted inside
  its library (the per-run session overhead included, as in ``bench_arm.py``).

The TVM kernels are cross-compiled for the target and run in one warm board Python (``cost.runner.BoardServer``:
one forked child per count, TVM_NUM_THREADS=1) with the TCG plugin counting inside the kernel's library; a
call's count is (count(1 + K) - count(1)) / K (K = ``--runs``), so loading cancels; counts are deterministic, so
one run each suffices.  ``est_cycles``: the executed blocks timed by llvm-mca with the core's model
(``tvm_lowbit.cost``; Pi 4 = Cortex-A57 model, Pi 5 = Neoverse N1), caches and DRAM ignored.  The kernels'
arguments are small random integers (the counts do not depend on the values); bit-exactness on the boards is
``tests/test_tbl.py``'s.  The table prints, per shape and core, the instructions and estimated cycles of every
kernel and its ratios to ``default`` and to ``ort-int8``:

    python scripts/bench_gemm.py --arm --json arm-gemm.json          # the shapes of docs/results-arm.md
    python scripts/bench_gemm.py --arm --shapes 1x4096x4096 --kernels tbl,default --targets rasp4b

With ``--arm`` the ``--json`` rows are ``{"shape", "kernel", "target", "insns", "insn_classes", "est_cycles",
"est_ms", "ratio_vs_default", "ratio_vs_ort_int8", "ratio_vs_default_cycles", "ratio_vs_ort_int8_cycles"}``
(``est_ms``: estimated cycles / the Pi's clock, not a measured time).

The alpha codes are drawn from 0..127 (7 bits, FGQ ``alpha_bits=7``), which every kernel takes.

On a shared machine the wall-clock rate measures the share of the cores this process got. The script also
prints the rate per CPU-second the process was actually given (the CPU time times the cores; spin-waits
count as busy, so this errs low). Only the wall-clock numbers go into the JSON.

    python scripts/bench_gemm.py --json gemm.json
``--shapes MxNxK,...`` runs several shapes (default: ``--m``, ``--n``, ``--k``). ``--json`` writes
``{"rows": [{"shape", "kernel", "ms", "gops", "peak_gops", "fraction_of_peak"(, "ratio_vs_ort_int8")}, ...]}``
with ``shape`` = [M, N, K] and ``ms`` the median wall time of one call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

AVX2_INT8_MACS_PER_CYCLE = 64


def cpu_ghz() -> float:
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
    if not mhz:
        raise SystemExit("no 'cpu MHz' in /proc/cpuinfo: pass --ghz")
    return sum(mhz) / len(mhz) / 1e3


def build_default(m: int, n: int, k: int, group_size: int, target: dict):  # -> compiled kernel
    import tvm
    from tvm import te

    from tvm_lowbit import kernels, qmath

    lay = qmath.group_layout((n, k), group_size)
    x = te.placeholder((m, k), "uint8", name="x")
    codes = te.placeholder((n, -(-lay.row_len // 4)), "uint8", name="codes")
    alpha = te.placeholder((n, lay.groups_per_row), "int16", name="alpha_q")
    scale = te.placeholder((n,), "float32", name="out_scale")
    bias = te.placeholder((n,), "float32", name="out_bias")
    out = kernels.ternary_dense(x, codes, alpha, scale, bias, weight_shape=(n, k), group_size=group_size,
                                out_mode="acc")
    func = kernels.make_prim_func([x, codes, alpha, scale, bias], out, "main")
    tgt = tvm.target.Target(target)
    return tvm.compile(tvm.IRModule({"main": kernels.schedule_default(func, tgt)}), target=tgt)


def build_lut(m: int, n: int, k: int, group_size: int, target: dict):  # -> compiled kernel
    import tvm
    from tvm import te

    from tvm_lowbit import kernels
    from tvm_lowbit.kernels import lut

    x = te.placeholder((m, k), "uint8", name="x")
    codes3 = te.placeholder((n, k // 4), "uint8", name="codes3")
    alpha = te.placeholder((n, -(-k // group_size)), "int16", name="alpha_q")
    scale = te.placeholder((n,), "float32", name="out_scale")
    bias = te.placeholder((n,), "float32", name="out_bias")
    out = lut.ternary_dense_lut(x, codes3, alpha, scale, bias, weight_shape=(n, k), group_size=group_size,
                                out_mode="acc")
    sch = tvm.s_tir.Schedule(kernels.make_prim_func([x, codes3, alpha, scale, bias], out, "main"))
    lut.schedule_dense_lut(sch)
    return tvm.compile(sch.mod, target=tvm.target.Target(target))


def host_isa() -> str:
    """The widest int8 dot-product ISA this host's CPU reports (what MLAS dispatches to by CPUID)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    for flag, name in (("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return "SSE"


def build_ort_int8(m: int, n: int, k: int, threads: int, spin: bool = True):  # -> (callable, ops)
    """ONNX Runtime's dynamic int8 MatMul (MatMulInteger) of an [m, k] float input by a [k, n] weight."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        fp32, q8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(fp32))
        quantize_dynamic(str(fp32), str(q8), weight_type=QuantType.QInt8)
        qbytes = q8.read_bytes()
    ops = sorted({node.op_type for node in onnx.load_from_string(qbytes).graph.node})
    if "MatMulInteger" not in ops:
        raise SystemExit(f"quantize_dynamic gave no MatMulInteger (ops: {ops})")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:  # ORT's idle intra-op threads then sleep instead of spinning on a core
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(qbytes, so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k)).astype(np.float32)
    return (lambda: sess.run(None, {"x": x})), ops


def interleaved_times(runs: dict, repeat: int, number: int = 3) -> tuple[dict, dict]:
    """``repeat`` rounds; each round times ``number`` calls of every kernel in turn (after one warm-up call
    each), so a change in the machine's load hits every kernel alike.  Returns the wall and the CPU seconds
    (``time.process_time``: all this process's threads) per call of each round, by kernel."""
    for fn in runs.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(number):
                fn()
            wall[name].append((time.perf_counter() - t0) / number)
            cpu[name].append((time.process_time() - c0) / number)
    return wall, cpu


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes takes MxNxK,... with positive integers, got {text!r}")
    return shapes  # type: ignore[return-value]


# --arm: batch-1 dense layers (classifiers, 4096 x 4096) and a transformer's linears (384 <-> 1536) at 1..64 rows
ARM_SHAPES = "1x512x512,1x1024x1024,1x4096x4096,1x1536x384,1x384x1536,8x1536x384,32x1536x384,64x1536x384"
ARM_KERNELS = ("tbl", "default", "ort-int8")
ARM_TARGETS = ("rasp4b", "rasp5")


def ort_int8_file(m: int, n: int, k: int, folder: Path) -> Path:
    """The quantize_dynamic (MatMulInteger) model of ``build_ort_int8`` saved as ``folder/ort-MxNxK.onnx``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
    fp32, q8 = folder / f"fp32-{m}x{n}x{k}.onnx", folder / f"ort-{m}x{n}x{k}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    quantize_dynamic(str(fp32), str(q8), weight_type=QuantType.QInt8)
    ops = sorted({node.op_type for node in onnx.load(str(q8)).graph.node})
    if "MatMulInteger" not in ops:
        raise SystemExit(f"quantize_dynamic gave no MatMulInteger (ops: {ops})")
    return q8


def arm_kernel_lib(kernel: str, m: int, n: int, k: int, gs: int, target: str, folder: Path) -> tuple[Path, list]:
    """A TVM kernel cross-compiled for ``target`` (its library, named after kernel and shape) and its argument
    infos (``["TENSOR", dtype, shape]``, as ``cost.runner`` takes them)."""
    from tvm_lowbit.kernels import tbl
    from tvm_lowbit.targets import load_target

    spec = load_target(target)
    tgt = spec.tvm_target()
    groups = -(-k // gs)
    if kernel == "tbl":
        if gs != tbl.GROUP_SIZE or n % tbl.LANES or k % tbl.STEP:
            raise SystemExit(f"tbl needs --group-size {tbl.GROUP_SIZE}, N % {tbl.LANES} == 0 and K % {tbl.STEP} == 0, "
                             f"got N={n}, K={k}, group size {gs}")
        lib = tbl.build_dense(m, n, k, target=tgt)
        tile = [n // tbl.LANES, k // tbl.GROUP_SIZE, tbl.LANES]
        args = [["TENSOR", "uint8", [m, k]], ["TENSOR", "uint8", tile], ["TENSOR", "uint8", tile],
                ["TENSOR", "int32", [m, n]]]
    elif kernel == "default":
        lib = build_default(m, n, k, gs, tgt)
        args = [["TENSOR", "uint8", [m, k]], ["TENSOR", "uint8", [n, -(-k // 4)]], ["TENSOR", "int16", [n, groups]],
                ["TENSOR", "float32", [n]], ["TENSOR", "float32", [n]], ["TENSOR", "int32", [m, n]]]
    else:
        raise SystemExit(f"unknown --arm kernel {kernel!r} ({', '.join(ARM_KERNELS)})")
    path = folder / f"{kernel}-{m}x{n}x{k}-{target}.so"
    lib.export_library(str(path), cc=spec.compiler_path())
    return path, args


def arm_main(a: argparse.Namespace) -> int:
    """``--arm``: instructions and estimated cycles per call on the emulated Pi boards (see the module doc)."""
    import tempfile

    from bench_arm import CLASSES, ORT_JITTER, per_inference

    from tvm_lowbit.cost import estimate, read_blocks
    from tvm_lowbit.cost import core as cost_core
    from tvm_lowbit.cost.runner import BoardServer
    from tvm_lowbit.deploy.board import ORT_LIBRARY, BoardError, icount_plugin, qemu_cpu, require_ort, run_ort

    shapes = parse_shapes(a.shapes or ARM_SHAPES)
    names = a.kernels.split(",") if a.kernels else list(ARM_KERNELS)
    targets = a.targets.split(",")
    for kernel in names:
        if kernel not in ARM_KERNELS:
            raise SystemExit(f"unknown --arm kernel {kernel!r} ({', '.join(ARM_KERNELS)})")
    try:
        icount_plugin()
        cpus = {t: qemu_cpu(t) for t in targets}
        if "ort-int8" in names:
            for cpu in cpus.values():
                require_ort(cpu)
    except BoardError as e:
        print(f"bench_gemm --arm: {e}", file=sys.stderr)
        return 2
    runs, rows = a.runs, []
    t_start, c_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="bench-gemm-arm-") as tmp_name:
        tmp = Path(tmp_name)
        for target, cpu in cpus.items():
            server = BoardServer(cpu)
            core = cost_core(cpu)
            try:
                for m, n, k in shapes:
                    for kernel in names:
                        t0 = time.perf_counter()
                        if kernel == "ort-int8":
                            model = ort_int8_file(m, n, k, tmp)
                            x_path, out_path = tmp / f"x-{m}x{k}.bin", tmp / f"y-{m}x{n}.bin"
                            np.random.default_rng(2).standard_normal((m, k)).astype(np.float32).tofile(x_path)
                            folder = tmp / f"ort-{m}x{n}x{k}-{target}"
                            folder.mkdir()

                            def run(plugin: str | None, count: int) -> None:
                                r = run_ort(model, x_path, (m, k), out_path, cpu, count, plugin=plugin)
                                if r.returncode != 0:
                                    raise BoardError(f"onnxruntime failed on -cpu {cpu}: "
                                                     f"{(r.stdout + r.stderr)[-600:]}")

                            run(None, 1)  # uncounted warm-up (the board Python compiles its .pyc files once)
                            insns, classes, cycles, _ = per_inference(run, folder, ORT_LIBRARY, cpu, runs,
                                                                      f"ort-int8 {m}x{n}x{k} on {target}", ORT_JITTER)
                        else:
                            lib, args = arm_kernel_lib(kernel, m, n, k, a.group_size, target, tmp)
                            counts = []
                            for number in (1, 1 + runs):
                                server.cycles(lib, args, number)
                                got = json.loads((server.tmp / "counts.json").read_text())
                                counts.append((int(got["matched_insns"]), got["matched_classes"],
                                               read_blocks(server.blocks)))
                            (i1, c1, b1), (ik, ck, bk) = counts
                            insns = (ik - i1) // runs
                            classes = {c: (int(ck[c]) - int(c1[c])) // runs for c in CLASSES}
                            extra = {b: v - b1.get(b, 0) for b, v in bk.items() if v - b1.get(b, 0)}
                            cycles = round(estimate(extra, core).cycles / runs)
                        rows.append({"shape": [m, n, k], "kernel": kernel, "target": target, "insns": insns,
                                     "insn_classes": classes, "est_cycles": cycles,
                                     "est_ms": round(cycles / core.clock_hz * 1e3, 4)})
                        print(f"{target:7s} M={m} N={n} K={k} {kernel:9s}: {insns:>13,d} instructions "
                              f"({insns / (m * n * k):.3f} per MAC), {cycles:>13,d} est. cycles "
                              f"({time.perf_counter() - t0:.0f} s)", flush=True)
            finally:
                server.close()
    for r in rows:
        same = {x["kernel"]: x for x in rows if x["shape"] == r["shape"] and x["target"] == r["target"]}
        for base in ("default", "ort-int8"):
            key = base.replace("-", "_")
            b = same.get(base)
            r[f"ratio_vs_{key}"] = round(r["insns"] / b["insns"], 4) if b and b["insns"] else None
            r[f"ratio_vs_{key}_cycles"] = round(r["est_cycles"] / b["est_cycles"], 4) if b and b["est_cycles"] else None

    def ratio(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    print()
    print(f"{'target':7s} {'shape MxNxK':16s} {'kernel':9s} {'insns':>13s} {'insn/MAC':>8s} {'vs_default':>10s} "
          f"{'vs_ort_int8':>11s} {'est_cycles':>13s} {'cyc_vs_def':>10s} {'cyc_vs_ort':>10s} {'est_ms':>8s}")
    for r in rows:
        m, n, k = r["shape"]
        print(f"{r['target']:7s} {f'{m}x{n}x{k}':16s} {r['kernel']:9s} {r['insns']:13,d} "
              f"{r['insns'] / (m * n * k):8.3f} "
              f"{ratio(r['ratio_vs_default']):>10s} {ratio(r['ratio_vs_ort_int8']):>11s} {r['est_cycles']:13,d} "
              f"{ratio(r['ratio_vs_default_cycles']):>10s} {ratio(r['ratio_vs_ort_int8_cycles']):>10s} "
              f"{r['est_ms']:8.3f}")
    print(f"host time: {time.perf_counter() - t_start:.0f} s wall, {time.process_time() - c_start:.0f} s CPU of this "
          f"process (the board runs are child processes); load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=256, help="activation rows (default 256)")
    ap.add_argument("--n", type=int, default=2048, help="output channels (default 2048)")
    ap.add_argument("--k", type=int, default=2048, help="reduction length (default 2048)")
    ap.add_argument("--shapes", default=None, help="MxNxK,... (several shapes; overrides --m/--n/--k)")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--kernels", default=None,
                    help="comma list (default avx2-dot,default; with --arm tbl,default,ort-int8)")
    ap.add_argument("--mcpu", default="x86-64-v3",
                    help="LLVM CPU of the build (default x86-64-v3: AVX2, no AVX-512; znver3 also has SSE4a: SIGILL on Intel)")
    ap.add_argument("--vnni-mcpu", default=None,
                    help="LLVM CPU of the vnni kernel's build (default: this host's, which must have VNNI)")
    ap.add_argument("--ghz", type=float, default=None, help="clock for the peak (default: /proc/cpuinfo)")
    ap.add_argument("--macs-per-cycle", type=int, default=AVX2_INT8_MACS_PER_CYCLE)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ort-spin", choices=("on", "off"), default="on",
                    help="onnxruntime's idle intra-op threads spin (its default) or sleep; spinning threads take "
                         "a core from the TVM thread pool of the next kernel in the same process")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--arm", action="store_true",
                    help="count instructions and estimated cycles on the emulated Pi boards instead of timing on the "
                         f"host (kernels {','.join(ARM_KERNELS)}; default shapes {ARM_SHAPES})")
    ap.add_argument("--targets", default=",".join(ARM_TARGETS), help="--arm: the boards (default rasp4b,rasp5)")
    ap.add_argument("--runs", type=int, default=2, help="--arm: K, the extra calls whose count is averaged (default 2)")
    a = ap.parse_args(argv)
    if a.arm:
        return arm_main(a)

    import tvm

    from tvm_lowbit import qmath
    from tvm_lowbit.kernels import avx2, lut, vlut, vnni

    cores = int(os.environ["TVM_NUM_THREADS"])
    ghz = a.ghz or cpu_ghz()
    peak = cores * ghz * a.macs_per_cycle * 2
    print(f"peak = {cores} cores x {ghz:.3f} GHz x {a.macs_per_cycle} int8 MACs/cycle x 2 = {peak:.1f} GOP/s")
    gs = a.group_size
    target = {"kind": "llvm", "mcpu": a.mcpu, "num-cores": cores}
    vnni_target = {"kind": "llvm", "mcpu": a.vnni_mcpu or tvm.target.codegen.llvm_get_system_cpu(), "num-cores": cores}
    print(f"CPU ISA (what onnxruntime's MLAS dispatches to): {host_isa()}; TVM builds: avx2-dot/default/lut for "
          f"mcpu={a.mcpu}, vnni for mcpu={vnni_target['mcpu']}")
    rows = []
    for m, n, k in parse_shapes(a.shapes) if a.shapes else [(a.m, a.n, a.k)]:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (m, k)).astype(np.uint8)
        t = rng.integers(-1, 2, (n, k))
        codes = qmath.pack_2bit(t)
        alpha = rng.integers(0, 128, (n, -(-k // gs))).astype(np.int16)  # 7-bit codes: every kernel takes them
        ref = avx2.reference_ternary(x[:8], codes, alpha, n, k, gs)
        runs: dict[str, object] = {}
        notes: dict[str, str] = {}
        for kernel in (a.kernels or "avx2-dot,default").split(","):
            weights, alpha_arg = codes, alpha
            if kernel in ("ort-int8", "ort-int8-1t"):
                threads = cores if kernel == "ort-int8" else 1
                runs[kernel], ops = build_ort_int8(m, n, k, threads, a.ort_spin == "on")
                notes[kernel] = f"onnxruntime {'+'.join(ops)}, int8 weights, {host_isa()} by CPUID, {threads} thread(s)"
                continue
            if kernel == "vnni":
                if k % 4 or gs % 4 or n % 16:
                    raise SystemExit(f"vnni needs K % 4 == 0, N % 16 == 0 and --group-size % 4 == 0, got N={n}, K={k}")
                f, _ = vnni.build_dense(m, n, k, group_size=gs, target=vnni_target)
                weights, alpha_arg = vnni.ternary_tiles(codes, alpha, qmath.group_layout((n, k), gs), 16)
            elif kernel in ("vlut", "vlut-1t"):
                if gs != vlut.GROUP_SIZE or k % vlut.STEP or n % 64:
                    raise SystemExit(f"vlut needs --group-size {vlut.GROUP_SIZE}, K % {vlut.STEP} == 0 and N % 64 == 0, "
                                     f"got N={n}, K={k}, group size {gs}")
                f = vlut.build_dense(m, n, k, parallel=kernel == "vlut", target=vnni_target)
                weights, alpha_arg = vlut.vlut_tiles(codes, alpha)
            elif kernel == "avx2-dot":
                f, _ = avx2.build_dense("ternary", m, n, k, group_size=gs, target=target)
            elif kernel == "default":
                f = build_default(m, n, k, gs, target)
            elif kernel == "lut":
                if k % 4 or gs % 4:
                    raise SystemExit(f"lut needs K % 4 == 0 and --group-size % 4 == 0, got K={k}, group size {gs}")
                f, weights = build_lut(m, n, k, gs, target), lut.base3_codes(t)
            else:
                raise SystemExit(f"unknown kernel {kernel!r} (avx2-dot, vnni, vlut, vlut-1t, default, lut, ort-int8, ort-int8-1t)")
            operands = (x, weights, alpha_arg) if kernel.startswith("vlut") else (x, weights, alpha_arg, np.ones(n, np.float32),
                                                                       np.zeros(n, np.float32))
            args = [tvm.runtime.tensor(v) for v in (*operands, np.zeros((m, n), np.int32))]
            mod = f.mod if hasattr(f, "mod") else f
            func = mod["main"]
            func(*args)
            if not np.array_equal(args[-1].numpy()[:8].astype(np.int64), ref):
                raise SystemExit(f"{kernel}: accumulators differ from the numpy reference")
            runs[kernel] = (lambda fn=func, av=args: fn(*av))
            notes[kernel] = "bit-exact"
        wall, cpu = interleaved_times(runs, a.repeat)  # type: ignore[arg-type]
        ort_ms = float(np.median(wall["ort-int8"])) * 1e3 if "ort-int8" in wall else None
        for kernel in runs:
            sec = float(np.median(wall[kernel]))
            cpu_sec = float(np.median(cpu[kernel]))
            gops = 2.0 * m * n * k / sec / 1e9
            gops_cpu = 2.0 * m * n * k / cpu_sec / 1e9 * cores if cpu_sec > 0 else float("nan")
            row = {"shape": [m, n, k], "kernel": kernel, "ms": round(sec * 1e3, 4), "gops": round(gops, 2),
                   "peak_gops": round(peak, 2), "fraction_of_peak": round(gops / peak, 4)}
            vs = ""
            if ort_ms is not None:
                row["ratio_vs_ort_int8"] = round(sec * 1e3 / ort_ms, 4)
                vs = f"  ORT int8 / this {ort_ms / (sec * 1e3):5.2f}x"
            rows.append(row)
            print(f"{kernel:10} M={m} N={n} K={k} g={gs}: {sec * 1e3:8.3f} ms  {gops:7.1f} GOP/s  "
                  f"{100 * gops / peak:5.1f}% of peak; CPU {cpu_sec * 1e3:8.3f} ms/call "
                  f"(per CPU-second {gops_cpu:7.1f} GOP/s = {100 * gops_cpu / peak:5.1f}%){vs}  ({notes[kernel]})")
    print(f"load average (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
