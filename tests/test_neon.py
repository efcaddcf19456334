"""The aarch64 folded-alpha conv kernels (kernels.neon): the compute definitions bit-exact against the numpy
integer reference on the host (ternary and int8 per channel, unsigned and signed codes, NCHW and NHWC, the
sdot and the widening forms), the instructions the schedules compile to for the Pi 5 and the Pi 4, and the
registry's choice.  The scheduled kernels run bit-exact on the emulated boards in tests/test_board.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from tvm_lowbit import kernels, qmath
from tvm_lowbit.kernels import LayerSpec, neon, requant, vnni
from tvm_lowbit.targets import load_target

HOST = {"kind": "llvm", "mcpu": "x86-64", "num-cores": 1}


def conv_case(kind: str, k: int, c: int, hw: int, r: int, stride: int, pad: int, signed: bool, widen: bool,
              n: int = 4, layout: str = "NCHW", out_mode: str = "acc", seed: int = 0, epi: str = "float64",
              requant_scale: float = 0.05) -> tuple:
    """(PrimFunc, its input arrays, output shape and dtype, the numpy accumulators, scale, bias).
    ``epi``: the epilogue form: "float64" (the reference's own), "fma" (float32 fused multiply-add), "recip"
    (that and the requantization's division as a multiply and a correction) or "integer" (a "requant" output
    in int64, zp folded in), the others proven exact by kernels.requant."""
    rng = np.random.default_rng(seed + k * c + r + stride + signed + widen)
    w = torch.randn(k, c, r, r, generator=torch.Generator().manual_seed(k + c + seed))
    dt = "int8" if signed else "uint8"
    if kind == "ternary":
        tw = qmath.ternarize_weight(w, n, alpha_bits=7)
        wint = tw.w_int.numpy()
        vals = list(vnni.ternary_tiles(tw.packed_codes(), tw.alpha_q.numpy().reshape(k, -1), tw.layout, neon.LANES))
    else:
        wint = qmath.int_quantize_weight(w, 8).w_int.numpy()
        fold = neon.folds_width(wint.shape, widen)  # the widening kernel's RGB-stem form
        vals = [neon.int_tile(wint, widen, fold)]
    xv = (rng.integers(-128, 128, (1, c, hw, hw)) if signed else rng.integers(0, 256, (1, c, hw, hw))).astype(dt)
    scale = (rng.uniform(0.5, 1.5, k) / (50 * np.sqrt(c * r * r) * np.abs(wint).max())).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, k).astype(np.float32)
    x = te.placeholder((1, c, hw, hw) if layout == "NCHW" else (1, hw, hw, c), dt, name="x")
    sc, bi = te.placeholder((k,), "float32", name="s"), te.placeholder((k,), "float32", name="b")
    zp = None if signed else te.placeholder((k,), "int32", name="zp")
    mode = dict(out_mode=out_mode, requant_scale=requant_scale if out_mode == "requant" else None,
                relu=out_mode != "acc")
    rq_args, rq_vals = epilogue_form(epi, wint, signed, scale, bias, requant_scale)
    common = dict(weight_shape=(k, c, r, r), strides=stride, padding=pad, zp=zp, in_layout=layout,
                  out_layout=layout, **mode, **rq_args)
    if kind == "ternary":
        ph = [te.placeholder(v.shape, "uint8", name=f"w{i}") for i, v in enumerate(vals)]
        out = neon.COMPUTE[("ternary", widen)](x, *ph, sc, bi, group_size=n, **common)
    else:
        ph = [te.placeholder(vals[0].shape, "int8", name="w8")]
        out = neon.COMPUTE[("int", widen)](x, *ph, sc, bi, fold_width=fold, **common)
    ins = [x, *ph, sc, bi, *([zp] if zp is not None else []), *(rq_args[n] for n in ("rq_mul", "rq_add") if n in rq_args)]
    func = kernels.make_prim_func(ins, out, f"{kind}_{k}_{c}_{hw}_{r}_{stride}_{int(signed)}_{int(widen)}_{layout}_"
                                            f"{out_mode}_{epi}")
    args = [xv if layout == "NCHW" else np.ascontiguousarray(xv.transpose(0, 2, 3, 1)), *vals, scale, bias,
            *([neon.zero_point_term(wint)] if zp is not None else []), *rq_vals]
    ref = qmath.conv2d_int_np(xv.astype(np.int64), wint.astype(np.int64), (stride, stride), (pad, pad), (1, 1), 1)
    return func, args, [int(v) for v in out.shape], str(out.dtype), ref, scale, bias


def epilogue_form(epi: str, wint: np.ndarray, signed: bool, scale: np.ndarray, bias: np.ndarray,
                  requant_scale: float) -> tuple[dict, list[np.ndarray]]:
    """The kernel keywords and extra input arrays of an epilogue form (also test_a76.py's): "float64" (none), "fma"
    (float32 fused multiply-add), "recip" (that and the requantization's division as a multiply and a
    correction), both asserted exact here by kernels.requant, or "integer" (unsigned output codes, the zero-point
    term folded in)."""
    bounds = requant.acc_bounds(wint, 8, signed)
    if epi in ("fma", "recip"):
        assert requant.fma_unexact(scale, bias, bounds) is None
        assert epi == "fma" or requant.recip_unexact(requant_scale, scale, bias, bounds) is None
        return dict(fma_epilogue=True, recip_requant=epi == "recip"), []
    if epi == "integer":
        rq = requant.solve(scale, bias, True, requant_scale, 8, False,
                           offset=None if signed else neon.zero_point_term(wint), bounds=bounds)
        assert not isinstance(rq, str), rq
        k = len(scale)
        return (dict(rq_mul=te.placeholder((k,), "int32", name="rq_mul"),
                     rq_add=te.placeholder((k,), "int64", name="rq_add"), rq_shift=rq.shift), [rq.mul, rq.add])
    return {}, []


def expected(ref: np.ndarray, scale: np.ndarray, bias: np.ndarray, out_mode: str, layout: str,
             requant_scale: float = 0.05) -> np.ndarray:
    """What the kernel must write: the accumulators, the float outputs or the requantized codes (qmath), in
    ``layout``."""
    want = ref.astype(np.int32)
    if out_mode == "float":
        want = qmath.epilogue_np(want, scale, bias, True, 1)
    if out_mode == "requant":
        want = qmath.quantize_act_np(qmath.epilogue_np(want, scale, bias, True, 1), requant_scale, 8,
                                     False).astype(np.uint8)
    return want if layout == "NCHW" else want.transpose(0, 2, 3, 1)


CASES = [  # kind, K, C, HW, R, stride, pad, signed, widen, N, layout, out_mode[, seed, epilogue, requant_scale]
    ("ternary", 32, 16, 8, 3, 1, 1, False, False, 4, "NHWC", "acc"),
    ("ternary", 16, 16, 9, 3, 2, 1, False, True, 4, "NHWC", "requant"),
    ("ternary", 16, 16, 9, 3, 2, 1, False, True, 4, "NHWC", "requant", 0, "fma"),
    ("ternary", 16, 16, 9, 3, 2, 1, False, True, 4, "NHWC", "requant", 0, "recip"),
    ("ternary", 16, 16, 9, 3, 2, 1, False, True, 4, "NHWC", "requant", 0, "integer", 0.002),
    ("ternary", 16, 32, 6, 3, 1, 1, False, False, 16, "NCHW", "requant"),
    ("ternary", 16, 32, 6, 3, 1, 1, False, False, 16, "NCHW", "float", 0, "fma"),
    ("ternary", 16, 32, 6, 3, 1, 1, False, False, 16, "NCHW", "requant", 0, "integer", 0.002),
    ("ternary", 32, 16, 8, 1, 2, 0, False, True, 4, "NCHW", "acc"),
    ("int", 16, 3, 12, 3, 1, 1, True, False, 0, "NCHW", "acc"),
    ("int", 16, 3, 12, 3, 1, 1, True, True, 0, "NHWC", "requant"),
    ("int", 16, 3, 12, 3, 1, 1, True, True, 0, "NHWC", "requant", 0, "integer", 0.002),
    ("int", 8, 5, 7, 3, 2, 1, False, True, 0, "NHWC", "acc"),
    ("int", 16, 3, 15, 7, 2, 3, True, True, 0, "NHWC", "requant", 0, "recip"),  # the 7x7 RGB stem, columns folded
    ("int", 16, 3, 15, 7, 2, 3, True, True, 0, "NHWC", "requant", 0, "integer", 0.002),
    ("int", 16, 12, 6, 3, 1, 1, True, True, 0, "NCHW", "acc"),  # 36 channels folded would be too many: padded
    ("ternary", 16, 16, 7, 3, 1, 1, False, True, 4, "NHWC", "requant"),  # odd width: a 1-pixel tile
    ("ternary", 16, 16, 7, 3, 1, 1, False, True, 4, "NHWC", "float", 0, "fma"),
    ("ternary", 32, 32, 8, 3, 1, 1, False, False, 4, "NHWC", "requant", 2, "integer", 0.002),  # sdot by element
    ("ternary", 32, 32, 8, 3, 1, 1, False, False, 4, "NHWC", "requant", 0, "fma"),
    ("ternary", 32, 32, 8, 3, 1, 1, False, False, 4, "NCHW", "requant", 0, "recip", 0.013),
]


def test_stem_folding_rule() -> None:
    assert neon.folds_width((64, 3, 7, 7), True) and neon.folds_width((16, 1, 3, 3), True)
    assert not neon.folds_width((64, 3, 7, 7), False)  # sdot steps are 4 channels: 3 of 4 is fine
    assert not neon.folds_width((16, 12, 3, 3), True) and not neon.folds_width((16, 16, 3, 3), True)


@pytest.mark.parametrize("case", CASES)
def test_neon_compute_bit_exact_on_the_host(case: tuple) -> None:
    """The compute definition (weight tiles, 2-bit decode with folded alpha, zero-point shift and term,
    padding, the widening kernel's split accumulators) computes the integer reference exactly."""
    func, args, shape, dtype, ref, scale, bias = conv_case(*case)
    layout, mode, rs = case[10], case[11], case[14] if len(case) > 14 else 0.05
    f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target(HOST))
    t = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros(shape, dtype))]
    f["main"](*t)
    want = expected(ref, scale, bias, mode, layout, rs)
    if mode == "requant":
        assert len(np.unique(want)) > 10, "degenerate test data"
    got = t[-1].numpy()
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def _asm(case: tuple, target: str) -> str:
    func = conv_case(*case)[0]
    sch = tvm.s_tir.Schedule(func)
    neon.schedule_conv2d_neon(sch)
    return tvm.compile(sch.mod, target=load_target(target).tvm_target()).mod.inspect_source("asm")


