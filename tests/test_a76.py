"""The Cortex-A76 conv kernels (kernels.a76: kernels.neon's folded-alpha sdot conv with a 16-byte weight decode and
the RGB stem's columns read as channels): the compute bit-exact against the numpy integer reference on the host, the
registry's choice on the Pi 5, the instructions the schedule compiles to, and the scheduled kernels bit for bit
on the emulated Cortex-A76 (the decode intrinsic runs only there)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from helpers import BoardPythons
from test_board import pytestmark as BOARD_MARKS
from test_neon import epilogue_form, expected
from tvm_lowbit import kernels, qmath
from tvm_lowbit.deploy import board as emu
from tvm_lowbit.kernels import LayerSpec, a76, neon, vnni
from tvm_lowbit.targets import load_target

HOST = {"kind": "llvm", "mcpu": "x86-64", "num-cores": 1}


def a76_case(kind: str, k: int, c: int, hw: int, r: int, stride: int, pad: int, signed: bool, n: int = 4,
             layout: str = "NHWC", out_mode: str = "acc", epi: str = "float64", seed: int = 0,
             requant_scale: float = 0.05) -> tuple:
    """(PrimFunc, its input arrays, output shape and dtype, the numpy accumulators, scale, bias) of an A76 conv;
    ``epi``: "float64", "fma", "recip" or "integer" (the forms kernels.requant proves exact)."""
    rng = np.random.default_rng(seed + k * c + r + stride + signed)
    w = torch.randn(k, c, r, r, generator=torch.Generator().manual_seed(k + c + seed))
    dt = "int8" if signed else "uint8"
    if kind == "ternary":
        tw = qmath.ternarize_weight(w, n, alpha_bits=7)
        wint = tw.w_int.numpy()
        vals = list(vnni.ternary_tiles(tw.packed_codes(), tw.alpha_q.numpy().reshape(k, -1), tw.layout, neon.LANES))
    else:
        wint = qmath.int_quantize_weight(w, 8).w_int.numpy()
        vals = [neon.int_tile(wint, False, a76.folds_width(wint.shape))]
    xv = (rng.integers(-128, 128, (1, c, hw, hw)) if signed else rng.integers(0, 256, (1, c, hw, hw))).astype(dt)
    scale = (rng.uniform(0.5, 1.5, k) / (50 * np.sqrt(c * r * r) * np.abs(wint).max())).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, k).astype(np.float32)
    x = te.placeholder((1, c, hw, hw) if layout == "NCHW" else (1, hw, hw, c), dt, name="x")
    sc, bi = te.placeholder((k,), "float32", name="s"), te.placeholder((k,), "float32", name="b")
    zp = None if signed else te.placeholder((k,), "int32", name="zp")
    mode = dict(out_mode=out_mode, requant_scale=requant_scale if out_mode == "requant" else None,
                relu=out_mode != "acc")
    extra, extra_vals = epilogue_form(epi, wint, signed, scale, bias, requant_scale)  # (unsigned output codes)
    common = dict(weight_shape=(k, c, r, r), strides=stride, padding=pad, zp=zp, in_layout=layout,
                  out_layout=layout, **mode, **extra)
    if kind == "ternary":
        ph = [te.placeholder(v.shape, "uint8", name=f"w{i}") for i, v in enumerate(vals)]
        out = a76.ternary_conv2d_a76(x, *ph, sc, bi, group_size=n, **common)
    else:
        ph = [te.placeholder(vals[0].shape, "int8", name="w8")]
        out = a76.int_conv2d_a76(x, *ph, sc, bi, fold_width=a76.folds_width(wint.shape), **common)
    ins = [x, *ph, sc, bi, *([zp] if zp is not None else []),
           *(extra[name] for name in ("rq_mul", "rq_add") if name in extra)]
    func = kernels.make_prim_func(ins, out, f"a76_{kind}_{k}_{c}_{hw}_{r}_{stride}_{int(signed)}_{n}_{layout}_"
                                            f"{out_mode}_{epi}")
    args = [xv if layout == "NCHW" else np.ascontiguousarray(xv.transpose(0, 2, 3, 1)), *vals, scale, bias,
            *([neon.zero_point_term(wint)] if zp is not None else []), *extra_vals]
    ref = qmath.conv2d_int_np(xv.astype(np.int64), wint.astype(np.int64), (stride, stride), (pad, pad), (1, 1), 1)
    return func, args, [int(v) for v in out.shape], str(out.dtype), ref, scale, bias


CASES = [  # kind, K, C, HW, R, stride, pad, signed, N, layout, out_mode, epilogue[, seed, requant_scale]
    ("ternary", 32, 32, 8, 3, 1, 1, False, 4, "NHWC", "acc", "float64"),           # 16-byte decode, lanes
    ("ternary", 16, 32, 9, 3, 2, 1, False, 4, "NHWC", "requant", "recip"),
    ("ternary", 16, 32, 7, 3, 1, 1, False, 4, "NHWC", "float", "fma"),              # a 7-pixel tile
    ("ternary", 16, 32, 6, 3, 1, 1, False, 16, "NCHW", "requant", "float64"),       # groups of 16: 8-byte decode
    ("ternary", 16, 12, 6, 3, 1, 1, False, 4, "NHWC", "requant", "fma"),            # 3 steps: 8-byte decode
    ("ternary", 32, 32, 8, 3, 1, 1, False, 4, "NHWC", "requant", "integer", 2, 0.002),
    ("ternary", 32, 16, 8, 1, 2, 0, False, 4, "NCHW", "acc", "float64"),            # 1x1 stride 2 (downsample)
    ("int", 16, 3, 15, 7, 2, 3, True, 0, "NHWC", "requant", "recip"),               # the 7x7 RGB stem, folded
    ("int", 16, 3, 16, 7, 2, 3, True, 0, "NCHW", "float", "fma"),                   # folded, NCHW
    ("int", 16, 5, 12, 3, 1, 1, False, 0, "NHWC", "acc", "float64"),                # 15 of 16: folded, 4-ch steps
    ("int", 16, 3, 12, 3, 1, 1, True, 0, "NHWC", "float", "fma"),                   # 9 of 12: no step saved
    ("int", 16, 16, 6, 3, 1, 1, False, 0, "NHWC", "requant", "recip"),
]


def test_stem_folding_rule() -> None:
    assert a76.folds_width((64, 3, 7, 7)) and a76.folds_width((16, 5, 3, 3))  # 6 sdots a row, not 7; 4, not 6
    assert not a76.folds_width((16, 3, 3, 3)) and not a76.folds_width((16, 4, 3, 3))  # no sdot saved
    assert not a76.folds_width((16, 12, 3, 3))  # 36 channels: more than neon.FOLD_MAX_CHANNELS


@pytest.mark.parametrize("case", CASES)
def test_a76_compute_bit_exact_on_the_host(case: tuple) -> None:
    """The compute definition (the affine alpha index, the folded stem, the zero-point shift and term, the
    epilogue forms) computes the integer reference exactly."""
    func, args, shape, dtype, ref, scale, bias = a76_case(*case)
    f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target(HOST))
    t = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros(shape, dtype))]
    f["main"](*t)
    want = expected(ref, scale, bias, case[10], case[9], case[13] if len(case) > 13 else 0.05)
    np.testing.assert_array_equal(t[-1].numpy(), want)


def _asm(case: tuple) -> str:
    sch = tvm.s_tir.Schedule(a76_case(*case)[0])
    a76.schedule_conv2d_a76(sch)
    return tvm.compile(sch.mod, target=load_target("rasp5").tvm_target()).mod.inspect_source("asm")


def test_a76_instructions() -> None:
    """The inner loop is by-element sdot; the groups-of-4 decode is the 16-byte one (shifts, byte multiplies,
    st4 of 16-byte registers, no tbl); groups of 16 take neon's 8-byte decode (tbl)."""
    asm = _asm(CASES[0])
    assert re.search(r"^\s+sdot\s+v\d+\.4s, v\d+\.16b, v\d+\.4b\[3\]", asm, re.M)
    assert re.search(r"^\s+st4\s+\{ v\d+\.16b, v\d+\.16b, v\d+\.16b, v\d+\.16b \}", asm, re.M)
    assert re.search(r"^\s+sshr\s+v\d+\.16b, v\d+\.16b, #6", asm, re.M) and not re.search(r"^\s+tbl\s", asm, re.M)
    assert re.search(r"^\s+tbl\s+v\d+\.8b", _asm(CASES[3]), re.M)


