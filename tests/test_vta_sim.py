"""VTA functional simulator (semantics, error detection), conv/dense lowering bit-exact against an
independent NumPy integer reference, and the cycle model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tvm_lowbit import qmath
from tvm_lowbit.vta import isa
from tvm_lowbit.vta.config import Timing, VTAConfig
from tvm_lowbit.vta.cycles import CycleModelError, duration, estimate
from tvm_lowbit.vta.lower import ConvSpec, Requant, Tiling, dense_spec, lower_conv, run_layer, tile_candidates
from tvm_lowbit.vta.program import Program, ProgramBuilder
from tvm_lowbit.vta.sim import (BufferOverflowError, DeadlockError, HazardError, PortabilityError, Simulator,
                                VTASimError, decode_weights, encode_weights)

CFG = VTAConfig()
D = isa.Deps


def conv_reference(q: np.ndarray, w: np.ndarray, spec: ConvSpec, requant: Requant, pad_value: int = 0) -> np.ndarray:
    """requant(conv(q, w)) by NumPy integer math, padding with ``pad_value``."""
    ph, pw = spec.pad
    qp = np.pad(np.asarray(q, np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    return requant.apply(qmath.conv2d_int_np(qp, w, spec.stride, (0, 0), (1, 1), 1))


CONV_CASES = [  # (spec, requant, pad value): VTA-padded and host-pre-padded inputs, strides, ragged tiles
    (ConvSpec(1, 16, 12, 12, 16, 3, 3, (1, 1), (1, 1)), Requant(9), 0),
    (ConvSpec(2, 20, 9, 11, 40, 3, 3, (2, 2), (1, 1)), Requant(10), 0),
    (ConvSpec(1, 32, 8, 8, 48, 3, 3, (1, 1), (1, 1), pre_padded=True), Requant(11), -128),
    (ConvSpec(1, 16, 10, 10, 32, 1, 1, (2, 2), (0, 0)), Requant(7, clip=None), 0),
    (ConvSpec(1, 48, 7, 7, 16, 3, 3, (1, 1), (1, 1)), Requant(tuple(range(8, 24)[:16]), (-128, 127)), 0),
    (ConvSpec(1, 16, 6, 6, 32, 5, 5, (1, 1), (2, 2)), Requant(12, clip=(0, 127)), 0),
    (ConvSpec(1, 16, 6, 6, 48, 3, 3, (1, 1), (1, 1)), Requant(tuple(range(2, 50))), 0),  # per-lane, 3 blocks
]


@pytest.mark.parametrize("spec,requant,pad", CONV_CASES)
def test_conv_bit_exact(spec: ConvSpec, requant: Requant, pad: int) -> None:
    rng = np.random.default_rng(spec.cin * 7 + spec.cout)
    w = rng.integers(-127, 128, (spec.cout, spec.cin, spec.kh, spec.kw))
    q = rng.integers(-128, 128, (spec.n, spec.cin, spec.h, spec.w))
    if requant.clip is None:  # the shift alone must keep every value in int8: use small inputs
        q //= 16
    if isinstance(requant.shift, tuple):
        requant = replace(requant, shift=tuple(min(s, 15) for s in requant.shift[:spec.cout]))
    ref = conv_reference(q, w, spec, requant, pad)
    cands = tile_candidates(spec, CFG, requant)
    orders = {t.order for t in cands}
    for tiling in [cands[0], cands[-1]] + [next(t for t in cands if t.order == o) for o in orders]:
        lp = lower_conv(spec, w, requant, CFG, tiling)
        for seed in (0, 1):
            np.testing.assert_array_equal(run_layer(lp, q, pad_value=pad, seed=seed), ref, err_msg=f"{tiling}, seed {seed}")


def test_dense_bit_exact() -> None:
    rng = np.random.default_rng(3)
    batch, k, m = 5, 40, 24
    x = rng.integers(-128, 128, (batch, k))
    w = rng.integers(-127, 128, (m, k))
    spec = dense_spec(batch, k, m)
    lp = lower_conv(spec, w[:, :, None, None], Requant(10), CFG)
    y = run_layer(lp, x.T[None, :, None, :])[0, :, 0, :].T
    np.testing.assert_array_equal(y, Requant(10).apply(qmath.dense_int_np(x, w), channel_axis=-1))


def test_lowering_refuses_the_pipeline_hazard() -> None:
    # batch 1, one output block: folding the input blocks into one GEMM would accumulate into the same
    # row on consecutive micro-ops; only one input block per GEMM instruction is legal
    spec = dense_spec(1, 64, 16)
    assert {t.tci for t in tile_candidates(spec, CFG)} == {1}
    with pytest.raises(Exception, match="hazard"):
        lower_conv(spec, np.ones((16, 64, 1, 1), int), Requant(4), CFG, Tiling(1, 1, 1, 4))
    x = np.arange(-32, 32).reshape(1, 64)
    lp = lower_conv(spec, np.ones((16, 64, 1, 1), int), Requant(4), CFG)
    np.testing.assert_array_equal(run_layer(lp, x.T[None, :, None, :])[0, :, 0, :].T,
                                  Requant(4).apply(qmath.dense_int_np(x, np.ones((16, 64), int))))


# ---- hand-written programs --------------------------------------------------------------------

def _inp_program(sram_base: int, rows: int) -> tuple:
    b = ProgramBuilder(CFG)
    buf = b.alloc("inp", rows * 16, 16)
    b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, sram_base, buf.base, 1, rows, rows))
    b.push("load", "compute")
    b.pop("load", "compute")
    b.nop("compute")
    return b


def test_buffer_overflow_names_the_instruction() -> None:
    prog = _inp_program(2040, 16).finish()
    with pytest.raises(BufferOverflowError, match=r"instruction #0 \(LOAD inp sram=2040.*2040..2055, beyond its 2048"):
        Simulator(CFG).run(prog, prog.dram_image())
    b = ProgramBuilder(CFG)
    r0, r1 = b.kernel([(2000, 0, 0)])
    b.emit(isa.Gemm(r0, r1, 1, 64, 0, 1, reset=True))
    prog = b.finish()
    with pytest.raises(BufferOverflowError, match=r"instruction #1 \(GEMM reset.*accumulator rows 2000..2063"):
        Simulator(CFG).run(prog, prog.dram_image())


def test_token_deadlock_names_the_waiting_instruction() -> None:
    spec, _, _ = CONV_CASES[0]
    # a double-buffered schedule: the load module cannot run ahead, so the GEMM that needs the dropped
    # token is the one that waits
    weight_order = next(t for t in tile_candidates(spec, CFG, Requant(9)) if t.order == "weight")
    lp = lower_conv(spec, np.ones((16, 16, 3, 3), int), Requant(9), CFG, weight_order)
    insns = list(lp.program.insns)
    first_push = next(k for k, i in enumerate(insns) if i.deps.push_next and isa.module_of(i) == "load")
    insns[first_push] = isa.with_deps(insns[first_push], replace(insns[first_push].deps, push_next=False))
    broken = replace(lp.program, insns=insns)
    with pytest.raises(DeadlockError, match=r"compute: instruction #\d+ \(GEMM.*waits for a token on l2g") as e:
        Simulator(CFG).run(broken, broken.dram_image())
    assert isinstance(insns[e.value.index], isa.Gemm) and insns[e.value.index].deps.pop_prev
    assert f"#{e.value.index} (GEMM" in str(e.value)
    with pytest.raises(CycleModelError, match=r"deadlock.*compute at #\d+ \(GEMM"):
        estimate(broken)
    # the whole-layer-on-chip schedule: the load module runs ahead, so a missing token surfaces at the
    # end, still as a named deadlock
    res = lower_conv(spec, np.ones((16, 16, 3, 3), int), Requant(9), CFG)
    assert res.tiling.order == "resident"
    insns = list(res.program.insns)
    k = next(k for k, i in enumerate(insns) if i.deps.push_next and isa.module_of(i) == "load")
    insns[k] = isa.with_deps(insns[k], replace(insns[k].deps, push_next=False))
    with pytest.raises(DeadlockError, match=r"compute: instruction #\d+ .*waits for a token on l2g"):
        Simulator(CFG).run(replace(res.program, insns=insns), res.program.dram_image())


def test_full_command_queue_deadlocks_the_fetch_unit() -> None:
    small = replace(CFG, timing=Timing(insn_queue_depth=4))
    b = ProgramBuilder(small)
    for _ in range(6):          # the store module waits on tokens the compute module pushes later
        b.pop("compute", "store")
        b.nop("store")
    for _ in range(6):
        b.nop("compute", D(push_next=True))
    prog = b.finish()
    Simulator(CFG).run(replace(prog, cfg=CFG), prog.dram_image())  # deep queues: fine
    with pytest.raises(DeadlockError, match="not fetched"):
        Simulator(small).run(prog, prog.dram_image())


def test_missing_finish_and_leftover_tokens() -> None:
    b = _inp_program(0, 1)
    prog = b.finish()
    with pytest.raises(VTASimError, match="without a FINISH"):
        Simulator(CFG).run(replace(prog, insns=prog.insns[:-1]), prog.dram_image())


def _compute_program(body, acc_rows: np.ndarray | None = None, store_rows: int = 0) -> tuple:
    """A compute-only program: optional LOAD ACC of ``acc_rows`` into rows 0.., ``body(b)``, then a
    STORE of ``store_rows`` output rows; returns (program, dram)."""
    b = ProgramBuilder(CFG)
    if acc_rows is not None:
        ab = b.constant("acc", acc_rows.astype("<i4"), 64)
        b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_ACC, 0, ab.base, 1, len(acc_rows), len(acc_rows)))
    body(b)
    ob = b.alloc("out", max(store_rows, 1) * 16, 16)
    if store_rows:
        b.push("compute", "store")
        b.pop("compute", "store")
        b.emit(isa.Mem(isa.OP_STORE, isa.MEM_OUT, 0, ob.base, 1, store_rows, store_rows))
    prog = b.finish()
    return prog, prog.dram_image()


def _out(prog, dram, rows: int) -> np.ndarray:
    ob = prog.buffers["out"]
    return dram[ob.offset:ob.offset + rows * 16].view(np.int8).reshape(rows, 16)


def test_alu_semantics_and_truncating_store() -> None:
    acc = np.array([[2 ** 31 - 2, -7, 300, -300] * 4, [3, 3, 3, 3] * 4, [1, 2, 3, -4] * 4], np.int64)

    def body(b):
        k0, k1 = b.kernel([(0, 1, 0)])
        b.emit(isa.Alu(isa.ALU_ADD, k0, k1, use_imm=False))                   # row0 += row1 (wraps)
        s0, s1 = b.kernel([(2, 2, 0)])
        b.emit(isa.Alu(isa.ALU_SHR, s0, s1, use_imm=True, imm=1))             # row2 >>= 1
        m0, m1 = b.kernel([(1, 0, 0)])
        b.emit(isa.Alu(isa.ALU_MIN, m0, m1, use_imm=False))                   # row1 = min(row1, row0)

    prog, dram = _compute_program(body, acc.astype(np.int32), store_rows=3)
    Simulator(CFG).run(prog, dram)
    row0 = (acc[0] + acc[1] + 2 ** 31) % 2 ** 32 - 2 ** 31   # int32 wrap-around
    assert row0[0] == -(2 ** 31) + 1
    want = np.stack([row0, np.minimum(acc[1], row0), acc[2] >> 1])
    # the output buffer holds the low 8 bits (303 -> 47): truncation, not saturation
    np.testing.assert_array_equal(_out(prog, dram, 3), (want & 0xFF).astype(np.uint8).view(np.int8))
    assert _out(prog, dram, 3)[0, 2] == 303 - 256


def test_arithmetic_shift_floors_negatives() -> None:
    acc = np.tile(np.array([-5, -4, -1, 5, 2 ** 20 + 7, -(2 ** 20) - 7, 0, 1], np.int32), 2)[None]

    def body(b):
        k0, k1 = b.kernel([(0, 0, 0)])
        b.emit(isa.Alu(isa.ALU_SHR, k0, k1, use_imm=True, imm=2))

    prog, dram = _compute_program(body, acc, store_rows=1)
    Simulator(CFG).run(prog, dram)
    np.testing.assert_array_equal(_out(prog, dram, 1)[0], ((acc[0].astype(np.int64) >> 2) & 0xFF).astype(np.uint8).view(np.int8))
    np.testing.assert_array_equal(Requant(2, None).apply(np.array([-5, -4, -1, 5])), [-2, -1, -1, 1])


@pytest.mark.parametrize("body,error,match", [
    (lambda b: b.emit(isa.Alu(isa.ALU_SHR, *b.kernel([(0, 0, 0)]), imm=16)), PortabilityError, "SHR by 16"),
    (lambda b: b.emit(isa.Alu(isa.ALU_MUL, *b.kernel([(0, 0, 0)]), imm=3)), PortabilityError, "MUL"),
    (lambda b: b.emit(isa.Gemm(*b.kernel([(0, 0, 0), (0, 1, 0)]))), HazardError, "micro-op 1 .* row 0"),
    (lambda b: b.emit(isa.Gemm(*b.kernel([(0, 0, 0)]), reset=True)), VTASimError, "no GEMM/ALU has written"),
])
def test_non_portable_or_unsafe_programs_are_rejected(body, error, match) -> None:
    prog, dram = _compute_program(body, np.zeros((1, 16), np.int32), store_rows=1)
    with pytest.raises(error, match=match):
        Simulator(CFG).run(prog, dram)


def test_weight_load_padding_is_rejected() -> None:
    b = ProgramBuilder(CFG)
    wb = b.constant("wgt", np.zeros(256, np.uint8), 256)
    b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_WGT, 0, wb.base, 1, 1, 1, x_pad0=1))
    prog = b.finish()
    with pytest.raises(PortabilityError, match="padded weight loads"):
        Simulator(CFG).run(prog, prog.dram_image())


def test_padded_input_load() -> None:
    b = ProgramBuilder(CFG)
    data = np.arange(2 * 3 * 16, dtype=np.int64).astype(np.int8)
    ib = b.constant("inp", data, 16)
    b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, 5, ib.base, 2, 3, 3, 1, 2, 1, 1))
    prog = b.finish()
    sim = Simulator(CFG)
    sim.run(prog, prog.dram_image())
    rect = sim.inp[5:5 + 5 * 5, 0].reshape(5, 5, 16)
    want = np.zeros((5, 5, 16), np.int8)
    want[1:3, 1:4] = data.reshape(2, 3, 16)
    np.testing.assert_array_equal(rect, want)


@pytest.mark.parametrize("path", ["ternary", "pow2"])
def test_narrow_weight_lanes_round_trip(path: str) -> None:
    cfg = CFG.with_weight_path(path)
    rng = np.random.default_rng(1)
    w = rng.integers(-1, 2, (3, 16, 16)) if path == "ternary" else \
        rng.choice([0, 1, -1, 2, -4, 8, -16, 32, 64, -64], (3, 16, 16))
    packed = encode_weights(w, cfg)
    assert packed.shape == (3, cfg.wgt_elem_bytes)
    np.testing.assert_array_equal(decode_weights(packed, cfg), w)
    with pytest.raises(ValueError):
        encode_weights(np.full((1, 16, 16), 3), cfg)


# ---- cycle model ------------------------------------------------------------------------------

def test_dma_duration_formula() -> None:
    t = CFG.timing
    ld = isa.Mem(isa.OP_LOAD, isa.MEM_INP, 0, 0, 4, 10, 10, 1, 1, 0, 0)
    assert duration(ld, CFG) == t.dma_request + 4 * (t.dma_row + 20) + 2 * 10 * t.pad_elem
    wide = replace(CFG, bus_bits=128)
    assert duration(ld, wide) == t.dma_request + 4 * (t.dma_row + 10) + 2 * 10 * t.pad_elem
    assert duration(isa.Gemm(0, 9, 2, 7), CFG) == t.compute_insn + 2 * 7 * 9


def test_modules_overlap_and_layer_accounting() -> None:
    spec = ConvSpec(1, 32, 14, 14, 32, 3, 3, (1, 1), (1, 1))
    lp = lower_conv(spec, np.ones((32, 32, 3, 3), int), Requant(10), CFG)
    rep = estimate(lp.program)
    assert rep.gemm_uops == spec.gemm_uops() == 14 * 14 * 2 * 2 * 9
    assert max(rep.busy.values()) <= rep.total_cycles < sum(rep.busy.values())  # load/compute/store overlap
    assert 0.5 < rep.utilization < 1.0
    # a single tile (no double buffering: load, then compute, then store) is slower
    single = lower_conv(spec, np.ones((32, 32, 3, 3), int), Requant(10), CFG, Tiling(14, 14, 2, 2))
    assert estimate(single.program).total_cycles > rep.total_cycles


def test_micro_op_kernels_loaded_on_demand_when_the_buffer_is_small() -> None:
    small = replace(CFG, log_uop_buff_size=10)        # 256 micro-ops: the kernels cannot all be preloaded
    spec = ConvSpec(1, 32, 14, 14, 32, 3, 3, (1, 1), (1, 1))
    rng = np.random.default_rng(5)
    w = rng.integers(-127, 128, (32, 32, 3, 3))
    q = rng.integers(-128, 128, (1, 32, 14, 14))
    lp = lower_conv(spec, w, Requant(11), small, Tiling(7, 14, 1, 1))
    uop_loads = [i for i in lp.program.insns if isinstance(i, isa.Mem) and i.mem == isa.MEM_UOP and i.x_size]
    assert len(uop_loads) > 1 and all(i.sram_base + i.x_size <= small.uop_depth for i in uop_loads)
    np.testing.assert_array_equal(run_layer(lp, q), conv_reference(q, w, spec, Requant(11)))


def test_illegal_dependency_flags_are_rejected() -> None:
    with pytest.raises(Exception, match="no previous stage"):   # the builder refuses it ...
        ProgramBuilder(CFG).emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, deps=D(push_prev=True)))
    prog = Program(CFG, [isa.Mem(isa.OP_LOAD, isa.MEM_INP, deps=D(push_prev=True)), isa.Finish()], {}, {}, 0)
    with pytest.raises(VTASimError, match=r"#0 .*load module has no push_prev queue"):
        Simulator(CFG).run(prog, prog.dram_image())


# ---- whole-layer-on-chip schedule and cross-layer weight prefetch ------------------------------

def test_band_rows_cover_the_output_and_respect_the_hazard_minimum() -> None:
    from tvm_lowbit.vta.lower import band_rows

    for oh in (1, 3, 7, 14, 28):
        for th in range(1, oh + 1):
            for taper in (0, 1, 2):
                bands = band_rows(oh, th, taper, 3)
                assert sum(bands) == oh and max(bands) < max(th, 3) + 3, (oh, th, taper, bands)  # a merge adds < 3
                assert len(bands) == 1 or min(bands) >= min(3, oh), (oh, th, taper, bands)
    assert band_rows(28, 28, 1, 3) == [7, 12, 6, 3]       # a short last band: little left after the last GEMM


def test_resident_schedule_resets_once_and_beats_double_buffering() -> None:
    # the 16-channel 28x28 layer of the built-in model: 9 GEMM + 1 reset + 2 ALU cycles per output
    # vector cap it at 75%; the double-buffered schedule reached 67.5%
    spec = ConvSpec(1, 16, 28, 28, 16, 3, 3, (1, 1), (1, 1), pre_padded=True)
    w = np.ones((16, 16, 3, 3), int)
    lp = lower_conv(spec, w, Requant(8, clip=None), CFG)
    rep = estimate(lp.program)
    assert lp.tiling.order == "resident"
    assert rep.reset_uops == 28 * 28 and sum(isinstance(i, isa.Gemm) and i.reset for i in lp.program.insns) == 1
    assert not any(i.deps.pop_next for i in lp.program.insns if isa.module_of(i) == "load")  # no WAR waits
    assert rep.compute_ceiling == pytest.approx(9 / 12)
    assert 0.70 <= rep.utilization < rep.compute_ceiling
    old = min(estimate(lower_conv(spec, w, Requant(8, clip=None), CFG, t).program).total_cycles
              for t in tile_candidates(spec, CFG, Requant(8, clip=None)) if t.order == "weight")
    assert rep.total_cycles < 0.96 * old


def test_weight_prefetch_chain_is_exact_in_order_and_refused_out_of_order() -> None:
    from tvm_lowbit.vta.lower import WeightChain, pack_weight_blocks

    rng = np.random.default_rng(11)
    a = ConvSpec(1, 16, 8, 8, 32, 3, 3, (1, 1), (1, 1))
    b = ConvSpec(1, 32, 8, 8, 64, 3, 3, (2, 2), (1, 1))
    wa, wb = rng.integers(-127, 128, (32, 16, 3, 3)), rng.integers(-127, 128, (64, 32, 3, 3))
    qa, qb = rng.integers(-128, 128, (1, 16, 8, 8)), rng.integers(-128, 128, (1, 32, 8, 8))
    plain_b = lower_conv(b, wb, Requant(11), CFG)
    la = lower_conv(a, wa, Requant(10), CFG, chain=WeightChain(0, False, pack_weight_blocks(wb, b), 512))
    lb = lower_conv(b, wb, Requant(11), CFG, chain=WeightChain(512, True))
    assert not any(isinstance(i, isa.Mem) and i.mem == isa.MEM_WGT for i in lb.program.insns)
    assert estimate(lb.program).total_cycles < estimate(plain_b.program).total_cycles
    sim = Simulator(CFG, seed=3)
    np.testing.assert_array_equal(run_layer(la, qa, sim=sim), conv_reference(qa, wa, a, Requant(10)))
    np.testing.assert_array_equal(run_layer(lb, qb, sim=sim), conv_reference(qb, wb, b, Requant(11)))
    with pytest.raises(VTASimError, match=r"expects its weights in weight SRAM blocks 512\.\.583.*in order"):
        run_layer(lb, qb)                                   # a fresh simulator: nobody prefetched them
    with pytest.raises(Exception, match="overwrite this layer's"):
        lower_conv(a, wa, Requant(10), CFG, chain=WeightChain(0, False, pack_weight_blocks(wb, b), 10))


def test_micro_op_prefetch_chain_is_exact_in_order_and_refused_out_of_order() -> None:
    from tvm_lowbit.vta.lower import WeightChain

    rng = np.random.default_rng(12)
    a = ConvSpec(1, 16, 8, 8, 32, 3, 3, (1, 1), (1, 1))
    b = ConvSpec(1, 32, 8, 8, 32, 3, 3, (2, 2), (1, 1))
    wa, wb = rng.integers(-127, 128, (32, 16, 3, 3)), rng.integers(-127, 128, (32, 32, 3, 3))
    qa, qb = rng.integers(-128, 128, (1, 16, 8, 8)), rng.integers(-128, 128, (1, 32, 8, 8))
    half = CFG.uop_depth // 2
    plain_b = lower_conv(b, wb, Requant(11), CFG)
    lb = lower_conv(b, wb, Requant(11), CFG, chain=WeightChain(uop_base=half, uops_preloaded=True))
    image = lb.program.notes["uop_image"][1]
    la = lower_conv(a, wa, Requant(10), CFG, chain=WeightChain(next_uops=image, next_uop_base=half))
    # b loads no micro-ops and saves their load; a loads b's after its own last ALU op
    assert not any(isinstance(i, isa.Mem) and i.mem == isa.MEM_UOP and i.x_size for i in lb.program.insns)
    assert "uop" not in lb.program.constants
    assert estimate(lb.program).total_cycles < estimate(plain_b.program).total_cycles
    uop_loads = [k for k, i in enumerate(la.program.insns) if isinstance(i, isa.Mem) and i.mem == isa.MEM_UOP and i.x_size]
    last_alu = max(k for k, i in enumerate(la.program.insns) if isinstance(i, isa.Alu))
    assert uop_loads[-1] > last_alu and la.program.insns[uop_loads[-1]].sram_base == half
    sim = Simulator(CFG, seed=5)
    np.testing.assert_array_equal(run_layer(la, qa, sim=sim), conv_reference(qa, wa, a, Requant(10)))
    np.testing.assert_array_equal(run_layer(lb, qb, sim=sim), conv_reference(qb, wb, b, Requant(11)))
    with pytest.raises(VTASimError, match=r"expects its micro-op kernels in uop SRAM entries .*in order"):
        run_layer(lb, qb)                                   # a fresh simulator: nobody prefetched them
    with pytest.raises(Exception, match="would overwrite this layer's"):
        lower_conv(a, wa, Requant(10), CFG, chain=WeightChain(next_uops=image, next_uop_base=5))


def test_one_row_bands_use_a_column_kernel_and_stay_exact() -> None:
    from tvm_lowbit.vta.lower import _band_gemm, band_rows

    # two output blocks x one row would write an accumulator row every 2 micro-ops (hazard); a kernel
    # of two columns keeps them 4 apart, so the last band can be one row (a short tail)
    spec = ConvSpec(1, 16, 12, 12, 32, 3, 3, (1, 1), (1, 1))
    uops, loop = _band_gemm(spec, 0, 0, 0, 14 * 14, 2, 1, 1, spec.oh, 1, 14, 1)
    assert loop[:4] == (1, 6, 12, 2) and len(uops) == 9 * 2 * 2
    t = Tiling(12, 12, 2, 1, "resident", 1)
    assert band_rows(spec.oh, t.th, t.taper, 1)[-1] == 1
    rng = np.random.default_rng(13)
    w, q = rng.integers(-127, 128, (32, 16, 3, 3)), rng.integers(-128, 128, (1, 16, 12, 12))
    lp = lower_conv(spec, w, Requant(10), CFG, t)
    assert lp.info["bands"][-1] == 1
    np.testing.assert_array_equal(run_layer(lp, q, seed=4), conv_reference(q, w, spec, Requant(10)))
    odd = ConvSpec(1, 16, 7, 7, 32, 3, 3, (1, 1), (1, 1))   # width 7: the kernel holds the whole row
    q = q[:, :, :7, :7]
    lp = lower_conv(odd, w, Requant(10), CFG, Tiling(7, 7, 2, 1, "resident", 1))
    assert lp.info["bands"][-1] == 1
    np.testing.assert_array_equal(run_layer(lp, q, seed=4), conv_reference(q, w, odd, Requant(10)))
    narrow = ConvSpec(1, 16, 6, 2, 16, 3, 3, (1, 1), (1, 1))  # one block, width 2: no column group
    lp = lower_conv(narrow, w[:16], Requant(10), CFG, Tiling(6, 2, 1, 1, "resident", 1))
    assert min(lp.info["bands"]) >= 3
