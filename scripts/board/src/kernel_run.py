"""Call a compiled TVM kernel library on the emulated board (the board's Python runs this file).

    python3 kernel_run.py KERNEL.so ARGS.json NUMBER

ARGS.json: the MetaSchedule argument infos (``ArgInfo.as_json()``: ["TENSOR", dtype, shape] each). The arguments
are filled with small random integers (valid codes for the low-bit kernels, finite floats), then the library's
entry function runs NUMBER times. tvm_lowbit.cost.runner starts it under the board's TCG plugin.
"""

import json
import sys

import numpy as np
import tvm


def main() -> None:
    lib, args_path, number = sys.argv[1:4]
    mod = tvm.runtime.load_module(lib)
    rng = np.random.default_rng(0)
    args = []
    with open(args_path) as f:
        infos = json.load(f)
    for kind, dtype, shape in infos:
        if kind != "TENSOR":
            raise SystemExit(f"kernel_run: argument kind {kind!r} is not supported (only tensors)")
        args.append(tvm.runtime.tensor(rng.integers(-8, 8, size=shape).astype(dtype)))
    func = mod["main"]
    for _ in range(int(number)):
        func(*args)


if __name__ == "__main__":
    main()
