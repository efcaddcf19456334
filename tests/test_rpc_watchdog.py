"""The RPC watchdog: every attempt of a deploy runs in a worker process that this process kills when a step
gets no answer, so a stopped board (SIGSTOP) or a stuck RPC call can never hang the caller. The boards are
TVM's stock RPC server, started here on 127.0.0.1 (loopback only) and stopped with SIGSTOP."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tvm_lowbit.deploy.board import free_port
from tvm_lowbit.deploy.remote import Board, DeployError, run_remote

X = np.zeros((1, 4), np.float32)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TVM_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not _listening(port):
            assert proc.poll() is None and time.time() < deadline, "the RPC server did not start"
            time.sleep(0.2)
        yield proc, port
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


@pytest.fixture
def lib(tmp_path: Path) -> Path:
    p = tmp_path / "model.so"
    p.write_bytes(os.urandom(32 << 10))
    return p


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_stopped_board_mid_run_is_abandoned_and_retried(server, lib: Path) -> None:
    proc, port = server
    workers: list[int] = []

    def stop_the_board(step: str) -> None:
        workers.extend(p.pid for p in multiprocessing.active_children() if p.pid not in workers)
        if step.startswith("upload"):
            os.killpg(proc.pid, signal.SIGSTOP)  # the board stops answering mid-run; the link stays up

    t0 = time.monotonic()
    with pytest.raises(DeployError) as e:
        run_remote(lib, X, Board(port=port, connect_timeout_s=2, step_timeout_s=3, retries=1), "rasp4b",
                   on_step=stop_the_board)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "failed after 2 attempt(s)" in msg and "no answer in 3 s" in msg, msg
    assert took < 50, f"took {took:.0f} s"
    assert workers and all(_gone(pid) for pid in workers), "a worker process was left behind"
    assert not multiprocessing.active_children()


def test_a_worker_stuck_in_rpc_is_killed(server, lib: Path) -> None:
    """The worker itself stops (as a call stuck on the session's mutex would): its own bounds cannot fire;
    the watchdog kills it after the step's bound."""
    _, port = server
    stuck: list[int] = []

    def freeze_the_worker(step: str) -> None:
        if step.startswith("upload"):
            for p in multiprocessing.active_children():
                stuck.append(p.pid)
                os.kill(p.pid, signal.SIGSTOP)

    t0 = time.monotonic()
    with pytest.raises(DeployError) as e:
        run_remote(lib, X, Board(port=port, connect_timeout_s=2, step_timeout_s=1, retries=0), "rasp4b",
                   on_step=freeze_the_worker)
    took = time.monotonic() - t0
    assert "the RPC worker process was killed" in str(e.value) and "upload model.so" in str(e.value), str(e.value)
    assert took < 50, f"took {took:.0f} s"
    assert stuck and all(_gone(pid) for pid in stuck)


def test_only_loopback_servers_in_these_tests(server) -> None:
    import socket

    _, port = server
    addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None) if a[4][0] not in ("127.0.0.1", "::1")}
    for a in addrs:
        with socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET) as s:
            s.settimeout(0.5)
            assert s.connect_ex((a, port)) != 0, f"the test server answers on {a}"


def test_the_board_server_serves_only_its_work_folder(tmp_path: Path) -> None:
    """scripts/board/confined_rpc_server.py (the board's server; here with this host's TVM on loopback):
    upload/download inside the work folder work, names outside it are refused."""
    from tvm import rpc

    script = Path(__file__).resolve().parents[1] / "scripts" / "board" / "confined_rpc_server.py"
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TVM_NUM_THREADS": "1", "PYTHONPATH":
                                                         f"{script.parent / 'confine'}:{os.environ.get('PYTHONPATH', '')}"})
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the board's clients")
    try:
        deadline = time.time() + 120
        while not _listening(port):
            assert proc.poll() is None and time.time() < deadline, "the confined RPC server did not start"
            time.sleep(0.2)
        sess = rpc.connect("127.0.0.1", port, session_timeout=60)
        sess.upload(bytearray(b"abc"), "ok.bin")
        assert bytes(sess.download("ok.bin")) == b"abc"
        for name in (str(secret), "../" * 12 + str(secret).lstrip("/"), "/etc/passwd"):
            with pytest.raises(Exception, match="outside the board's work folder"):
                sess.download(name)
            with pytest.raises(Exception, match="outside the board's work folder"):
                sess.upload(bytearray(b"x"), name)
        assert secret.read_text() == "not for the board's clients"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
