"""Estimated cycles of a Raspberry Pi core for code run on the emulated board.

The board's TCG plugin (``scripts/board/src/icount.c``, option ``blocks=FILE``) records every translated block
that executed inside the measured library: its instruction words and how often it ran. Each distinct block goes
through ``llvm-mca`` with the core's scheduling model, as if it ran in a loop; its steady-state cycles per
iteration are ``(cycles at 2n iterations - cycles at n iterations) / n``. The estimate is

    est_cycles = sum over blocks of executions x steady-state cycles of the block

It is deterministic (the same blocks and counts give the same number) and it ignores: caches, DRAM and TLBs
(every load hits L1 at the model's load latency), branch mispredictions and fetch, dependencies and overlap
between consecutive blocks (each block is timed in steady state against itself), instructions the model does
not know (``unmodelled_insns``: skipped, costing 0 cycles), and other threads.

Scheduling models (LLVM has no Cortex-A72 or Cortex-A76 model of its own):
  cortex-a72 (Pi 4): LLVM's ``-mcpu=cortex-a72`` uses the Cortex-A57 model (A72 is the A57's successor, the same
                     3-wide out-of-order pipeline with two 64+64-bit FP/ASIMD pipes); the same in LLVM 14 and 19.
  cortex-a76 (Pi 5): LLVM's ``-mcpu=cortex-a76`` also maps to the Cortex-A57 model (LLVM 14 and 19), which has
                     no dot product and one 128-bit FMA per cycle; we use ``-mcpu=neoverse-n1`` instead
                     (LLVM 19 here), whose model describes the A76-derived N1 core: two 128-bit ASIMD pipes (V0/V1),
                     SDOT and FMLA at 2 per cycle, as the Cortex-A76 optimization guide gives.
Results are cached per block under ``<cache>/mca/`` (``TVM_LOWBIT_CACHE``), keyed by the LLVM version and model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tvm_lowbit.deploy.bundle import cache_dir

Block = tuple[int, ...]  # the instruction words of one translated block

# the steady state is the cost of the iterations between these two counts
ITERATIONS = (100, 200)
# every extension a Pi 4 / Pi 5 binary may carry, so that the disassembler and llvm-mca parse them all
MATTR = "+neon,+dotprod,+i8mm,+fullfp16,+fp16fml,+bf16,+aes,+sha2,+crc,+lse,+rcpc,+rdm"
CHUNK = 1500  # blocks per llvm-mca process


class CostError(RuntimeError):
    pass


@dataclass(frozen=True)
class Core:
    """A Pi core: the qemu CPU that emulates it, the LLVM scheduling model that times it, its clock."""

    qemu_cpu: str
    mcpu: str
    model: str  # the LLVM scheduling model behind ``mcpu``, as llvm-mca names its resources
    clock_hz: float
    board: str


CORES = {
    "cortex-a72": Core("cortex-a72", "cortex-a72", "CortexA57Model", 1.8e9, "Raspberry Pi 4 (BCM2711), 1.8 GHz"),
    "cortex-a76": Core("cortex-a76", "neoverse-n1", "NeoverseN1Model", 2.4e9, "Raspberry Pi 5 (BCM2712), 2.4 GHz"),
}


def core(qemu_cpu: str) -> Core:
    if qemu_cpu not in CORES:
        raise CostError(f"no cycle model for -cpu {qemu_cpu}: known cores are {', '.join(CORES)}")
    return CORES[qemu_cpu]


@dataclass(frozen=True)
class Estimate:
    cycles: float  # sum of executions x steady-state cycles
    insns: int  # instructions executed in the recorded blocks
    unmodelled_insns: int  # executed instructions llvm-mca skipped (no scheduling data or no parse): 0 cycles
    blocks: int  # distinct blocks


def llvm_tool(name: str) -> str:
    """The newest installed versioned LLVM tool ``name`` from LLVM 17 on, e.g. ``llvm-mca-19`` (LLVM 14, the
    bookworm default, has no Neoverse N1 model: ``-mcpu=neoverse-n1`` falls back to the A57 model there;
    tests/test_cost.py checks which model answers)."""
    for version in range(30, 16, -1):
        path = shutil.which(f"{name}-{version}")
        if path:
            return path
    raise CostError(f"{name} (LLVM >= 17, for the Neoverse N1 model) is not installed: "
                    "`bash scripts/board/setup.sh` installs llvm-19 (apt-get install llvm-19)")


def llvm_version() -> str:
    out = subprocess.run([llvm_tool("llvm-mca"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"LLVM version (\S+)", out)
    return m.group(1) if m else "unknown"


def read_blocks_at(path: str | os.PathLike[str]) -> dict[tuple[int, Block], int]:
    """The plugin's ``blocks=`` file as {(file offset, instruction words): executions}; a block translated more
    than once (a code-cache flush, a second thread) is merged by its offset and words."""
    counts: dict[tuple[int, Block], int] = {}
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        key = (int(fields[0], 16), tuple(int(w, 16) for w in fields[2:]))
        counts[key] = counts.get(key, 0) + int(fields[1])
    return counts


def read_blocks(path: str | os.PathLike[str]) -> dict[Block, int]:
    """The plugin's ``blocks=`` file as {instruction words: executions} (``read_blocks_at`` merged by words)."""
    merged: dict[Block, int] = {}
    for (_, words), n in read_blocks_at(path).items():
        merged[words] = merged.get(words, 0) + n
    return merged


