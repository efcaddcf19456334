"""The NEON ``tbl`` LUT dense kernel (kernels.tbl): its operand layout, the code it compiles to for aarch64, the
selection rule, and (on the emulated Pi 4 and Pi 5) its accumulators and epilogues bit for bit against the
numpy integer reference and the generic kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from tvm_lowbit import kernels, qmath
from tvm_lowbit.kernels import tbl
from tvm_lowbit.targets import load_target

from helpers import BoardPythons


def _reference(x: np.ndarray, t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    w = t.astype(np.int64) * np.repeat(alpha.astype(np.int64), 4, axis=1)  # one alpha per 4 input channels
    return qmath.dense_int_np(x.reshape(-1, x.shape[-1]).astype(np.int64), w).reshape(*x.shape[:-1], -1)


def test_tbl_tiles_are_the_same_bytes() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (32, 8)).astype(np.uint8)
    alpha = rng.integers(0, 128, (32, 8)).astype(np.int16)
    ct, at = tbl.tbl_tiles(codes, alpha)
    assert ct.shape == at.shape == (2, 8, 16)
    assert sorted(ct.ravel().tolist()) == sorted(codes.ravel().tolist())
    assert ct[1, 5, 3] == codes[16 + 3, 5] and at[1, 5, 3] == alpha[16 + 3, 5]
    with pytest.raises(ValueError, match="K % 16"):
        tbl.tbl_tiles(codes[:20], alpha[:20])
    with pytest.raises(ValueError, match="0..127"):
        tbl.tbl_tiles(codes, alpha + 1)


def test_tbl_compiles_to_lookups_and_widening_multiply_adds() -> None:
    asm = tbl.build_dense(1, 32, 64, parallel=False).mod.inspect_source("asm")
    for insn in ("tbl", "smlal", "saddw"):
        assert f"\t{insn}" in asm, insn
    with pytest.raises(ValueError, match="not aarch64"):
        tbl.build_dense(1, 32, 64, target={"kind": "llvm", "mcpu": "x86-64-v3"})
    with pytest.raises(ValueError, match="C % 16"):
        tbl.build_dense(1, 32, 40)


def _spec(rows: int, shape: tuple[int, int] = (64, 128), group_size: int = 4, alpha_bits: int = 7,
          lead: tuple[int, ...] = ()) -> kernels.LayerSpec:
    torch.manual_seed(0)
    tw = qmath.ternarize_weight(torch.randn(*shape), group_size, alpha_bits=alpha_bits)
    return kernels.LayerSpec("fc", "dense", "ternary", tw, {"weight_shape": shape}, 8, False,
                             (*lead, rows, shape[1]))


@pytest.mark.parametrize("target", ["rasp4b", "rasp5"])
def test_select_takes_tbl_for_few_rows_on_aarch64(target: str) -> None:
    tgt = load_target(target).tvm_target()
    for rows in (1, 8, tbl.MAX_ROWS):
        kernel, reason = kernels.select(_spec(rows), tgt)
        assert kernel is not None and kernel.name == "ternary_dense_tbl", reason
    kernel, reason = kernels.select(_spec(2, lead=(tbl.MAX_ROWS,)), tgt)  # batch x tokens above the rule
    assert kernel.name == "ternary_dense" and f"activation rows > MAX_ROWS={tbl.MAX_ROWS}" in reason
    for spec, why in ((_spec(1, group_size=8), "ternary groups of 8"), (_spec(1, (40, 128)), "K=40"),
                      (_spec(1, alpha_bits=8), "alpha codes up to")):
        kernel, reason = kernels.select(spec, tgt)
        assert kernel.name == "ternary_dense" and f"not ternary_dense_tbl: {why}" in reason, reason
    assert tbl.tbl_fits(_spec(1), load_target("x86-host").tvm_target()) == "the target is not aarch64"


def _acc_case(name: str, rows: int, kout: int, cin: int, signed: bool, extreme: bool = False):
    rng = np.random.default_rng(kout + cin + rows)
    if extreme:  # the largest int16 span sums: |Pl| = |Ph| = 60 (x = 255: both nibbles 15), alpha 127
        x = np.full((rows, cin), -128 if signed else 255, np.int64)
        t = np.ones((kout, cin), np.int64)
        t[1::2] = -1
        t[2::4, ::3] = 0
        alpha = np.full((kout, cin // 4), 127, np.int16)
    else:
        x = rng.integers(-128, 128, (rows, cin)) if signed else rng.integers(0, 256, (rows, cin))
        t = rng.integers(-1, 2, (kout, cin))
        alpha = rng.integers(0, 128, (kout, cin // 4)).astype(np.int16)
    x = x.astype("int8" if signed else "uint8")
    ct, at = tbl.tbl_tiles(qmath.pack_2bit(t), alpha)
    func = tbl.dense_tbl_func(rows, kout, cin, signed).with_attr("global_symbol", name)
    ref = _reference(x, t, alpha)
    assert np.abs(ref).max() < 2**31
    return func, [x, ct, at, np.zeros((rows, kout), np.int32)], ref.astype(np.int32)


def _epilogue_case(name: str, lead: tuple[int, ...], kout: int, cin: int, signed: bool, mode: str):
    """The registered TE compute (with the epilogue, N-D rows) and the generic kernel's result on the host."""
    rng = np.random.default_rng(len(lead) + kout)
    dt = "int8" if signed else "uint8"
    xv = (rng.integers(-128, 128, (*lead, cin)) if signed else rng.integers(0, 256, (*lead, cin))).astype(dt)
    t = rng.integers(-1, 2, (kout, cin))
    alpha = rng.integers(0, 128, (kout, cin // 4)).astype(np.int16)
    scale = (rng.uniform(0.5, 1.5, kout) / (3000 * np.sqrt(cin))).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, kout).astype(np.float32)
    x = te.placeholder(xv.shape, dt, name="x")
    sc, bi = te.placeholder((kout,), "float32", name="s"), te.placeholder((kout,), "float32", name="b")
    opts = dict(weight_shape=(kout, cin), group_size=4, out_mode=mode, relu=mode != "acc",
                requant_scale=0.02 if mode == "requant" else None)
    ct, at = tbl.tbl_tiles(qmath.pack_2bit(t), alpha)
    pc, pa = te.placeholder(ct.shape, "uint8", name="ct"), te.placeholder(at.shape, "uint8", name="at")
    out = tbl.ternary_dense_tbl(x, pc, pa, sc, bi, **opts)
    sch = tvm.s_tir.Schedule(kernels.make_prim_func([x, pc, pa, sc, bi], out, name))
    tbl.schedule_dense_tbl(sch)
    # the generic kernel on the host: the expected bits of the same layer
    codes = te.placeholder((kout, cin // 4), "uint8", name="codes")
    ga = te.placeholder((kout, cin // 4), "int16", name="ga")
    ref = kernels.ternary_dense(x, codes, ga, sc, bi, **opts)
    host_func = kernels.make_prim_func([x, codes, ga, sc, bi], ref, "ref")
    x86 = load_target("x86-host").tvm_target()
    host = tvm.compile(tvm.IRModule({"ref": kernels.schedule_default(host_func, x86)}), target=x86)
    res = tvm.runtime.tensor(np.zeros([int(v) for v in ref.shape], str(ref.dtype)))
    host["ref"](*[tvm.runtime.tensor(a) for a in (xv, qmath.pack_2bit(t), alpha, scale, bias)], res)
    want = res.numpy()
    if mode == "acc":
        assert np.array_equal(want.astype(np.int64), _reference(xv, t, alpha))
    else:
        assert len(np.unique(want)) > 20, f"{name}: degenerate test data"
    return sch.mod["main"].with_attr("global_symbol", name), [xv, ct, at, scale, bias, np.zeros_like(want)], want


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rasp4b", "rasp5"])
def test_tbl_kernel_is_bit_exact_on_the_board(board_python: BoardPythons, tmp_path: Path, target: str) -> None:
    """kernels.tbl compiled for the Pi 4 (cortex-a72) and Pi 5 (cortex-a76) computes the numpy integer
    reference (random and extreme codes, signed and unsigned, several rows) and, through its epilogue, the
    generic kernel's outputs bit for bit on the emulated core."""
    tgt = load_target(target)
    cases = [_acc_case("u_1x64x128", 1, 64, 128, False), _acc_case("s_3x32x256", 3, 32, 256, True),
             _acc_case("u_ext", 2, 32, 512, False, extreme=True), _acc_case("s_ext", 1, 32, 64, True, extreme=True),
             _epilogue_case("ep_float", (2, 3), 32, 64, False, "float"),
             _epilogue_case("ep_requant", (3,), 48, 128, True, "requant")]
    feeds, want = {}, {}
    for func, arrays, expected in cases:
        name = str(func.attrs["global_symbol"])
        lib = tvm.compile(tvm.IRModule({name: func}), target=tgt.tvm_target())
        lib.export_library(str(tmp_path / f"{name}.so"), cc=tgt.compiler_path())
        feeds.update({f"{name}/{i}": a for i, a in enumerate(arrays)})
        want[name] = expected
    ok, err = board_python.run(tmp_path, feeds, tgt.qemu_cpu)
    assert ok, err
    for name, expected in want.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name
    ext = np.load(tmp_path / "u_ext.out.npy")
    assert ext[0, 0] == 255 * 127 * 512 and ext[0, 1] == -255 * 127 * 512


@pytest.mark.slow
def test_ternary_mlp_on_tbl_matches_the_host_on_the_pi4_board(board_built: Path, tmp_path: Path) -> None:
    """A ternary MLP compiled for rasp4b runs every linear on kernels.tbl and, on the emulated Cortex-A72,
    gives the host's output exactly (the bundle's runner compares with atol 0)."""
    from torch import nn

    import tvm_lowbit
    from tvm_lowbit.deploy.bundle import export_bundle, run_bundle_emulated
    from tvm_lowbit.quantizers.fgq import FGQ

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    q = tvm_lowbit.quantize(model, FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq"),
                            torch.randn(32, 64), progress=False)
    x = torch.randn(1, 64).numpy()
    host_out = tvm_lowbit.compile(q, x, "x86-host").run(x)
    art = tvm_lowbit.compile(q, x, "rasp4b")
    assert set(art.report.kernel_names.values()) == {"ternary_dense_tbl"}, art.report.kernel_reasons
    bundle = export_bundle(art, tmp_path / "bundle", x, host_out, 0.0)
    r = run_bundle_emulated(bundle, "cortex-a72")
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
