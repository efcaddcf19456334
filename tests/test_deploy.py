"""Deploy reliability without a board: every failure mode gives a clear error within a bounded time.

The boards here are TVM's stock RPC server and tracker running natively on this host (a few seconds to
start, no emulation); the end-to-end test on the emulated Pi is tests/test_board.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tvm_lowbit.deploy.board import _listening, free_port
from tvm_lowbit.deploy.remote import Board, BoardUnavailable, DeployError, run_remote, wait_for_board

X = np.zeros((1, 4), np.float32)


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TVM_NUM_THREADS": "1"})


def _kill(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not _listening(port):
        assert proc.poll() is None, "the server exited during start"
        assert time.time() < deadline, f"nothing listens on port {port} after {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def servers() -> Iterator[list[tuple[subprocess.Popen[bytes], int]]]:
    """Two native RPC servers (direct connection, loopback) and a tracker with no board registered."""
    procs = []
    try:
        for _ in range(2):
            port = free_port()
            procs.append((_spawn(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                                  "--port-end", str(port + 1)]), port))
        tport = free_port()
        procs.append((_spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport),
                              "--port-end", str(tport + 1)]), tport))
        for proc, port in procs:
            _wait_listening(port, proc)
        yield procs
    finally:
        for proc, _ in procs:
            _kill(proc)


@pytest.fixture
def dummy_lib(tmp_path: Path) -> Path:
    lib = tmp_path / "model.so"
    lib.write_bytes(os.urandom(64 << 10))  # never loaded: every test here fails before or at the upload
    return lib


def test_unreachable_tracker_fails_within_the_wait() -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(BoardUnavailable, match=rf"cannot reach the RPC tracker at 127.0.0.1:{port}.*waited 2 s"):
        wait_for_board(f"127.0.0.1:{port}", "rasp4b", wait_s=2)
    assert time.monotonic() - t0 < 5


def test_tracker_without_board_names_the_key(servers, dummy_lib: Path) -> None:
    tracker_port = servers[2][1]
    t0 = time.monotonic()
    with pytest.raises(BoardUnavailable, match=r"no board is registered under key 'rasp4b' \(registered keys: none\)"):
        run_remote(dummy_lib, X, Board(tracker=f"127.0.0.1:{tracker_port}", wait_s=3), "rasp4b")
    assert time.monotonic() - t0 < 8


def test_bad_tracker_address() -> None:
    with pytest.raises(DeployError, match="not HOST:PORT"):
        wait_for_board("localhost", "rasp4b", 1)


def test_direct_connection_refused_is_clear(dummy_lib: Path) -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(BoardUnavailable, match=rf"cannot connect to the RPC server 127.0.0.1:{port}"):
        run_remote(dummy_lib, X, Board(port=port, connect_timeout_s=5), "rasp4b")
    assert time.monotonic() - t0 < 8


def test_board_lost_mid_run_is_retried_then_reported(servers, dummy_lib: Path) -> None:
    proc, port = servers[0]
    steps: list[str] = []

    def pull_the_plug(step: str) -> None:
        steps.append(step)
        if step.startswith("upload") and proc.poll() is None:
            _kill(proc)  # the board (and its session process) dies just before the upload

    t0 = time.monotonic()
    with pytest.raises(DeployError) as e:
        run_remote(dummy_lib, X, Board(port=port, connect_timeout_s=5, step_timeout_s=10, retries=2), "rasp4b",
                   on_step=pull_the_plug)
    msg = str(e.value)
    assert "failed after 2 attempt(s)" in msg and "attempt 1:" in msg and "attempt 2:" in msg, msg
    assert "cannot connect to the RPC server" in msg  # the retry found the board gone
    assert any(s.startswith("retrying after") for s in steps)
    assert time.monotonic() - t0 < 30


def test_hung_board_times_out_on_upload(servers, dummy_lib: Path) -> None:
    proc, port = servers[1]

    def freeze(step: str) -> None:
        if step.startswith("upload"):
            os.killpg(proc.pid, signal.SIGSTOP)  # the board stops answering, the link stays up

    t0 = time.monotonic()
    try:
        with pytest.raises(DeployError) as e:
            run_remote(dummy_lib, X, Board(port=port, connect_timeout_s=2, step_timeout_s=2, retries=1), "rasp4b",
                       on_step=freeze)
    finally:
        _kill(proc)
    msg = str(e.value)
    assert "failed after 2 attempt(s)" in msg, msg
    assert "upload model.so (64 KiB): no answer in 2 s" in msg
    assert "connect to 127.0.0.1" in msg and "no answer in 2 s" in msg.split("attempt 2:")[1]
    assert time.monotonic() - t0 < 50  # 2 s bounds, plus a worker process (spawned, importing TVM) per attempt


def test_cli_deploy_fails_fast_without_tracker(capsys) -> None:
    from tvm_lowbit.cli import main

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:  # before any compiling
        main(["deploy", "--tracker", f"127.0.0.1:{port}", "--wait", "1"])
    assert e.value.code == 2
    assert f"cannot reach the RPC tracker at 127.0.0.1:{port}" in capsys.readouterr().err
    assert time.monotonic() - t0 < 5