def test_neon_instructions() -> None:
    """Pi 5: the inner loop is by-element sdot (no per-group mla, no widening multiply); Pi 4: smull/smlal into int16
    and sadalp into int32, no sdot."""
    asm = _asm(("ternary", 32, 16, 8, 3, 1, 1, False, False), "rasp5")
    assert re.search(r"^\s+sdot\s+v\d+\.4s, v\d+\.16b, v\d+\.4b\[3\]", asm, re.M)  # by element: 16 channels a load
    assert not re.search(r"^\s+(mla|smlal2?|smull2?)\s+v\d+\.4s", asm, re.M)
    asm = _asm(("ternary", 32, 16, 8, 3, 1, 1, False, True), "rasp4b")
    assert re.search(r"^\s+smull\s+v\d+\.8h", asm, re.M) and re.search(r"^\s+smlal\s+v\d+\.8h", asm, re.M)
    assert re.search(r"^\s+sadalp\s+v\d+\.4s", asm, re.M) and "sdot" not in asm
    # Pi 4, uint8 codes out: the two partial sums meet in registers (addp, no round trip through the stack
    # with ld2), and the rounding and clip are fcvtns and two saturating narrows (no frint, fmax, fmin)
    asm = _asm(("ternary", 16, 16, 9, 3, 2, 1, False, True, 4, "NHWC", "requant", 0, "recip"), "rasp4b")
    assert re.search(r"^\s+addp\s+v\d+\.4s", asm, re.M) and not re.search(r"^\s+ld2\s", asm, re.M)
    for insn in ("fcvtns", "sqxtun", "uqxtn"):
        assert re.search(rf"^\s+{insn}2?\s+v\d+", asm, re.M), insn
    assert not re.search(r"^\s+(frint[a-z]|fmaxnm|fminnm)\s+v\d+\.4s", asm, re.M)


