"""Shared test fixtures: the emulated board (built once a session, one board Python per core for every board
test), and the tiny model of the tuning tests with its x86 database (tuned once a session).

The default suite runs on two pytest-xdist workers (pyproject.toml's addopts: ``--numprocesses auto --maxprocesses 2
--dist loadfile``): a test file runs whole on one worker (its module fixtures are built once), and the session
fixtures here are per worker and safe side by side: the board is built under a lock, the tuned database lives in
the worker's own temporary folder. ``-n 0`` runs the suite in one process; without pytest-xdist
(``-p no:xdist``, or not installed) the xdist options of addopts are accepted and ignored (docs/testing.md)."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import helpers such as ddp_worker

from helpers import BoardPythons  # noqa: E402  (found through the path above)

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """Without pytest-xdist (``-p no:xdist``, or an environment set up before it was a test dependency) the
    xdist options in addopts are accepted and ignored: the suite runs in this one process."""
    if pluginmanager.hasplugin("xdist"):
        return
    group = parser.getgroup("xdist (not loaded)")
    group.addoption("--numprocesses", dest="numprocesses", default=None, help="ignored: pytest-xdist is not loaded")
    group.addoption("--maxprocesses", dest="maxprocesses", default=None, help="ignored: pytest-xdist is not loaded")
    group.addoption("--dist", dest="dist", default="no", help="ignored: pytest-xdist is not loaded")


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: the small training tests are slower, not faster, with more on
    an oversubscribed 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def board_built() -> Path:
    """The emulated board (scripts/board/setup.sh: ~1 min the first time, a few seconds after), once a session.
    Built under a lock on its folder: two xdist workers (or two sessions) never run the setup at the same time;
    the second finds it built and returns in a second."""
    from tvm_lowbit.deploy import board as emu

    key = hashlib.sha1(str(emu.board_dir().resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"tvm_lowbit-board-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        r = subprocess.run(["bash", str(REPO / "scripts" / "board" / "setup.sh")], capture_output=True, text=True,
                           timeout=1200)
    assert r.returncode == 0, f"scripts/board/setup.sh failed:\n{r.stderr[-4000:]}"
    return emu.require_board()


@pytest.fixture(scope="session")
def board_python(board_built: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BoardPythons]:
    """The board's Python, one per emulated core, shared by the board tests: ``board_python.run(tmp_path, feeds,
    cpu)`` runs the kernels ``tmp_path/<name>.so`` on their feeds (helpers.BOARD_SERVER)."""
    pythons = BoardPythons(board_built, tmp_path_factory.mktemp("board-python"))
    yield pythons
    pythons.close()


@pytest.fixture(scope="session")
def tiny_fgq() -> tuple[nn.Module, np.ndarray]:
    """Two 3x3 convs and a linear on 8x8 inputs, FGQ with a float stem: its tasks are the ternary conv and the
    activation quantizer (tests/test_tune.py, tests/test_tune_judge.py); (model, one input)."""
    from tvm_lowbit import FGQ, quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    calib = torch.randn(16, 8, 8, 8)
    q = quantize(model, FGQ(group_size=4, act_bits=8, first_layer="float"), calib, progress=False)
    return q, calib[:1].numpy()


@pytest.fixture(scope="session")
def tiny_tuned(tiny_fgq, tmp_path_factory: pytest.TempPathFactory):
    """``tiny_fgq`` tuned on this host, 3 trials a task (kernels only): (database folder, TuneReport). Shared by
    the session: a test that writes into a database works on its own copy."""
    from tvm_lowbit import tune

    q, x = tiny_fgq
    d = tmp_path_factory.mktemp("sched") / "x86-host"
    rep = tune.tune(q, x, "x86-host", trials_per_task=3, work_dir=d, only_kernels=True, progress=False, seed=0)
    return d, rep
