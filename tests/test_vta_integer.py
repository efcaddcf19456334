"""Integer-only VTA ResNet bodies (tvm_lowbit.vta.integer): the conversion keeps FGQ's grouped-ternary
structure, the NumPy reference agrees with a direct computation, the whole body runs on the simulator bit
for bit with the activations kept in VTA's layout, and the ternary-wide core's resource model and cycles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvm_lowbit import FGQ, qmath, quantize
from tvm_lowbit.models.resnet import ResNet
from tvm_lowbit.targets import load_target
from tvm_lowbit.vta import integer, isa
from tvm_lowbit.vta.config import ternary_width_factor
from tvm_lowbit.vta.cycles import estimate
from tvm_lowbit.vta.lower import Epilogue


@pytest.fixture(scope="module")
def small():
    """A 3-block ResNet (identity + two projection shortcuts), random weights, FGQ N=4."""
    torch.manual_seed(0)
    model = ResNet(blocks=1, width=16).eval()
    calib = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    q = quantize(model, FGQ(group_size=4, act_bits=8, alpha_bits=7), calib, progress=False)
    net = integer.from_resnet(q, calib, batch=8)
    return q, net, calib


@pytest.fixture(scope="module")
def lowered(small):
    _, net, _ = small
    cfg = load_target("vta-sim").vta_config()
    return integer.lower_net(net, cfg, net.shapes(1, (28, 28), 1), search=False)


def test_weights_stay_grouped_ternary(small):
    """w8 = alpha' * t per group of 4 input channels, |w8| <= 127: a VTA-flavoured FGQ model."""
    _, net, _ = small
    for l in net.layers:
        w = l.w8.reshape(l.w8.shape[0], -1)
        assert np.abs(w).max() <= 127
        assert np.abs(w).max() > 0
        assert qmath.decompose_w_int(l.w8, 4, alpha_bits=7) is not None, l.name
    assert qmath.decompose_w_int(np.arange(36).reshape(1, 4, 3, 3), 4, alpha_bits=7) is None  # the check can fail


def test_shortcuts_and_partition(small):
    _, net, _ = small
    kinds = [l.sc_kind for l in net.layers if l.sc_inp]
    assert kinds == ["identity", "projection", "projection"]
    ident = next(l for l in net.layers if l.sc_kind == "identity")
    j = int(np.log2(ident.sc_w8.max()))
    assert np.array_equal(ident.sc_w8[:, :, 0, 0], (1 << j) * np.eye(ident.sc_w8.shape[0], dtype=np.int64))
    where = [w for _, w, _ in net.ops()]
    assert where[0] == "host" and where[-1] == "host" and set(where[1:-1]) == {"vta"}
    assert net.host_roundtrips() == 0


def test_reference_matches_direct_math(small):
    """layer_reference == clip(floor(floor((conv + B) / 2^p) + shortcut) / 2^q), computed in float64."""
    _, net, calib = small
    codes = net.stem_codes(calib[:2])
    t = integer.reference(net, codes)
    for l in net.layers:
        x = torch.from_numpy(t[l.inp].astype(np.float64))
        acc = torch.nn.functional.conv2d(x, torch.from_numpy(l.w8.astype(np.float64)), stride=l.stride,
                                         padding=l.padding).numpy()
        acc = np.floor((acc + np.asarray(l.epi.bias).reshape(1, -1, 1, 1)) / 2.0 ** np.asarray(l.epi.shift).reshape(1, -1, 1, 1))
        if l.sc_inp:
            r = torch.from_numpy(t[l.sc_inp].astype(np.float64))
            acc = np.floor((acc + torch.nn.functional.conv2d(r, torch.from_numpy(l.sc_w8.astype(np.float64)),
                                                             stride=l.sc_stride).numpy()) / 2.0 ** l.epi.post_shift)
        assert np.array_equal(np.clip(acc, 0, 127), t[l.out]), l.name
    assert t[net.last].max() > 0  # not everything clipped away
    logits = integer.IntegerModel(net)(torch.from_numpy(calib[:2])).numpy()
    assert np.array_equal(logits, net.head_logits(t[net.last]))


