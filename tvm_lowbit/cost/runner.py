"""A MetaSchedule runner for the emulated Raspberry Pi boards whose "run time" is the cycle estimate.

Each candidate (a kernel library cross-compiled for aarch64 by MetaSchedule's builder) runs in the board's Python
under ``qemu-aarch64 -cpu <the Pi's core>`` with the TCG plugin recording the blocks executed inside that library;
``tvm_lowbit.cost.mca`` turns them into estimated cycles, and the runner reports cycles / the Pi's clock
(1.8 GHz Pi 4, 2.4 GHz Pi 5) per call. No board, tracker or RPC is involved, and the result is deterministic, so
a candidate ranks the same every time. What the estimate ignores is listed in ``tvm_lowbit.cost.mca``; also, the
library's load-time code (a few hundred instructions) is counted once and shared out over ``number`` calls.

    from tvm_lowbit.cost.runner import EstimateRunner
    ms.tune_tasks(..., runner=EstimateRunner("rasp4b"), builder=<LocalBuilder with an aarch64 f_export>)

A candidate that fails (a crash, SIGILL, a timeout, the board missing) is reported as a failed measurement with
its error, and tuning goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerFuture, RunnerInput, RunnerResult

from tvm_lowbit.cost.mca import CostError, core, estimate_file
from tvm_lowbit.deploy.board import REPO, BoardError, icount_plugin, qemu_cpu, require_board

KERNEL_RUN = REPO / "scripts" / "board" / "src" / "kernel_run.py"


def kernel_cycles(artifact: str | os.PathLike[str], args_json: list[Any], cpu: str, number: int = 2,
                  timeout: float = 300.0) -> float:
    """Estimated cycles of one call of the kernel library ``artifact`` (entry function ``main``) on ``cpu``."""
    lib = Path(artifact).resolve()
    with tempfile.TemporaryDirectory(prefix="est-run-") as tmp:
        args_path, out, blocks = Path(tmp) / "args.json", Path(tmp) / "counts.json", Path(tmp) / "blocks.txt"
        args_path.write_text(json.dumps(args_json))
        plugin = f"{icount_plugin()},out={out},match=/{lib.name},blocks={blocks}"
        env = {**os.environ, "BOARD_CPU": cpu, "BOARD_QEMU_ARGS": f"-plugin {plugin}", "TVM_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        try:
            r = subprocess.run([str(require_board() / "bin" / "python3"), str(KERNEL_RUN), str(lib), str(args_path),
                                str(number)], env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BoardError(f"{lib.name} did not finish {number} call(s) on -cpu {cpu} in {timeout:.0f} s") from e
        if r.returncode != 0:
            raise BoardError(f"{lib.name} failed on -cpu {cpu} (rc {r.returncode}): {(r.stdout + r.stderr)[-600:]}")
        if not blocks.is_file():
            raise BoardError(f"the plugin recorded no blocks of {lib.name} (rc {r.returncode})")
        return estimate_file(blocks, cpu).cycles / number


@derived_object
class EstimateFuture(PyRunnerFuture):
    """An already finished measurement: run seconds, or an error message."""

    def __init__(self, seconds: float | None = None, error: str | None = None) -> None:
        super().__init__()
        self.seconds = seconds
        self.error = error

    def done(self) -> bool:
        return True

    def result(self) -> RunnerResult:
        return RunnerResult(None if self.seconds is None else [self.seconds], self.error)


@derived_object
class EstimateRunner(PyRunner):
    """MetaSchedule runner: "run time" = estimated cycles per call / the Pi's clock, on the emulated board of
    ``target`` (rasp4b or rasp5). ``max_workers`` candidates run at once (one qemu each)."""

    def __init__(self, target: str = "rasp4b", number: int = 2, timeout_sec: float = 300.0,
                 max_workers: int = 1) -> None:
        super().__init__()
        self.cpu = qemu_cpu(target)
        self.clock_hz = core(self.cpu).clock_hz
        self.number = number
        self.timeout_sec = timeout_sec
        self.max_workers = max_workers

    def measure(self, runner_input: RunnerInput) -> EstimateFuture:
        try:
            args = [a.as_json() for a in runner_input.args_info]
            cycles = kernel_cycles(runner_input.artifact_path, args, self.cpu, self.number, self.timeout_sec)
        except (BoardError, CostError, OSError, ValueError) as e:
            return EstimateFuture(error=f"{type(e).__name__}: {e}")
        return EstimateFuture(seconds=cycles / self.clock_hz)

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(self.measure, runner_inputs))
