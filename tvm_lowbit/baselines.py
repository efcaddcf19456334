"""Baselines the speed benchmark compares the low-bit TVM builds against.

* ``tvm_fp32``  : torch.export -> Relax -> plain ``tvm.compile`` (default pipeline, untuned) -> Relax VM.
* ``torch_fp32``: PyTorch eager under ``torch.inference_mode()``.
* ``ort_int8``  : ONNX Runtime static int8 quantization (QDQ, per-channel weights), ORT's x86 recommendation.

Every runner uses ``NUM_THREADS`` (2) threads, so the comparison is fair. TVM reads ``TVM_NUM_THREADS``
when its thread pool starts, so it is set here, before anything imports tvm.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

NUM_THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(NUM_THREADS))


def set_threads(n: int | None = None) -> None:
    """torch's intra-op pool (``NUM_THREADS`` as it is at the call); TVM's comes from TVM_NUM_THREADS (above);
    ORT's from SessionOptions."""
    torch.set_num_threads(NUM_THREADS if n is None else n)


class Runner:
    """A compiled/loaded model: ``run`` one input, time it, and report the bytes its weights take."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], weight_bytes: int) -> None:
        self._fn = fn
        self.weight_bytes = weight_bytes

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._fn(np.ascontiguousarray(x, dtype=np.float32))

    def median_ms(self, x: np.ndarray, repeat: int = 50, warmup: int = 5) -> float:
        """Median wall time of ``run`` over ``repeat`` calls after ``warmup`` calls (median: the host is shared)."""
        return median_call_ms(self._fn, np.ascontiguousarray(x, dtype=np.float32), repeat, warmup)


def median_call_ms(fn: Callable[[Any], Any], x: Any, repeat: int = 50, warmup: int = 5) -> float:
    """Median wall time in ms of ``fn(x)`` over ``repeat`` calls after ``warmup`` uncounted calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def host_target() -> Any:
    """The x86 host as a JSON-dict target (``num-cores`` is what MetaSchedule needs, harmless otherwise)."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                              "num-cores": NUM_THREADS})


def fp32_weight_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters (conv/linear weights and biases, BN affine) as float32."""
    return sum(4 * p.numel() for p in model.parameters())


class TVMRunner(Runner):
    """Relax VM runner; timing goes through the VM's ``time_evaluator`` so Python overhead is excluded."""

    def __init__(self, vm: Any, weight_bytes: int) -> None:
        import tvm

        self._vm, self._dev = vm, tvm.cpu()
        super().__init__(self._call, weight_bytes)

    def _call(self, x: np.ndarray) -> np.ndarray:
        import tvm

        out = self._vm["main"](tvm.runtime.tensor(x, self._dev))
        return out[0].numpy()  # exported programs return a tuple

    def median_ms(self, x: np.ndarray, repeat: int = 50, warmup: int = 5) -> float:
        import tvm

        x = np.ascontiguousarray(x, dtype=np.float32)
        for _ in range(warmup):
            self._call(x)
        self._vm.set_input("main", tvm.runtime.tensor(x, self._dev))
        # number=1: each of the `repeat` samples is one inference, so the median is per inference
        res = self._vm.time_evaluator("invoke_stateful", self._dev, number=1, repeat=repeat)("main")
        return 1e3 * float(np.median(res.results))


def tvm_fp32(model: nn.Module, example: np.ndarray | torch.Tensor) -> TVMRunner:
    """Untuned TVM FP32: weights become Relax constants, then the default ``tvm.compile`` pipeline."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    x = torch.as_tensor(example, dtype=torch.float32)
    model = model.eval()
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
    mod = from_exported_program(ep, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    # bind the weights back as constants: the compiled module then only takes the input
    names = [p.name for p in mod["main"].params[1:]]
    mod = relax.transform.BindParams("main", dict(zip(names, params["main"])))(mod)
    ex = tvm.compile(mod, target=host_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return TVMRunner(vm, fp32_weight_bytes(model))


def torch_fp32(model: nn.Module) -> Runner:
    """PyTorch eager FP32 on NUM_THREADS threads."""
    set_threads()
    model = model.eval()

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return Runner(fn, fp32_weight_bytes(model))


class _Calib:
    """ORT CalibrationDataReader over a numpy batch, one sample per call (the ONNX model has batch 1)."""

    def __init__(self, name: str, calib: np.ndarray) -> None:
        self._it = iter([{name: calib[i: i + 1].astype(np.float32)} for i in range(calib.shape[0])])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def ort_int8(model: nn.Module, example: np.ndarray | torch.Tensor, calib: np.ndarray) -> Runner:
    """ONNX Runtime static int8, QDQ, per-channel int8 weights, uint8 activations, MinMax calibration.

    Settings follow ``quantize_static``'s guidance for x86 without VNNI (this host): U8S8 with
    ``reduce_range=True`` (7-bit weights, avoids VPMADDUBSW saturation on AVX2).
    ``weight_bytes`` counts the int8/uint8 initializers (the quantized weights; BN is folded by the exporter).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x = torch.as_tensor(example, dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter is deprecated, but it folds BN and needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (x,), buf, input_names=["x"], output_names=["y"],
                          dynamo=False, opset_version=17)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path, fp32_path, q_path = Path(tmp) / "raw.onnx", Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        raw_path.write_bytes(buf.getvalue())
        quant_pre_process(str(raw_path), str(fp32_path))  # ORT's recommended step: shape inference + graph opt
        quantize_static(str(fp32_path), str(q_path), _Calib("x", calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        qbytes = q_path.read_bytes()
    qmodel = onnx.load_from_string(qbytes)
    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    wbytes = sum(int(np.prod(t.dims)) for t in qmodel.graph.initializer if t.data_type in int8)

    so = ort.SessionOptions()
    so.intra_op_num_threads = NUM_THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(qbytes, so, providers=["CPUExecutionProvider"])

    def fn(a: np.ndarray) -> np.ndarray:
        return sess.run(None, {"x": a})[0]

    return Runner(fn, wbytes)
