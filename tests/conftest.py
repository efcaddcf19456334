"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import helpers such as ddp_worker


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: the small training tests are slower, not faster, with more on
    an oversubscribed 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
