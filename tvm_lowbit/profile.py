"""Where a compiled model spends its time on the host: CPU and wall time per VM call, grouped by function.

TVM 0.27's Relax VM has no ``profile``; this times every ``Call`` instruction of the VM through
``VirtualMachine.set_instrument`` (the kernels, the float ops Relax lowered, the VM builtins), by the
process's CPU clock (all threads: TVM's pool workers count) and by the wall clock, over several
inferences, and reports the median per inference of each function (a function called several times per
inference: the sum of its calls).  Used by ``scripts/bench_speed.py --profile``::

    rows = profile_calls(artifact.executable, [x], runs=20)
    print(profile_table(rows))
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CallTime:
    """One function of the compiled model: median CPU and wall ms per inference over the profiled runs."""

    name: str          # the function symbol with its numeric suffix dropped (every instance together)
    calls: int         # calls per inference
    cpu_ms: float
    wall_ms: float


def base_name(symbol: str) -> str:
    """``ternary_conv2d_vnni12`` -> ``ternary_conv2d_vnni``, ``fused_tir_negative5_tir_exp5_add5_divide`` ->
    ``fused_tir_negative_tir_exp_add_divide``: the instances of one kernel or fused op together (each
    ``_``-separated part loses its trailing digits)."""
    parts = [p.rstrip("0123456789") for p in symbol.split("_")]
    return "_".join(p for p in parts if p) or symbol


def profile_calls(executable: Any, inputs: Sequence[np.ndarray], runs: int = 20, warmup: int = 3,
                  func: str = "main") -> list[CallTime]:
    """Time every VM call of ``func`` on ``inputs`` over ``runs`` inferences (after ``warmup``); the rows
    sorted by CPU time, largest first."""
    import tvm
    from tvm import relax
    from tvm.runtime.vm import VMInstrumentReturnKind

    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs]
    for _ in range(warmup):
        vm[func](*args)
    current: dict[str, list[float]] = {}  # symbol -> [cpu s, wall s, calls] in this inference
    started: list[tuple[float, float]] = []

    def instrument(_f: Any, symbol: str, before_run: bool, _ret: Any, *_args: Any) -> int:
        if before_run:
            started.append((time.process_time(), time.perf_counter()))
        else:
            c0, w0 = started.pop()
            acc = current.setdefault(base_name(str(symbol)), [0.0, 0.0, 0])
            acc[0] += time.process_time() - c0
            acc[1] += time.perf_counter() - w0
            acc[2] += 1
        return int(VMInstrumentReturnKind.NO_OP)

    vm.set_instrument(instrument)
    per_run: list[dict[str, list[float]]] = []
    for _ in range(max(runs, 1)):
        current = {}
        vm[func](*args)
        per_run.append(current)
    names = {n for r in per_run for n in r}
    rows = []
    for n in names:
        got = [r.get(n, [0.0, 0.0, 0]) for r in per_run]
        rows.append(CallTime(n, int(got[0][2]), 1e3 * statistics.median(g[0] for g in got),
                             1e3 * statistics.median(g[1] for g in got)))
    return sorted(rows, key=lambda r: -r.cpu_ms)


def profile_table(rows: Sequence[CallTime], top: int = 25) -> str:
    """The rows as a text table with each function's share of the summed CPU time."""
    total = sum(r.cpu_ms for r in rows) or 1.0
    lines = [f"{'function':<44}{'calls':>6}{'cpu_ms':>10}{'wall_ms':>10}{'share':>8}"]
    for r in rows[:top]:
        lines.append(f"{r.name[:43]:<44}{r.calls:>6}{r.cpu_ms:>10.3f}{r.wall_ms:>10.3f}{100 * r.cpu_ms / total:>7.1f}%")
    rest = rows[top:]
    if rest:
        lines.append(f"{f'({len(rest)} more)':<44}{sum(r.calls for r in rest):>6}{sum(r.cpu_ms for r in rest):>10.3f}"
                     f"{sum(r.wall_ms for r in rest):>10.3f}{100 * sum(r.cpu_ms for r in rest) / total:>7.1f}%")
    lines.append(f"{'sum':<44}{sum(r.calls for r in rows):>6}{total:>10.3f}{sum(r.wall_ms for r in rows):>10.3f}")
    return "\n".join(lines)
