"""VTA instruction set: golden encodings (bit for bit), round trips, field limits, configurations, presets."""

from __future__ import annotations

import numpy as np
import pytest

from tvm_lowbit import targets
from tvm_lowbit.vta import isa
from tvm_lowbit.vta.config import VTAConfig, VTAConfigError

D = isa.Deps
CFG = VTAConfig()

# (instruction, bits 63:0, bits 127:64): vectors from the upstream C header, compiled for the default
# configuration (written down in the project's VTA design study; copied here as data)
GOLDEN = [
    (isa.Mem(isa.OP_LOAD, isa.MEM_INP, 0x10, 0x12345, 4, 6, 56, 1, 1, 1, 1, D(pop_next=True, push_next=True)),
     0x0000048D14004150, 0x1111003800060004),
    (isa.Mem(isa.OP_LOAD, isa.MEM_WGT, 0, 0x400, 2, 36, 36, deps=D(push_next=True)), 0x00000010000000C0, 0x0000002400240002),
    (isa.Mem(isa.OP_LOAD, isa.MEM_UOP, 0, 0x100, 1, 18, 18), 0x0000000400000000, 0x0000001200120001),
    (isa.Gemm(0, 18, 4, 14, 14, 1, 16, 1, 0, 0, deps=D(pop_prev=True, push_prev=True)), 0x001C00200240002A, 0x000000020400080E),
    (isa.Gemm(18, 19, 4, 14, 14, 1, reset=True), 0x001C002002601282, 0x000000000000080E),
    (isa.Alu(isa.ALU_SHR, 18, 19, 4, 14, 14, 1, 14, 1, True, 8), 0x001C002002601204, 0x0008B0020380080E),
    (isa.Alu(isa.ALU_MAX, 18, 19, 4, 14, 14, 1, 14, 1, True, -127, D(push_next=True)), 0x001C002002601244, 0xFF8190020380080E),
    (isa.Alu(isa.ALU_ADD, 19, 20, 1, 56, 0, 1, 0, 0, False, 0), 0x0070000802801304, 0x0000200000000800),
    (isa.Mem(isa.OP_STORE, isa.MEM_OUT, 0, 0x2000, 4, 14, 56, deps=D(pop_prev=True, push_prev=True)),
     0x0000008000000229, 0x00000038000E0004),
    (isa.Mem(isa.OP_LOAD, isa.MEM_UOP, deps=D(pop_next=True)), 0x0000000000000010, 0),   # compute NOP
    (isa.Mem(isa.OP_STORE, isa.MEM_UOP, deps=D(push_prev=True)), 0x0000000000000021, 0),  # store NOP
    (isa.Finish(), 0x0000000000000003, 0),
]
GOLDEN_UOPS = [((5, 300, 1000), 0xFA096005), ((2047, 2047, 1023), 0xFFFFFFFF)]


@pytest.mark.parametrize("insn,lo,hi", GOLDEN, ids=[isa.disassemble(g[0]) for g in GOLDEN])
def test_golden_encodings(insn: isa.Insn, lo: int, hi: int) -> None:
    assert isa.encode_words(insn, CFG) == (lo, hi)
    raw = isa.encode_bytes(insn, CFG)
    assert raw == (lo | hi << 64).to_bytes(16, "little")
    assert isa.decode(raw, CFG) == insn


def test_golden_uops() -> None:
    for (d, s, w), want in GOLDEN_UOPS:
        assert isa.encode_uop(d, s, w, CFG) == want
        assert isa.decode_uop(want, CFG) == (d, s, w)
        assert int(isa.encode_uops(np.array([[d, s, w]]), CFG)[0]) == want


def test_random_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        deps = D(*(bool(b) for b in rng.integers(0, 2, 4)))
        kind = rng.integers(0, 3)
        if kind == 0:
            insn = isa.Mem(int(rng.integers(0, 2)), int(rng.integers(0, 5)), *(int(v) for v in rng.integers(0, 1 << 16, 1)),
                           int(rng.integers(0, 1 << 32)), *(int(v) for v in rng.integers(0, 1 << 16, 3)),
                           *(int(v) for v in rng.integers(0, 16, 4)), deps=deps)
        elif kind == 1:
            insn = isa.Gemm(int(rng.integers(0, 8192)), int(rng.integers(0, 8193)), *(int(v) for v in rng.integers(0, 1 << 14, 2)),
                            *(int(v) for v in rng.integers(0, 2048, 4)), *(int(v) for v in rng.integers(0, 1024, 2)),
                            reset=bool(rng.integers(0, 2)), deps=deps)
        else:
            insn = isa.Alu(int(rng.integers(0, 5)), int(rng.integers(0, 8192)), int(rng.integers(0, 8193)),
                           *(int(v) for v in rng.integers(0, 1 << 14, 2)), *(int(v) for v in rng.integers(0, 2048, 4)),
                           bool(rng.integers(0, 2)), int(rng.integers(-32768, 32768)), deps=deps)
        assert isa.decode(isa.encode(insn, CFG), CFG) == insn


