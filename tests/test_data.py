"""The Fashion-MNIST reader: IDX parsing, the missing-data message, calibration sampling."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from tvm_lowbit import data


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def fake_dataset(d: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_reads_idx_and_normalizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dataset(tmp_path)
    monkeypatch.setenv("TVM_LOWBIT_DATA", str(tmp_path))
    x, y = data.load("test", limit=4, offset=1)
    assert x.shape == (4, 1, 28, 28) and x.dtype == np.float32 and y.shape == (4,)
    raw, _ = data.load_split("test")
    np.testing.assert_allclose(x[0, 0], (raw[1] / 255.0 - data.MEAN) / data.STD, rtol=1e-5, atol=1e-6)
    c1, c2 = data.calibration_set(3, seed=1), data.calibration_set(3, seed=1)
    np.testing.assert_array_equal(c1, c2)  # fixed seed, training split


def test_missing_data_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVM_LOWBIT_DATA", str(tmp_path))
    monkeypatch.setattr(data, "DEFAULT_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(data.DataMissingError, match="apt-get install dataset-fashion-mnist"):
        data.load("test")


def test_corrupt_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dataset(tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x01\x02")  # says 10, holds 2
    monkeypatch.setenv("TVM_LOWBIT_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="expected 10 bytes"):
        data.load("test")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split("validation")


def test_real_fashion_mnist_is_installed() -> None:
    x, y = data.load_split("test")
    assert x.shape == (10000, 28, 28) and sorted(set(y.tolist())) == list(range(10))

