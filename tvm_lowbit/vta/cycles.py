"""Cycle model of a VTA program: the load, compute and store modules run in order, each on its own
timeline, and overlap as far as the dependency tokens and the fetch unit let them.

Each instruction starts at the latest of: the end of its module's previous instruction, its fetch
time, and the push time of every token it pops (the k-th pop of a queue takes the k-th push).  It
ends ``duration`` cycles later and pushes its tokens then.  The fetch unit reads 16-byte instructions
over the bus in program order and stalls while the target module's command queue is full.  Because
the modules are in order and the queues FIFO, the result does not depend on evaluation order.

Durations (parameters from the preset's ``timing``, see :class:`~tvm_lowbit.vta.config.Timing`):

* LOAD INP/WGT/ACC: ``dma_request + y_size * (dma_row + beats(x_size * elem_bytes)) + pad_elems * pad_elem``
* LOAD UOP: ``dma_request + beats(4 * x_size)``;  STORE: ``dma_request + y_size * (dma_row + beats(x_size * 16))``
* GEMM: ``compute_insn + micro-ops * gemm_ii``;  ALU: ``compute_insn + micro-ops * alu_ii``
* NOP, FINISH: ``nop``

GEMM utilization = GEMM micro-ops (resets excluded) x ``gemm_ii`` / total cycles: the fraction of the
run the GEMM core spends on the layer's multiply-accumulates.

Not modelled: contention of the three modules' DMA for the shared DRAM port, DRAM refresh and page
misses, and the host's launch overhead.  The DMA constants are estimates (no board was available to
calibrate them); relative comparisons of schedules are what the lowering relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvm_lowbit.vta import isa
from tvm_lowbit.vta.config import VTAConfig
from tvm_lowbit.vta.program import Program


class CycleModelError(RuntimeError):
    pass


def _beats(nbytes: int, bus: int) -> int:
    return -(-nbytes // bus)


def duration(insn: isa.Insn, cfg: VTAConfig) -> int:
    t = cfg.timing
    if isinstance(insn, isa.Finish):
        return t.nop
    if isinstance(insn, isa.Mem):
        if insn.x_size == 0:
            return t.nop
        if insn.opcode == isa.OP_STORE:
            return t.dma_request + insn.y_size * (t.dma_row + _beats(insn.x_size * cfg.out_elem_bytes, cfg.bus_bytes))
        if insn.mem == isa.MEM_UOP:
            return t.dma_request + _beats(4 * insn.x_size, cfg.bus_bytes)
        eb = {isa.MEM_INP: cfg.inp_elem_bytes, isa.MEM_WGT: cfg.wgt_elem_bytes}.get(insn.mem, cfg.acc_elem_bytes)
        pads = ((insn.y_pad0 + insn.y_size + insn.y_pad1) * (insn.x_pad0 + insn.x_size + insn.x_pad1)
                - insn.y_size * insn.x_size)
        return (t.dma_request + insn.y_size * (t.dma_row + _beats(insn.x_size * eb, cfg.bus_bytes))
                + pads * t.pad_elem)
    n = -(-insn.iter_out * insn.iter_in * (insn.uop_end - insn.uop_bgn) // cfg.gemm_width)
    if isinstance(insn, isa.Gemm):
        return t.compute_insn + n * t.gemm_ii
    return t.compute_insn + n * (t.alu_ii_imm if insn.use_imm else t.alu_ii_tensor)


@dataclass
class CycleReport:
    total_cycles: int
    busy: dict[str, int]                 # cycles each module spent executing
    gemm_uops: int                       # multiply-accumulate micro-ops (resets excluded)
    reset_uops: int
    alu_uops: int
    dram_bytes: dict[str, int]           # bytes moved per memory type
    clock_mhz: float
    gemm_ii: int
    starts: list[int] = field(default_factory=list, repr=False)
    ends: list[int] = field(default_factory=list, repr=False)
    alu_cycles: int = 0                  # ALU micro-ops x their initiation interval
    gemm_width: int = 1                  # 16-lane output blocks per micro-op (the ternary-wide core's 4)

    @property
    def compute_ceiling(self) -> float:
        """The utilization the ISA allows this program even with every DMA, instruction-issue and
        start-up cost hidden: GEMM cycles / (GEMM + reset + ALU micro-op cycles), all on the compute
        module.  A layer whose ceiling is below a target cannot reach it by scheduling."""
        work = self.gemm_cycles + self.reset_uops * self.gemm_ii // self.gemm_width + self.alu_cycles
        return self.gemm_cycles / work if work else 0.0

    @property
    def gemm_cycles(self) -> int:
        return -(-self.gemm_uops // self.gemm_width) * self.gemm_ii

    @property
    def dma_overlap(self) -> float:
        """The fraction of the load and store modules' busy time hidden under the compute module's:
        1 - (cycles the compute module is idle) / (load + store busy cycles), clamped to 0..1."""
        dma = self.busy.get("load", 0) + self.busy.get("store", 0)
        idle = self.total_cycles - self.busy.get("compute", 0)
        return 1.0 if dma == 0 else min(1.0, max(0.0, 1 - idle / dma))

    @property
    def utilization(self) -> float:
        return self.gemm_cycles / self.total_cycles if self.total_cycles else 0.0

    @property
    def microseconds(self) -> float:
        return self.total_cycles / self.clock_mhz

    def text(self) -> str:
        b = ", ".join(f"{m} {v:,d}" for m, v in self.busy.items())
        return (f"{self.total_cycles:,d} cycles ({self.microseconds:.1f} us), GEMM {self.gemm_cycles:,d} "
                f"({100 * self.utilization:.1f}%), busy: {b}")


def estimate(program: Program) -> CycleReport:
    cfg = program.cfg
    t = cfg.timing
    insns = program.insns
    n = len(insns)
    mods = [isa.module_of(i) for i in insns]
    queues: dict[str, list[int]] = {m: [] for m in isa.MODULES}
    pos = [0] * n
    for k, m in enumerate(mods):
        pos[k] = len(queues[m])
        queues[m].append(k)
    durs = [duration(i, cfg) for i in insns]
    fetch: list[int | None] = [None] * n
    start: list[int | None] = [None] * n
    end: list[int] = [0] * n
    pushes: dict[str, list[int]] = {q: [] for q in ("l2g", "g2l", "g2s", "s2g")}
    popped = {q: 0 for q in pushes}
    head = {m: 0 for m in isa.MODULES}
    free_at = {m: 0 for m in isa.MODULES}
    fetch_ptr, fetch_t = 0, 0
    fetch_cost = _beats(cfg.insn_bytes, cfg.bus_bytes)
    pop_q = {"load": (None, "g2l"), "compute": ("l2g", "s2g"), "store": ("g2s", None)}
    push_q = {"load": (None, "l2g"), "compute": ("g2l", "g2s"), "store": ("s2g", None)}
    while True:
        progress = False
        while fetch_ptr < n:
            k, m = fetch_ptr, mods[fetch_ptr]
            t_free = 0
            if pos[k] >= t.insn_queue_depth:
                j = queues[m][pos[k] - t.insn_queue_depth]
                if start[j] is None:
                    break
                t_free = start[j]
            fetch_t = max(fetch_t, t_free) + fetch_cost
            fetch[k] = fetch_t
            fetch_ptr += 1
            progress = True
        for m in isa.MODULES:
            while head[m] < len(queues[m]):
                k = queues[m][head[m]]
                if fetch[k] is None:
                    break
                d = insns[k].deps
                need = [q for q, f in zip(pop_q[m], (d.pop_prev, d.pop_next)) if f]
                if any(q is None for q in need):
                    raise CycleModelError(f"instruction #{k} ({isa.disassemble(insns[k])}) pops from a stage the "
                                          f"{m} module does not have")
                if any(popped[q] >= len(pushes[q]) for q in need):
                    break
                t0 = max([free_at[m], fetch[k]] + [pushes[q][popped[q]] for q in need])
                for q in need:
                    popped[q] += 1
                start[k] = t0
                end[k] = t0 + durs[k]
                free_at[m] = end[k]
                for q, f in zip(push_q[m], (d.push_prev, d.push_next)):
                    if f:
                        if q is None:
                            raise CycleModelError(f"instruction #{k} ({isa.disassemble(insns[k])}) pushes to a stage "
                                                  f"the {m} module does not have")
                        pushes[q].append(end[k])
                head[m] += 1
                progress = True
        if all(head[m] >= len(queues[m]) for m in isa.MODULES):
            break
        if not progress:
            heads = [f"{m} at #{queues[m][head[m]]} ({isa.disassemble(insns[queues[m][head[m]]])})"
                     for m in isa.MODULES if head[m] < len(queues[m])]
            raise CycleModelError("deadlock: no module can proceed: " + "; ".join(heads))
    busy = {m: sum(durs[k] for k in queues[m]) for m in isa.MODULES}
    gemm = resets = alu = alu_cyc = 0
    dram = {"inp": 0, "wgt": 0, "uop": 0, "acc": 0, "out": 0}
    for i in insns:
        if isinstance(i, isa.Gemm):
            u = i.iter_out * i.iter_in * (i.uop_end - i.uop_bgn)
            if i.reset:
                resets += u
            else:
                gemm += u
        elif isinstance(i, isa.Alu):
            u = i.iter_out * i.iter_in * (i.uop_end - i.uop_bgn)
            alu += u
            alu_cyc += -(-u // cfg.gemm_width) * (t.alu_ii_imm if i.use_imm else t.alu_ii_tensor)
        elif isinstance(i, isa.Mem) and i.x_size:
            eb = {isa.MEM_INP: cfg.inp_elem_bytes, isa.MEM_WGT: cfg.wgt_elem_bytes, isa.MEM_UOP: 4,
                  isa.MEM_ACC: cfg.acc_elem_bytes, isa.MEM_OUT: cfg.out_elem_bytes}.get(i.mem, 0)
            y = 1 if i.mem == isa.MEM_UOP else i.y_size
            key = "out" if i.opcode == isa.OP_STORE else isa.MEM_NAMES.get(i.mem, "acc")
            dram[key] = dram.get(key, 0) + y * i.x_size * eb
    return CycleReport(max(end) if n else 0, busy, gemm, resets, alu, dram, cfg.clock_mhz, t.gemm_ii,
                       [s or 0 for s in start], end, alu_cyc, cfg.gemm_width)
