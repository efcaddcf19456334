"""A VTA program and the builder the lowering emits it with (the old runtime's job, in Python).

A :class:`Program` is everything the accelerator needs for one launch: the instruction stream, the
micro-op image, and a DRAM layout of named buffers (constants such as weights are stored in it;
inputs and outputs are filled/read by the caller).  Addresses in instructions are element indices of
the memory type (byte offset / element bytes), so every buffer is aligned to 256 bytes.

The builder hides the dependency-token bookkeeping the same way the old runtime did:
``push(src, dst)`` sets the push flag on the last instruction already emitted by module ``src`` (or
emits a token-only NOP if that flag is taken), and ``pop(src, dst)`` marks a pending pop that is OR-ed
into the next instruction emitted for module ``dst``.  ``finish()`` drains the tokens left in the
queues, adds the load/store -> compute handshake and FINISH, and checks every queue balances.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tvm_lowbit.vta import isa
from tvm_lowbit.vta.config import VTAConfig

QUEUES = {("load", "compute"): "l2g", ("compute", "load"): "g2l",
          ("compute", "store"): "g2s", ("store", "compute"): "s2g"}
DRAM_ALIGN = 256


class ProgramError(RuntimeError):
    pass


@dataclass(frozen=True)
class Buffer:
    """A DRAM region: ``offset``/``nbytes`` in bytes; ``elem_bytes`` is the element size its
    instructions address it in (so ``base`` = offset / elem_bytes)."""

    name: str
    offset: int
    nbytes: int
    elem_bytes: int

    @property
    def base(self) -> int:
        return self.offset // self.elem_bytes


@dataclass(frozen=True)
class DramLayout:
    """Where a program's DRAM lives inside a larger one shared by a network's programs: ``buffers``
    (e.g. ``inp``, ``out``) are placed by the caller (activations another program writes or reads, in
    VTA's layout), everything else -- weights, micro-ops, constants -- is allocated from ``base`` on."""

    base: int = 0
    buffers: dict[str, Buffer] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Program:
    cfg: VTAConfig
    insns: list[isa.Insn]
    buffers: dict[str, Buffer]
    constants: dict[str, bytes]          # buffer name -> initial bytes (weights, micro-ops)
    dram_bytes: int
    notes: dict[str, object] = field(default_factory=dict)

    def module_counts(self) -> dict[str, int]:
        out = {m: 0 for m in isa.MODULES}
        for i in self.insns:
            out[isa.module_of(i)] += 1
        return out

    def insn_bytes(self) -> bytes:
        return b"".join(isa.encode_bytes(i, self.cfg) for i in self.insns)

    def disassemble(self) -> str:
        return "\n".join(f"{k:5d} {isa.module_of(i):8s} {isa.disassemble(i)}" for k, i in enumerate(self.insns))

    def uops(self) -> np.ndarray:
        """The micro-op image (uint32) stored in the ``uop`` buffer."""
        raw = self.constants.get("uop", b"")
        return np.frombuffer(raw, dtype="<u4").copy()

    def dram_image(self) -> np.ndarray:
        """A fresh DRAM (uint8) holding the constants; inputs are written by the caller."""
        d = np.zeros(self.dram_bytes, np.uint8)
        for name, raw in self.constants.items():
            b = self.buffers[name]
            d[b.offset:b.offset + len(raw)] = np.frombuffer(raw, np.uint8)
        return d


class UopCache:
    """Micro-op kernels: stored once in the DRAM image, loaded into uop SRAM on first use and kept
    while they fit (a ring allocator: a kernel that does not fit wraps to 0 and evicts what it overlaps)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.image: list[int] = []             # encoded uops in DRAM order
        self.dram_at: dict[tuple, int] = {}    # kernel key -> first uop index in the image
        self.resident: dict[tuple, int] = {}   # kernel key -> uop SRAM offset
        self.next_free = 0

    def place(self, key: tuple, encoded: list[int]) -> tuple[int, int, bool]:
        """(sram_begin, dram_index, must_load) for kernel ``key``."""
        if len(encoded) > self.depth:
            raise ProgramError(f"a micro-op kernel of {len(encoded)} uops does not fit the {self.depth}-entry uop buffer")
        if key not in self.dram_at:
            self.dram_at[key] = len(self.image)
            self.image.extend(encoded)
        if key in self.resident:
            return self.resident[key], self.dram_at[key], False
        start = self.next_free if self.next_free + len(encoded) <= self.depth else 0
        end = start + len(encoded)
        for k, s in list(self.resident.items()):
            n = self._len(k)
            if s < end and start < s + n:
                del self.resident[k]
        self.resident[key] = start
        self.next_free = end
        return start, self.dram_at[key], True

    def _len(self, key: tuple) -> int:
        return key[-1]


class ProgramBuilder:
    """``preload_uops``: give every micro-op kernel its own uop-SRAM range and load them all with one
    LOAD UOP at the start of the program (the compute module does it while the load module brings the
    first tiles); raises :class:`ProgramError` when they do not all fit, and the caller can retry with
    on-demand loading (a ring cache, one LOAD UOP per kernel that is not resident)."""

    def __init__(self, cfg: VTAConfig, preload_uops: bool = False, uop_base: int = 0,
                 uops_resident: bool = False, dram_base: int = 0, external: dict[str, Buffer] | None = None) -> None:
        self.cfg = cfg
        self.preload_uops = preload_uops or uops_resident
        self.uop_base = uop_base            # preloaded kernels live in uop SRAM from here on
        self.uops_resident = uops_resident  # ... and the previous program already loaded them there
        self.preloaded: dict[tuple, int] = {}
        self.insns: list[isa.Insn] = []
        self.buffers: dict[str, Buffer] = {}
        self.constants: dict[str, bytes] = {}
        self.dram_top = dram_base
        self.external = dict(external or {})   # buffers placed by the caller (see DramLayout)
        self.pending: dict[str, isa.Deps] = {m: isa.NO_DEPS for m in isa.MODULES}
        self.last_of: dict[str, int | None] = {m: None for m in isa.MODULES}
        self.pushed = {q: 0 for q in QUEUES.values()}
        self.popped = {q: 0 for q in QUEUES.values()}
        self.uops = UopCache(cfg.uop_depth)
        self.uop_buffer_reserved = False

    # ---- DRAM ---------------------------------------------------------------------------------
    def alloc(self, name: str, nbytes: int, elem_bytes: int) -> Buffer:
        if name in self.buffers:
            raise ProgramError(f"buffer {name!r} allocated twice")
        if name in self.external:
            ext = self.external[name]
            if ext.nbytes < nbytes or ext.offset % elem_bytes:
                raise ProgramError(f"buffer {name!r}: the placed DRAM region ({ext.nbytes} B at {ext.offset}) does not "
                                   f"hold {nbytes} B in {elem_bytes}-byte elements")
            b = Buffer(name, ext.offset, int(nbytes), elem_bytes)
            self.buffers[name] = b
            return b
        off = -(-self.dram_top // DRAM_ALIGN) * DRAM_ALIGN
        b = Buffer(name, off, int(nbytes), elem_bytes)
        self.buffers[name] = b
        self.dram_top = off + int(nbytes)
        return b

    def constant(self, name: str, data: bytes | np.ndarray, elem_bytes: int) -> Buffer:
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        b = self.alloc(name, len(raw), elem_bytes)
        self.constants[name] = raw
        return b

    # ---- instructions and tokens --------------------------------------------------------------
    def emit(self, insn: isa.Insn) -> int:
        m = isa.module_of(insn)
        if self.pending[m] != isa.NO_DEPS:
            insn = isa.with_deps(insn, insn.deps | self.pending[m])
            self.pending[m] = isa.NO_DEPS
        self._count(m, insn.deps)
        self.insns.append(insn)
        self.last_of[m] = len(self.insns) - 1
        return len(self.insns) - 1

    def _count(self, module: str, d: isa.Deps) -> None:
        prev, nxt = {"load": (None, "compute"), "compute": ("load", "store"), "store": ("compute", None)}[module]
        for flag, other, push in ((d.pop_prev, prev, False), (d.pop_next, nxt, False),
                                  (d.push_prev, prev, True), (d.push_next, nxt, True)):
            if not flag:
                continue
            if other is None:
                raise ProgramError(f"the {module} module has no {'previous' if other is prev else 'next'} stage")
            q = QUEUES[(module, other)] if push else QUEUES[(other, module)]
            (self.pushed if push else self.popped)[q] += 1

    def nop(self, module: str, deps: isa.Deps = isa.NO_DEPS) -> int:
        insn = {"load": isa.Mem(isa.OP_LOAD, isa.MEM_INP), "compute": isa.Mem(isa.OP_LOAD, isa.MEM_UOP),
                "store": isa.Mem(isa.OP_STORE, isa.MEM_UOP)}[module]
        return self.emit(isa.with_deps(insn, deps))

    def push(self, src: str, dst: str) -> None:
        """Module ``src`` signals module ``dst`` after everything it has been given so far."""
        flag = "push_next" if isa.MODULES.index(dst) > isa.MODULES.index(src) else "push_prev"
        k = self.last_of[src]
        if k is not None and not getattr(self.insns[k].deps, flag):
            old = self.insns[k]
            self.insns[k] = isa.with_deps(old, old.deps | isa.Deps(**{flag: True}))
            self.pushed[QUEUES[(src, dst)]] += 1
        else:
            self.nop(src, isa.Deps(**{flag: True}))

    def pop(self, src: str, dst: str) -> None:
        """Module ``dst`` waits for a token from ``src`` before its next instruction."""
        flag = "pop_next" if isa.MODULES.index(src) > isa.MODULES.index(dst) else "pop_prev"
        if getattr(self.pending[dst], flag):
            self.nop(dst)  # flushes the pending pop into a token-only NOP
        self.pending[dst] = self.pending[dst] | isa.Deps(**{flag: True})

    def outstanding(self, src: str, dst: str) -> int:
        q = QUEUES[(src, dst)]
        return self.pushed[q] - self.popped[q]

    # ---- micro-op kernels ---------------------------------------------------------------------
    def kernel(self, uops: list[tuple[int, int, int]]) -> tuple[int, int]:
        """Make a micro-op kernel resident (emitting a LOAD UOP on the compute module when it is not)
        and return its [begin, end) in uop SRAM."""
        enc = isa.encode_uops(np.asarray(uops, np.int64), self.cfg)
        encoded = enc.tolist()
        key = (enc.tobytes(), len(encoded))
        if self.preload_uops:
            if key not in self.preloaded:
                if self.uop_base + len(self.uops.image) + len(encoded) > self.cfg.uop_depth:
                    raise ProgramError(f"the micro-op kernels exceed the {self.cfg.uop_depth}-entry uop buffer"
                                       + (f" above entry {self.uop_base}" if self.uop_base else ""))
                self.preloaded[key] = self.uop_base + len(self.uops.image)
                self.uops.image.extend(encoded)
            start = self.preloaded[key]
            return start, start + len(encoded)
        start, dram_index, load = self.uops.place(key, encoded)
        if load:
            self.uop_buffer_reserved = True
            # the uop buffer's DRAM base is fixed at finish(); record the image index for now
            self.emit(isa.Mem(isa.OP_LOAD, isa.MEM_UOP, sram_base=start, dram_base=dram_index, y_size=1,
                              x_size=len(encoded), x_stride=len(encoded)))
        return start, start + len(encoded)

    # ---- the end ------------------------------------------------------------------------------
    def finish(self, notes: dict[str, object] | None = None) -> Program:
        notes = dict(notes or {})
        if self.preload_uops:  # the kernels, as one image; a uop chain (lower.WeightChain) prefetches it
            notes["uop_image"] = (self.uop_base, np.asarray(self.uops.image, dtype="<u4"))
        if self.uops_resident:  # the previous program left the image in uop SRAM: no constant, no load
            notes["preloaded_uop"] = notes["uop_image"]
        # the micro-op image becomes a DRAM constant; LOAD UOP bases are relocated onto it
        elif self.uops.image:
            ub = self.constant("uop", np.asarray(self.uops.image, dtype="<u4"), 4)
            if not self.preload_uops:  # (a preloading program's only LOAD UOPs are a chain's, already placed)
                self.insns = [isa.Mem(i.opcode, i.mem, i.sram_base, i.dram_base + ub.base, i.y_size, i.x_size,
                                      i.x_stride, deps=i.deps)
                              if isinstance(i, isa.Mem) and i.mem == isa.MEM_UOP and i.x_size else i for i in self.insns]
            else:  # one load of the whole image, first in the compute module's queue
                n = len(self.uops.image)
                self.insns.insert(0, isa.Mem(isa.OP_LOAD, isa.MEM_UOP, self.uop_base, ub.base, 1, n, n))
        # drain: consume every token still queued, by the consumer, in a token-only NOP
        for (src, dst) in QUEUES:
            while self.outstanding(src, dst) > 0:
                self.pop(src, dst)
                self.nop(dst)
        for m, d in self.pending.items():
            if d != isa.NO_DEPS:
                self.nop(m)
        # load and store tell compute they are done; compute consumes both, then FINISH
        self.nop("store", isa.Deps(push_prev=True))
        self.nop("load", isa.Deps(push_next=True))
        self.nop("compute", isa.Deps(pop_prev=True, pop_next=True))
        self.emit(isa.Finish())
        for (src, dst), q in QUEUES.items():
            if self.pushed[q] != self.popped[q]:
                raise ProgramError(f"token queue {q} ({src} -> {dst}) does not balance: "
                                   f"{self.pushed[q]} pushes, {self.popped[q]} pops")
        return Program(self.cfg, self.insns, dict(self.buffers), dict(self.constants), self.dram_top, notes)
