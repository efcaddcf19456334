"""End to end on the emulated Raspberry Pi 4: build the board (scripts/board/setup.sh, ~1 min the first time,
~1 s after), start a tracker and a board, compile the built-in FGQ model for rasp4b, deploy it over RPC and
check that the board computes exactly what the host computes; then run the exported bundle's C++ runner on
the board (no Python there). Stopping the board must leave no process behind.
"""

from __future__ import annotations

import functools
import platform
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import BoardPythons, builtin_fgq
from tvm_lowbit.deploy import board as emu

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64" or not shutil.which("dpkg-deb"),
                       reason="the emulated board is built on Debian/Linux x86_64 hosts only"),
]


def test_cortex_a72_board_has_no_dotprod(board_built: Path) -> None:
    """-cpu cortex-a72 behaves like a Pi 4: SDOT is an illegal instruction there, and runs on the Pi 5 core."""
    isa = str(board_built / "bin" / "isa_check")
    a72, a76 = emu.board_exec([isa], emu.qemu_cpu("rasp4b")), emu.board_exec([isa], emu.qemu_cpu("rasp5"))
    assert a72.returncode == 1 and "sdot: SIGILL" in a72.stdout and "asimddp" not in a72.stdout, a72.stdout
    assert a76.returncode == 0 and "sdot: ok (24)" in a76.stdout and "asimddp" in a76.stdout, a76.stdout


# (kernel, K, C, H/W, kernel size, stride, pad, groups, out_mode): the NEON schedule's tile edge cases:
# 7-wide columns (28/14/7), 5 and 3 columns, 4- and 8-channel tiles, 1x1 stride 2, depthwise, all out modes
KERNEL_CASES = [("ternary", 16, 16, 28, 3, 1, 1, 1, "requant"), ("ternary", 32, 16, 14, 3, 2, 1, 1, "float"),
                ("ternary", 32, 16, 14, 1, 2, 0, 1, "acc"), ("ternary", 12, 8, 9, 3, 1, 1, 1, "acc"),
                ("ternary", 8, 8, 10, 3, 1, 1, 8, "float"), ("pow2", 16, 8, 10, 3, 1, 1, 1, "requant"),
                ("pow2", 8, 16, 7, 3, 1, 1, 1, "acc")]