def _spec(cin: int, family: str = "ternary", k: int = 32, r: int = 3) -> LayerSpec:
    w = torch.randn(k, cin, r, r)
    weight = qmath.ternarize_weight(w, 4, alpha_bits=7) if family == "ternary" else qmath.int_quantize_weight(w, 8)
    attrs = dict(weight_shape=(k, cin, r, r), strides=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    return LayerSpec("l", "conv2d", family, weight, attrs, 8, family == "int", (1, cin, 8, 8))


def test_registry_picks_the_a76_kernels_on_the_pi5_only() -> None:
    pi5, pi4 = load_target("rasp5").tvm_target(), load_target("rasp4b").tvm_target()
    assert kernels.select(_spec(16), pi5).kernel.name == "ternary_conv2d_a76"
    assert kernels.select(_spec(3, "int", 64, 7), pi5).kernel.name == "int_conv2d_a76"
    assert kernels.select(_spec(16), pi4).kernel.name == "ternary_conv2d_neon"
    choice = kernels.select(_spec(16), tvm.target.Target(HOST))
    assert choice.kernel.isa not in ("a76", "dotprod") and "not ternary_conv2d_a76" in choice.reason


@BOARD_MARKS[0]
@BOARD_MARKS[1]
def test_a76_kernels_are_bit_exact_on_the_pi5_board(board_python: BoardPythons, tmp_path: Path) -> None:
    """Scheduled for the Pi 5 (16-byte decode, by-element sdot, the folded stem), the kernels compute the numpy
    integer reference bit for bit on the emulated Cortex-A76."""
    target = load_target("rasp5")
    feeds, want = {}, {}
    for case in CASES:
        func, args, shape, dtype, ref, scale, bias = a76_case(*case)
        name = str(func.attrs["global_symbol"])
        sch = tvm.s_tir.Schedule(func)
        a76.schedule_conv2d_a76(sch)
        lib = tvm.compile(sch.mod, target=target.tvm_target())
        lib.export_library(str(tmp_path / f"{name}.so"), cc=target.compiler_path())
        feeds.update({f"{name}/{i}": a for i, a in enumerate([*args, np.zeros(shape, dtype)])})
        want[name] = expected(ref, scale, bias, case[10], case[9], case[13] if len(case) > 13 else 0.05)
    ok, err = board_python.run(tmp_path, feeds, emu.qemu_cpu("rasp5"))
    assert ok, err
    for name, w in want.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        if w.dtype == np.uint8:
            assert len(np.unique(w)) > 10, f"{name}: degenerate test data"
        assert got.dtype == w.dtype and np.array_equal(got, w), name
