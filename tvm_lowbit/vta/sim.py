"""Functional VTA simulator in NumPy, bit-exact with the portable subset of VTA's semantics.

* GEMM: int8 x int8 products summed into int32 accumulators that wrap mod 2^32; a reset writes 0.
* ALU: MIN, MAX, ADD (wraps), SHR by 0..15 (arithmetic), lane-wise on int32, with an immediate or an
  accumulator row as second operand.  MUL, shifts outside 0..15, ACC_8BIT loads and padded weight
  loads are not portable across VTA implementations and are rejected.
* A separate output buffer: GEMM/ALU write ``low 8 bits`` of the new accumulator to it (truncation,
  not saturation); STORE copies it.  Rows whose last writer was a LOAD ACC or a GEMM reset are
  poisoned, and storing one is an error (the hardware would store garbage).
* The three modules run as an eager dataflow: any module whose head instruction has been fetched
  and has its tokens may run; a seeded random choice among the ready ones shakes out missing tokens.
  The fetch unit fills per-module command queues of ``insn_queue_depth`` in program order.
* Errors name the instruction: :class:`DeadlockError` (no module can proceed, with the token each
  waits for), :class:`BufferOverflowError` (an SRAM or DRAM index out of range), :class:`HazardError`
  (a micro-op writes an accumulator row one of the previous ``hazard_distance - 1`` micro-ops wrote:
  the pipelined hardware would lose the update), :class:`PortabilityError`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from tvm_lowbit.vta import isa
from tvm_lowbit.vta.config import VTAConfig
from tvm_lowbit.vta.program import QUEUES, Program


class VTASimError(RuntimeError):
    def __init__(self, msg: str, index: int | None = None) -> None:
        super().__init__(msg)
        self.index = index


class DeadlockError(VTASimError):
    pass


class BufferOverflowError(VTASimError):
    pass


class HazardError(VTASimError):
    pass


class PortabilityError(VTASimError):
    pass


@dataclass
class SimStats:
    """fsim-style counters of one run."""

    inp_load_nbytes: int = 0
    wgt_load_nbytes: int = 0
    acc_load_nbytes: int = 0
    uop_load_nbytes: int = 0
    out_store_nbytes: int = 0
    gemm_counter: int = 0       # GEMM micro-ops executed, resets excluded
    reset_counter: int = 0
    alu_counter: int = 0
    insns: dict[str, int] = field(default_factory=lambda: {m: 0 for m in isa.MODULES})


def wrap32(a: np.ndarray) -> np.ndarray:
    """int64 -> int32 with two's-complement wrap-around (never np.int32() of an out-of-range value)."""
    return ((np.asarray(a, np.int64) + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)


def low8(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a, np.int64) & 0xFF).astype(np.uint8).view(np.int8)


def decode_weights(raw: np.ndarray, cfg: VTAConfig) -> np.ndarray:
    """Packed weight elements [n, wgt_elem_bytes] (uint8) -> int8 [n, BLOCK_OUT, BLOCK_IN].
    Sub-byte lanes: lane i = c * BLOCK_IN + k sits in bits [(i+1)W-1 : iW]."""
    n, b = raw.shape[0], cfg.block
    if cfg.weight_path == "int8":
        return raw.view(np.int8).reshape(n, b, b)
    width = cfg.wgt_bits
    per_byte = 8 // width
    shifts = (np.arange(per_byte) * width).astype(np.uint8)
    lanes = ((raw[:, :, None] >> shifts) & ((1 << width) - 1)).reshape(n, b * b).astype(np.int16)
    if cfg.weight_path == "ternary":
        if np.any(lanes == 2):
            raise ValueError("ternary weight lane holds the unused code 0b10")
        vals = np.where(lanes == 3, -1, lanes)
    else:  # pow2: bit 3 = sign, bits 2:0 = exponent index (0 = zero weight, e + 1 otherwise)
        idx = lanes & 7
        mag = np.where(idx > 0, np.left_shift(1, np.maximum(idx - 1, 0)), 0)
        vals = np.where(lanes & 8, -mag, mag)
    return vals.astype(np.int8).reshape(n, b, b)


