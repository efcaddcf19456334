"""Run an ONNX model with ONNX Runtime on the emulated board (the board's Python runs this file).

    python3 ort_run.py MODEL.onnx INPUT.bin 1x1x28x28 RUNS OUTPUT.bin

One intra-op and one inter-op thread, sequential execution, the CPU execution provider; the input is raw
float32, the first output is written as raw float32. tvm_lowbit.deploy.board.run_ort starts it.
"""

import sys

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, x_path, shape, runs, out_path = sys.argv[1:6]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    x = np.fromfile(x_path, dtype=np.float32).reshape([int(d) for d in shape.split("x")])
    feed = {sess.get_inputs()[0].name: x}
    y = None
    for _ in range(int(runs)):
        y = sess.run(None, feed)[0]
    np.ascontiguousarray(y, dtype=np.float32).tofile(out_path)


if __name__ == "__main__":
    main()
