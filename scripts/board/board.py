#!/usr/bin/env python3
"""Start, stop and query emulated Raspberry Pi boards (build them first with scripts/board/setup.sh).

    python scripts/board/board.py start                       # tracker 127.0.0.1:9190 + one Pi 4 board, key rasp4b
    python scripts/board/board.py start --boards 2            # two boards under the key (parallel sessions)
    python scripts/board/board.py start --target rasp5 --name pi5 --rpc-port 9100 --tracker-port 9191
    python scripts/board/board.py status [--name NAME]
    python scripts/board/board.py stop [--name NAME]

Boards listen on loopback unless --host says otherwise. `start` returns when every board is registered.
Run it with the project's Python (.venv/bin/python): the tracker runs there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tvm_lowbit.deploy.board import BoardError, start, status, stop  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("start", "stop", "status", "restart"))
    ap.add_argument("--name", default="default", help="instance name: several instances can run side by side")
    ap.add_argument("--target", default="rasp4b", help="board to emulate: rasp4b (cortex-a72) or rasp5 (cortex-a76)")
    ap.add_argument("--boards", type=int, default=1, help="boards registered under the key (default 1)")
    ap.add_argument("--key", default=None, help="tracker key (default: the target name)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 exposes it)")
    ap.add_argument("--rpc-port", type=int, default=9090, help="first board's port (default 9090)")
    ap.add_argument("--tracker-port", type=int, default=9190, help="tracker port (default 9190)")
    ap.add_argument("--no-tracker", action="store_true", help="no tracker: connect to the board directly")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the boards (default 240)")
    a = ap.parse_args()
    try:
        if a.action in ("stop", "restart"):
            stop(a.name)
        if a.action in ("start", "restart"):
            if a.boards < 1:
                raise BoardError("--boards must be at least 1")
            st = start(a.name, a.target, a.boards, a.key, a.host, a.rpc_port,
                       None if a.no_tracker else a.tracker_port, a.timeout)
            if st.tracker:
                print(f"deploy with: tvm-lowbit deploy --target {st.target} --tracker {st.tracker} --key {st.key}")
            else:
                print(f"deploy with: tvm-lowbit deploy --target {st.target} --host {st.host} --port {st.rpc_ports[0]}")
        if a.action == "status":
            info = status(a.name)
            print(json.dumps(info, indent=2))
            return 0 if info["running"] else 3
    except BoardError as e:
        print(f"board: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
