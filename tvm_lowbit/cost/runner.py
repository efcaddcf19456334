"""A MetaSchedule runner for the emulated Raspberry Pi boards whose "run time" is the cycle estimate.

Each candidate (a kernel library cross-compiled for aarch64 by MetaSchedule's builder) runs in the board's Python
under ``qemu-aarch64 -cpu <the Pi's core>`` with the TCG plugin recording the blocks executed inside that library;
``tvm_lowbit.cost.mca`` turns them into estimated cycles, and the runner reports cycles / the Pi's clock
(1.8 GHz Pi 4, 2.4 GHz Pi 5) per call. No board, tracker or RPC is involved, and the result is deterministic, so
a candidate ranks the same every time. What the estimate ignores is listed in ``tvm_lowbit.cost.mca``; also, the
library's load-time code (a few hundred instructions) is counted once and shared out over ``number`` calls.
The runner also keeps each candidate's executed instructions per call (``EstimateRunner.instructions``, by
artifact path), which ``tvm_lowbit.tune`` records beside the run time: a record is applied only when it needs
fewer estimated cycles and no more instructions than the kernel's default schedule.

    from tvm_lowbit.cost.runner import EstimateRunner
    ms.tune_tasks(..., runner=EstimateRunner("rasp4b"), builder=<LocalBuilder with an aarch64 f_export>)

The board's Python is started once per worker and kept warm (``BoardServer``: importing TVM under qemu takes
10-30 s, a candidate then about a second): it forks one child per candidate, so the plugin's report covers one
candidate. ``run`` returns at once; the candidates are measured in the background while MetaSchedule builds the
next batch. A candidate that fails (a crash, SIGILL, a timeout, the board process killed or missing) is reported
as a failed measurement with its error, a dead board process is started again for the next candidate, and tuning
goes on.
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import signal
import subprocess
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerFuture, RunnerInput, RunnerResult

from tvm_lowbit.cost.mca import CostError, Estimate, core, estimate_file
from tvm_lowbit.deploy.board import REPO, BoardError, icount_plugin, qemu_cpu, require_board

KERNEL_RUN = REPO / "scripts" / "board" / "src" / "kernel_run.py"
KERNEL_SERVER = REPO / "scripts" / "board" / "src" / "kernel_server.py"
# the plugin records the blocks of the files whose path holds this; each candidate is copied to such a name
CANDIDATE = "est-cand-"
START_TIMEOUT = 600.0  # seconds the board's Python may take to import TVM (a loaded 2-core host: 10-60 s)


def _board_env(cpu: str, plugin: str) -> dict[str, str]:
    return {**os.environ, "BOARD_CPU": cpu, "BOARD_QEMU_ARGS": f"-plugin {plugin}", "TVM_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def kernel_cycles(artifact: str | os.PathLike[str], args_json: list[Any], cpu: str, number: int = 2,
                  timeout: float = 300.0) -> float:
    """Estimated cycles of one call of the kernel library ``artifact`` (entry function ``main``) on ``cpu``, in a
    board Python of its own (a cold start; ``BoardServer`` keeps one warm)."""
    lib = Path(artifact).resolve()
    with tempfile.TemporaryDirectory(prefix="est-run-") as tmp:
        args_path, out, blocks = Path(tmp) / "args.json", Path(tmp) / "counts.json", Path(tmp) / "blocks.txt"
        args_path.write_text(json.dumps(args_json))
        env = _board_env(cpu, f"{icount_plugin()},out={out},match=/{lib.name},blocks={blocks}")
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


class BoardServer:
    """One warm board Python (``scripts/board/src/kernel_server.py`` under qemu with the plugin) that measures one
    candidate at a time. It runs in a session of its own; ``close`` (or the host process ending: its stdin
    closes) ends it. A dead server (killed, crashed) fails the candidate it was running and starts again on the
    next ``cycles`` call."""

    def __init__(self, cpu: str, start_timeout: float = START_TIMEOUT) -> None:
        self.cpu = cpu
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="est-board-"))
        self.blocks = self.tmp / "blocks.txt"
        self.log = self.tmp / "board.log"
        self.served = 0
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The board process (qemu) while it runs; its process group has the same id."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _readline(self, timeout: float, what: str) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise BoardError(f"the board (-cpu {self.cpu}) did not {what} in {timeout:.0f} s; it was stopped")
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.proc = None
            raise BoardError(f"the board process (-cpu {self.cpu}) ended (rc {rc}) while it should {what}: "
                             f"{self._log_tail()}")
        return line.strip()

    def _log_tail(self, offset: int = 0) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return text[-600:]

    def start(self) -> None:
        self.close()
        plugin = f"{icount_plugin()},out={self.tmp / 'counts.json'},match=/{CANDIDATE},blocks={self.blocks}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(require_board() / "bin" / "python3"), str(KERNEL_SERVER)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=_board_env(self.cpu, plugin), start_new_session=True)
        self.starts += 1
        if (line := self._readline(self.start_timeout, "start")) != "ready":
            self.close()
            raise BoardError(f"the board process said {line!r} instead of 'ready'")

    def cycles(self, artifact: str | os.PathLike[str], args_json: list[Any], number: int = 2,
               timeout: float = 300.0) -> float:
        """Estimated cycles of one call of ``artifact``'s ``main`` (as ``kernel_cycles``, on the warm board)."""
        return self.estimate(artifact, args_json, number, timeout).cycles / number

    def estimate(self, artifact: str | os.PathLike[str], args_json: list[Any], number: int = 2,
                 timeout: float = 300.0) -> Estimate:
        """The estimate of ``number`` calls of ``artifact``'s ``main`` (cycles and executed instructions of the
        library, its load-time code included once)."""
        lib = Path(artifact)
        if not lib.is_file():
            raise BoardError(f"no kernel library {lib}")
        if self.pid is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.served += 1
        cand = self.tmp / f"{CANDIDATE}{self.served}.so"
        shutil.copyfile(lib, cand)
        self.blocks.unlink(missing_ok=True)
        offset = self.log.stat().st_size if self.log.is_file() else 0
        try:
            try:
                self.proc.stdin.write(json.dumps({"lib": str(cand), "args": args_json, "number": number}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError) as e:
                self.close()
                raise BoardError(f"the board process (-cpu {self.cpu}) is gone ({type(e).__name__})") from e
            status = json.loads(self._readline(timeout, f"finish {number} call(s) of {lib.name}"))["status"]
            if status != 0:
                raise BoardError(f"{lib.name} failed on -cpu {self.cpu} (wait status {status}): "
                                 f"{self._log_tail(offset)}")
            if not self.blocks.is_file():
                raise BoardError(f"the plugin recorded no blocks of {lib.name}")
            return estimate_file(self.blocks, self.cpu)
        finally:
            cand.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the board process group (qemu and a candidate's child); idempotent."""
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


@derived_object
class EstimateFuture(PyRunnerFuture):
    """A measurement running in the background: run seconds, or an error message."""

    def __init__(self, future: Future[float]) -> None:
        super().__init__()
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunnerResult:
        try:
            seconds = self.future.result()
        except (BoardError, CostError, OSError, ValueError) as e:
            return RunnerResult(None, f"{type(e).__name__}: {e}")
        return RunnerResult([seconds], None)


@derived_object
class EstimateRunner(PyRunner):
    """MetaSchedule runner: "run time" = estimated cycles per call / the Pi's clock, on the emulated board of
    ``target`` (rasp4b or rasp5). ``max_workers`` warm boards measure at once (one qemu each); ``close`` stops
    them (they also end with this process). ``instructions`` maps each measured artifact's path to its executed
    instructions per call (MetaSchedule's RunnerResult has room for run times only; ``tune`` reads them from
    here in a measure callback)."""

    def __init__(self, target: str = "rasp4b", number: int = 2, timeout_sec: float = 300.0,
                 max_workers: int = 1) -> None:
        super().__init__()
        self.cpu = qemu_cpu(target)
        self.clock_hz = core(self.cpu).clock_hz
        self.number = number
        self.timeout_sec = timeout_sec
        self.max_workers = max_workers
        self.boards = [BoardServer(self.cpu) for _ in range(max_workers)]
        self.free: queue.Queue[BoardServer] = queue.Queue()
        for b in self.boards:
            self.free.put(b)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="est-board")
        self.instructions: dict[str, float] = {}

    def seconds(self, artifact: str, args: list[Any]) -> float:
        board = self.free.get()
        try:
            est = board.estimate(artifact, args, self.number, self.timeout_sec)
        finally:
            self.free.put(board)
        self.instructions[artifact] = est.insns / self.number
        return est.cycles / self.number / self.clock_hz

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        return [EstimateFuture(self.pool.submit(self.seconds, str(r.artifact_path),
                                                [a.as_json() for a in r.args_info])) for r in runner_inputs]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for b in self.boards:
            b.close()
            shutil.rmtree(b.tmp, ignore_errors=True)
