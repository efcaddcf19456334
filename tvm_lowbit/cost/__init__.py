"""Cost models for code that runs on the emulated Raspberry Pi boards: ``mca`` estimates a Pi core's cycles
from the blocks the board's TCG plugin recorded, through llvm-mca's scheduling models; ``runner`` (imports TVM,
so not imported here) is the MetaSchedule runner whose run time is that estimate; ``attribute`` splits a
library's estimate by the functions of its ELF symbol table."""

from tvm_lowbit.cost.mca import (CORES, Block, Core, CostError, Estimate, core, estimate, estimate_file,
                                 read_blocks, read_blocks_at)

__all__ = ["CORES", "Block", "Core", "CostError", "Estimate", "core", "estimate", "estimate_file", "read_blocks",
           "read_blocks_at"]
