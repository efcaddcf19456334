"""Exhaustive check of tvm_lowbit.kernels.vecmath against the C library, bit for bit, on every float32.

For every one of the 2^32 float32 bit patterns (NaNs, infinities, denormals, -0 included) the vectorized
TIR expression (a 16-lane loop, as ``ScheduleFloatOps`` builds it) and TVM's plain ``tirx`` intrinsic (one
call of the C library's function per element: what a build without ``VectorMath`` computes) are run on the
same inputs and their outputs compared as integers::

    python scripts/check_vecmath.py [--ops expf,erff] [--nontrivial] [--target '{"kind": "llvm", "mcpu": "znver4"}']

Prints one line per op: inputs checked, mismatches (with the first few), CPU seconds of each side.
Exit status 1 when any output differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np
import tvm
from tvm import te, tirx

from tvm_lowbit.kernels import vecmath

OPS: dict[str, tuple[Callable, Callable]] = {"expf": (tirx.exp, vecmath.expf), "erff": (tirx.erf, vecmath.erff)}
# --nontrivial: the |x| bit patterns where the op computes (outside: a constant, +-x, inf or NaN), both signs
NONTRIVIAL = {"expf": (0x00000000, 0x42D00000), "erff": (0x31800000, 0x40C00000)}


def build_elementwise(f: Callable, n: int, target: tvm.target.Target, lanes: int = 16) -> tvm.runtime.Module:
    """``out[i] = f(in[i])`` over float32 ``[n]``, the loop split by ``lanes`` and vectorized."""
    a = te.placeholder((n,), "float32", name="a")
    b = te.compute((n,), lambda i: f(a[i]), name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (loop,) = sch.get_loops(sch.get_sblock("b"))
    sch.vectorize(sch.split(loop, [None, lanes])[1])
    return tvm.compile(sch.mod, target=target)


def check(op: str, target: tvm.target.Target, chunk_bits: int, nontrivial: bool = False) -> int:
    libm_f, vec_f = OPS[op]
    n = 1 << chunk_bits
    ref, vec = build_elementwise(libm_f, n, target), build_elementwise(vec_f, n, target)
    out_ref, out_vec = tvm.runtime.tensor(np.zeros(n, np.float32)), tvm.runtime.tensor(np.zeros(n, np.float32))
    bad: list[int] = []
    n_bad = 0
    cpu_ref = cpu_vec = 0.0
    lo, hi = NONTRIVIAL[op] if nontrivial else (0, 1 << 31)
    starts = [s for base in (0, 1 << 31) for s in range(base + lo - lo % n, base + hi, n)]
    total = 0
    for start in starts:
        bits = np.arange(start, start + n, dtype=np.uint64).astype(np.uint32)
        total += n
        x = tvm.runtime.tensor(bits.view(np.float32))
        t = time.process_time()
        ref(x, out_ref)
        cpu_ref += time.process_time() - t
        t = time.process_time()
        vec(x, out_vec)
        cpu_vec += time.process_time() - t
        diff = np.nonzero(out_ref.numpy().view(np.uint32) != out_vec.numpy().view(np.uint32))[0]
        n_bad += len(diff)
        bad.extend(int(bits[i]) for i in diff[: max(0, 8 - len(bad))])
    print(f"{op}: {total} inputs{' (both signs of |x| bits %#x-%#x)' % (lo, hi) if nontrivial else ''}, {n_bad} differ from the C library"
          + (f" (first: {', '.join(hex(b) for b in bad)})" if bad else "")
          + f"; CPU s: library {cpu_ref:.1f}, vecmath {cpu_vec:.1f}")
    return n_bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {sorted(OPS)}")
    p.add_argument("--target", default=None, help="TVM target as JSON (default: this host's CPU)")
    p.add_argument("--nontrivial", action="store_true",
                   help="only the |x| range where the op computes (NONTRIVIAL), both signs: ~1/8 of erff's 2^32")
    p.add_argument("--chunk-bits", type=int, default=24, help="log2 of the inputs per call (default 24: 64 MB)")
    args = p.parse_args(argv)
    target = tvm.target.Target(json.loads(args.target) if args.target else
                               {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not vecmath.expf_matches_libm(target):
        print(f"target {target}: not an x86-64 glibc target with FMA and AVX2; vecmath does not apply",
              file=sys.stderr)
        return 2
    failed = sum(check(op, target, args.chunk_bits, args.nontrivial) > 0 for op in args.ops.split(","))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
