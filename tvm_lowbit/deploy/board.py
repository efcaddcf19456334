"""The emulated Raspberry Pi: start, stop and query boards built by ``scripts/board/setup.sh``.

A board is TVM's stock RPC server (``python -m tvm.exec.rpc_server``) running as aarch64 code under
``qemu-aarch64 -cpu <the target's qemu_cpu>`` (cortex-a72 for a Pi 4), registered with a TVM RPC tracker
on the host under a key (the target name by default). Several boards can serve one key, one session each.

Everything here is plain Python (no TVM import), so ``scripts/board/board.py`` starts quickly. Every process
is started in its own session and tagged with ``TVM_LOWBIT_BOARD_RUN=<its run folder>`` in its environment;
``stop`` kills the recorded process groups, then any process that still carries the tag (a forked RPC
session, a popen worker), and checks that none is left.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tvm_lowbit.targets import load_target

REPO = Path(__file__).resolve().parents[2]
TAG = "TVM_LOWBIT_BOARD_RUN"
# tvm.rpc.base: RPC_TRACKER_MAGIC and TrackerCode.SUMMARY / SUCCESS
_TRACKER_MAGIC, _SUMMARY, _SUCCESS = 0x2F271, 6, 0


class BoardError(RuntimeError):
    pass


def board_dir() -> Path:
    """Where ``scripts/board/setup.sh`` builds the board (``TVM_LOWBIT_BOARD_DIR``, default ``<repo>/.board``)."""
    return Path(os.environ.get("TVM_LOWBIT_BOARD_DIR", REPO / ".board"))


def require_board() -> Path:
    d = board_dir()
    if not (d / "bin" / "python3").is_file():
        raise BoardError(f"no emulated board in {d}: build it with `bash {REPO / 'scripts/board/setup.sh'}` "
                         "(about a minute; set TVM_LOWBIT_BOARD_DIR to build it elsewhere)")
    return d


def qemu_cpu(target: str) -> str:
    spec = load_target(target)
    if spec.arch != "aarch64" or not spec.qemu_cpu:
        raise BoardError(f"target {spec.name!r} ({spec.arch}) has no emulated board: the board is aarch64 "
                         "(rasp4b: cortex-a72, rasp5: cortex-a76)")
    return spec.qemu_cpu


# --------------------------------------------------------------------------------------------
# the tracker's wire protocol, enough for its summary (no TVM import)
# --------------------------------------------------------------------------------------------

def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the tracker closed the connection")
        buf += chunk
    return buf


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict[str, Any]:
    """The tracker's ``summary()``: ``queue_info`` {key: {free, pending}} and ``server_info``."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(struct.pack("<i", _TRACKER_MAGIC))
        if struct.unpack("<i", _recv_exact(s, 4))[0] != _TRACKER_MAGIC:
            raise ConnectionError(f"{host}:{port} is not a TVM RPC tracker")
        msg = json.dumps([_SUMMARY]).encode()
        s.sendall(struct.pack("<i", len(msg)) + msg)
        size = struct.unpack("<i", _recv_exact(s, 4))[0]
        code, value = json.loads(_recv_exact(s, size))
        if code != _SUCCESS:
            raise ConnectionError(f"tracker {host}:{port} answered {code} to a summary request")
        return value


def boards_under_key(summary: dict[str, Any], key: str) -> tuple[int, int]:
    """(registered, free) boards of ``key`` in a tracker summary."""
    registered = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{key}")
    return registered, int(summary.get("queue_info", {}).get(key, {}).get("free", 0))


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Is a TCP socket listening on ``port``? Read from /proc/net: connecting to an RPC server to find out
    would make it drop and redo its tracker registration."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(r.split()[1].endswith(suffix) and r.split()[3] == "0A" for r in rows):
            return True
    return False


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------

@dataclass
class BoardState:
    """What ``start`` launched, saved in ``<board dir>/run/<name>/state.json``."""

    name: str
    target: str
    key: str
    cpu: str
    host: str
    rpc_ports: list[int]
    tracker_port: int | None
    pids: dict[str, int] = field(default_factory=dict)
    started_s: float = 0.0

    @property
    def tracker(self) -> str | None:
        return None if self.tracker_port is None else f"{self.host}:{self.tracker_port}"


