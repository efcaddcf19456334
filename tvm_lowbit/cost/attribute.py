"""Where in a library the estimated cycles and instructions went: each recorded block, by its file offset, mapped
to the function of the library's ELF symbol table that holds it.

The board's TCG plugin (``blocks=FILE``) gives each block's offset in the measured file; the library's program
headers turn offsets into addresses and its symbol table (``.symtab``, else ``.dynsym``) names the functions. A TVM
model library has, per PrimFunc ``f``, the entry ``__tvm_ffi_f`` and its body ``f_compute_``; the bodies of its
parallel loops are private LLVM functions (``__tvm_parallel_lambda``) with no symbol, in the gaps between named
functions. A gap is given to the function whose code takes its address (an ``adrp`` + ``add`` pair: how the body
passes the lambda to ``TVMBackendParallelLaunch``); a gap nobody references, and code outside every function (the
PLT), stays unattributed under its section's name (``[.plt]``), so the per-function sums plus the unattributed
share add up to the library's total. ``primfunc_name`` folds the entry, the body and the lambdas into ``f``.
Nothing here imports TVM; the block cycles are ``tvm_lowbit.cost.mca``'s.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tvm_lowbit.cost.mca import Block, BlockCycles, Core, CostError, read_blocks_at

FFI_PREFIX = "__tvm_ffi_"  # TVM's exported entry of a PrimFunc
COMPUTE_SUFFIX = "_compute_"  # TVM's body of a PrimFunc


@dataclass(frozen=True)
class Function:
    name: str
    start: int  # file offset
    end: int  # file offset, exclusive


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    size: int
    executable: bool


@dataclass
class ElfMap:
    """The functions of a library by file offset, parallel-loop gaps included (``gaps``: gap -> owner or None)."""

    functions: list[Function]  # sorted by start; gaps given to their owner appear under the owner's name
    sections: list[Function]  # executable sections (name in brackets), for what no function covers
    gaps: dict[tuple[int, int], str | None] = field(default_factory=dict)

    def name_at(self, offset: int) -> str | None:
        """The function holding file ``offset``, or None."""
        i = bisect.bisect_right([f.start for f in self.functions], offset) - 1
        if i >= 0 and self.functions[i].start <= offset < self.functions[i].end:
            return self.functions[i].name
        return None

    def section_at(self, offset: int) -> str:
        for s in self.sections:
            if s.start <= offset < s.end:
                return s.name
        return "[outside sections]"


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise CostError(f"{path}: not a 64-bit little-endian ELF file (an aarch64 library is)")
    return data


def _segments(data: bytes) -> list[Segment]:
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    out = []
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            out.append(Segment(p_offset, p_vaddr, p_filesz, bool(p_flags & 1)))
    return out


def _sections(data: bytes) -> list[tuple[str, int, int, int, int, int, int]]:
    """(name, type, flags, addr, offset, size, link) per section."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = raw[shstrndx][4] if shnum else 0

    def name(off: int) -> str:
        end = data.index(b"\0", names_off + off)
        return data[names_off + off:end].decode(errors="replace")

    return [(name(n), t, fl, addr, off, size, link) for n, t, fl, addr, off, size, link, _ in raw]


def _to_offset(vaddr: int, segments: list[Segment]) -> int | None:
    for s in segments:
        if s.vaddr <= vaddr < s.vaddr + s.size:
            return vaddr - s.vaddr + s.offset
    return None


def _address_refs(data: bytes, start: int, end: int, segments: list[Segment]) -> set[int]:
    """File offsets that the code in [start, end) takes the address of with ``adrp xN`` + ``add xN, xN, #imm``."""
    seg = next((s for s in segments if s.offset <= start < s.offset + s.size), None)
    if seg is None:
        return set()
    refs: set[int] = set()
    pages: dict[int, int] = {}  # register -> page address set by the last adrp
    for off in range(start, end - 3, 4):
        w, = struct.unpack_from("<I", data, off)
        pc = off - seg.offset + seg.vaddr
        if w & 0x9F000000 == 0x90000000:  # ADRP
            imm = ((w >> 29) & 3) | (((w >> 5) & 0x7FFFF) << 2)
            if imm & (1 << 20):
                imm -= 1 << 21
            pages[w & 31] = (pc & ~0xFFF) + (imm << 12)
        elif w & 0xFF800000 == 0x91000000:  # ADD (immediate), 64-bit
            rn = (w >> 5) & 31
            if rn in pages:
                imm = ((w >> 10) & 0xFFF) << (12 if (w >> 22) & 1 else 0)
                if (target := _to_offset(pages[rn] + imm, segments)) is not None:
                    refs.add(target)
    return refs


