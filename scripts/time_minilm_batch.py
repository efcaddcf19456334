"""MiniLM FGQ N=4 (7-bit alphas), compiled for x86 and run on the 16 evaluation sentences x 32 tokens at
once (``[16, 32, 384]`` activations: batch x tokens): the kernels the layers got, the median run time,
and the compiled vs fake-quant lowest cosine.  Read the CPU seconds beside the wall on a shared host.

    python scripts/time_minilm_batch.py [--runs 10]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import Counter

import numpy as np
import torch

import tvm_lowbit
from tvm_lowbit.models import minilm
from tvm_lowbit.quantizers.fgq import FGQ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="timed runs (median reported)")
    a = ap.parse_args(argv)
    packed = minilm.PackedMiniLM(minilm.load_torch()).eval()
    x = minilm.pack(minilm.inputs())
    xc = minilm.pack(minilm.inputs(minilm.CALIB_SENTENCES))[:32]
    t = time.time()
    q = tvm_lowbit.quantize(packed, FGQ(group_size=4, act_bits=8, first_layer="int8", last_layer="fgq",
                                        alpha_bits=7), xc, progress=False)
    art = tvm_lowbit.compile(q, x.numpy(), target="x86")
    print(f"quantize + compile {time.time() - t:.0f} s wall")
    print("kernels", dict(Counter(art.report.kernel_names.values())))
    xs = x.numpy()
    got = np.asarray(art.run(xs))
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        art.run(xs)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        want = q(x).numpy()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"median {1e3 * np.median(times):.1f} ms, min {1e3 * min(times):.1f} ms ({tuple(xs.shape)} input); "
          f"compiled vs fake-quant lowest cosine {minilm.cosines(got, want).min():.6f}; "
          f"{ru.ru_utime + ru.ru_stime:.0f} CPU s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
