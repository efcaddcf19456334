"""int8 per-channel and int4 grouped weights: qmath codes, TE kernels bit-exact against the NumPy int64
references, and one compiled graph mixing every weight format with requantization between neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")
from tvm import te  # noqa: E402

from tvm_lowbit import qmath  # noqa: E402
from tvm_lowbit.formats import avg_weight_bits, model_weight_bytes, parse_format  # noqa: E402
from tvm_lowbit.kernels import int_conv2d, int_dense, make_prim_func  # noqa: E402
from test_kernels import CONV_CASES, DENSE_CASES, MODES, ConvCase, _act, _assert_same, _reference, _run  # noqa: E402

INT_CASES = [(8, 0), (4, 32), (4, 4), (4, 0)]  # (bits, group size)


# --------------------------------------------------------------------------------------------
# qmath
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (16, 1, 3, 3), (10, 37), (32, 64, 1, 1)])
@pytest.mark.parametrize("bits,group", INT_CASES)
def test_int_weight_codes_and_decomposition(shape: tuple[int, ...], bits: int, group: int) -> None:
    torch.manual_seed(len(shape) + bits + group)
    w = torch.randn(shape)
    iw = qmath.int_quantize_weight(w, bits, group)
    qmax = 2 ** (bits - 1) - 1
    assert iw.format == f"int{bits}" and int(iw.codes.abs().max()) == qmax  # the largest weight hits qmax
    # the weight the model uses is w_scale * w_int, and rounding error is at most half a step
    step, _ = qmath.int_grid(iw)
    assert torch.all((iw.dequantized().double() - w.double()).abs() <= step / 2 * (1 + 1e-6) + 1e-7)
    # codes survive packing; the compiler recovers an equal integer weight from w_int alone
    flat = iw.codes.reshape(iw.layout.out_channels, -1).numpy()
    unpacked = qmath.unpack_4bit(iw.packed_codes(), flat.shape[1], True) if bits == 4 else iw.packed_codes()
    np.testing.assert_array_equal(unpacked, flat)
    back = qmath.decompose_int(iw.w_int.numpy(), bits, group)
    assert back is not None
    np.testing.assert_array_equal(back.w_int.numpy(), iw.w_int.numpy())
    # storage: codes (padded groups) + 8-bit scale codes + one float32 per channel
    k, lay = shape[0], iw.layout
    expect = k * (lay.row_len * bits // 8 if bits == 8 else -(-lay.row_len // 2)) + 4 * k
    expect += k * lay.groups_per_row if group else 0
    assert iw.storage_bytes() == expect


def test_decompose_int_rejects_what_no_kernel_takes() -> None:
    assert qmath.decompose_int(np.full((2, 3), 128.0), 8, 0) is None         # beyond int8
    assert qmath.decompose_int(np.array([[8.0, 1.0]]), 4, 0) is None          # beyond int4, per channel
    assert qmath.decompose_int(np.array([[5.0, 7.0, 0.5]]), 4, 4) is None     # not an integer
    # a group as scale * code: 255 * 7 fits, 11 (prime, > 7) with 1 in the same group does not
    assert qmath.decompose_int(np.array([[255.0 * 7, -255.0, 0.0]]), 4, 4) is not None
    assert qmath.decompose_int(np.array([[11.0, 1.0]]), 4, 4) is None
    d = qmath.decompose_int(np.array([[12.0, -6.0, 18.0, 0.0]]), 4, 4)      # gcd 6 -> codes 2, -1, 3, 0
    assert d is not None and d.scale_q.tolist() == [[6]] and d.codes.flatten().tolist() == [2, -1, 3, 0]


def test_format_names() -> None:
    assert parse_format("int4") == parse_format("INT4-g32")
    assert parse_format("int4-g0").group_size == 0 and parse_format("int8").group_size == 0
    assert parse_format("ternary").group_size == 4 and parse_format("ternary-n16").name == "ternary-n16"
    for bad in ("int3", "pow2-6", "fp16", "ternary-n0"):
        with pytest.raises(ValueError, match="format"):
            parse_format(bad)


# --------------------------------------------------------------------------------------------
# kernels, bit-exact
# --------------------------------------------------------------------------------------------

def _conv(case: ConvCase, mode: str, bits: int, group: int, seed: int = 0, rq: float = 0.37):
    rng = np.random.default_rng(seed)
    cg = case.c // case.groups
    torch.manual_seed(seed)
    iw = qmath.int_quantize_weight(torch.randn(case.k, cg, *case.rs), bits, group)
    x = _act(rng, (case.batch, case.c, *case.hw), case.bits, case.signed)
    codes, sc = iw.packed_codes(), iw.scale_codes()
    scale = (rng.standard_normal(case.k) * 1e-4).astype(np.float32)
    bias = rng.standard_normal(case.k).astype(np.float32)
    arrays = [x, codes, scale, bias] + ([sc] if sc is not None else [])
    ph = [te.placeholder(a.shape, str(a.dtype)) for a in arrays]
    relu = mode != "acc"
    out = int_conv2d(*ph[:4], weight_shape=(case.k, cg, *case.rs), bits=bits, group_size=iw.group_size,
                     scale_codes=ph[4] if sc is not None else None, strides=case.stride, padding=case.pad,
                     dilation=case.dil, groups=case.groups, relu=relu, out_mode=mode, requant_scale=rq,
                     out_bits=8, out_signed=case.signed)
    acc = qmath.conv2d_int_np(x, iw.w_int.numpy(), case.stride, case.pad, case.dil, case.groups)
    ref = _reference(acc, scale, bias, relu, mode, rq, 8, case.signed, 1)
    return make_prim_func(ph, out, "int_conv2d"), arrays, ref


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", MODES)
def test_int_conv2d_exact(case: ConvCase, mode: str) -> None:
    bits, group = INT_CASES[CONV_CASES.index(case) % len(INT_CASES)]
    func, args, ref = _conv(case, mode, bits, group)
    _assert_same(_run(func, args, ref.shape, str(ref.dtype)), ref)


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: c[0])
def test_int_dense_exact(case: tuple) -> None:
    _, shape, k, _n, abits, signed = case
    bits, group = INT_CASES[DENSE_CASES.index(case) % len(INT_CASES)]
    rng = np.random.default_rng(5)
    torch.manual_seed(5)
    iw = qmath.int_quantize_weight(torch.randn(k, shape[-1]), bits, group)
    x = _act(rng, shape, abits, signed)
    scale = (rng.standard_normal(k) * 1e-4).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    sc = iw.scale_codes()
    arrays = [x, iw.packed_codes(), scale, bias] + ([sc] if sc is not None else [])
    ph = [te.placeholder(a.shape, str(a.dtype)) for a in arrays]
    acc = qmath.dense_int_np(x, iw.w_int.numpy())
    for mode in MODES:
        out = int_dense(*ph[:4], weight_shape=(k, shape[-1]), bits=bits, group_size=iw.group_size,
                        scale_codes=ph[4] if sc is not None else None, relu=mode == "requant", out_mode=mode,
                        requant_scale=0.05, out_bits=abits, out_signed=signed)
        ref = _reference(acc, scale, bias, mode == "requant", mode, 0.05, abits, signed, -1)
        _assert_same(_run(make_prim_func(ph, out, "int_dense"), arrays, ref.shape, str(ref.dtype)), ref)


def test_int_kernel_rejects_bad_inputs() -> None:
    x = te.placeholder((2, 16), "int8")
    s = te.placeholder((4,), "float32")
    with pytest.raises(ValueError, match="codes shape"):
        int_dense(x, te.placeholder((4, 16), "uint8"), s, s, weight_shape=(4, 16), bits=4)
    with pytest.raises(ValueError, match="stored as int8"):
        int_dense(x, te.placeholder((4, 16), "uint8"), s, s, weight_shape=(4, 16), bits=8)
    with pytest.raises(ValueError, match="need scale_codes"):
        int_dense(x, te.placeholder((4, 8), "uint8"), s, s, weight_shape=(4, 16), bits=4, group_size=8)


# --------------------------------------------------------------------------------------------
# one graph, every format: lowered, bit-exact, requantized between neighbours
# --------------------------------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 40, 1)
        self.dw = nn.Conv2d(40, 40, 3, padding=1, groups=40)
        self.project = nn.Conv2d(40, 24, 1)
        self.down = nn.Conv2d(24, 24, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(24 * 16, 37)
        self.fc2 = nn.Linear(37, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.dw(torch.relu(self.expand(x))))
        x = torch.relu(self.down(self.project(x)))        # signed codes into the next layer
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_mixed_formats_compile_bit_exact() -> None:
    from test_compile import check_bit_exact

    from tvm_lowbit.quantizers.auto import Auto, build_mixed
    from tvm_lowbit.quantizers.layers import quant_layers

    torch.manual_seed(0)
    model = Mixed().eval()
    calib = torch.randn(64, 3, 8, 8)
    formats = {"stem": "int8", "expand": "int4", "dw": "int4", "project": "ternary", "down": "pow2-4",
               "fc1": "int4-g0", "fc2": "int8-g16"}
    q = build_mixed(model, formats, calib, Auto(act_bits=8))
    layers = quant_layers(q)
    assert {n: m.weight_format for n, m in layers.items()} == {
        "stem": "int8", "expand": "int4", "dw": "int4", "project": "ternary", "down": "pow2", "fc1": "int4",
        "fc2": "int8"}
    art = check_bit_exact(q, calib[:2].numpy())
    assert art.report.kernels == {n: m.weight_format for n, m in layers.items()}
    # int -> int, int -> ternary, ternary -> pow2, pow2 -> int and int -> int write their consumer's codes
    assert set(art.report.requant_fused) >= {"stem", "expand", "dw", "fc1"}
    # bytes as compiled: the weight constants of the lowered graph hold exactly what the formats count
    nbytes, count = model_weight_bytes(q)
    assert count == sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert avg_weight_bits(model) == 32.0 and avg_weight_bits(q) == pytest.approx(8 * nbytes / count)
    consts = art.weight_bytes - sum(8 * m.out_scale.numel() for m in layers.values())  # minus the epilogues
    counted = nbytes - sum(4 * m.w_int.shape[0] for m in layers.values())  # scales live in the epilogue
    # the depthwise kernels keep their (few) weights as an int16 tap tile, not the format's codes: a known
    # excess, bounded by those tiles; every other layer holds exactly what its format counts
    dw = [n for n, k in art.report.kernel_names.items() if "dwconv" in k]
    if dw:
        assert 0 < consts - counted <= sum(2 * layers[n].w_int.numel() for n in dw)
    else:
        assert consts == counted


@pytest.mark.parametrize("target", ["a72", "armv7"])
def test_int_kernels_cross_compile_for_arm(target: str) -> None:
    """The Pi targets build the int4/int8 kernels with their default schedules (vectorized NEON code)."""
    import re

    from test_kernels import A72, ARMV7

    from tvm_lowbit.kernels import schedule_default

    tgt = {"a72": A72, "armv7": ARMV7}[target]
    func, _, _ = _conv(CONV_CASES[0], "requant", 4, 32)
    asm = tvm.compile(schedule_default(func, tgt), target=tvm.target.Target(tgt)).mod.inspect_source("asm")
    assert re.search(r"\bmla\s+v\d+\.4s|\bvmla\.i32\b|\bmul\s+v\d+\.4s|\bvmul\.i32\b|\bsmlal|\bvmlal", asm), \
        "no NEON integer multiply-accumulate in the int4 conv"


def test_saved_mixed_model_compiles_with_its_formats(tmp_path) -> None:
    """A saved .pt2 (what `tvm-lowbit quantize --scheme auto` writes) keeps each layer's format and group."""
    from tvm_lowbit.compiler import compile_saved, save_quantized
    from tvm_lowbit.quantizers.auto import build_mixed

    torch.manual_seed(1)
    model = Mixed().eval()
    calib = torch.randn(32, 3, 8, 8)
    q = build_mixed(model, {"expand": "int4-g8", "dw": "int8", "project": "int4", "fc1": "int8-g16"}, calib)
    path = save_quantized(q, calib[:2], tmp_path / "q.pt2")
    art = compile_saved(path)
    assert art.report.kernels == {"expand": "int4", "dw": "int8", "project": "int4", "fc1": "int8"}
    assert not art.report.fallback
    with torch.no_grad():
        np.testing.assert_allclose(art.run(calib[:2].numpy()), q(calib[:2]).numpy(), rtol=1e-5, atol=1e-5)