def elf_functions(path: str | os.PathLike[str]) -> ElfMap:
    """The function map of an aarch64 ELF library (see the module's docstring for the parallel-loop gaps)."""
    p = Path(path)
    data = _read(p)
    segments = _segments(data)
    sections = _sections(data)
    tables = [s for s in sections if s[1] == 2] or [s for s in sections if s[1] == 11]  # SYMTAB, else DYNSYM
    if not tables:
        raise CostError(f"{p}: no symbol table (stripped?); build it unstripped to attribute blocks to functions")
    _, _, _, _, sym_off, sym_size, link = tables[0]
    str_off = sections[link][4]
    funcs: dict[int, Function] = {}
    for i in range(sym_size // 24):
        st_name, st_info, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", data, sym_off + i * 24)
        if st_info & 0xF != 2 or st_shndx == 0 or st_size == 0:  # defined functions with a size
            continue
        off = _to_offset(st_value, segments)
        if off is None:
            continue
        end = data.index(b"\0", str_off + st_name)
        name = data[str_off + st_name:end].decode(errors="replace")
        if off not in funcs or funcs[off].end - funcs[off].start < st_size:
            funcs[off] = Function(name, off, off + st_size)
    named = sorted(funcs.values(), key=lambda f: f.start)
    code = [Function(f"[{n}]", off, off + size) for n, t, fl, _, off, size, _ in sections
            if fl & 4 and t == 1 and size]  # SHF_EXECINSTR, PROGBITS
    # the gaps inside .text between named functions: parallel-loop bodies, given to the function referencing them
    text = next((s for s in code if s.name == "[.text]"), None)
    gaps: dict[tuple[int, int], str | None] = {}
    if text is not None:
        inside = [f for f in named if text.start <= f.start < text.end]
        bounds = [text.start] + [x for f in inside for x in (f.start, f.end)] + [text.end]
        holes = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2) if bounds[i + 1] - bounds[i] >= 16]
        refs = {f.name: _address_refs(data, f.start, f.end, segments) for f in inside}
        for lo, hi in holes:
            owners = sorted({n for n, r in refs.items() if any(lo <= t < hi for t in r)})
            gaps[(lo, hi)] = owners[0] if len(owners) == 1 else None
    owned = [Function(owner, lo, hi) for (lo, hi), owner in gaps.items() if owner is not None]
    return ElfMap(sorted(named + owned, key=lambda f: f.start), code, gaps)


def primfunc_name(symbol: str) -> str:
    """A TVM model library's symbol as the PrimFunc it belongs to: ``__tvm_ffi_f`` and ``f_compute_`` are ``f``."""
    if symbol.startswith(FFI_PREFIX):
        return symbol[len(FFI_PREFIX):]
    if symbol.endswith(COMPUTE_SUFFIX) and len(symbol) > len(COMPUTE_SUFFIX):
        return symbol[:-len(COMPUTE_SUFFIX)]
    return symbol


@dataclass(frozen=True)
class Share:
    cycles: float
    insns: int


@dataclass
class Attribution:
    """Estimated cycles and executed instructions per function (``by_function``, folded by ``primfunc_name``) and
    what no function holds (``unattributed``, by section). ``total`` is the library's whole estimate: the sums of
    both add up to it."""

    by_function: dict[str, Share]
    unattributed: dict[str, Share]
    total: Share

    def share_unattributed(self) -> float:
        """The unattributed fraction of the estimated cycles."""
        return sum(s.cycles for s in self.unattributed.values()) / self.total.cycles if self.total.cycles else 0.0

    def of(self, names: list[str]) -> Share:
        """The summed share of these functions (a missing one counts 0)."""
        parts = [self.by_function.get(n, Share(0.0, 0)) for n in names]
        return Share(sum(p.cycles for p in parts), sum(p.insns for p in parts))


def attribute(blocks: Mapping[tuple[int, Block], int], library: str | os.PathLike[str], c: Core,
              cache: Path | None = None) -> Attribution:
    """Attribute located blocks (``mca.read_blocks_at``: {(file offset, words): executions}) of ``library`` to its
    functions, with core ``c``'s steady-state cycles per block."""
    elf = elf_functions(library)
    cycles = BlockCycles(c, cache).get({words for _, words in blocks})
    by_fn: dict[str, list[float]] = {}
    rest: dict[str, list[float]] = {}
    total = [0.0, 0]
    for (offset, words), n in blocks.items():
        cyc, ins = n * cycles[words][0], n * len(words)
        name = elf.name_at(offset)
        bucket = by_fn.setdefault(primfunc_name(name), [0.0, 0]) if name is not None else \
            rest.setdefault(elf.section_at(offset), [0.0, 0])
        bucket[0] += cyc
        bucket[1] += ins
        total[0] += cyc
        total[1] += ins
    return Attribution({k: Share(v[0], int(v[1])) for k, v in by_fn.items()},
                       {k: Share(v[0], int(v[1])) for k, v in rest.items()}, Share(total[0], int(total[1])))


def attribute_file(blocks_file: str | os.PathLike[str], library: str | os.PathLike[str], c: Core,
                   cache: Path | None = None) -> Attribution:
    """``attribute`` for a plugin ``blocks=`` file."""
    return attribute(read_blocks_at(blocks_file), library, c, cache)