def test_field_overflow_names_the_field() -> None:
    with pytest.raises(isa.ISAError, match="iter_out = 16384 does not fit its 14-bit field"):
        isa.encode(isa.Gemm(0, 1, 16384, 1), CFG)
    with pytest.raises(isa.ISAError, match="wgt_fo = 1024"):
        isa.encode(isa.Gemm(0, 1, wgt_fo=1024), CFG)
    with pytest.raises(isa.ISAError, match="imm 40000"):
        isa.encode(isa.Alu(isa.ALU_ADD, 0, 1, imm=40000), CFG)
    with pytest.raises(isa.ISAError, match="src = 2048"):
        isa.encode_uops(np.array([[0, 2048, 0]]), CFG)
    with pytest.raises(isa.ISAError, match="opcode 5"):
        isa.decode(5, CFG)


def test_routing_to_modules() -> None:
    assert isa.module_of(isa.Mem(isa.OP_LOAD, isa.MEM_INP)) == "load"
    assert isa.module_of(isa.Mem(isa.OP_LOAD, isa.MEM_WGT)) == "load"
    assert isa.module_of(isa.Mem(isa.OP_LOAD, isa.MEM_UOP)) == "compute"
    assert isa.module_of(isa.Mem(isa.OP_LOAD, isa.MEM_ACC)) == "compute"
    assert isa.module_of(isa.Mem(isa.OP_STORE, isa.MEM_OUT)) == "store"
    assert isa.module_of(isa.Gemm(0, 1)) == isa.module_of(isa.Finish()) == "compute"


def test_derived_parameters() -> None:
    c = CFG
    assert (c.uop_depth, c.inp_depth, c.wgt_depth, c.acc_depth) == (8192, 2048, 1024, 2048)
    assert (c.inp_elem_bytes, c.wgt_elem_bytes, c.acc_elem_bytes, c.out_elem_bytes) == (16, 256, 64, 16)
    assert c.sram_bytes == {"uop": 32768, "inp": 32768, "wgt": 262144, "acc": 131072, "out": 32768}
    assert c.peak_gops == pytest.approx(51.2)
    assert c.bitstream == "1x16_i8w8a32_15_15_18_17"
    # the narrow weight paths keep 1024 weight blocks, so the instruction layout is unchanged
    for path, elem, sram in (("ternary", 64, 64 * 1024), ("pow2", 128, 128 * 1024)):
        v = c.with_weight_path(path)
        assert (v.wgt_elem_bytes, v.sram_bytes["wgt"], v.wgt_depth) == (elem, sram, 1024)
        assert isa.layouts(v) == isa.layouts(c)
    with pytest.raises(VTAConfigError, match="micro-op"):
        VTAConfig(log_wgt_width=1, weight_path="ternary").validate()  # 2-bit lanes in a 256 KiB buffer: 4096 blocks
    with pytest.raises(VTAConfigError, match="weight_path"):
        VTAConfig(weight_path="int4").validate()


def test_vta_presets_are_targets() -> None:
    names = [n for n in targets.available() if n.startswith("vta-")]
    assert names == ["vta-pynq", "vta-sim", "vta-ultra96", "vta-zcu104"]
    want = {"vta-pynq": (100, 64, "armv7l"), "vta-ultra96": (333, 128, "aarch64"),
            "vta-zcu104": (333, 128, "aarch64"), "vta-sim": (100, 64, "x86_64")}
    for name in names:
        spec = targets.load_target(name)
        cfg = spec.vta_config()
        assert spec.is_vta and (cfg.clock_mhz, cfg.bus_bits, spec.arch) == want[name]
        assert str(spec.tvm_target().kind) == "llvm"  # the host CPU the rest of the model compiles for
    assert not targets.load_target("rasp4b").is_vta
    with pytest.raises(targets.TargetError, match="no VTA accelerator"):
        targets.load_target("x86").vta_config()