def encode_weights(blocks: np.ndarray, cfg: VTAConfig) -> np.ndarray:
    """int weights [n, BLOCK_OUT, BLOCK_IN] -> packed uint8 [n, wgt_elem_bytes] for ``cfg.weight_path``
    (the inverse of :func:`decode_weights`; raises if a value is not representable)."""
    w = np.asarray(blocks, np.int64)
    n, b = w.shape[0], cfg.block
    if cfg.weight_path == "int8":
        if w.size and (w.min() < -128 or w.max() > 127):
            raise ValueError("int8 weight path: values must be in -128..127")
        return w.astype(np.int8).view(np.uint8).reshape(n, b * b)
    flat = w.reshape(n, b * b)
    if cfg.weight_path == "ternary":
        if flat.size and (flat.min() < -1 or flat.max() > 1):
            raise ValueError("ternary weight path: values must be -1, 0 or +1")
        codes = flat & 3
    else:
        mag = np.abs(flat)
        nz = mag > 0
        if np.any(mag[nz] & (mag[nz] - 1)) or (nz.any() and mag.max() > 64):
            raise ValueError("pow2 weight path: values must be 0 or +-2^e with e <= 6")
        e = np.zeros_like(mag)
        e[nz] = np.log2(mag[nz]).round().astype(np.int64)
        codes = np.where(nz, (e + 1) | np.where(flat < 0, 8, 0), 0)
    width = cfg.wgt_bits
    per_byte = 8 // width
    codes = codes.reshape(n, b * b // per_byte, per_byte).astype(np.uint8)
    out = np.zeros(codes.shape[:2], np.uint8)
    for j in range(per_byte):
        out |= (codes[:, :, j] << (j * width)).astype(np.uint8)
    return out


class Simulator:
    """Executes a :class:`~tvm_lowbit.vta.program.Program` on a DRAM image (uint8 array, in place)."""

    def __init__(self, cfg: VTAConfig, *, seed: int | None = 0, hazard_distance: int = 3,
                 allow_mul: bool = False) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed) if seed is not None else None
        self.hazard_distance = hazard_distance
        self.allow_mul = allow_mul
        b, blk = cfg.batch, cfg.block
        self.inp = np.zeros((cfg.inp_depth, b, blk), np.int8)
        self.wgt = np.zeros((cfg.wgt_depth, blk, blk), np.int8)
        self.acc = np.zeros((cfg.acc_depth, b, blk), np.int32)
        self.out = np.zeros((cfg.acc_depth, b, blk), np.int8)
        self.out_valid = np.zeros(cfg.acc_depth, bool)
        self.uop = np.zeros((cfg.uop_depth, 3), np.int64)  # decoded dst, src, wgt
        self.uop_raw = np.zeros(cfg.uop_depth, np.uint32)  # as loaded (a uop chain's check compares these)
        self.stats = SimStats()

    # ---- driver -------------------------------------------------------------------------------
    def run(self, program: Program, dram: np.ndarray) -> SimStats:
        if program.cfg != self.cfg:
            raise VTASimError(f"program built for {program.cfg.name}, simulator configured for {self.cfg.name}")
        self.dram = dram
        # a chain: the previous layer's program must have left these weight blocks / micro-ops on chip
        for key, sram, what in (("preloaded_wgt", self.wgt, "weights in weight SRAM blocks"),
                                ("preloaded_uop", self.uop_raw, "micro-op kernels in uop SRAM entries")):
            pre = program.notes.get(key)
            if pre is None:
                continue
            base, data = pre
            if not np.array_equal(sram[base:base + len(data)], data):
                raise VTASimError(f"program {program.notes.get('layer', '')!r} expects its {what} "
                                  f"{base}..{base + len(data) - 1}, prefetched by the previous layer's program, and "
                                  "they are not there: run the chained layer programs in order on one simulator "
                                  "(or lower the layer without a chain)")
        insns = program.insns
        queues: dict[str, list[int]] = {m: [] for m in isa.MODULES}
        legal = {"load": ("pop_next", "push_next"), "store": ("pop_prev", "push_prev")}
        for k, insn in enumerate(insns):
            m = isa.module_of(insn)
            bad = [f for f in ("pop_prev", "pop_next", "push_prev", "push_next")
                   if getattr(insn.deps, f) and f not in legal.get(m, (f,))]
            if bad:
                raise VTASimError(f"instruction #{k} ({isa.disassemble(insn)}): the {m} module has no "
                                  f"{'/'.join(bad)} queue", k)
            queues[m].append(k)
        head = {m: 0 for m in isa.MODULES}
        fetched = {m: 0 for m in isa.MODULES}     # how many of each module's instructions are fetched
        fetch_ptr = 0
        depth = self.cfg.timing.insn_queue_depth
        tokens = {q: 0 for q in QUEUES.values()}
        finished = False
        while True:
            # the fetch unit dispatches in program order until a command queue is full
            while fetch_ptr < len(insns):
                m = isa.module_of(insns[fetch_ptr])
                if fetched[m] - head[m] >= depth:
                    break
                fetched[m] += 1
                fetch_ptr += 1
            ready = [m for m in isa.MODULES if head[m] < fetched[m]
                     and self._pops_ok(insns[queues[m][head[m]]], m, tokens)]
            if finished or not ready:
                break
            m = self.rng.choice(ready) if self.rng is not None else ready[0]
            k = queues[m][head[m]]
            insn = insns[k]
            self._take(insn, m, tokens)
            try:
                self.execute(insn, k)
            except VTASimError:
                raise
            except (ValueError, IndexError) as e:
                raise VTASimError(f"instruction #{k} ({isa.disassemble(insn)}): {e}", k) from e
            self._give(insn, m, tokens, k)
            self.stats.insns[m] += 1
            head[m] += 1
            if isinstance(insn, isa.Finish):
                finished = True
        if not finished:
            self._deadlock(insns, queues, head, fetched, tokens, fetch_ptr)
        left = [m for m in isa.MODULES if head[m] < len(queues[m])]
        if left or any(tokens.values()):
            raise VTASimError(f"FINISH ran while instructions remained ({', '.join(left) or 'none'}) or tokens "
                              f"were still queued ({tokens}); FINISH must be last, after the token handshake",
                              queues["compute"][head["compute"] - 1])
        return self.stats

    @staticmethod
    def _pop_queues(insn: isa.Insn, m: str) -> list[str]:
        d, out = insn.deps, []
        if d.pop_prev:
            out.append({"compute": "l2g", "store": "g2s"}.get(m, "?"))
        if d.pop_next:
            out.append({"load": "g2l", "compute": "s2g"}.get(m, "?"))
        return out

    def _pops_ok(self, insn: isa.Insn, m: str, tokens: dict[str, int]) -> bool:
        return all(tokens.get(q, 0) > 0 for q in self._pop_queues(insn, m))

    def _take(self, insn: isa.Insn, m: str, tokens: dict[str, int]) -> None:
        for q in self._pop_queues(insn, m):
            tokens[q] -= 1

    def _give(self, insn: isa.Insn, m: str, tokens: dict[str, int], k: int) -> None:
        d = insn.deps
        for flag, q in ((d.push_prev, {"compute": "g2l", "store": "s2g"}.get(m)),
                        (d.push_next, {"load": "l2g", "compute": "g2s"}.get(m))):
            if not flag:
                continue
            if q is None:
                raise VTASimError(f"instruction #{k} ({isa.disassemble(insn)}): the {m} module cannot push "
                                  f"to a {'previous' if flag is d.push_prev else 'next'} stage", k)
            tokens[q] += 1
            if tokens[q] > self.cfg.timing.token_limit:
                raise VTASimError(f"instruction #{k} ({isa.disassemble(insn)}) leaves {tokens[q]} tokens in queue "
                                  f"{q}, more than the {self.cfg.timing.token_limit} the hardware holds", k)

    def _deadlock(self, insns, queues, head, fetched, tokens, fetch_ptr) -> None:
        waits, first = [], None
        for m in isa.MODULES:
            if head[m] >= len(queues[m]):
                waits.append(f"{m}: done")
                continue
            k = queues[m][head[m]]
            if head[m] >= fetched[m]:
                waits.append(f"{m}: instruction #{k} not fetched (fetch stalled at #{fetch_ptr}: a command queue is full)")
                continue
            first = k if first is None else min(first, k)
            need = [q for q in self._pop_queues(insns[k], m) if tokens.get(q, 0) == 0]
            waits.append(f"{m}: instruction #{k} ({isa.disassemble(insns[k])}) waits for a token on {', '.join(need)}")
        if all(head[m] >= len(queues[m]) for m in isa.MODULES):
            raise VTASimError("the program ended without a FINISH instruction", len(insns) - 1)
        raise DeadlockError("token deadlock: no module can proceed; " + "; ".join(waits), first)

    # ---- instructions -------------------------------------------------------------------------
    def execute(self, insn: isa.Insn, k: int) -> None:
        if isinstance(insn, isa.Finish):
            if insn.deps.pop_prev or insn.deps.pop_next:
                raise PortabilityError(f"instruction #{k}: FINISH must not pop tokens", k)
            return
        if isinstance(insn, isa.Mem):
            if insn.x_size == 0:
                return
            if insn.opcode == isa.OP_STORE:
                self._store(insn, k)
            else:
                self._load(insn, k)
        elif isinstance(insn, isa.Gemm):
            self._gemm(insn, k)
        elif isinstance(insn, isa.Alu):
            self._alu(insn, k)

    def _overflow(self, k: int, insn: isa.Insn, what: str, lo: int, hi: int, depth: int) -> None:
        raise BufferOverflowError(f"instruction #{k} ({isa.disassemble(insn)}) addresses {what} "
                                  f"{lo}..{hi}, beyond its {depth} entries", k)

    def _dram_rows(self, insn: isa.Mem, k: int, elem_bytes: int) -> np.ndarray:
        """Byte indices [y_size, x_size * elem_bytes] of the DRAM side of a 2-D copy."""
        rows = insn.dram_base + np.arange(insn.y_size, dtype=np.int64)[:, None] * insn.x_stride
        elems = rows + np.arange(insn.x_size, dtype=np.int64)[None, :]
        idx = (elems[..., None] * elem_bytes + np.arange(elem_bytes)).reshape(insn.y_size, -1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.dram.size):
            self._overflow(k, insn, "DRAM bytes", int(idx.min()), int(idx.max()), self.dram.size)
        return idx

    def _load(self, insn: isa.Mem, k: int) -> None:
        cfg = self.cfg
        if insn.mem == isa.MEM_UOP:
            if insn.sram_base + insn.x_size > cfg.uop_depth:
                self._overflow(k, insn, "uop buffer entries", insn.sram_base, insn.sram_base + insn.x_size - 1,
                               cfg.uop_depth)
            one = isa.Mem(insn.opcode, insn.mem, insn.sram_base, insn.dram_base, 1, insn.x_size, 0)
            raw = self.dram[self._dram_rows(one, k, 4)].view("<u4").reshape(-1)
            lay = isa.uop_layout(cfg)
            masks = [(1 << w) - 1 for _, w in lay]
            dst = raw & masks[0]
            src = (raw >> lay[0][1]) & masks[1]
            wgt = (raw >> (lay[0][1] + lay[1][1])) & masks[2]
            self.uop[insn.sram_base:insn.sram_base + insn.x_size] = np.stack([dst, src, wgt], 1).astype(np.int64)
            self.uop_raw[insn.sram_base:insn.sram_base + insn.x_size] = raw
            self.stats.uop_load_nbytes += 4 * insn.x_size
            return
        if insn.mem == isa.MEM_ACC_8BIT:
            raise PortabilityError(f"instruction #{k}: LOAD ACC_8BIT is fsim-only (HLS ignores it, Chisel does "
                                   "not decode it)", k)
        mem = {isa.MEM_INP: (self.inp, cfg.inp_elem_bytes, "input buffer"),
               isa.MEM_WGT: (self.wgt, cfg.wgt_elem_bytes, "weight buffer"),
               isa.MEM_ACC: (self.acc, cfg.acc_elem_bytes, "accumulator")}.get(insn.mem)
        if mem is None:
            raise PortabilityError(f"instruction #{k}: LOAD into memory {insn.mem} "
                                   f"({isa.MEM_NAMES.get(insn.mem, '?')}) is not a loadable buffer", k)
        sram, eb, what = mem
        pads = (insn.y_pad0, insn.y_pad1, insn.x_pad0, insn.x_pad1)
        if insn.mem == isa.MEM_WGT and any(pads):
            raise PortabilityError(f"instruction #{k}: padded weight loads are ignored by the HLS design", k)
        width = insn.x_pad0 + insn.x_size + insn.x_pad1
        height = insn.y_pad0 + insn.y_size + insn.y_pad1
        end = insn.sram_base + width * height
        if end > sram.shape[0]:
            self._overflow(k, insn, f"{what} rows", insn.sram_base, end - 1, sram.shape[0])
        raw = self.dram[self._dram_rows(insn, k, eb)].reshape(insn.y_size, insn.x_size, eb)
        if insn.mem == isa.MEM_WGT:
            data = decode_weights(raw.reshape(-1, eb), cfg).reshape(insn.y_size, insn.x_size, cfg.block, cfg.block)
        elif insn.mem == isa.MEM_ACC:
            data = raw.reshape(insn.y_size, insn.x_size, -1).view("<i4").reshape(
                insn.y_size, insn.x_size, cfg.batch, cfg.block)
        else:
            data = raw.view(np.int8).reshape(insn.y_size, insn.x_size, cfg.batch, cfg.block)
        rect = np.zeros((height, width) + sram.shape[1:], sram.dtype)
        rect[insn.y_pad0:insn.y_pad0 + insn.y_size, insn.x_pad0:insn.x_pad0 + insn.x_size] = data
        sram[insn.sram_base:end] = rect.reshape((-1,) + sram.shape[1:])
        if insn.mem == isa.MEM_ACC:
            self.out_valid[insn.sram_base:end] = False  # LOAD ACC does not write the output buffer
            self.stats.acc_load_nbytes += raw.size
        elif insn.mem == isa.MEM_WGT:
            self.stats.wgt_load_nbytes += raw.size
        else:
            self.stats.inp_load_nbytes += raw.size

    def _store(self, insn: isa.Mem, k: int) -> None:
        cfg = self.cfg
        if insn.mem != isa.MEM_OUT:
            raise PortabilityError(f"instruction #{k}: STORE must read the output buffer (memory id 4)", k)
        if any((insn.y_pad0, insn.y_pad1, insn.x_pad0, insn.x_pad1)):
            raise PortabilityError(f"instruction #{k}: STORE cannot pad", k)
        n = insn.y_size * insn.x_size
        if insn.sram_base + n > cfg.acc_depth:
            self._overflow(k, insn, "output buffer rows", insn.sram_base, insn.sram_base + n - 1, cfg.acc_depth)
        rows = slice(insn.sram_base, insn.sram_base + n)
        bad = np.flatnonzero(~self.out_valid[rows])
        if bad.size:
            raise VTASimError(f"instruction #{k} ({isa.disassemble(insn)}) stores output-buffer row "
                              f"{insn.sram_base + int(bad[0])}, which no GEMM/ALU has written since a LOAD ACC "
                              "or a GEMM reset (the hardware would store garbage)", k)
        idx = self._dram_rows(insn, k, cfg.out_elem_bytes)
        self.dram[idx] = self.out[rows].view(np.uint8).reshape(insn.y_size, -1)
        self.stats.out_store_nbytes += idx.size

    def _indices(self, insn: isa.Gemm | isa.Alu, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= insn.uop_bgn <= insn.uop_end <= self.cfg.uop_depth:
            self._overflow(k, insn, "micro-ops", insn.uop_bgn, insn.uop_end - 1, self.cfg.uop_depth)
        u = self.uop[insn.uop_bgn:insn.uop_end]
        o = np.arange(insn.iter_out, dtype=np.int64)[:, None, None]
        i = np.arange(insn.iter_in, dtype=np.int64)[None, :, None]
        dst = (u[None, None, :, 0] + o * insn.dst_fo + i * insn.dst_fi).reshape(-1)
        src = (u[None, None, :, 1] + o * insn.src_fo + i * insn.src_fi).reshape(-1)
        wgt = (u[None, None, :, 2] + o * getattr(insn, "wgt_fo", 0) + i * getattr(insn, "wgt_fi", 0)).reshape(-1)
        return dst, src, wgt

    def _check_range(self, insn: isa.Insn, k: int, idx: np.ndarray, depth: int, what: str) -> None:
        if idx.size and idx.max() >= depth:
            self._overflow(k, insn, what, int(idx.min()), int(idx.max()), depth)

    def _check_hazard(self, insn: isa.Insn, k: int, dst: np.ndarray) -> None:
        for d in range(1, self.hazard_distance):
            hit = np.flatnonzero(dst[d:] == dst[:-d]) if dst.size > d else np.empty(0, np.int64)
            if hit.size:
                p = int(hit[0]) + d
                raise HazardError(f"instruction #{k} ({isa.disassemble(insn)}): micro-op {p} of the unrolled "
                                  f"sequence writes accumulator row {int(dst[p])}, which micro-op {p - d} wrote "
                                  f"{d} step(s) before; the pipeline needs {self.hazard_distance} steps between "
                                  "writes to one row", k)

    def _gemm(self, insn: isa.Gemm, k: int) -> None:
        cfg = self.cfg
        dst, src, wgt = self._indices(insn, k)
        self._check_range(insn, k, dst, cfg.acc_depth, "accumulator rows")
        if insn.reset:
            self.acc[dst] = 0
            self.out_valid[dst] = False
            self.stats.reset_counter += dst.size
            return
        self._check_range(insn, k, src, cfg.inp_depth, "input-buffer rows")
        self._check_range(insn, k, wgt, cfg.wgt_depth, "weight blocks")
        self._check_hazard(insn, k, dst)
        if dst.size == 0:
            return
        # one BLAS product per weight block; float32 is exact (|dot| <= 16 * 128 * 128 < 2^24)
        x = self.inp[src].reshape(dst.size * cfg.batch, cfg.block).astype(np.float32)
        prod = np.empty((dst.size, cfg.batch, cfg.block), np.int64)
        order = np.argsort(wgt, kind="stable")
        blocks, starts = np.unique(wgt[order], return_index=True)
        bounds = list(starts) + [len(order)]
        xr = x.reshape(dst.size, cfg.batch, cfg.block)
        for j, blk in enumerate(blocks):
            sel = order[bounds[j]:bounds[j + 1]]
            p = xr[sel].reshape(-1, cfg.block) @ self.wgt[blk].astype(np.float32).T
            prod[sel] = p.reshape(sel.size, cfg.batch, cfg.block).astype(np.int64)
        acc64 = self.acc.astype(np.int64)
        np.add.at(acc64, dst, prod)
        touched = np.unique(dst)
        self.acc[touched] = wrap32(acc64[touched])
        self.out[touched] = low8(self.acc[touched])
        self.out_valid[touched] = True
        self.stats.gemm_counter += dst.size

    def _alu(self, insn: isa.Alu, k: int) -> None:
        cfg = self.cfg
        dst, src, _ = self._indices(insn, k)
        self._check_range(insn, k, dst, cfg.acc_depth, "accumulator rows")
        if not insn.use_imm:
            self._check_range(insn, k, src, cfg.acc_depth, "accumulator rows (ALU source)")
        self._check_hazard(insn, k, dst)
        op = insn.op
        if op == isa.ALU_MUL and not self.allow_mul:
            raise PortabilityError(f"instruction #{k}: ALU MUL is not implemented by the HLS and Chisel designs", k)
        if op not in isa.ALU_NAMES:
            raise PortabilityError(f"instruction #{k}: unknown ALU opcode {op}", k)
        if op == isa.ALU_SHR and insn.use_imm and not 0 <= insn.imm <= 15:
            raise PortabilityError(f"instruction #{k}: SHR by {insn.imm}: only shifts 0..15 behave the same on "
                                   "every VTA implementation", k)
        vectorized = np.unique(dst).size == dst.size and (
            insn.use_imm or np.array_equal(src, dst) or not np.intersect1d(src, dst).size)
        if vectorized:
            self._alu_apply(insn, k, dst, src)
        else:  # a micro-op reads a row an earlier one wrote: keep the sequential semantics
            for j in range(dst.size):
                self._alu_apply(insn, k, dst[j:j + 1], src[j:j + 1])
        self.stats.alu_counter += dst.size

    def _alu_apply(self, insn: isa.Alu, k: int, dst: np.ndarray, src: np.ndarray) -> None:
        a = self.acc[dst].astype(np.int64)
        b = np.int64(insn.imm) if insn.use_imm else self.acc[src].astype(np.int64)
        op = insn.op
        if op == isa.ALU_MIN:
            r = np.minimum(a, b)
        elif op == isa.ALU_MAX:
            r = np.maximum(a, b)
        elif op == isa.ALU_ADD:
            r = a + b
        elif op == isa.ALU_SHR:
            if not insn.use_imm and (np.min(b) < 0 or np.max(b) > 15):
                raise PortabilityError(f"instruction #{k}: SHR by a lane value outside 0..15 is not portable", k)
            r = a >> b
        else:
            r = a * b
        self.acc[dst] = wrap32(r)
        self.out[dst] = low8(self.acc[dst])
        self.out_valid[dst] = True