def disassemble(words: Iterable[int]) -> dict[int, str | None]:
    """{word: assembly text} through ``llvm-mc --disassemble``; None for an encoding LLVM does not know."""
    unique = sorted(set(words))
    if not unique:
        return {}
    text = "\n".join(" ".join(f"0x{(w >> s) & 0xff:02x}" for s in (0, 8, 16, 24)) for w in unique) + "\n"
    r = subprocess.run([llvm_tool("llvm-mc"), "--disassemble", "-triple=aarch64", f"-mattr={MATTR}"], input=text,
                       capture_output=True, text=True)
    bad = {int(m.group(1)) - 1 for m in re.finditer(r"<stdin>:(\d+):\d+: warning: invalid instruction", r.stderr)}
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip() and not ln.strip().startswith(".")]
    good = [w for i, w in enumerate(unique) if i not in bad]
    if len(lines) != len(good):
        raise CostError(f"llvm-mc disassembled {len(lines)} of {len(good)} instruction words; stderr: "
                        f"{r.stderr.strip()[-300:]}")
    asm: dict[int, str | None] = {w: None for w in unique}
    asm.update({w: " ".join(line.split()) for w, line in zip(good, lines)})
    return asm


def _mca_regions(asm_blocks: list[list[str]], mcpu: str, iterations: int) -> list[tuple[float, int]]:
    """(total cycles, instructions llvm-mca kept) per block, each block a code region run ``iterations`` times."""
    src = []
    for i, lines in enumerate(asm_blocks):
        src += [f"# LLVM-MCA-BEGIN b{i}", *lines, "# LLVM-MCA-END"]
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(src) + "\n")
    try:
        r = subprocess.run([llvm_tool("llvm-mca"), "-mtriple=aarch64", f"-mcpu={mcpu}", f"-mattr={MATTR}",
                            f"-iterations={iterations}", "--skip-unsupported-instructions=any", "--json",
                            "-all-views=false", "-summary-view", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise CostError(f"llvm-mca -mcpu={mcpu} failed: {r.stderr.strip()[-500:]}")
    out: list[tuple[float, int]] = [(0.0, 0)] * len(asm_blocks)
    for region in json.loads(r.stdout)["CodeRegions"]:
        i = int(region["Name"][1:])
        out[i] = (float(region["SummaryView"]["TotalCycles"]), len(region["Instructions"]))
    return out


class BlockCycles:
    """Steady-state cycles per block for one core, with an on-disk cache (one JSON file per LLVM version and
    model). A block's value: [cycles per iteration, instructions llvm-mca skipped]."""

    def __init__(self, c: Core, cache: Path | None = None) -> None:
        self.core = c
        version = llvm_version()
        self.path = (cache or cache_dir() / "mca") / f"llvm{version}-{c.mcpu}.json"
        self.table: dict[str, list[float]] = {}
        if self.path.is_file():
            self.table = json.loads(self.path.read_text())

    @staticmethod
    def key(block: Block) -> str:
        return hashlib.sha1(b"".join(w.to_bytes(4, "little") for w in block)).hexdigest()

    def get(self, blocks: Iterable[Block]) -> dict[Block, tuple[float, int]]:
        wanted = {b: self.key(b) for b in blocks}
        missing = [b for b, k in wanted.items() if k not in self.table]
        if missing:
            self._compute(missing)
        return {b: (self.table[k][0], int(self.table[k][1])) for b, k in wanted.items()}

    def _compute(self, blocks: list[Block]) -> None:
        asm = disassemble(w for b in blocks for w in b)
        for lo in range(0, len(blocks), CHUNK):
            chunk = blocks[lo:lo + CHUNK]
            text = [[asm[w] for w in b if asm[w] is not None] for b in chunk]
            short, long = (_mca_regions(text, self.core.mcpu, n) for n in ITERATIONS)
            for b, lines, (c1, kept), (c2, _) in zip(chunk, text, short, long):
                per_iter = (c2 - c1) / (ITERATIONS[1] - ITERATIONS[0]) if kept else 0.0
                self.table[self.key(b)] = [per_iter, len(b) - kept]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")  # runner threads write too
        tmp.write_text(json.dumps(self.table))
        tmp.replace(self.path)


def estimate(blocks: Mapping[Block, int], c: Core, cache: Path | None = None) -> Estimate:
    """Estimated cycles of the recorded blocks on core ``c``."""
    cycles = BlockCycles(c, cache).get(blocks)
    total = sum(n * cycles[b][0] for b, n in blocks.items())
    insns = sum(n * len(b) for b, n in blocks.items())
    unmodelled = sum(n * cycles[b][1] for b, n in blocks.items())
    return Estimate(round(total, 1), insns, unmodelled, len(blocks))


def estimate_file(path: str | os.PathLike[str], qemu_cpu: str, cache: Path | None = None) -> Estimate:
    """The estimate for a plugin ``blocks=`` file recorded under ``-cpu qemu_cpu``."""
    return estimate(read_blocks(path), core(qemu_cpu), cache)
