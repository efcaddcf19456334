"""Deploy a compiled model to a board over TVM RPC: upload, run remotely, compare with the host, time it.

The board is anything that runs TVM's RPC server: a Raspberry Pi running ``python -m tvm.exec.rpc_server``,
or the emulated board of ``scripts/board/``. It is reached through a tracker (``Board(tracker="host:port",
key="rasp4b")``) or directly (``Board(host=..., port=...)``).

Every network step is bounded: waiting for a tracker or a free board (``wait_s``), connecting
(``connect_timeout_s``), each remote step such as the upload or a run (``step_timeout_s``). A board that goes
away or stops answering is retried with a fresh session ``retries`` times, then a ``DeployError`` says what
failed where. The server is also asked to end the session after ``session_timeout_s``, so a client that dies
never keeps a board busy.

The watchdog: each attempt runs its RPC session in a worker process (``multiprocessing``, spawn) that reports
every step to this process. A step that gets no answer in time ends with the worker killed (SIGKILL): a
session stuck in TVM's RPC code (a stopped board; a destructor waiting on the session's mutex) is abandoned
without being waited on, and the kernel closes its socket, which ends the session on the board.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from tvm_lowbit.deploy.board import boards_under_key, tracker_summary

T = TypeVar("T")


class DeployError(RuntimeError):
    """A deployment failed; the message says which board, which step, and what to check."""


class BoardUnavailable(DeployError):
    """No tracker, no board under the key, or no board free in time."""


class BoardLost(DeployError):
    """The board's session ended during a step (the board went away or crashed)."""


class StepTimeout(DeployError):
    """A remote step did not finish in time (the board hangs, or the link is too slow)."""


