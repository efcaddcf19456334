"""Imported at start by every Python of the board's RPC server (PYTHONPATH names this folder), its
session workers (``tvm.exec.popen_worker``) included: TVM's work-folder paths are confined to the work
folder (see ../confined_rpc_server.py)."""

from __future__ import annotations

import os

from tvm.support import utils

_relpath = utils.TempDirectory.relpath


def confined_relpath(self: utils.TempDirectory, name: str) -> str:
    root = os.path.realpath(self.temp_dir)
    path = os.path.realpath(_relpath(self, name))
    if os.path.commonpath([root, path]) != root:
        raise PermissionError(f"{name!r} is outside the board's work folder")
    return path


utils.TempDirectory.relpath = confined_relpath  # every server path (workpath, load_module) goes through it
os.umask(0o077)
