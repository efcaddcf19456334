"""A warm kernel runner on the emulated board: the board's Python starts once (importing TVM under qemu takes
10-30 s), then runs one candidate kernel library per request, each in a forked child, so that the TCG plugin's
exit report (``blocks=FILE``) covers exactly one candidate (qemu-user runs the plugin's exit callback in the
child when it exits).

    python3 kernel_server.py

Requests, one JSON line each on stdin: {"lib": KERNEL.so, "args": [["TENSOR", dtype, shape], ...], "number": N}.
The child loads the library, fills the arguments with small random integers (valid codes for the low-bit kernels,
finite floats), calls its entry function ``main`` N times and exits; the parent answers one JSON line on stdout,
{"status": the child's wait status} (0: success), after the child is gone (and the plugin has written its files).
A line "ready" on stdout says the server is up. tvm_lowbit.cost.runner drives it.
"""

import json
import os
import sys
import traceback

import numpy as np
import tvm


def run_one(request: dict) -> None:
    mod = tvm.runtime.load_module(request["lib"])
    rng = np.random.default_rng(0)
    args = []
    for kind, dtype, shape in request["args"]:
        if kind != "TENSOR":
            raise SystemExit(f"kernel_server: argument kind {kind!r} is not supported (only tensors)")
        args.append(tvm.runtime.tensor(rng.integers(-8, 8, size=shape).astype(dtype)))
    func = mod["main"]
    for _ in range(int(request["number"])):
        func(*args)


def main() -> None:
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_one(request)
            except BaseException:  # noqa: BLE001 - any failure is the candidate's
                traceback.print_exc(file=sys.stderr)
                code = 1
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"status": status}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