def _spec(alpha_max: int, cin: int = 16) -> LayerSpec:
    tw = qmath.ternarize_weight(torch.randn(32, cin, 3, 3), 4, alpha_bits=8)
    tw.alpha_q = tw.alpha_q.clamp(max=alpha_max)
    attrs = dict(weight_shape=(32, cin, 3, 3), strides=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    return LayerSpec("l", "conv2d", "ternary", tw, attrs, 8, False, (1, cin, 8, 8))


def test_registry_picks_the_folded_kernels_on_arm() -> None:
    pi5, pi4 = load_target("rasp5").tvm_target(), load_target("rasp4b").tvm_target()
    assert kernels.select(_spec(127), pi5).kernel.name == "ternary_conv2d_a76"
    assert kernels.select(_spec(127), pi4).kernel.name == "ternary_conv2d_neon"
    # 8-bit alpha codes over 127: the scaled sdot kernel on the Pi 5, the generic one on the Pi 4
    choice = kernels.select(_spec(255), pi5)
    assert choice.kernel.name == "ternary_conv2d_sdot" and "alpha codes up to 255 > 127" in choice.reason
    assert kernels.select(_spec(255), pi4).kernel.isa == kernels.GENERIC
    # the widening kernel takes 8 channels per step
    assert kernels.select(_spec(127, cin=12), pi4).kernel.isa == kernels.GENERIC
    assert kernels.select(_spec(127, cin=12), pi5).kernel.name == "ternary_conv2d_a76"
    assert kernels.select(_spec(127), tvm.target.Target(HOST)).kernel.isa not in ("a76", "dotprod", "neon")


def test_sdot_kernels_take_nhwc() -> None:
    """kernels.sdot's convs (8-bit alpha codes, power-of-two weights) read and write NHWC too, so that they
    sit in the NHWC integer region without transposes: same result as NCHW, and the schedule compiles."""
    from tvm_lowbit.kernels import sdot

    rng = np.random.default_rng(3)
    k, c, hw = 16, 16, 6
    tw = qmath.ternarize_weight(torch.randn(k, c, 3, 3, generator=torch.Generator().manual_seed(3)), 4)
    codes, alpha = tw.packed_codes(), tw.alpha_q.numpy().reshape(k, -1).astype(np.uint8)  # 8-bit alpha codes
    xv = rng.integers(0, 256, (1, c, hw, hw)).astype(np.uint8)
    outs = {}
    for layout in ("NCHW", "NHWC"):
        x = te.placeholder((1, c, hw, hw) if layout == "NCHW" else (1, hw, hw, c), "uint8", name="x")
        cp, ap = te.placeholder(codes.shape, "uint8", name="codes"), te.placeholder(alpha.shape, "uint8", name="a")
        sc, bi = te.placeholder((k,), "float32", name="s"), te.placeholder((k,), "float32", name="b")
        out = sdot.ternary_conv2d_sdot(x, cp, ap, sc, bi, weight_shape=(k, c, 3, 3), padding=1, group_size=4,
                                       out_mode="acc", in_layout=layout, out_layout=layout)
        func = kernels.make_prim_func([x, cp, ap, sc, bi], out, "main")
        f = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(HOST))
        args = [xv if layout == "NCHW" else np.ascontiguousarray(xv.transpose(0, 2, 3, 1)), codes,
                alpha, np.ones(k, np.float32), np.zeros(k, np.float32)]
        t = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros([int(v) for v in out.shape], "int32"))]
        f["main"](*t)
        outs[layout] = t[-1].numpy()
        sch = tvm.s_tir.Schedule(func)
        sdot.schedule_conv2d_sdot(sch)
        assert "sdot" in tvm.compile(sch.mod, target=load_target("rasp5").tvm_target()).mod.inspect_source("asm")
    ref = qmath.conv2d_int_np(xv.astype(np.int64), tw.w_int.numpy().astype(np.int64), (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_array_equal(outs["NCHW"], ref)
    np.testing.assert_array_equal(outs["NHWC"].transpose(0, 3, 1, 2), ref)