@dataclass(frozen=True)
class Board:
    """Where the board is, and how long to wait for it."""

    tracker: str | None = None  # "host:port" of a TVM RPC tracker; None: connect to host:port directly
    key: str | None = None  # the board's tracker key; default: the target name (rasp4b, rasp5)
    host: str = "127.0.0.1"
    port: int = 9090
    wait_s: float = 60.0  # for the tracker to answer and a board under the key to be free
    connect_timeout_s: float = 30.0
    step_timeout_s: float = 300.0  # one remote step: upload, load, a run, the timing runs
    retries: int = 2  # further attempts, each with a new session, after a lost board or a timeout
    session_timeout_s: float = 900.0  # the server ends the session after this, whatever the client does

    def describe(self, key: str) -> str:
        return f"tracker {self.tracker}, key '{key}'" if self.tracker else f"RPC server {self.host}:{self.port}"


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise DeployError(f"tracker address {addr!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
    return host or "127.0.0.1", int(port)


def bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()``, or ``StepTimeout`` after ``timeout`` s. TVM's FFI releases the GIL in remote calls, so a call
    blocked on a dead link can be abandoned; its session is then dropped and the server's session timeout
    frees the board."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=work, name=f"tvm-lowbit {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise StepTimeout(f"{what}: no answer in {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_for_board(tracker: str, key: str, wait_s: float) -> None:
    """Return once the tracker lists a free board under ``key``; ``BoardUnavailable`` after ``wait_s``."""
    host, port = _split_addr(tracker)
    deadline = time.monotonic() + wait_s
    delay, problem = 0.2, ""
    while True:
        try:
            summary = tracker_summary(host, port, timeout=min(5.0, max(wait_s, 0.5)))
            registered, free = boards_under_key(summary, key)
            if free > 0:
                return
            keys = sorted({s["key"].split(":", 1)[-1] for s in summary.get("server_info", [])})
            problem = (f"all {registered} board(s) under key '{key}' stayed busy with other sessions (wait longer "
                       "with --wait, or start more boards: board.py start --boards N)" if registered else
                       f"no board is registered under key '{key}' (registered keys: {', '.join(keys) or 'none'}); "
                       "start one (python scripts/board/board.py start, or on a Pi: python -m tvm.exec.rpc_server "
                       f"--tracker {tracker} --key {key})")
        except OSError as e:
            problem = (f"cannot reach the RPC tracker at {tracker} ({type(e).__name__}: {e}); is it running? "
                       "(python scripts/board/board.py start, or python -m tvm.exec.rpc_tracker)")
        if time.monotonic() + delay > deadline:
            raise BoardUnavailable(f"{problem} [waited {wait_s:g} s]")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def open_session(board: Board, key: str) -> Any:
    """A ``tvm.rpc.RPCSession`` on a free board."""
    from tvm import rpc

    if board.tracker:
        wait_for_board(board.tracker, key, board.wait_s)
        host, port = _split_addr(board.tracker)
        tracker = bounded(lambda: rpc.connect_tracker(host, port), board.connect_timeout_s,
                          f"connect to the tracker {board.tracker}")
        try:
            return bounded(lambda: tracker.request(key, priority=1, session_timeout=board.session_timeout_s,
                                                   max_retry=1),
                           board.wait_s + board.connect_timeout_s, f"get a '{key}' board from the tracker")
        except StepTimeout:
            raise
        except Exception as e:  # the board the tracker handed out did not take the session
            raise BoardLost(f"the tracker's '{key}' board refused the session: {_first_line(e)}") from e
        finally:
            tracker.close()
    try:
        return bounded(lambda: rpc.connect(board.host, board.port, session_timeout=board.session_timeout_s),
                       board.connect_timeout_s, f"connect to {board.host}:{board.port}")
    except StepTimeout:
        raise
    except Exception as e:
        raise BoardUnavailable(f"cannot connect to the RPC server {board.host}:{board.port}: {_first_line(e)} "
                               "(is it running? a server registered with a tracker only takes connections "
                               "through the tracker: pass --tracker)") from e


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    # TVM errors end with the message; the lines before are a traceback
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _session_alive(sess: Any) -> bool:
    """Does the session still answer? Tells a failed remote step from a board that went away."""
    try:
        return bounded(lambda: sess.get_function("testing.echo")(7), 5.0, "ping the board") == 7
    except Exception:  # noqa: BLE001 - any failure means the session is gone
        return False


@dataclass
class RemoteRun:
    output: np.ndarray
    run_ms: list[float]  # one inference each, measured on the board by time_evaluator
    upload_s: float
    attempts: int
    board: str

    @property
    def median_ms(self) -> float:
        return float(np.median(self.run_ms))


def _run_once(lib: Path, x: np.ndarray, board: Board, key: str, repeat: int,
              on_step: Callable[[str], None]) -> RemoteRun:
    import tvm
    from tvm import relax

    on_step("connect")
    sess = open_session(board, key)
    step = "connect"

    def remote(name: str, fn: Callable[[], T]) -> T:
        nonlocal step
        step = name
        on_step(name)
        return bounded(fn, board.step_timeout_s, name)

    try:
        t0 = time.perf_counter()
        remote(f"upload {lib.name} ({lib.stat().st_size / 1024:.0f} KiB)", lambda: sess.upload(str(lib)))
        upload_s = time.perf_counter() - t0
        rlib = remote("load the model on the board", lambda: sess.load_module(lib.name))
        dev = sess.cpu(0)
        vm = remote("create the Relax VM", lambda: relax.VirtualMachine(rlib, dev))
        x_dev = remote("copy the input to the board", lambda: tvm.runtime.tensor(x, dev))
        out = remote("run the model", lambda: vm["main"](x_dev).numpy())
        remote("set the timing input", lambda: vm.set_input("main", x_dev))
        # number=1: each sample is one inference; the board's own clock, so RPC latency is excluded
        timer = remote("prepare the timer", lambda: vm.time_evaluator("invoke_stateful", dev, number=1,
                                                                       repeat=max(repeat, 1), min_repeat_ms=0))
        res = remote(f"time {repeat} runs", lambda: timer("main"))
        times = [1e3 * float(t) for t in res.results]
        # drop every remote handle: a board serves one session at a time
        sess = rlib = dev = vm = x_dev = timer = None  # noqa: F841
        gc.collect()
        return RemoteRun(out, times, upload_s, 1, board.describe(key))
    except DeployError:
        raise
    except Exception as e:
        msg = _first_line(e)
        if not _session_alive(sess):
            raise BoardLost(f"the board's session ended during '{step}' ({msg}); the board went away, or the model "
                            "crashed it (an instruction its CPU lacks? check the target)") from e
        raise DeployError(f"'{step}' failed on the board: {msg}") from e
    # on failure the handles are not released here: a dead session's destructor may wait forever on its
    # mutex; the worker process exits without running them (see _worker)


# The worker process: spawn start-up (importing TVM) may take this long on a loaded machine
WORKER_START_S = 120.0
# the watchdog waits this much longer than a step's own bound, so the worker's clearer error comes first
WATCHDOG_GRACE_S = 10.0


def _worker(conn: Any, lib: str, x: np.ndarray, board: Board, key: str, repeat: int) -> None:
    """One attempt in a worker process: every step and the result (or the error) go to ``conn``."""
    try:
        run = _run_once(Path(lib), x, board, key, repeat, lambda step: conn.send(("step", step)))
        conn.send(("ok", run))
    except BaseException as e:  # noqa: BLE001 - every failure goes to the parent
        try:
            conn.send(("error", e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            conn.send(("error", DeployError(_first_line(e))))
    conn.close()
    os._exit(0)  # no destructors: a dead session's would wait on its mutex


def _step_limit(board: Board, step: str) -> float:
    if step == "connect":  # the tracker wait, the connection, the tracker's request
        return board.wait_s + 2 * board.connect_timeout_s + WATCHDOG_GRACE_S
    return board.step_timeout_s + WATCHDOG_GRACE_S


def _end(proc: Any) -> None:
    """The worker is gone when this returns: it has exited, or it was killed."""
    proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join(10.0)


def _run_watched(lib: Path, x: np.ndarray, board: Board, key: str, repeat: int,
                 on_step: Callable[[str], None]) -> RemoteRun:
    """One attempt (:func:`_run_once`) in a worker process that is killed when a step gets no answer in time."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(send, str(lib), x, board, key, repeat), daemon=True,
                       name=f"tvm-lowbit RPC to {board.describe(key)}")
    proc.start()
    send.close()
    step, limit = "start the RPC worker process", WORKER_START_S
    try:
        while True:
            if not recv.poll(limit):
                raise StepTimeout(f"{step}: no answer in {limit:g} s (the RPC worker process was killed)")
            try:
                kind, value = recv.recv()
            except EOFError:
                proc.join(5.0)
                raise BoardLost(f"the RPC worker process died during '{step}' (exit code {proc.exitcode})") from None
            if kind == "step":
                step, limit = value, _step_limit(board, value)
                on_step(value)
            elif kind == "ok":
                return value
            else:
                raise value
    finally:
        _end(proc)
        recv.close()


def _precheck(board: Board, key: str) -> None:
    """``BoardUnavailable`` when no board can be reached (the tracker's list, or a TCP connection)."""
    if board.tracker:
        wait_for_board(board.tracker, key, board.wait_s)
        return
    import socket

    try:
        with socket.create_connection((board.host, board.port), timeout=board.connect_timeout_s):
            pass
    except OSError as e:
        raise BoardUnavailable(f"cannot connect to the RPC server {board.host}:{board.port}: {type(e).__name__}: {e} "
                               "(is it running? a server registered with a tracker only takes connections "
                               "through the tracker: pass --tracker)") from e


def run_remote(lib: str | os.PathLike[str], x: np.ndarray, board: Board, key: str, *, repeat: int = 10,
               on_step: Callable[[str], None] = lambda _s: None) -> RemoteRun:
    """Upload ``lib`` (an exported model.so for the board), run it on ``x``, time ``repeat`` runs.
    Lost boards and timeouts are retried ``board.retries`` times with a new session; each attempt runs in a
    worker process under a watchdog (see the module docstring), so no step waits longer than its bound."""
    lib = Path(lib)
    errors: list[str] = []
    _precheck(board, key)  # here, in a few seconds, before a worker process starts
    for attempt in range(1, board.retries + 2):
        try:
            run = _run_watched(lib, np.ascontiguousarray(x), board, key, repeat, on_step)
            run.attempts = attempt
            return run
        except BoardUnavailable as e:
            if attempt == 1:  # nothing to retry: the wait for a board was already bounded
                raise
            errors.append(f"attempt {attempt}: {e}")  # the board went away and did not come back
            break
        except (BoardLost, StepTimeout) as e:
            errors.append(f"attempt {attempt}: {e}")
            on_step(f"retrying after: {e}")
    raise DeployError(f"deploying to {board.describe(key)} failed after {len(errors)} attempt(s):\n  "
                      + "\n  ".join(errors))


def check_reachable(board: Board, key: str) -> None:
    """Fail fast (``BoardUnavailable``), before a long compile, if no board can be reached."""
    if board.tracker:
        wait_for_board(board.tracker, key, board.wait_s)
        return
    import socket

    try:
        with socket.create_connection((board.host, board.port), timeout=min(board.connect_timeout_s, 10.0)):
            pass
    except OSError as e:
        raise BoardUnavailable(f"cannot reach the RPC server {board.host}:{board.port} ({e}); is it running? "
                               "(python scripts/board/board.py start --no-tracker, or on a Pi: "
                               "python -m tvm.exec.rpc_server --host 0.0.0.0)") from e


# --------------------------------------------------------------------------------------------
# the whole flow: compile for the board and for the host, run on both, compare
# --------------------------------------------------------------------------------------------

# The board and the host run the same integer kernels, so every FGQ accumulator and code is identical.
# Only the float parts (the float first conv and classifier, the epilogue's float ops) may round differently:
# LLVM vectorizes float reductions differently for NEON and AVX2. The outputs are logits of magnitude ~10;
# a difference of a few float32 ulps is 1e-6, a requantization code flipped by such a difference would show
# as >= 1e-2. The tolerance sits between: 1e-4 relative to the largest host logit.
REL_TOLERANCE = 1e-4


@dataclass
class DeployReport:
    target: str
    board: str
    output: np.ndarray
    host_output: np.ndarray | None
    max_abs_diff: float
    tolerance: float
    run_ms: list[float]
    upload_s: float
    attempts: int
    lib_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.host_output is None or self.max_abs_diff <= self.tolerance

    @property
    def median_ms(self) -> float:
        return float(np.median(self.run_ms))

    def text(self) -> str:
        lines = [f"deployed to {self.target} via {self.board}: model.so {self.lib_bytes:,d} bytes, "
                 f"uploaded in {self.upload_s:.2f} s" + (f" ({self.attempts} attempts)" if self.attempts > 1 else "")]
        if self.host_output is not None:
            same = np.array_equal(self.output, self.host_output)
            agree = float((self.output.argmax(-1) == self.host_output.argmax(-1)).mean()) * 100 \
                if self.output.ndim > 1 else 100.0
            lines.append(f"board vs host (x86) output: max |diff| {self.max_abs_diff:.3g} "
                         f"(tolerance {self.tolerance:.3g}{', bit-identical' if same else ''}), "
                         f"top-1 agreement {agree:.1f}%: {'OK' if self.ok else 'MISMATCH'}")
        lines.append(f"remote time per inference: median {self.median_ms:.3f} ms over {len(self.run_ms)} runs "
                     f"(min {min(self.run_ms):.3f}, max {max(self.run_ms):.3f})")
        return "\n".join(lines + self.notes)


def deploy_artifact(art: Any, x: np.ndarray, board: Board, *, host_output: np.ndarray | None = None,
                    repeat: int = 10, on_step: Callable[[str], None] = lambda _s: None) -> DeployReport:
    """Export ``art`` (a ``tvm_lowbit.artifact.Artifact`` built for the board's target), run it remotely,
    compare with ``host_output`` if given."""
    key = board.key or art.target.name
    x = art.check_input(x)
    with tempfile.TemporaryDirectory(prefix="tvm-lowbit-deploy-") as tmp:
        out = art.export(Path(tmp) / "artifact")
        lib = out / f"{art.target.name}_model.so"
        (out / "model.so").rename(lib)  # a distinctive name in the board's work folder and its logs
        run = run_remote(lib, x, board, key, repeat=repeat, on_step=on_step)
        lib_bytes = lib.stat().st_size
    diff, tol = float("nan"), float("nan")
    if host_output is not None:
        if host_output.shape != run.output.shape:
            raise DeployError(f"the board returned shape {run.output.shape}, the host {host_output.shape}")
        diff = float(np.max(np.abs(run.output.astype(np.float64) - host_output))) if run.output.size else 0.0
        tol = REL_TOLERANCE * max(float(np.max(np.abs(host_output))), 1.0)
    return DeployReport(art.target.name, run.board, run.output, host_output, diff, tol, run.run_ms, run.upload_s,
                        run.attempts, lib_bytes)


def deploy(qmodel: Any, example: Any, target: str = "rasp4b", board: Board | None = None, *, repeat: int = 10,
           compare: bool = True, on_step: Callable[[str], None] = lambda _s: None) -> DeployReport:
    """Compile ``qmodel`` (from ``tvm_lowbit.quantize``, or a float model) for ``target``, run it on the board,
    and compare with the same model compiled for and run on this x86 host."""
    import tvm_lowbit
    from tvm_lowbit.targets import load_target

    spec = load_target(target)
    board = board or Board()
    x = np.ascontiguousarray(np.asarray(example, dtype=np.float32))
    on_step(f"compile for {spec.name}")
    art = tvm_lowbit.compile(qmodel, x, spec)
    host_output = None
    if compare:
        on_step("compile for the host and run there")
        host_output = tvm_lowbit.compile(qmodel, x, "x86-host").run(x)
    return deploy_artifact(art, x, board, host_output=host_output, repeat=repeat, on_step=on_step)
