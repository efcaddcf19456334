"""The CPU backend (x86 host, the Raspberry Pi boards): lower the quantized layers to integer kernels, apply
the target's tuned schedules, build with ``tvm.compile``; tuning with MetaSchedule (``tvm_lowbit.tune``)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from torch import nn

from tvm_lowbit import tune
from tvm_lowbit.artifact import Artifact, module_inputs
from tvm_lowbit.backends.base import Backend, Schedules
from tvm_lowbit.errors import CompileError
from tvm_lowbit.importer import example_batch, import_torch, layer_infos, strip_single_tuple
from tvm_lowbit.quantizers.inputs import first_tensor
from tvm_lowbit.passes.apply_kernel_schedules import apply_default_schedules
from tvm_lowbit.passes.fuse_add_quantize import fuse_add_quantize
from tvm_lowbit.passes.lower_integer_layers import lower_integer_layers
from tvm_lowbit.passes.nhwc_shuffle import nhwc_shuffle
from tvm_lowbit.passes.pool_quantize import pool_quantize
from tvm_lowbit.passes.shuffle_quantize import shuffle_quantize
from tvm_lowbit.passes.normalize_take import normalize_take
from tvm_lowbit.passes.schedule_float_ops import build_pipeline
from tvm_lowbit.passes.vector_math import vector_math
from tvm_lowbit.passes.layer_info import LayerInfo
from tvm_lowbit.targets import TargetSpec


# One build at a time per process: TVM's TE tag scope (``te.tag_scope``, entered by the TOPI functions that
# legalization and constant folding call) is a process-global stack, so two threads building at once fail with
# "nested op_tag is not allowed".  Runs of built artifacts stay parallel (per-thread VMs).
BUILD_LOCK = threading.Lock()


def constants_bytes(func: Any) -> int:
    """Bytes of the distinct tensor constants of a Relax function (what the artifact stores)."""
    import tvm
    from tvm import relax

    sizes: dict[int, int] = {}

    def visit(e: Any) -> None:
        if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "numpy"):
            sizes[e.__hash__()] = e.value.numpy().nbytes

    relax.analysis.post_order_visit(func, visit)
    return sum(sizes.values())


def schedules_dir(spec: TargetSpec, schedules: Schedules, verbose: bool = False) -> Path | None:
    """The tuning database folder a build applies: ``schedules`` as given to :func:`build`."""
    if schedules is False:
        return None
    if schedules is None or schedules is True:
        if (note := tune.emulated_default(spec.name)) is not None:
            if verbose:
                print(f"note: {note}")
            return None
        d = tune.SCHEDULES_DIR / spec.name
        return d if (d / tune.WORKLOAD_FILE).is_file() else None
    d = Path(schedules)
    if not d.is_dir():
        raise CompileError(f"schedules={str(d)!r}: no such tuning database folder (make one with `tvm-lowbit tune`)")
    return d


def build(mod: Any, spec: TargetSpec, infos: dict[str, LayerInfo] | None, input_shape: tuple[int, ...], *,
          expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> Artifact:
    """Lower, schedule and build a Relax module imported from a fake-quant model for a CPU target.

    ``schedules``: a MetaSchedule database folder (``tvm-lowbit tune``) to apply; ``None`` uses
    ``tune.SCHEDULES_DIR/<target>/`` when it exists and was not measured under emulation (``tune.EMULATED_MARK``);
    ``False`` keeps the default schedules."""
    t0 = time.time()
    db_dir = schedules_dir(spec, schedules, verbose)
    with BUILD_LOCK:  # TVM's TE tag scope (used by legalization and constant folding) is process-global
        return _build_locked(mod, spec, infos, input_shape, expose_acc, verbose, schedules, db_dir, t0)


def _build_locked(mod: Any, spec: TargetSpec, infos: dict[str, LayerInfo] | None, input_shape: tuple[int, ...],
                  expose_acc: bool, verbose: bool, schedules: Schedules, db_dir: Any, t0: float) -> Artifact:
    import tvm

    tgt = spec.tvm_target()
    tuning = None

    def apply_tuned(m: Any, _ctx: Any) -> Any:
        """Tuned schedules first; the kernels without a record get their default schedule after."""
        nonlocal tuning
        try:
            m, tuning = tune.apply_database(m, tgt, db_dir)
        except Exception as e:  # noqa: BLE001 - a database problem must not stop a build that works without it
            if schedules not in (None, True):
                raise CompileError(f"cannot apply the tuning database {db_dir}: {type(e).__name__}: {e}") from e
            print(f"warning: tuned schedules in {db_dir} not applied ({type(e).__name__}: {e}); "
                  "default schedules used", file=sys.stderr)
        return m

    # the pipeline's passes (tvm_lowbit.passes.pipeline), with the integer region's layout chosen per model:
    # lower_integer_layers tries NHWC and keeps NCHW when NHWC would leave more layers in float
    try:
        mod = normalize_take(mod)
        mod, report = lower_integer_layers(mod, infos, expose_acc=expose_acc, target=tgt)
        # before the tuned database, whose application legalizes and fuses the float ops these passes read
        mod, _ = nhwc_shuffle(mod)  # channel shuffles in NHWC, no NCHW detour (passes.nhwc_shuffle)
        if spec.arch == "x86_64":  # residual add (+ ReLU) and the next quantizer in one loop (passes.fuse_add_quantize)
            mod, _ = fuse_add_quantize(mod)
            mod, _ = pool_quantize(mod)  # max pool + the next quantizer in one kernel (passes.pool_quantize)
            mod, _ = shuffle_quantize(mod)  # concat + shuffle + split + quantizer in one pass (passes.shuffle_quantize)
        mod = vector_math(mod, tgt)  # float32 exp / erf vectorized, the C library's bits (x86 FMA+AVX2 only)
        if db_dir is not None:
            mod = apply_tuned(mod, None)
        mod = apply_default_schedules(mod, tgt)
    except Exception as e:  # a CompileError raised inside a pass arrives as a RuntimeError with its message
        if isinstance(e, CompileError):
            raise
        msg = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise CompileError(f"lowering for {spec.name} failed: {msg[-1] if msg else type(e).__name__}") from e
    if verbose and tuning is not None:
        print(tuning.text())
    if not expose_acc:
        mod = strip_single_tuple(mod)
    weight_bytes = constants_bytes(mod["main"])
    try:
        # x86: the float ops between the kernels parallel and vectorized, same results (passes.schedule_float_ops)
        ex = tvm.compile(mod, target=tgt, relax_pipeline=build_pipeline(tgt) if spec.arch == "x86_64" else "default")
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise CompileError(f"TVM failed to build the model for {spec.name}: {type(e).__name__}: "
                           f"{msg[-1] if msg else ''}") from e
    ret = mod["main"].ret_ty
    n_out = len(ret.fields) if hasattr(ret, "fields") else 1
    inputs = module_inputs(mod["main"])
    dtype = inputs[0].dtype if inputs else "float32"
    art = Artifact(spec, ex, tuple(input_shape), dtype, report, weight_bytes, n_out, time.time() - t0, tuning,
                   inputs=inputs if len(inputs) != 1 or dtype != "float32" else ())
    if verbose:
        print(report.text())
    return art


class CPUBackend(Backend):
    kind = "cpu"

    def compile(self, qmodel: nn.Module, example_input: Any, spec: TargetSpec, *,
                expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> Artifact:
        x = example_batch(example_input)  # a tensor (any dtype), a tuple or a dict of inputs
        mod = import_torch(qmodel, x)
        return build(mod, spec, layer_infos(qmodel), tuple(first_tensor(x).shape), expose_acc=expose_acc,
                     verbose=verbose, schedules=schedules)

    def build(self, mod: Any, spec: TargetSpec, infos: dict[str, LayerInfo] | None, input_shape: tuple[int, ...],
              *, expose_acc: bool = False, verbose: bool = False, schedules: Schedules = None) -> Artifact:
        return build(mod, spec, infos, input_shape, expose_acc=expose_acc, verbose=verbose, schedules=schedules)

    def tune_module(self, mod: Any, spec: TargetSpec, **kw: Any) -> tune.TuneReport:
        return tune.tune_module(mod, spec, **kw)

    def cli_refusal(self, spec: TargetSpec, source: str, schedules: str | None) -> str | None:
        if schedules is not None and source == "onnx":
            return f"--schedules {schedules}: tuned schedules apply to .pt2 and built-in models on CPU targets"
        return None

    def schedules_note(self, spec: TargetSpec) -> str | None:
        return tune.emulated_default(spec.name)