def run_dir(name: str) -> Path:
    return board_dir() / "run" / name


def load_state(name: str) -> BoardState | None:
    path = run_dir(name) / "state.json"
    if not path.is_file():
        return None
    return BoardState(**json.loads(path.read_text()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def tagged_processes(rundir: Path) -> list[int]:
    """Processes whose environment carries this run's tag: everything the board started, forks included."""
    needle = f"{TAG}={rundir}\0".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "environ").read_bytes() and _alive(int(p.name)):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def _spawn(argv: list[str], log: Path, env: dict[str, str], user: pwd.struct_passwd | None = None) -> int:
    ids: dict[str, Any] = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=log.parent, **ids)
    return proc.pid


# the unprivileged user a board's RPC server runs as when root starts it (created by scripts/board/setup.sh)
BOARD_USER = "tvm-lowbit-board"


def board_user(python: Path, script: Path, workdir: Path, log: Any = print) -> pwd.struct_passwd | None:
    """The user to run the boards as: ``BOARD_USER`` when root starts them and that user can run the board's
    Python, read the server script and write the work folder; else None (this process's user)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(BOARD_USER)
    except KeyError:
        log(f"note: the boards run as root (confined to their work folder); `bash scripts/board/setup.sh` "
            f"creates the user {BOARD_USER} to run them unprivileged")
        return None
    check = subprocess.run(["/bin/sh", "-c", 'test -x "$1" && test -r "$2" && test -w "$3"', "sh", str(python),
                            str(script), str(workdir)], user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                           capture_output=True, timeout=30)
    if check.returncode != 0:
        log(f"note: the boards run as root: {BOARD_USER} cannot run {python}, read {script} or write {workdir} "
            "(rerun scripts/board/setup.sh as root)")
        return None
    return user


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in lines[-n:])


def start(name: str = "default", target: str = "rasp4b", boards: int = 1, key: str | None = None,
          host: str = "127.0.0.1", rpc_port: int = 9090, tracker_port: int | None = 9190,
          timeout: float = 240.0, log: Any = print) -> BoardState:
    """Start a tracker (unless ``tracker_port`` is None) and ``boards`` emulated boards; return once every
    board is listening and, with a tracker, registered and free. Idempotent for a running instance."""
    bdir = require_board()
    cpu = qemu_cpu(target)
    key = key or load_target(target).name
    rundir = run_dir(name)
    old = load_state(name)
    if old is not None:
        if all(_alive(p) for p in old.pids.values()):
            log(f"board '{name}' is already running: key {old.key}, boards on {old.host}:{old.rpc_ports}, "
                f"tracker {old.tracker or 'none'}")
            return old
        stop(name, log=lambda *_: None)  # half-dead leftovers of an earlier run
    ports = list(range(rpc_port, rpc_port + boards))
    for p in ports + ([tracker_port] if tracker_port is not None else []):
        if port_in_use(host, p):
            raise BoardError(f"port {p} on {host} is in use (another board? `python scripts/board/board.py "
                             "status`); choose other ports with --rpc-port/--tracker-port")
    rundir.mkdir(parents=True, exist_ok=True)
    for old_log in rundir.glob("*.log"):
        old_log.unlink()
    env = {**os.environ, TAG: str(rundir)}
    state = BoardState(name, load_target(target).name, key, cpu, host, ports, tracker_port)
    t0 = time.time()
    try:
        if tracker_port is not None:
            # the tracker needs no compiler: TVM_USE_RUNTIME_LIB makes its import faster
            state.pids["tracker"] = _spawn(
                [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(tracker_port),
                 "--port-end", str(tracker_port + 1)], rundir / "tracker.log", {**env, "TVM_USE_RUNTIME_LIB": "1"})
        server = REPO / "scripts" / "board" / "confined_rpc_server.py"
        user = board_user(bdir / "bin" / "python3", server, bdir / "tmp", log)
        for i, port in enumerate(ports):
            # TVM's server confined to its work folder (scripts/board/confined_rpc_server.py)
            argv = [str(bdir / "bin" / "python3"), str(server),
                    "--host", host, "--port", str(port), "--port-end", str(port + 1)]
            if tracker_port is not None:
                argv += ["--tracker", f"{host}:{tracker_port}", "--key", key]
            else:
                argv += ["--key", key]
            # the board's python3 wrapper drops the host's PYTHONPATH and takes BOARD_PYTHONPATH instead
            confine = str(REPO / "scripts" / "board" / "confine")
            state.pids[f"board-{i}"] = _spawn(argv, rundir / f"board-{i}.log",
                                              {**env, "BOARD_CPU": cpu, "BOARD_PYTHONPATH": confine}, user)
        (rundir / "state.json").write_text(json.dumps(asdict(state), indent=2))
        _wait_ready(state, rundir, t0 + timeout, log)
    except BaseException:
        stop(name, log=lambda *_: None)
        raise
    state.started_s = round(time.time() - t0, 1)
    (rundir / "state.json").write_text(json.dumps(asdict(state), indent=2))
    where = f"registered with the tracker {state.tracker} under key '{key}'" if tracker_port is not None else \
        f"listening on {host}:{ports[0]} (direct connection, key '{key}')"
    log(f"board ready in {state.started_s} s: {boards} emulated {state.target} board(s) (qemu -cpu {cpu}) {where}")
    return state


def _wait_ready(state: BoardState, rundir: Path, deadline: float, log: Any) -> None:
    def check_alive() -> None:
        for what, pid in state.pids.items():
            if not _alive(pid):
                raise BoardError(f"the {what} process exited during start; its log ({rundir / (what + '.log')}):\n"
                                 + _tail(rundir / f"{what}.log"))

    pending = set(state.rpc_ports)
    while pending:
        check_alive()
        pending = {p for p in pending if not _listening(p)}
        if pending and time.time() > deadline:
            raise BoardError(f"board(s) on port(s) {sorted(pending)} did not start listening in time; log:\n"
                             + _tail(rundir / "board-0.log"))
        time.sleep(0.3)
    if state.tracker_port is None:
        return
    want = len(state.rpc_ports)
    while True:
        check_alive()
        try:
            if boards_under_key(tracker_summary(state.host, state.tracker_port), state.key)[1] >= want:
                return
        except OSError:
            pass  # the tracker is still importing tvm
        if time.time() > deadline:
            raise BoardError(f"the board(s) never registered as '{state.key}' with the tracker; logs:\n"
                             + _tail(rundir / "tracker.log") + "\n" + _tail(rundir / "board-0.log"))
        time.sleep(0.3)


def stop(name: str = "default", log: Any = print, grace: float = 5.0) -> list[int]:
    """Stop the instance: its process groups, then any straggler that carries its tag. Returns the pids
    that were still running. Raises if a process survives SIGKILL."""
    rundir = run_dir(name)
    state = load_state(name)
    pids = sorted(set((state.pids.values() if state else [])) | set(tagged_processes(rundir)))
    running = [p for p in pids if _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in running:
            for kill in (lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)):
                try:
                    kill()
                    break
                except (ProcessLookupError, PermissionError):
                    continue
        deadline = time.time() + grace
        while time.time() < deadline:
            running = [p for p in set(running) | set(tagged_processes(rundir)) if _alive(p)]
            if not running:
                break
            time.sleep(0.1)
        if not running:
            break
    for pid in pids:  # reap the ones this process started (a test that starts and stops a board)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    left = [p for p in set(running) | set(tagged_processes(rundir)) if _alive(p)]
    if left:
        raise BoardError(f"processes {left} of board '{name}' survived SIGKILL")
    if (rundir / "state.json").exists():
        (rundir / "state.json").unlink()
    log(f"board '{name}' stopped ({len(pids)} process(es) ended)" if pids else f"board '{name}' was not running")
    return pids


def status(name: str = "default") -> dict[str, Any]:
    """Which processes of the instance run, and what its tracker says."""
    state = load_state(name)
    if state is None:
        return {"name": name, "running": False, "stray_processes": tagged_processes(run_dir(name))}
    info: dict[str, Any] = {"name": name, **asdict(state),
                            "alive": {what: _alive(pid) for what, pid in state.pids.items()}}
    info["running"] = all(info["alive"].values())
    if state.tracker_port is not None:
        try:
            registered, free = boards_under_key(tracker_summary(state.host, state.tracker_port), state.key)
            info["tracker_boards"] = {"registered": registered, "free": free}
        except OSError as e:
            info["tracker_boards"] = f"tracker unreachable: {e}"
    return info


# --------------------------------------------------------------------------------------------
# running a program on the board directly (no RPC): the bundle runner, instruction counting
# --------------------------------------------------------------------------------------------

def board_exec(argv: list[str], cpu: str, *, plugin: str | None = None, threads: int = 1, timeout: float = 600,
               cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an aarch64 program under the board's qemu with ``-cpu cpu`` (and a TCG plugin)."""
    bdir = require_board()
    env = {**os.environ, "BOARD_CPU": cpu, "TVM_NUM_THREADS": str(threads), "BOARD_QEMU_ARGS": ""}
    if plugin:
        env["BOARD_QEMU_ARGS"] = f"-plugin {plugin}"
    try:
        return subprocess.run([str(bdir / "bin" / "board-exec"), *argv], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise BoardError(f"{Path(argv[0]).name} did not finish on the emulated board in {timeout:.0f} s") from e


def icount_plugin() -> Path:
    p = require_board() / "plugins" / "libicount.so"
    if not p.is_file():
        raise BoardError(f"{p} is missing: run scripts/board/setup.sh")
    return p


# --------------------------------------------------------------------------------------------
# ONNX Runtime on the board (cross-installed by setup.sh), for the int8 baseline
# --------------------------------------------------------------------------------------------

ORT_RUN = REPO / "scripts" / "board" / "src" / "ort_run.py"
# the ORT library whose instructions are counted: the pybind module links ORT and its MLAS kernels statically
ORT_LIBRARY = "/onnxruntime_pybind11_state"
# what repeatable counts of the board Python need (shared/board/ORT.md): no telemetry thread, one numpy thread,
# a fixed string hash
ORT_ENV = {"ORT_DISABLE_TELEMETRY": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def require_ort(cpu: str) -> Path:
    """The core's sysroot, checked to have onnxruntime and the Pi's /proc/cpuinfo (setup.sh builds both)."""
    root = require_board() / f"sysroot-{cpu}"
    site = root / "usr" / "local" / "lib" / "python3.11" / "dist-packages"
    if not (root / "proc" / "cpuinfo").is_file() or not (site / "onnxruntime" / "capi").is_dir():
        raise BoardError(f"{root} has no onnxruntime or no Pi /proc/cpuinfo: re-run `bash "
                         f"{REPO / 'scripts/board/setup.sh'}` (it cross-installs onnxruntime per emulated core)")
    return root


def run_ort(model: str | os.PathLike[str], x_path: str | os.PathLike[str], shape: tuple[int, ...], out_path: str |
            os.PathLike[str], cpu: str, runs: int, *, plugin: str | None = None,
            timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run an ONNX model ``runs`` times with ONNX Runtime (one thread) in the board's Python under ``-cpu cpu``.
    Every argument has the same length whatever ``runs`` is (up to 999), so counts of two runs differ only by
    the inferences."""
    require_ort(cpu)
    if not 0 < runs < 1000:
        raise BoardError(f"runs must be 1..999, not {runs}")
    env = {**os.environ, **ORT_ENV, "BOARD_CPU": cpu, "BOARD_QEMU_ARGS": f"-plugin {plugin}" if plugin else ""}
    argv = [str(require_board() / "bin" / "python3"), str(ORT_RUN), str(model), str(x_path),
            "x".join(map(str, shape)), f"{runs:03d}", str(out_path)]
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BoardError(f"onnxruntime did not finish {runs} run(s) of {model} on -cpu {cpu} in {timeout:.0f} s") from e
