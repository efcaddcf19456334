"""The disk cache of kernels.requant's proof that the division-free quantizer is exact (``binade_exact``, behind
``recip_unexact`` and ``quantize_recip_unexact``): the same answer with and without it, one entry per proof key
under ``$TVM_LOWBIT_CACHE/proofs``, and a damaged or foreign entry never trusted (proven again, rewritten)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tvm_lowbit.kernels import requant

RS = 0.0371


def _entry(folder: Path) -> tuple[Path, dict]:
    files = list(folder.glob("recip-*.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def proven() -> bool:
    """The NumPy proof itself, no cache."""
    return requant.binade_exact(RS)


def test_cached_answer_is_the_proof(tmp_path: Path, proven: bool) -> None:
    assert proven is True  # the rs the tests of test_requant.py prove
    assert requant.binade_exact(RS, tmp_path) is proven  # cold: proven and written
    path, entry = _entry(tmp_path)
    assert entry["exact"] is proven
    assert entry["key"]["rs_float32"] == f"{int(np.float32(RS).view(np.uint32)):08x}"
    assert entry["key"]["numpy"] == np.__version__ and len(entry["key"]["code_sha256"]) == 64
    inode = path.stat().st_ino
    assert requant.binade_exact(RS, tmp_path) is proven  # warm: read, not rewritten
    assert path.stat().st_ino == inode
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left


def test_an_intact_entry_is_what_answers(tmp_path: Path, proven: bool) -> None:
    """The cache is read: an entry with its checksum intact is the answer (here one saying the opposite, which
    only a writer of the cache could make), so the warm path above did not prove again."""
    requant.binade_exact(RS, tmp_path)
    path, entry = _entry(tmp_path)
    entry["exact"] = not proven
    entry["check"] = requant._entry_check(entry["key"], entry["exact"])
    path.write_text(json.dumps(entry))
    assert requant.binade_exact(RS, tmp_path) is (not proven)


def _truncate(text: str) -> str:
    return text[: len(text) // 2]


def _flip(text: str) -> str:  # the result changed, the checksum not
    d = json.loads(text)
    d["exact"] = not d["exact"]
    return json.dumps(d)


def _other_scale(text: str) -> str:  # another scale's entry (with its own valid checksum) under this name
    d = json.loads(text)
    d["key"]["rs_float32"] = f"{int(np.float32(0.5).view(np.uint32)):08x}"
    d["exact"] = not d["exact"]
    d["check"] = requant._entry_check(d["key"], d["exact"])
    return json.dumps(d)


def _int_result(text: str) -> str:
    d = json.loads(text)
    d["exact"] = int(not d["exact"])
    return json.dumps(d)


@pytest.mark.parametrize("damage", [_truncate, _flip, _other_scale, _int_result, lambda t: "", lambda t: "[]",
                                    lambda t: "\x00\xff garbage", lambda t: t.replace('"check"', '"chek"')])
def test_a_damaged_entry_is_proven_again_and_rewritten(tmp_path: Path, proven: bool, damage) -> None:
    requant.binade_exact(RS, tmp_path)
    path, good = _entry(tmp_path)
    path.write_text(damage(path.read_text()))
    assert requant.binade_exact(RS, tmp_path) is proven
    assert _entry(tmp_path) == (path, good)


def test_an_unwritable_cache_only_costs_the_proof(tmp_path: Path, proven: bool) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert requant.binade_exact(RS, blocked / "proofs") is proven
    assert requant.binade_exact(RS, blocked) is proven


def test_the_quantizer_proof_uses_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``quantize_recip_unexact`` answers the same with the cache folder empty and full; its entries go to
    ``$TVM_LOWBIT_CACHE/proofs`` (default ``~/.cache/tvm_lowbit/proofs``)."""
    monkeypatch.setenv("TVM_LOWBIT_CACHE", str(tmp_path / "c"))
    assert requant.proof_cache_dir() == tmp_path / "c" / "proofs"
    rs = 0.012345679  # a scale no other test proves in this process
    assert requant.quantize_recip_unexact(rs, 8, False) is None
    path, entry = _entry(tmp_path / "c" / "proofs")
    assert entry["exact"] is True and entry["key"]["rs_float32"] == f"{int(np.float32(rs).view(np.uint32)):08x}"
    assert requant.binade_exact(rs) is True
    monkeypatch.delenv("TVM_LOWBIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert requant.proof_cache_dir() == tmp_path / "home" / ".cache" / "tvm_lowbit" / "proofs"