def _kernel_case(case: tuple, sdot: bool = False) -> tuple[object, list[np.ndarray]]:
    """A conv kernel PrimFunc and its random inputs (valid ternary / power-of-two codes) plus output buffer;
    ``sdot``: the aarch64 dot-product kernel of the layer instead of the default one (same inputs)."""
    from tvm import te

    from tvm_lowbit import kernels, qmath
    from tvm_lowbit.kernels import sdot as sd

    kind, kout, cin, hw, ks, stride, pad, groups, mode = case
    rng = np.random.default_rng(kout * 1000 + hw)
    cg = cin // groups
    x = rng.integers(0, 256, (1, cin, hw, hw), dtype=np.uint8)
    # outputs of a few units, so that the requantized codes spread over 0..255 instead of all clipping
    scale = (rng.uniform(0.5, 1.5, kout) / (5000 * np.sqrt(cg * ks * ks))).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, kout).astype(np.float32)
    data = te.placeholder(x.shape, "uint8", name="x")
    sc, bi = te.placeholder((kout,), "float32", name="s"), te.placeholder((kout,), "float32", name="b")
    common = dict(weight_shape=(kout, cg, ks, ks), strides=stride, padding=pad, groups=groups, relu=True,
                  out_mode=mode, requant_scale=0.02 if mode == "requant" else None)
    if kind == "ternary":
        lay = qmath.group_layout((kout, cg, ks, ks), 4)
        nbytes = -(-lay.row_len // 4)
        t = rng.choice(np.array([0, 1, 3], np.uint8), (kout, nbytes, 4))  # 2-bit codes of 0, +1, -1
        packed = (t[..., 0] | t[..., 1] << 2 | t[..., 2] << 4 | t[..., 3] << 6).astype(np.uint8)
        alpha = rng.integers(-127, 128, (kout, lay.groups_per_row), dtype=np.int8)
        cp, ap = te.placeholder(packed.shape, "uint8", name="codes"), te.placeholder(alpha.shape, "int8", name="a")
        out = (sd.ternary_conv2d_sdot if sdot else kernels.ternary_conv2d)(data, cp, ap, sc, bi, group_size=4, **common)
        inputs, arrays = [data, cp, ap, sc, bi], [x, packed, alpha, scale, bias]
    else:
        packed = rng.integers(0, 256, (kout, -(-(cg * ks * ks) // 2)), dtype=np.uint8)
        cp = te.placeholder(packed.shape, "uint8", name="codes")
        out = (sd.pow2_conv2d_sdot if sdot else kernels.pow2_conv2d)(data, cp, sc, bi, code_bits=4, **common)
        inputs, arrays = [data, cp, sc, bi], [x, packed, scale, bias]
    name = f"{kind}_{kout}_{cin}_{hw}_{ks}_{stride}_{groups}_{mode}{'_sdot' if sdot else ''}"
    func = kernels.make_prim_func(inputs, out, name)
    return func, arrays + [np.zeros([int(v) for v in out.shape], str(out.dtype))]


@functools.cache
def _host_output(case: tuple) -> np.ndarray:
    """What the default x86 kernel of ``case`` writes for its inputs (``_kernel_case``, deterministic): the reference
    of both board kernel tests below, computed once."""
    import tvm

    from tvm_lowbit.kernels import schedule_default
    from tvm_lowbit.targets import load_target

    x86 = load_target("x86-host").tvm_target()
    func, arrays = _kernel_case(case)
    name = str(func.attrs["global_symbol"])
    host = tvm.compile(tvm.IRModule({name: schedule_default(func, x86)}), target=x86)
    args = [tvm.runtime.tensor(a) for a in arrays]
    host[name](*args)
    return args[-1].numpy()


def test_neon_conv_schedule_is_bit_exact_on_the_board(board_python: BoardPythons, tmp_path: Path) -> None:
    """The aarch64 conv schedule (channel lanes, unrolled columns) computes what the x86 schedule computes,
    bit for bit, running on the emulated Cortex-A72."""
    import tvm

    from tvm_lowbit.kernels import schedule_default
    from tvm_lowbit.targets import load_target

    a72 = load_target("rasp4b")
    feeds, expected = {}, {}
    for case in KERNEL_CASES:
        func, arrays = _kernel_case(case)
        name = str(func.attrs["global_symbol"])
        expected[name] = _host_output(case)
        board = tvm.compile(tvm.IRModule({name: schedule_default(func, a72.tvm_target())}), target=a72.tvm_target())
        board.export_library(str(tmp_path / f"{name}.so"), cc=a72.compiler_path())
        feeds.update({f"{name}/{i}": a for i, a in enumerate(arrays)})
    ok, err = board_python.run(tmp_path, feeds, "cortex-a72")
    assert ok, err
    for name, want in expected.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        assert len(np.unique(want)) > 20, f"{name}: degenerate test data"  # not all clipped to 0 or 255
        assert got.dtype == want.dtype and np.array_equal(got, want), name


def test_sdot_conv_kernels_are_bit_exact_on_the_pi5_board(board_python: BoardPythons, tmp_path: Path) -> None:
    """The aarch64 dot-product kernels (kernels.sdot: zero-point-shifted int8 activations, sdot, per-group
    alpha by mla) compute what the default x86 kernels compute, bit for bit, on the emulated Cortex-A76."""
    import re

    import tvm

    from tvm_lowbit.kernels import schedule_default
    from tvm_lowbit.targets import load_target

    a76 = load_target("rasp5")
    feeds, expected = {}, {}
    for case in [c for c in KERNEL_CASES if c[7] == 1]:  # grouped convs keep the NEON kernel
        _, arrays = _kernel_case(case)
        func, _ = _kernel_case(case, sdot=True)
        name = str(func.attrs["global_symbol"])
        expected[name] = _host_output(case)
        board = tvm.compile(tvm.IRModule({name: schedule_default(func, a76.tvm_target())}), target=a76.tvm_target())
        assert re.search(r"^\s+sdot\s+v\d+\.4s", board.mod.inspect_source("asm"), re.M), f"{name}: no sdot"
        board.export_library(str(tmp_path / f"{name}.so"), cc=a76.compiler_path())
        feeds.update({f"{name}/{i}": a for i, a in enumerate(arrays)})
    ok, err = board_python.run(tmp_path, feeds, "cortex-a76")
    assert ok, err
    for name, want in expected.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        assert got.dtype == want.dtype and np.array_equal(got, want), name


NEON_CASES = [  # kernels.neon: kind, K, C, HW, R, stride, pad, signed, widen, N, layout, out_mode[, seed, epilogue,
    # requant_scale] (test_neon.py)
    ("ternary", 32, 16, 16, 3, 1, 1, False, False, 4, "NHWC", "requant"),
    ("ternary", 32, 16, 16, 3, 1, 1, False, False, 4, "NHWC", "requant", 0, "fma"),
    ("ternary", 32, 16, 16, 3, 1, 1, False, False, 4, "NHWC", "requant", 0, "recip", 0.013),
    ("ternary", 32, 32, 8, 3, 1, 1, False, False, 4, "NHWC", "requant", 2, "integer", 0.002),  # sdot by element
    ("ternary", 32, 32, 8, 3, 1, 1, False, False, 4, "NHWC", "float", 0, "fma"),
    ("ternary", 64, 32, 9, 3, 2, 1, False, False, 4, "NHWC", "acc"),
    ("ternary", 32, 64, 8, 1, 2, 0, False, False, 64, "NCHW", "acc"),
    ("int", 16, 3, 14, 3, 1, 1, True, False, 0, "NHWC", "requant"),
    ("int", 16, 3, 14, 3, 1, 1, True, False, 0, "NHWC", "requant", 0, "recip"),
    ("ternary", 32, 16, 16, 3, 1, 1, False, True, 4, "NHWC", "requant"),
    ("ternary", 32, 16, 16, 3, 1, 1, False, True, 4, "NHWC", "requant", 0, "fma"),
    ("ternary", 32, 16, 16, 3, 1, 1, False, True, 4, "NHWC", "requant", 0, "recip", 0.013),
    ("ternary", 16, 16, 9, 3, 2, 1, False, True, 4, "NHWC", "requant", 0, "integer", 0.002),
    ("ternary", 64, 32, 9, 3, 2, 1, False, True, 4, "NHWC", "acc"),
    ("ternary", 16, 64, 8, 1, 2, 0, False, True, 64, "NCHW", "acc"),
    ("int", 16, 3, 14, 3, 1, 1, True, True, 0, "NHWC", "requant"),
    ("int", 16, 3, 15, 7, 2, 3, True, True, 0, "NHWC", "requant", 0, "integer", 0.002),
    ("int", 16, 3, 15, 7, 2, 3, True, True, 0, "NHWC", "requant", 0, "recip"),
    ("ternary", 16, 16, 7, 3, 1, 1, False, True, 4, "NHWC", "requant"),
    ("ternary", 16, 16, 7, 3, 1, 1, False, True, 4, "NHWC", "float", 0, "fma"),
]


@pytest.mark.parametrize("cpu,widen", [("rasp5", False), ("rasp4b", True)])
def test_folded_alpha_neon_kernels_are_bit_exact_on_the_board(board_python: BoardPythons, tmp_path: Path, cpu: str,
                                                             widen: bool) -> None:
    """kernels.neon (alpha folded into int8 weights; sdot on the emulated Cortex-A76, smull/smlal/sadalp on the
    Cortex-A72), scheduled for the board, compute the numpy integer reference bit for bit."""
    import tvm

    from test_neon import conv_case, expected
    from tvm_lowbit.kernels import neon
    from tvm_lowbit.targets import load_target

    target = load_target(cpu)
    feeds, want = {}, {}
    for case in [c for c in NEON_CASES if c[8] == widen]:
        func, args, shape, dtype, ref, scale, bias = conv_case(*case)
        name = str(func.attrs["global_symbol"])
        sch = tvm.s_tir.Schedule(func)
        neon.schedule_conv2d_neon(sch)
        lib = tvm.compile(sch.mod, target=target.tvm_target())
        lib.export_library(str(tmp_path / f"{name}.so"), cc=target.compiler_path())
        feeds.update({f"{name}/{i}": a for i, a in enumerate([*args, np.zeros(shape, dtype)])})
        want[name] = expected(ref, scale, bias, case[11], case[10], case[14] if len(case) > 14 else 0.05)
    ok, err = board_python.run(tmp_path, feeds, emu.qemu_cpu(cpu))
    assert ok, err
    for name, w in want.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        assert got.dtype == w.dtype and np.array_equal(got, w), name


def test_widening_kernel_uint8_rounding_step_on_the_a72_board(board_python: BoardPythons, tmp_path: Path) -> None:
    """The A72 kernel's last epilogue step for uint8 codes (kernels.neon's fcvtns + sqxtun + uqxtn intrinsic)
    is ``round_clip``: nearbyint (ties to even), clip to 0..255, cast -- checked on every tie near the ends,
    -0.0, values past int16 and int32, and random values."""
    import tvm
    from tvm import te

    from tvm_lowbit.kernels import neon
    from tvm_lowbit.kernels.common import round_clip
    from tvm_lowbit.targets import load_target

    special = [-3e9, -70000.0, -256.5, -2.5, -1.5, -0.5, -0.0, 0.0, 0.25, 0.5, 0.75, 1.5, 2.5, 3.5, 126.5, 127.5,
               128.5, 253.5, 254.4999847, 254.5, 254.5000153, 255.0, 255.5, 256.5, 32767.5, 65535.5, 65536.0,
               70000.0, 2.5e9, 3e9, 1e20, -1e20]
    rng = np.random.default_rng(5)
    x = np.concatenate([np.array(special, np.float32), rng.uniform(-300, 600, 96).astype(np.float32),
                        np.round(rng.uniform(-10, 270, 64)).astype(np.float32) + np.float32(0.5)])
    n = len(x)
    assert n % 8 == 0
    xs = te.placeholder((n,), "float32", name="x")
    q = te.compute((n,), lambda i: xs[i] + tvm.tirx.const(0.0, "float32"), name="q")
    out = te.compute((n,), lambda i: round_clip(q[i], 0, 255, "uint8"), name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([xs, out]).with_attr("global_symbol", "narrow"))
    neon.register()
    lo, li = sch.split(sch.get_loops(sch.get_sblock("out"))[0], [None, 8])
    qb = sch.get_sblock("q")
    sch.compute_at(qb, lo)
    sch.set_scope(qb, 0, "local")
    sch.vectorize(sch.get_loops(qb)[-1])
    sch.tensorize(li, neon.NARROW_INTRIN)
    target = load_target("rasp4b")
    lib = tvm.compile(sch.mod, target=target.tvm_target())
    assert "fcvtns" in lib.mod.inspect_source("asm") and "uqxtn" in lib.mod.inspect_source("asm")
    lib.export_library(str(tmp_path / "narrow.so"), cc=target.compiler_path())
    ok, err = board_python.run(tmp_path, {"narrow/0": x, "narrow/1": np.zeros(n, np.uint8)}, emu.qemu_cpu("rasp4b"),
                               threads=1)
    assert ok, err
    want = np.clip(np.rint(x.astype(np.float64)), 0, 255).astype(np.uint8)  # rint: ties to even
    np.testing.assert_array_equal(np.load(tmp_path / "narrow.out.npy"), want)


def test_builtin_fgq_model_on_sdot_kernels_matches_the_host_on_an_emulated_pi5(board_built: Path, tmp_path: Path,
                                                                               one_thread) -> None:
    """rasp5 (+dotprod) builds put every ternary conv on kernels.a76's sdot kernel (alpha folded: FGQ's
    7-bit alpha codes); the bundle's C++ runner on the emulated Cortex-A76 reproduces the x86 host's logits
    exactly (the host uses its own x86 kernels: two independent integer kernels, one answer)."""
    import tvm_lowbit
    from tvm_lowbit import FGQ, data
    from tvm_lowbit.deploy.bundle import export_bundle, run_bundle_emulated

    # 64 calibration images: the model of tests/test_vta_model.py, quantized once a session
    qmodel = builtin_fgq(FGQ(group_size=4, act_bits=8, first_layer="float"), 64)
    x = data.load("test", limit=1, offset=5)[0]
    art = tvm_lowbit.compile(qmodel, x, "rasp5")
    # the 20 ternary convs (the stem conv and the classifier stay float)
    assert art.report.fast_kernels == {n: "a76" for n in art.report.lowered}, art.report.text()
    assert len(art.report.lowered) == 20
    host_out = tvm_lowbit.compile(qmodel, x, "x86-host").run(x)
    bundle = export_bundle(art, tmp_path / "bundle", x, host_out, atol=0.0)
    run = run_bundle_emulated(bundle, emu.qemu_cpu("rasp5"), runs=1)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "max_abs_diff 0 atol 0 OK" in run.stdout, run.stdout


def test_integer_requantization_in_a_model_matches_the_host_on_an_emulated_pi5(board_built: Path, tmp_path: Path,
                                                                               one_thread) -> None:
    """A model whose 1x1 projection (batch norm, no ReLU: signed codes) takes the integer requantization on the
    Pi 5 (``kernels.requant``; the model of tests/test_compile.py's host check): the bundle on the emulated
    Cortex-A76 gives the x86 host's outputs (before the fix, the projection's int64 offsets reached the kernel
    as int32 and every accumulator of the next layer was wrong: MobileNetV2/EfficientNet-B0 FGQ on the Pi 5)."""
    from torch import nn

    import tvm_lowbit
    from tvm_lowbit import FGQ
    from tvm_lowbit.deploy.bundle import export_bundle, run_bundle_emulated

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU6(), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16),
                          nn.Conv2d(16, 32, 1), nn.ReLU6(), nn.Conv2d(32, 16, 1)).eval()
    calib = torch.randn(8, 3, 8, 8)
    qmodel = tvm_lowbit.quantize(model, FGQ(group_size=4), calib, progress=False)
    x = calib[:2].numpy()
    art = tvm_lowbit.compile(qmodel, x, "rasp5")
    assert art.report.epilogue_forms.get("2") == "integer" and "4" in art.report.lowered, art.report.text()
    host_out = tvm_lowbit.compile(qmodel, x, "x86-host").run(x)
    # the last conv stays float (last_layer): its float32 sums may round differently on the two machines
    bundle = export_bundle(art, tmp_path / "bundle", x, host_out, atol=1e-5)
    run = run_bundle_emulated(bundle, emu.qemu_cpu("rasp5"), runs=1)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"max_abs_diff \S+ atol \S+ OK", run.stdout), run.stdout


def test_deploy_builtin_fgq_model_to_emulated_pi4(board_built: Path, tmp_path: Path, one_thread) -> None:
    import tvm_lowbit
    from tvm_lowbit import FGQ, data
    from tvm_lowbit.deploy.bundle import export_bundle, run_bundle_emulated
    from tvm_lowbit.deploy.remote import Board, deploy_artifact

    name = f"pytest-{emu.free_port()}"
    tracker_port = emu.free_port()
    rpc_port = next(p for p in iter(emu.free_port, None) if p != tracker_port and p + 1 != tracker_port)
    started: dict[str, object] = {}

    def power_on() -> None:  # the emulated board boots (~15 s) while the host compiles
        try:
            started["state"] = emu.start(name, "rasp4b", boards=1, rpc_port=rpc_port, tracker_port=tracker_port,
                                         log=lambda *_: None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            started["error"] = e

    boot = threading.Thread(target=power_on)
    boot.start()
    try:
        qmodel = builtin_fgq(FGQ(group_size=4, act_bits=8), 256)  # quantized once a session (tests/test_fgq.py)
        x = data.load("test", limit=1)[0]
        art = tvm_lowbit.compile(qmodel, x, "rasp4b")
        host_out = tvm_lowbit.compile(qmodel, x, "x86-host").run(x)
        with torch.no_grad():
            fake_quant = qmodel(torch.from_numpy(x)).numpy()
        boot.join(timeout=300)
        assert "error" not in started, f"the board did not start: {started.get('error')}"
        state = started["state"]
        assert state.host == "127.0.0.1"  # loopback unless told otherwise

        rep = deploy_artifact(art, x, Board(tracker=f"127.0.0.1:{tracker_port}", key="rasp4b"),
                              host_output=host_out, repeat=3)
        # the integer layers are exact and the float first/last layers round the same way on both:
        # the board's logits are bit-identical to the host's
        assert np.array_equal(rep.output, host_out), rep.text()
        assert rep.ok and rep.max_abs_diff == 0.0
        assert rep.output.argmax(1) == fake_quant.argmax(1)
        assert len(rep.run_ms) == 3 and all(t > 0 for t in rep.run_ms)

        # the bundle: the C++ runner on the board, without Python, checks against the host's output itself
        bundle = export_bundle(art, tmp_path / "bundle", x, host_out, atol=0.0)
        run = run_bundle_emulated(bundle, emu.qemu_cpu("rasp4b"), runs=2)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "max_abs_diff 0 atol 0 OK" in run.stdout, run.stdout
        assert np.array_equal(np.fromfile(bundle / "output.bin", np.float32).reshape(host_out.shape), host_out)
    finally:
        boot.join(timeout=300)
        emu.stop(name, log=lambda *_: None)
    assert emu.tagged_processes(emu.run_dir(name)) == []
    assert not emu.status(name)["running"]
    shutil.rmtree(emu.run_dir(name))  # its logs; kept when the test fails
