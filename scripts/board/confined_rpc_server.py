"""TVM's stock RPC server (``python -m tvm.exec.rpc_server``), confined to its work folder.

A client with the key can upload, download, list, remove and load files by name. The stock server joins
the name to its work folder without a check, so ``download("/etc/shadow")`` or ``"../../x"`` reaches any
file the server's user can read or write. Here every name must stay inside the work folder (else the call
fails with ``PermissionError``), and files are created private (umask 077): ``confine/sitecustomize.py``,
loaded by every Python the server starts (its session workers run in fresh processes). The board runs as the dedicated
unprivileged user that ``scripts/board/setup.sh`` creates, when started by root (tvm_lowbit/deploy/board.py).

    python3 confined_rpc_server.py --host 127.0.0.1 --port 9090 ...   (the rpc_server's arguments)
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

CONFINE = str(Path(__file__).resolve().parent / "confine")

if __name__ == "__main__":
    if "confined_relpath" not in repr(getattr(sys.modules.get("sitecustomize"), "confined_relpath", "")):
        sys.exit(f"confined_rpc_server: start it with PYTHONPATH={CONFINE} (its sitecustomize confines the "
                 "server and the session workers it starts)")
    runpy.run_module("tvm.exec.rpc_server", run_name="__main__", alter_sys=True)
