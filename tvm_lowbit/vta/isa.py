"""The VTA instruction set (HW_VER 0.0.2): 128-bit instructions and 32-bit micro-ops, bit-exact.

An instruction is two little-endian 64-bit words; fields are packed LSB-first within a word and none
straddles bit 64.  Index and loop-factor fields are as wide as the log2 depth of the buffer they
address, so the layout tables are built from a :class:`~tvm_lowbit.vta.config.VTAConfig`.

Instructions are plain frozen dataclasses (:class:`Mem`, :class:`Gemm`, :class:`Alu`,
:class:`Finish`); :func:`encode` / :func:`decode` convert them to and from 128-bit integers, and
:func:`encode_uop` / :func:`decode_uop` do the same for micro-ops.  A value that does not fit its
field raises :class:`ISAError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Union

import numpy as np

from tvm_lowbit.vta.config import VTAConfig

OP_LOAD, OP_STORE, OP_GEMM, OP_FINISH, OP_ALU = 0, 1, 2, 3, 4
MEM_UOP, MEM_WGT, MEM_INP, MEM_ACC, MEM_OUT, MEM_ACC_8BIT = 0, 1, 2, 3, 4, 5
ALU_MIN, ALU_MAX, ALU_ADD, ALU_SHR, ALU_MUL = 0, 1, 2, 3, 4
MEM_NAMES = {MEM_UOP: "uop", MEM_WGT: "wgt", MEM_INP: "inp", MEM_ACC: "acc", MEM_OUT: "out", MEM_ACC_8BIT: "acc8"}
ALU_NAMES = {ALU_MIN: "min", ALU_MAX: "max", ALU_ADD: "add", ALU_SHR: "shr", ALU_MUL: "mul"}
LOOP_ITER_BITS = 14
MODULES = ("load", "compute", "store")


class ISAError(ValueError):
    pass


@dataclass(frozen=True)
class Deps:
    """Dependency-token flags: pop before executing, push after finishing (prev/next stage)."""

    pop_prev: bool = False
    pop_next: bool = False
    push_prev: bool = False
    push_next: bool = False

    def __or__(self, other: "Deps") -> "Deps":
        return Deps(*(a or b for a, b in zip(self.flags(), other.flags())))

    def flags(self) -> tuple[bool, bool, bool, bool]:
        return (self.pop_prev, self.pop_next, self.push_prev, self.push_next)

    def __str__(self) -> str:
        names = ("pop_prev", "pop_next", "push_prev", "push_next")
        return "|".join(n for n, f in zip(names, self.flags()) if f) or "-"


NO_DEPS = Deps()


@dataclass(frozen=True)
class Mem:
    """LOAD (opcode 0) or STORE (1): a 2-D strided, zero-padded copy between DRAM and one SRAM.
    ``dram_base`` and ``x_stride`` count elements of the memory type; ``x_size == 0`` is a token NOP."""

    opcode: int
    mem: int
    sram_base: int = 0
    dram_base: int = 0
    y_size: int = 0
    x_size: int = 0
    x_stride: int = 0
    y_pad0: int = 0
    y_pad1: int = 0
    x_pad0: int = 0
    x_pad1: int = 0
    deps: Deps = field(default=NO_DEPS)


@dataclass(frozen=True)
class Gemm:
    """GEMM (opcode 2): for o < iter_out, i < iter_in, u in [uop_bgn, uop_end):
    acc[dst] += inp[src] . wgt[w]^T with each index = uop field + o * factor_out + i * factor_in."""

    uop_bgn: int
    uop_end: int
    iter_out: int = 1
    iter_in: int = 1
    dst_fo: int = 0
    dst_fi: int = 0
    src_fo: int = 0
    src_fi: int = 0
    wgt_fo: int = 0
    wgt_fi: int = 0
    reset: bool = False
    deps: Deps = field(default=NO_DEPS)

    opcode = OP_GEMM


@dataclass(frozen=True)
class Alu:
    """ALU (opcode 4): acc[dst] = op(acc[dst], imm if use_imm else acc[src]) lane-wise, same loops as GEMM."""

    op: int
    uop_bgn: int
    uop_end: int
    iter_out: int = 1
    iter_in: int = 1
    dst_fo: int = 0
    dst_fi: int = 0
    src_fo: int = 0
    src_fi: int = 0
    use_imm: bool = True
    imm: int = 0
    deps: Deps = field(default=NO_DEPS)

    opcode = OP_ALU


@dataclass(frozen=True)
class Finish:
    deps: Deps = field(default=NO_DEPS)

    opcode = OP_FINISH


Insn = Union[Mem, Gemm, Alu, Finish]


def with_deps(insn: Insn, deps: Deps) -> Insn:
    return replace(insn, deps=deps)


def module_of(insn: Insn) -> str:
    """Which execution module runs ``insn`` (the fetch unit's routing)."""
    if isinstance(insn, Mem):
        if insn.opcode == OP_STORE:
            return "store"
        return "load" if insn.mem in (MEM_INP, MEM_WGT) else "compute"
    return "compute"


def is_nop(insn: Insn) -> bool:
    return isinstance(insn, Mem) and insn.x_size == 0


# ---- layouts ---------------------------------------------------------------------------------

_HEADER = [("opcode", 3), ("pop_prev", 1), ("pop_next", 1), ("push_prev", 1), ("push_next", 1)]


@lru_cache(maxsize=None)
def layouts(cfg: VTAConfig) -> dict[str, tuple[list[tuple[str, int]], list[tuple[str, int]]]]:
    """Field (name, width) lists of word 0 and word 1 for each format: ``mem``, ``gemm``, ``alu``."""
    acc, inp, wgt, uop = cfg.log_acc_depth, cfg.log_inp_depth, cfg.log_wgt_depth, cfg.log_uop_depth
    loop0 = [("reset", 1), ("uop_bgn", uop), ("uop_end", uop + 1),
             ("iter_out", LOOP_ITER_BITS), ("iter_in", LOOP_ITER_BITS)]
    return {
        "mem": (_HEADER + [("mem", 3), ("sram_base", 16), ("dram_base", 32)],
                [("y_size", 16), ("x_size", 16), ("x_stride", 16), ("y_pad0", 4), ("y_pad1", 4),
                 ("x_pad0", 4), ("x_pad1", 4)]),
        "gemm": (_HEADER + loop0,
                 [("dst_fo", acc), ("dst_fi", acc), ("src_fo", inp), ("src_fi", inp), ("wgt_fo", wgt),
                  ("wgt_fi", wgt)]),
        "alu": (_HEADER + loop0,
                [("dst_fo", acc), ("dst_fi", acc), ("src_fo", acc), ("src_fi", acc), ("op", 3),
                 ("use_imm", 1), ("imm", 16)]),
    }


def _check_widths(cfg: VTAConfig) -> None:
    for fmt, words in layouts(cfg).items():
        for w in words:
            if sum(width for _, width in w) > 64:
                raise ISAError(f"{cfg.name}: the {fmt} format does not fit 64-bit words with this configuration")


def _pack(values: dict[str, int], word: list[tuple[str, int]], what: str) -> int:
    out, pos = 0, 0
    for name, width in word:
        v = int(values.get(name, 0))
        if name == "imm":
            if not -(1 << 15) <= v < (1 << 15):
                raise ISAError(f"{what}: imm {v} does not fit a signed 16-bit field")
            v &= 0xFFFF
        elif not 0 <= v < (1 << width):
            raise ISAError(f"{what}: {name} = {v} does not fit its {width}-bit field (0..{(1 << width) - 1})")
        out |= v << pos
        pos += width
    return out


def _unpack(word_value: int, word: list[tuple[str, int]]) -> dict[str, int]:
    out, pos = {}, 0
    for name, width in word:
        v = (word_value >> pos) & ((1 << width) - 1)
        if name == "imm" and v >= 1 << 15:
            v -= 1 << 16
        out[name] = v
        pos += width
    return out


def _values(insn: Insn) -> dict[str, int]:
    d = {f.name: getattr(insn, f.name) for f in fields(insn) if f.name != "deps"}
    d.update(opcode=insn.opcode, pop_prev=insn.deps.pop_prev, pop_next=insn.deps.pop_next,
             push_prev=insn.deps.push_prev, push_next=insn.deps.push_next)
    return {k: int(v) for k, v in d.items()}


def encode(insn: Insn, cfg: VTAConfig) -> int:
    """The instruction as a 128-bit integer (bits 63:0 = word 0)."""
    fmt = "mem" if isinstance(insn, Mem) else "alu" if isinstance(insn, Alu) else "gemm"
    w0, w1 = layouts(cfg)[fmt]
    vals = _values(insn)
    what = f"{type(insn).__name__} instruction"
    return _pack(vals, w0, what) | (_pack(vals, w1, what) << 64)


def encode_words(insn: Insn, cfg: VTAConfig) -> tuple[int, int]:
    v = encode(insn, cfg)
    return v & ((1 << 64) - 1), v >> 64


def encode_bytes(insn: Insn, cfg: VTAConfig) -> bytes:
    return encode(insn, cfg).to_bytes(16, "little")


def decode(value: int | bytes, cfg: VTAConfig) -> Insn:
    """Inverse of :func:`encode` (also takes the 16 little-endian bytes)."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 16:
            raise ISAError(f"an instruction is 16 bytes, got {len(value)}")
        value = int.from_bytes(value, "little")
    lo, hi = value & ((1 << 64) - 1), value >> 64
    opcode = lo & 7
    fmt = {OP_LOAD: "mem", OP_STORE: "mem", OP_GEMM: "gemm", OP_FINISH: "gemm", OP_ALU: "alu"}.get(opcode)
    if fmt is None:
        raise ISAError(f"opcode {opcode} is not a VTA instruction (LOAD 0, STORE 1, GEMM 2, FINISH 3, ALU 4)")
    w0, w1 = layouts(cfg)[fmt]
    v = {**_unpack(lo, w0), **_unpack(hi, w1)}
    deps = Deps(bool(v["pop_prev"]), bool(v["pop_next"]), bool(v["push_prev"]), bool(v["push_next"]))
    if opcode in (OP_LOAD, OP_STORE):
        return Mem(opcode, v["mem"], v["sram_base"], v["dram_base"], v["y_size"], v["x_size"], v["x_stride"],
                   v["y_pad0"], v["y_pad1"], v["x_pad0"], v["x_pad1"], deps)
    if opcode == OP_FINISH:
        return Finish(deps)
    loops = dict(uop_bgn=v["uop_bgn"], uop_end=v["uop_end"], iter_out=v["iter_out"], iter_in=v["iter_in"],
                 dst_fo=v["dst_fo"], dst_fi=v["dst_fi"], src_fo=v["src_fo"], src_fi=v["src_fi"])
    if opcode == OP_GEMM:
        return Gemm(**loops, wgt_fo=v["wgt_fo"], wgt_fi=v["wgt_fi"], reset=bool(v["reset"]), deps=deps)
    return Alu(op=v["op"], **loops, use_imm=bool(v["use_imm"]), imm=v["imm"], deps=deps)


# ---- micro-ops -------------------------------------------------------------------------------

def uop_layout(cfg: VTAConfig) -> list[tuple[str, int]]:
    return [("dst", cfg.log_acc_depth), ("src", cfg.uop_src_bits), ("wgt", cfg.log_wgt_depth)]


def encode_uop(dst: int, src: int, wgt: int, cfg: VTAConfig) -> int:
    """A GEMM micro-op (acc row, inp row, wgt block) or an ALU micro-op (acc dst, acc src, 0)."""
    return _pack({"dst": dst, "src": src, "wgt": wgt}, uop_layout(cfg), "micro-op")


def encode_uops(uops: np.ndarray, cfg: VTAConfig) -> np.ndarray:
    """Vectorized :func:`encode_uop`: int array [n, 3] of (dst, src, wgt) -> uint32 [n]."""
    u = np.asarray(uops, np.int64).reshape(-1, 3)
    widths = [w for _, w in uop_layout(cfg)]
    for j, (name, w) in enumerate(uop_layout(cfg)):
        if u.size and (u[:, j].min() < 0 or u[:, j].max() >= 1 << w):
            bad = int(u[:, j].max() if u[:, j].max() >= 1 << w else u[:, j].min())
            raise ISAError(f"micro-op: {name} = {bad} does not fit its {w}-bit field (0..{(1 << w) - 1})")
    return (u[:, 0] | (u[:, 1] << widths[0]) | (u[:, 2] << (widths[0] + widths[1]))).astype(np.uint32)


def decode_uop(value: int, cfg: VTAConfig) -> tuple[int, int, int]:
    v = _unpack(int(value), uop_layout(cfg))
    return v["dst"], v["src"], v["wgt"]


# ---- text ------------------------------------------------------------------------------------

def disassemble(insn: Insn) -> str:
    d = "" if insn.deps == NO_DEPS else f" [{insn.deps}]"
    if isinstance(insn, Mem):
        kind = "STORE" if insn.opcode == OP_STORE else "LOAD"
        if insn.x_size == 0:
            return f"NOP({module_of(insn)}){d}"
        pads = (insn.y_pad0, insn.y_pad1, insn.x_pad0, insn.x_pad1)
        return (f"{kind} {MEM_NAMES.get(insn.mem, insn.mem)} sram={insn.sram_base} dram={insn.dram_base} "
                f"y={insn.y_size} x={insn.x_size} stride={insn.x_stride}"
                + (f" pad={pads}" if any(pads) else "") + d)
    if isinstance(insn, Finish):
        return f"FINISH{d}"
    loops = (f"uop[{insn.uop_bgn},{insn.uop_end}) {insn.iter_out}x{insn.iter_in} "
             f"dst {insn.dst_fo}/{insn.dst_fi} src {insn.src_fo}/{insn.src_fi}")
    if isinstance(insn, Gemm):
        return (f"GEMM{' reset' if insn.reset else ''} {loops} wgt {insn.wgt_fo}/{insn.wgt_fi}{d}")
    operand = f"imm {insn.imm}" if insn.use_imm else "tensor"
    return f"ALU {ALU_NAMES.get(insn.op, insn.op)} {operand} {loops}{d}"
