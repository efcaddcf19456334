"""vecmath / VectorMath: vectorized float32 exp and erf with the C library's bits.

Dense samples of the float32 line (every 4096th bit pattern from a random offset, plus the edges: zeros,
denormals, the overflow / underflow thresholds and their neighbours, infinities, NaN payloads) through the
vectorized TIR expressions against TVM's intrinsics, which call the C library (checked against ``ctypes``
calls of libm on a subset): equal bit for bit.  The exhaustive check over all 2^32 inputs is
``scripts/check_vecmath.py``.  Then the pass: a graph of exp / SiLU / softmax / erf / GELU built with and
without it gives the same bits, and where it applies no ``exp`` / ``erf`` call is left.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax, te, tirx

from tvm_lowbit.importer import import_torch
from tvm_lowbit.kernels import vecmath
from tvm_lowbit.passes.schedule_float_ops import build_pipeline
from tvm_lowbit.passes.vector_math import VECMATH_ENV, VectorMath, vector_math_legalizations

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
pytestmark = pytest.mark.skipif(not vecmath.erff_matches_libm(HOST),
                                reason="vecmath reproduces x86-64 glibc (2.27-2.40) with FMA and AVX2 only")


def _edges() -> np.ndarray:
    bits = [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000, 0x80800000,
            0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA12345,
            0xFFE54321, 0x3F800000, 0xBF800000, 0x04000000, 0x03FFFFFF, 0x31800000, 0x317FFFFF, 0x3F580000,
            0x3F57FFFF, 0x3FA00000, 0x3F9FFFFF, 0x4036DB6E, 0x4036DB6D, 0x40C00000, 0x40BFFFFF, 0x42B00000]
    for t in (vecmath.OVERFLOW, vecmath.UNDERFLOW, vecmath.MAY_UNDERFLOW):
        b = int(np.float32(t).view(np.uint32))
        bits += [b - 2, b - 1, b, b + 1, b + 2]
    return np.array(bits, np.uint32).view(np.float32)


def _samples(seed: int) -> np.ndarray:
    start = np.random.default_rng(seed).integers(0, 4096)
    dense = np.arange(start, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([dense, _edges()])


def _run(f, x: np.ndarray) -> np.ndarray:
    """``f`` over ``x`` in a 16-lane vectorized loop built for the host."""
    a = te.placeholder((len(x),), "float32", name="a")
    b = te.compute((len(x),), lambda i: f(a[i]), name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (loop,) = sch.get_loops(sch.get_sblock("b"))
    sch.vectorize(sch.split(loop, [None, 16])[1])
    fn = tvm.compile(sch.mod, target=HOST)
    out = tvm.runtime.tensor(np.zeros(len(x), np.float32))
    fn(tvm.runtime.tensor(x), out)
    return out.numpy()


def _libm(name: str, x: np.ndarray) -> np.ndarray:
    f = getattr(ctypes.CDLL(ctypes.util.find_library("m")), name)
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return np.array([f(float(v)) for v in x], np.float32)


def _assert_same_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray) -> None:
    bad = np.nonzero(got.view(np.uint32) != want.view(np.uint32))[0]
    assert len(bad) == 0, f"{len(bad)} differ, e.g. x={x[bad[:4]]} got {got[bad[:4]]} want {want[bad[:4]]}"


def test_expf_table_is_glibcs() -> None:
    assert vecmath.TABLE[0] == 0x3FF0000000000000
    assert vecmath.TABLE[1] == 0x3FEFD9B0D3158574 and vecmath.TABLE[31] == 0x3FEFD0765B6E4540


@pytest.mark.parametrize(("name", "intrinsic", "ours"), [("expf", tirx.exp, vecmath.expf),
                                                          ("erff", tirx.erf, vecmath.erff)])
def test_bits_equal_the_c_library(name: str, intrinsic, ours) -> None:
    x = _samples(seed=len(name))
    library = _run(intrinsic, x)
    sub = np.concatenate([x[:: len(x) // 2000], _edges()])
    _assert_same_bits(_run(intrinsic, sub), _libm(name, sub), sub)  # the intrinsic is the C library's call
    _assert_same_bits(_run(ours, x), library, x)


class MathOps(nn.Module):
    """exp, PyTorch's SiLU formula, softmax, erf and GELU: the float ops VectorMath legalizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        silu = x / (1 + torch.exp(-x))
        soft = torch.softmax(x * 3.0, dim=-1)
        return silu + soft * torch.erf(x) + nn.functional.gelu(x) + torch.exp(x * 9.0)


def _build(mod: tvm.IRModule, pipeline) -> np.ndarray:
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3)) * 4
    ex = tvm.compile(mod, target=HOST, relax_pipeline=pipeline)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()


def test_vector_math_keeps_every_bit_and_leaves_no_library_call(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = import_torch(MathOps().eval(), torch.randn(2, 8, 64))
    legalized = relax.transform.LegalizeOps()(VectorMath(HOST)(mod)).script()
    assert "T.exp(" not in legalized and "T.erf(" not in legalized and "llvm.fma" in legalized
    fast = _build(mod, build_pipeline(HOST))
    monkeypatch.setenv(VECMATH_ENV, "off")
    assert "T.exp(" in relax.transform.LegalizeOps()(VectorMath(HOST)(mod)).script()
    plain = _build(mod, build_pipeline(HOST))
    assert np.array_equal(fast.view(np.uint32), plain.view(np.uint32)), np.abs(fast - plain).max()
    assert np.isinf(fast).any() and np.isfinite(fast).mean() > 0.5  # exp(9x) overflows in places: covered


def test_other_targets_keep_the_library_calls() -> None:
    assert vector_math_legalizations(HOST)  # exp, softmax, erf, gelu here
    assert not vector_math_legalizations(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}))  # no FMA/AVX2
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"})
    assert not vector_math_legalizations(arm)
