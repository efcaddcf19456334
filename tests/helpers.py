"""Helpers shared by the test files: readiness checks for the emulated board and llvm-mca, one long-lived board
Python per emulated core that runs the compiled kernels of every board test (one qemu launch and one TVM import
on the board for all of them, instead of one per test), and the built-in ResNet-20 quantized once per
configuration in a session."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import IO

import numpy as np
from torch import nn

from tvm_lowbit import FGQ, data, quantize
from tvm_lowbit.cost import mca
from tvm_lowbit.deploy import board as emu
from tvm_lowbit.models import load_pretrained

REPO = Path(__file__).resolve().parent.parent

# The board side: reads one request a line ({"feeds": npz path, "dir": folder}), runs every kernel
# ``<dir>/<name>.so`` of the feeds (inputs ``<name>/0``, ``<name>/1``, ...; the last one is the output buffer)
# and saves each output as ``<dir>/<name>.out.npy``; answers one ``RESULT`` line (ok, or the traceback).
BOARD_SERVER = """
import json, sys, traceback
import numpy as np, tvm
for line in sys.stdin:
    req = json.loads(line)
    try:
        with np.load(req["feeds"]) as d:
            names = sorted({k.split("/")[0] for k in d.files})
            for name in names:
                n = sum(k.startswith(name + "/") for k in d.files)
                args = [tvm.runtime.tensor(d[f"{name}/{i}"]) for i in range(n)]
                tvm.runtime.load_module(f"{req['dir']}/{name}.so")[name](*args)
                np.save(f"{req['dir']}/{name}.out.npy", args[-1].numpy())
        res = {"ok": True, "error": ""}
    except BaseException:
        res = {"ok": False, "error": traceback.format_exc()}
    print("RESULT " + json.dumps(res), flush=True)
"""


def board_ready() -> bool:
    """The emulated board with its instruction-count plugin is built (scripts/board/setup.sh)."""
    d = emu.board_dir()
    return (d / "plugins" / "libicount.so").is_file() and (d / "bin" / "board-exec").is_file()


def mca_ready() -> bool:
    """llvm-mca (>= 17) answers: the cycle estimate can run."""
    try:
        mca.llvm_version()
    except mca.CostError:
        return False
    return True


def has_cross_gcc() -> bool:
    return shutil.which("aarch64-linux-gnu-gcc") is not None


class _Server:
    def __init__(self, board: Path, cpu: str, threads: int, log: Path) -> None:
        self.log = log
        self._err: IO[str] = log.open("a")
        self.proc = subprocess.Popen([str(board / "bin" / "python3"), "-u", "-c", BOARD_SERVER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env={**os.environ, "BOARD_CPU": cpu, "TVM_NUM_THREADS": str(threads)})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output: the board's Python exited

    def request(self, feeds: Path, folder: Path, timeout: float) -> tuple[bool, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"feeds": str(feeds), "dir": str(folder)}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self.close()
                return False, f"the board ran past {timeout} s"
            if not line:  # a kernel crashed the board's Python
                self.proc.wait(timeout=30)
                return False, f"the board's Python exited ({self.proc.returncode}):\n{self.tail()}"
            if line.startswith("RESULT "):
                res = json.loads(line[len("RESULT "):])
                return res["ok"], res["error"][-3000:]

    def tail(self) -> str:
        self._err.flush()
        return self.log.read_text()[-3000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if not self._err.closed:
            self._err.close()


class BoardPythons:
    """The board's Python (qemu-user), one per (emulated core, TVM threads), started on first use and kept for
    the session; a run that crashes it starts a fresh one for the next."""

    def __init__(self, board: Path, logs: Path) -> None:
        self.board, self.logs = board, logs
        self.servers: dict[tuple[str, int], _Server] = {}

    def run(self, folder: Path, feeds: dict[str, np.ndarray], cpu: str, threads: int = 2,
            timeout: float = 600) -> tuple[bool, str]:
        """Save ``feeds`` to ``folder/feeds.npz`` and run each kernel ``folder/<name>.so`` on its inputs on the
        emulated ``cpu`` (a qemu -cpu name); outputs land in ``folder/<name>.out.npy``. (ok, the board's error)."""
        np.savez(folder / "feeds.npz", **feeds)
        key = (cpu, threads)
        server = self.servers.get(key)
        if server is None or not server.alive():
            server = _Server(self.board, cpu, threads, self.logs / f"board-{cpu}-{threads}.log")
            self.servers[key] = server
        return server.request(folder / "feeds.npz", folder, timeout)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


_QUANTIZED: dict[tuple[int, str], nn.Module] = {}


def builtin_fgq(config: FGQ, calib_n: int) -> nn.Module:
    """The built-in ResNet-20 quantized with ``config`` on ``data.calibration_set(calib_n)`` (deterministic):
    quantized once a session per configuration (equal configurations share it), a fresh copy for each caller."""
    key = (calib_n, repr(config))
    if key not in _QUANTIZED:
        _QUANTIZED[key] = quantize(load_pretrained(), config, data.calibration_set(calib_n), progress=False)
    return copy.deepcopy(_QUANTIZED[key])


@functools.cache
def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as the module ``name`` (its dataclasses look their module up in
    ``sys.modules``), once a session."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
