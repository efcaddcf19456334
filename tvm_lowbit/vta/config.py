"""VTA hardware configuration: the ``vta_config.json`` fields, the FPGA/timing parameters of a preset,
and every quantity derived from them (element sizes, buffer depths, ISA field widths).

A preset lives in ``targets/vta-*.json`` under the key ``"vta"`` (see ``tvm_lowbit.targets``).  The
instruction layout depends on the configuration: index and loop-factor fields are as wide as the
log2 depth of the buffer they address, so :meth:`VTAConfig.check_isa_fits` rejects a configuration
whose fields no longer fit the fixed 128-bit instruction and 32-bit micro-op containers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

WEIGHT_PATHS = ("int8", "ternary", "pow2")  # the GEMM core's weight lanes: int8, 2-bit ternary, 4-bit shift-add
CORES = ("int8", "ternary-wide")

# Resource model of one GEMM lane (one multiply-accumulate per cycle) on a 6-input-LUT FPGA.  ESTIMATES,
# not a synthesis result and not from a datasheet: an 8x8 signed multiplier in LUTs has 64 partial-product
# bits, about one LUT6 each with the carry chain (~60 LUT6); its 16-bit product feeds the 16-input adder
# tree (15 adders of ~18 bits per 16 lanes, ~17 LUT6 per lane).  A ternary x int8 lane is a conditional
# negate-or-zero of the 8-bit input (~9 LUT6, one per bit plus the sign) feeding a 9-bit adder tree
# (~10 LUT6 per lane).  The ratio sets how many more lanes a ternary core gets for the same LUTs.
LUT_PER_INT8_LANE = 60 + 17
LUT_PER_TERNARY_LANE = 9 + 10


def ternary_width_factor() -> int:
    """How many times as many ternary lanes fit the LUTs of the int8 lanes, rounded down to a power of
    two (BLOCK_OUT must stay a power of two): 77 / 19 = 4.05 -> 4, i.e. BLOCK_OUT 64."""
    r = LUT_PER_INT8_LANE / LUT_PER_TERNARY_LANE
    return 1 << (int(r).bit_length() - 1)


class VTAConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Timing:
    """Cycle-model parameters of one implementation (cycles of the accelerator clock).

    DMA: a LOAD/STORE costs ``dma_request`` once, ``dma_row`` per 2-D row, one cycle per bus beat,
    and ``pad_elem`` per zero-padded element written into SRAM.  GEMM/ALU: ``compute_insn`` once per
    instruction, then one micro-op every ``gemm_ii`` / ``alu_ii_imm`` / ``alu_ii_tensor`` cycles.
    Instructions are fetched over the bus (16 B each) into per-module queues of ``insn_queue_depth``.
    The defaults follow the HLS design (ALU II = 2); they are estimates, not a board calibration.
    """

    gemm_ii: int = 1
    alu_ii_imm: int = 2
    alu_ii_tensor: int = 2
    dma_request: int = 50
    dma_row: int = 8
    pad_elem: int = 1
    compute_insn: int = 8
    nop: int = 1
    insn_queue_depth: int = 512
    token_limit: int = 255

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Timing":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise VTAConfigError(f"unknown VTA timing field(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**{k: int(v) for k, v in d.items()})


@dataclass(frozen=True)
class VTAConfig:
    """One VTA design point.  Field names follow ``vta_config.json`` (lower-cased)."""

    name: str = "vta-sim"
    target: str = "sim"                 # TARGET: sim, pynq, ultra96, zcu104
    hw_ver: str = "0.0.2"
    log_inp_width: int = 3
    log_wgt_width: int = 3
    log_acc_width: int = 5
    log_batch: int = 0
    log_block: int = 4
    log_uop_buff_size: int = 15
    log_inp_buff_size: int = 15
    log_wgt_buff_size: int = 18
    log_acc_buff_size: int = 17
    part: str = "xc7z020clg484-1"
    clock_mhz: float = 100.0
    bus_bits: int = 64
    weight_path: str = "int8"
    # output blocks of 16 lanes one GEMM / ALU micro-op computes (BLOCK_OUT = 16 * gemm_width); > 1 only in
    # the cycle model of the ternary-wide core, whose programs are those of the 16-lane core (same math)
    gemm_width: int = 1
    timing: Timing = field(default_factory=Timing)

    # ---- the JSON form ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "vta") -> "VTAConfig":
        """From the ``"vta"`` object of a target file (upper-case vta_config.json keys accepted)."""
        d = {k.lower(): v for k, v in d.items()}
        fpga = d.pop("fpga", {})
        timing = Timing.from_dict(d.pop("timing", {}))
        known = set(cls.__dataclass_fields__) - {"timing", "name"}
        unknown = set(d) - known
        if unknown:
            raise VTAConfigError(f"unknown VTA config field(s) {', '.join(sorted(unknown))}; known: "
                                 f"{', '.join(sorted(known))}, fpga, timing")
        kw = {k: v for k, v in d.items()}
        for k in ("part", "clock_mhz", "bus_bits"):
            if k in fpga:
                kw[k] = fpga[k]
        cfg = cls(name=name, timing=timing, **kw)
        cfg.validate()
        return cfg

    def with_weight_path(self, path: str) -> "VTAConfig":
        """The same core with a narrower weight datapath (the hardware variant of the issue):
        ``ternary`` = 2-bit lanes (LOG_WGT_WIDTH 1, weight SRAM 64 KiB), ``pow2`` = 4-bit sign+exponent
        codes decoded to a shift (LOG_WGT_WIDTH 2, 128 KiB).  Both keep 1024 weight blocks, so the
        instruction set is unchanged."""
        if path == "int8":
            return replace(self, weight_path="int8", log_wgt_width=3, log_wgt_buff_size=18, name=self.name)
        if path == "ternary":
            return replace(self, weight_path=path, log_wgt_width=1, log_wgt_buff_size=16, name=f"{self.name}+ternary")
        if path == "pow2":
            return replace(self, weight_path=path, log_wgt_width=2, log_wgt_buff_size=17, name=f"{self.name}+pow2")
        raise VTAConfigError(f"unknown weight path {path!r}; use one of {', '.join(WEIGHT_PATHS)}")

    def core(self, name: str) -> "VTAConfig":
        """``int8`` (this preset) or ``ternary-wide``: 2-bit ternary weight lanes and a GEMM array (and
        ALU) ``ternary_width_factor()`` times as wide, BLOCK_OUT 16 -> 64, for about the LUTs of the int8
        array (see the resource model above).  The wide core is modelled, not simulated lane by lane: its
        programs are the 16-lane ones (the functional simulator checks their math), and the cycle model
        issues ``gemm_width`` output blocks' micro-ops per cycle."""
        if name == "int8":
            return self
        if name == "ternary-wide":
            t = self.with_weight_path("ternary")
            return replace(t, name=f"{self.name}+ternary-wide", gemm_width=ternary_width_factor())
        raise VTAConfigError(f"unknown VTA core {name!r}; use one of {', '.join(CORES)}")

    def validate(self) -> None:
        if self.weight_path not in WEIGHT_PATHS:
            raise VTAConfigError(f"{self.name}: weight_path {self.weight_path!r}: use one of {', '.join(WEIGHT_PATHS)}")
        if (self.log_inp_width, self.log_acc_width) != (3, 5):
            raise VTAConfigError(f"{self.name}: only int8 inputs and int32 accumulators are supported "
                                 f"(LOG_INP_WIDTH 3, LOG_ACC_WIDTH 5), got {self.log_inp_width}/{self.log_acc_width}")
        want_wgt = {"int8": 3, "ternary": 1, "pow2": 2}[self.weight_path]
        if self.log_wgt_width != want_wgt:
            raise VTAConfigError(f"{self.name}: weight path {self.weight_path} needs LOG_WGT_WIDTH {want_wgt}, "
                                 f"got {self.log_wgt_width}")
        if self.bus_bits not in (32, 64, 128, 256, 512):
            raise VTAConfigError(f"{self.name}: bus_bits must be a power of two in 32..512, got {self.bus_bits}")
        for nm in ("log_uop_depth", "log_inp_depth", "log_wgt_depth", "log_acc_depth"):
            if getattr(self, nm) < 1:
                raise VTAConfigError(f"{self.name}: {nm} = {getattr(self, nm)}: a buffer is smaller than one element")
        self.check_isa_fits()

    # ---- derived parameters -------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return 1 << self.log_batch

    @property
    def block(self) -> int:
        return 1 << self.log_block

    @property
    def wgt_bits(self) -> int:
        return 1 << self.log_wgt_width

    @property
    def inp_elem_bytes(self) -> int:
        return self.batch * self.block

    @property
    def out_elem_bytes(self) -> int:
        return self.batch * self.block

    @property
    def wgt_elem_bytes(self) -> int:
        return self.block * self.block * self.wgt_bits // 8

    @property
    def acc_elem_bytes(self) -> int:
        return self.batch * self.block * 4

    uop_elem_bytes = 4
    insn_bytes = 16

    @property
    def log_uop_depth(self) -> int:
        return self.log_uop_buff_size - 5 + 3

    @property
    def log_inp_depth(self) -> int:
        return self.log_inp_buff_size - self.log_batch - self.log_block - self.log_inp_width + 3

    @property
    def log_wgt_depth(self) -> int:
        return self.log_wgt_buff_size - 2 * self.log_block - self.log_wgt_width + 3

    @property
    def log_acc_depth(self) -> int:
        return self.log_acc_buff_size - self.log_batch - self.log_block - self.log_acc_width + 3

    @property
    def uop_depth(self) -> int:
        return 1 << self.log_uop_depth

    @property
    def inp_depth(self) -> int:
        return 1 << self.log_inp_depth

    @property
    def wgt_depth(self) -> int:
        return 1 << self.log_wgt_depth

    @property
    def acc_depth(self) -> int:
        return 1 << self.log_acc_depth

    @property
    def bus_bytes(self) -> int:
        return self.bus_bits // 8

    @property
    def macs_per_cycle(self) -> int:
        return self.batch * self.block * self.block * self.gemm_width

    @property
    def peak_gops(self) -> float:
        return 2 * self.macs_per_cycle * self.clock_mhz / 1e3

    @property
    def sram_bytes(self) -> dict[str, int]:
        out = 1 << (self.log_acc_buff_size + self.log_inp_width - self.log_acc_width)
        return {"uop": 1 << self.log_uop_buff_size, "inp": 1 << self.log_inp_buff_size,
                "wgt": 1 << self.log_wgt_buff_size, "acc": 1 << self.log_acc_buff_size, "out": out}

    @property
    def bitstream(self) -> str:
        return (f"{self.batch}x{self.block}_i{8}w{self.wgt_bits}a32_{self.log_uop_buff_size}_"
                f"{self.log_inp_buff_size}_{self.log_wgt_buff_size}_{self.log_acc_buff_size}")

    # ---- instruction-field widths -------------------------------------------------------------
    @property
    def uop_src_bits(self) -> int:
        return max(self.log_acc_depth, self.log_inp_depth)

    def check_isa_fits(self) -> None:
        """The field-width constraints of the 128-bit instruction and 32-bit micro-op formats."""
        acc, inp, wgt, uop = self.log_acc_depth, self.log_inp_depth, self.log_wgt_depth, self.log_uop_depth
        checks = [("micro-op (dst + src + wgt indices)", acc + max(acc, inp) + wgt, 32),
                  ("GEMM word 1 (loop factors)", 2 * acc + 2 * inp + 2 * wgt, 64),
                  ("ALU word 1 (loop factors, opcode, imm)", 4 * acc + 3 + 1 + 16, 64),
                  ("GEMM/ALU word 0", 3 + 4 + 1 + uop + (uop + 1) + 14 + 14, 64)]
        for what, bits, limit in checks:
            if bits > limit:
                raise VTAConfigError(f"{self.name}: the {what} needs {bits} bits with these buffer depths, "
                                     f"more than its {limit}; shrink a buffer or widen the elements")

    def describe(self) -> str:
        return (f"{self.name}: {self.batch}x{self.block}x{self.block * self.gemm_width} GEMM core ({self.weight_path} weights), "
                f"{self.clock_mhz:g} MHz, {self.bus_bits}-bit bus, peak {self.peak_gops:.1f} GOPS; SRAM "
                + ", ".join(f"{k} {v // 1024} KiB" for k, v in self.sram_bytes.items()))