def test_body_on_simulator_bit_exact(small, lowered):
    """One program per layer over one DRAM: the host writes the stem's codes once; every tensor read back
    afterwards equals the NumPy reference (here with the whole-layer-on-chip schedules)."""
    _, net, calib = small
    assert {p.tiling.order for p in lowered.programs.values()} <= {"resident", "resident-ci"}
    codes = net.stem_codes(calib[:1])
    ref = integer.reference(net, codes)
    out = lowered.run(codes)
    for l in net.layers:
        assert np.array_equal(out[l.out], ref[l.out]), l.name
    # the epilogues run on VTA's ALU: bias ADD + per-lane SHR + MIN/MAX, and the shortcut as a GEMM
    prog = lowered.programs[net.layers[1].name].program
    alu = {(i.op, i.use_imm) for i in prog.insns if isinstance(i, isa.Alu)}
    assert {(isa.ALU_MAX, True), (isa.ALU_MIN, True), (isa.ALU_ADD, False)} <= alu
    assert "inp2" in prog.buffers and prog.buffers["inp2"].offset == lowered.tensors[net.layers[1].sc_inp].offset
    assert prog.buffers["inp"].offset == lowered.tensors[net.layers[1].inp].offset


def test_weight_order_schedule_bit_exact(small):
    """The double-buffered schedule (the one ResNet-18's big layers use): the shortcut as extra chunks."""
    _, net, calib = small
    cfg = load_target("vta-sim").vta_config()
    netp = integer.lower_net(net, cfg, net.shapes(1, (28, 28), 1), search=False, order="weight")
    assert {p.tiling.order for p in netp.programs.values()} == {"weight"}
    codes = net.stem_codes(calib[2:3])
    ref = integer.reference(net, codes)
    out = netp.run(codes)
    for l in net.layers:
        assert np.array_equal(out[l.out], ref[l.out]), l.name


def test_subset_run_with_given_inputs(small, lowered):
    _, net, calib = small
    codes = net.stem_codes(calib[1:2])
    ref = integer.reference(net, codes)
    l = net.layers[3]   # a projection-shortcut layer, fed the reference's inputs
    out = lowered.run(codes, layers=[l.name], inputs={l.inp: ref[l.inp], l.sc_inp: ref[l.sc_inp]})
    assert np.array_equal(out[l.out], ref[l.out])
    wrong = dict(ref)
    wrong[l.sc_inp] = np.zeros_like(ref[l.sc_inp])
    out = lowered.run(codes, layers=[l.name], inputs={l.inp: ref[l.inp], l.sc_inp: wrong[l.sc_inp]})
    assert not np.array_equal(out[l.out], ref[l.out])   # the shortcut really is accumulated


def test_epilogue_ops():
    e = Epilogue((5, 0), (5, 20), 2, (0, 127), True)
    ops = e.ops()
    assert ops[0] == (isa.ALU_ADD, None)
    assert (isa.ALU_SHR, 5) in ops and (isa.ALU_SHR, None) in ops      # 20 = imm 5 + lanes (0 .. 15)
    assert ops[-2:] == [(isa.ALU_MIN, 127), (isa.ALU_MAX, 0)]
    with pytest.raises(ValueError):
        Epilogue((0, 0), (0, 16), 0).ops()


def test_ternary_wide_core(small):
    _, net, _ = small
    assert ternary_width_factor() == 4
    base = load_target("vta-sim").vta_config()
    wide = base.core("ternary-wide")
    assert wide.macs_per_cycle == 4 * base.macs_per_cycle and wide.weight_path == "ternary"
    tnet = integer.ternarize(net)
    shapes = net.shapes(1, (28, 28), 1)
    a = integer.lower_net(tnet, base, shapes, search=False)
    b = integer.lower_net(tnet, wide, shapes, search=False)
    name = net.layers[2].name
    ra, rb = estimate(a.programs[name].program), estimate(b.programs[name].program)
    assert rb.gemm_cycles == -(-ra.gemm_uops // 4) and rb.total_cycles < ra.total_cycles
    # the ternary program computes the same math as its reference
    codes = tnet.stem_codes(np.random.default_rng(3).standard_normal((1, 1, 28, 28)).astype(np.float32))
    out, ref = b.run(codes), integer.reference(tnet, codes)
    assert all(np.array_equal(out[l.out], ref[l.out]) for l in tnet.layers)
