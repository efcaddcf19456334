"""MiniLM FGQ N=4 (alpha 7 bits), compiled for x86 on the 16 evaluation sentences x 32 tokens at once
(``[16, 32, 384]`` activations: batch x tokens): which kernels the layers got, the median run time, and
the compiled vs fake-quant lowest cosine.

    python scripts/time_minilm_batch.py [RUNS]
"""
import resource
import sys
import time

import numpy as np
import torch

import tvm_lowbit
from tvm_lowbit.models import minilm
from tvm_lowbit.quantizers.fgq import FGQ
print("tvm_lowbit from", tvm_lowbit.__file__)
packed = minilm.PackedMiniLM(minilm.load_torch()).eval()
x = minilm.pack(minilm.inputs()); xc = minilm.pack(minilm.inputs(minilm.CALIB_SENTENCES))[:32]
t = time.time()
q = tvm_lowbit.quantize(packed, FGQ(group_size=4, act_bits=8, first_layer="int8", last_layer="fgq", alpha_bits=7), xc, progress=False)
art = tvm_lowbit.compile(q, x.numpy(), target="x86")
print("quantize+compile %.0f s" % (time.time() - t))
from collections import Counter
print("kernels", dict(Counter(art.report.kernel_names.values())))
xs = x.numpy(); art.run(xs)
ts = []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
    t0 = time.perf_counter(); art.run(xs); ts.append(time.perf_counter() - t0)
with torch.no_grad(): want = q(x).numpy()
got = np.asarray(art.run(xs))
print("median %.1f ms  min %.1f ms  (16 x 32 tokens); compiled vs fake-quant cos_min %.6f" % (1e3*np.median(ts), 1e3*min(ts), minilm.cosines(got, want).min()))
print("cpu s", resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime)
