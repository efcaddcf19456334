"""tvm_lowbit.safe_io: outputs staged in unique siblings and renamed; foreign folders refused; hashes checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tvm_lowbit import safe_io


def listing(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


def test_publish_replaces_an_earlier_output_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for text in ("one", "two"):
        safe_io.check_output_dir(out)
        with safe_io.staging_dir(out) as tmp:
            (tmp / "f.txt").write_text(text)
            safe_io.publish_dir(tmp, out)
    assert (out / "f.txt").read_text() == "two" and (out / safe_io.MARKER).is_file()
    assert listing(tmp_path) == ["out", "out/.tvm_lowbit", "out/f.txt"]


def test_failure_cleans_the_staging_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="stop"):
        with safe_io.staging_dir(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("stop")
    assert listing(tmp_path) == []


def test_staging_names_are_unique(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with safe_io.staging_dir(out) as a, safe_io.staging_dir(out) as b:
        assert a != b and a.parent == b.parent == tmp_path
    files = {safe_io.temp_sibling(tmp_path / "m.pt2") for _ in range(5)}
    assert len(files) == 5 and all(f.parent == tmp_path for f in files)


@pytest.mark.parametrize("name,why", [("", "is empty"), (".", "current folder"), ("/", "file system root"),
                                     ("HOME", "home folder"), ("file", "exists and is not a folder"),
                                     ("foreign", "did not write"), ("link", "exists and is not a folder")])
def test_refused_output_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, why: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "foreign")
    path = str(tmp_path / "home") if name == "HOME" else name
    with pytest.raises(safe_io.OutputError, match=why):
        safe_io.check_output_dir(path)


def test_force_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert safe_io.check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a").write_text("x")
    out = safe_io.check_output_dir(tmp_path / "foreign", force=True)
    with safe_io.staging_dir(out) as tmp:
        safe_io.publish_dir(tmp, out, force=True)
    assert listing(out) == [safe_io.MARKER]


def test_publish_checks_again(tmp_path: Path) -> None:
    """A folder that became foreign between the check and the publish is not replaced."""
    out = tmp_path / "out"
    with safe_io.staging_dir(out) as tmp:
        out.mkdir()
        (out / "user.txt").write_text("x")
        with pytest.raises(safe_io.OutputError):
            safe_io.publish_dir(tmp, out)
    assert listing(tmp_path) == ["out", "out/user.txt"]


def test_output_files(tmp_path: Path) -> None:
    (tmp_path / "a.pt2").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    assert safe_io.check_output_file(tmp_path / "a.pt2", ours=(".pt2",)) == tmp_path / "a.pt2"
    with pytest.raises(safe_io.OutputError, match="is not a .pt2 file"):
        safe_io.check_output_file(tmp_path / "notes.txt", ours=(".pt2",))
    safe_io.check_output_file(tmp_path / "notes.txt", force=True, ours=(".pt2",))
    with pytest.raises(safe_io.OutputError, match="is a folder"):
        safe_io.check_output_file(tmp_path)


def test_hash_tree_and_verify(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "model.so").write_bytes(b"abc")
    (tmp_path / "meta.json").write_text("{}")
    hashes = safe_io.hash_tree(tmp_path)
    assert sorted(hashes) == ["model.so", "sub/x.bin"]
    safe_io.verify_tree(tmp_path, hashes)
    (tmp_path / "sub" / "x.bin").write_bytes(b"\x00" * 9 + b"\x01")
    with pytest.raises(safe_io.IntegrityError, match=r"x.bin: its content does not match"):
        safe_io.verify_tree(tmp_path, hashes)
    os.remove(tmp_path / "model.so")
    with pytest.raises(safe_io.IntegrityError, match="model.so: missing"):
        safe_io.verify_tree(tmp_path, {"model.so": hashes["model.so"]})
