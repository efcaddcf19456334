"""Writing outputs without destroying what we did not create, and reading inputs only after checking them.

Every writer of a folder (``Artifact.export``, ``export --bundle``, ``compile --out``) follows one rule:

1. :func:`check_output_dir` before any long work: the destination must not be ``''``, ``.``, ``/``, the home
   folder or an existing file, and an existing non-empty folder must be a previous output of ours (it holds
   :data:`MARKER`) unless ``force``;
2. the files are written into a fresh, uniquely named sibling (:func:`staging_dir`), removed on any failure;
3. :func:`publish_dir` renames the staged folder into place (an earlier output moves aside under a unique
   name first and is deleted only once the new one is there).

Files (``.pt2``) go through :func:`check_output_file` and :func:`publish_file` the same way.  Content hashes
(:func:`sha256_file`, :func:`hash_tree`) are recorded in the outputs' metadata and checked on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = ".tvm_lowbit"  # in every folder we write: "this folder is ours, it may be replaced"
MARKER_TEXT = "tvm_lowbit output folder: replaced by the next export to this path\n"


class OutputError(ValueError):
    """An output path that would destroy something we did not create (or cannot be written)."""


class IntegrityError(RuntimeError):
    """An input file whose content does not match the hash recorded when it was written."""


def _forbidden(p: Path) -> str | None:
    resolved = p.resolve()
    if resolved == Path(resolved.anchor):
        return "the file system root"
    if resolved == Path.home().resolve():
        return "your home folder"
    if resolved == Path.cwd().resolve():
        return "the current folder"
    return None


def check_output_dir(path: str | os.PathLike[str], force: bool = False, what: str = "--out") -> Path:
    """``path`` as an output folder we may (re)place, or an ``OutputError`` saying why not and what to do.
    Call it before the long work; :func:`publish_dir` checks again."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{what} is empty: give a new folder name, e.g. {what} build/model")
    p = Path(text)
    if (why := _forbidden(p)) is not None:
        raise OutputError(f"{what} {text!r} is {why}: give a new folder name (it would be replaced)")
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise OutputError(f"{what} {text!r} exists and is not a folder: give a new folder name")
    if p.is_dir() and any(p.iterdir()) and not (p / MARKER).is_file() and not force:
        raise OutputError(f"{what} {text!r} is a folder with files that tvm_lowbit did not write: give a new folder "
                          "name, or pass --force (force=True) to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{what} {text!r}: {parent} is not a folder")
    return p


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh, uniquely named, empty folder next to ``out`` (same file system, so a rename publishes it);
    removed again when the block raises (or when it was not published)."""
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: Path, out: Path, force: bool = False) -> Path:
    """Put the folder ``staged`` at ``out``: an earlier output of ours (or anything, with ``force``) moves aside
    under a unique name and is deleted after the rename; anything else stops with an ``OutputError``."""
    check_output_dir(out, force)
    (staged / MARKER).write_text(MARKER_TEXT)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "d")  # the mkdtemp name is unique; the old output goes inside it
    try:
        os.rename(staged, out)
    except BaseException:
        if old is not None:
            os.rename(old / "d", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def check_output_file(path: str | os.PathLike[str], force: bool = False, what: str = "--out",
                      ours: tuple[str, ...] = ()) -> Path:
    """``path`` as an output file: not empty, not a folder; an existing file is replaced only when its name
    ends with one of ``ours`` (a file of ours: ``.pt2``) or with ``force``."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{what} is empty: give a file name, e.g. {what} model.pt2")
    p = Path(text)
    if p.is_dir():
        raise OutputError(f"{what} {text!r} is a folder: give a file name, e.g. {text.rstrip('/')}/model.pt2")
    if p.exists() and not force and not (ours and text.endswith(ours)):
        raise OutputError(f"{what} {text!r} exists and is not a {'/'.join(ours) or 'tvm_lowbit'} file: give a new "
                          "name, or pass --force (force=True) to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{what} {text!r}: {parent} is not a folder")
    return p


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """A new, uniquely named empty file next to ``path`` (the caller renames it over ``path`` or deletes it)."""
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=parent)
    os.close(fd)
    return Path(name)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(directory: Path, exclude: tuple[str, ...] = ("meta.json", MARKER)) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory`` except ``exclude`` (top-level names)."""
    out: dict[str, str] = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def verify_tree(directory: Path, hashes: dict[str, str]) -> None:
    """Raise an ``IntegrityError`` naming the first file under ``directory`` whose sha256 is not ``hashes``'s."""
    for rel, want in sorted(hashes.items()):
        p = directory / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise IntegrityError(f"{directory / 'meta.json'}: the file name {rel!r} points outside the artifact")
        if not p.is_file():
            raise IntegrityError(f"{p}: missing (the artifact is incomplete; export it again)")
        if sha256_file(p) != want:
            raise IntegrityError(f"{p}: its content does not match the sha256 recorded in meta.json (damaged or "
                                 "modified after export); export it again")
