"""The pass pipeline ``tvm_lowbit.compile`` runs on an imported fake-quant Relax module: one
``tvm.transform.Sequential`` with named passes, printable by a user::

    >>> print(lowering_pipeline(target))          # the passes, in order
    >>> mod, report = run_pipeline(mod, target, infos)

0. ``tvm_lowbit.NormalizeTake`` (:mod:`.normalize_take`): every ``take`` reads inside its tensor (the importer's
   ``x[:, -1]`` is a negative index in mode "fast", an out-of-bounds read); ``tvm_lowbit.TorchSiLU``
   (:mod:`.torch_silu`): SiLU with PyTorch's formula, so fewer values differ from the fake-quant model's;
   ``tvm_lowbit.TorchSigmoid`` (:mod:`.torch_sigmoid`): sigmoid as PyTorch's CPU kernel computes it, bit for bit;
   ``tvm_lowbit.TorchMean`` (:mod:`.torch_mean`): means over trailing axes summed in PyTorch's order;
1. ``relax.transform.CanonicalizeBindings`` and ``DeadCodeElimination``: drop the dead tuple members
   importers leave (e.g. the constant indices of torch's max_pool2d_with_indices);
2. ``relax.transform.FoldConstant``, then ``tvm_lowbit.Relu6Quantizer`` (:mod:`.relu6_quantizer`): a quantizer
   of ``clip(y, 0, b)`` reads ``relu(y)`` where ``b`` quantizes to the top code (exact), so the ReLU6 fuses;
   On targets whose conv kernels take NHWC (``integer_layout``): ``relax.transform.ConvertLayout`` to
   NHWC convs and ``tvm_lowbit.SinkPermutes`` (:mod:`.convert_layout`), so the integer region runs in
   NHWC end to end and transposes stay at the float boundaries;
3. ``tvm_lowbit.FoldRequantize`` (:mod:`.fold_requantize`): a quantizer that re-quantizes codes it would
   reproduce exactly reads the first quantizer's codes;
3b. ``tvm_lowbit.LowerEmbeddings`` (:mod:`.embedding`): a ``take`` of a constant table of integers (a
   quantized embedding) gathers from int8 / int4 codes instead of a float32 table, same values;
4. ``tvm_lowbit.LowerIntegerLayers`` (:mod:`.lower_integer_layers`): every fake-quant layer becomes one
   integer kernel, the one the kernel registry picks for the target;
5. ``schedule_passes``, if given (e.g. a tuned MetaSchedule database applied by the compiler);
6. ``tvm_lowbit.ApplyKernelSchedules`` (:mod:`.apply_kernel_schedules`): the default schedule of every
   kernel not scheduled yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax

from tvm_lowbit.passes.apply_kernel_schedules import ApplyKernelSchedules
from tvm_lowbit.passes.convert_layout import integer_layout, nhwc_passes
from tvm_lowbit.passes.embedding import LowerEmbeddings
from tvm_lowbit.passes.fold_requantize import FoldRequantize
from tvm_lowbit.passes.layer_info import LayerInfo
from tvm_lowbit.passes.lower_integer_layers import LowerIntegerLayers
from tvm_lowbit.passes.normalize_take import NormalizeTake
from tvm_lowbit.passes.relu6_quantizer import Relu6Quantizer
from tvm_lowbit.passes.report import LoweringReport
from tvm_lowbit.passes.torch_mean import TorchMean
from tvm_lowbit.passes.torch_sigmoid import TorchSigmoid
from tvm_lowbit.passes.torch_silu import TorchSiLU

FUNC_NAME = "main"


def lowering_passes(target: tvm.target.Target | None, infos: dict[str, LayerInfo] | None = None, *,
                    expose_acc: bool = False, report: LoweringReport | None = None) -> list[tvm.transform.Pass]:
    """Steps 0-4 of the pipeline (no schedules): take indices, canonicalize, [NHWC], fold constants and
    re-quantizers, lower."""
    report = report if report is not None else LoweringReport()
    layout = nhwc_passes(FUNC_NAME) if integer_layout(target) == "NHWC" else []
    return [
        NormalizeTake(),
        TorchSiLU(FUNC_NAME),
        TorchSigmoid(FUNC_NAME),
        TorchMean(FUNC_NAME),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination([FUNC_NAME]),
        *layout,
        relax.transform.FoldConstant(),
        Relu6Quantizer(FUNC_NAME),
        FoldRequantize(FUNC_NAME, report=report),
        LowerEmbeddings(infos, report=report, func_name=FUNC_NAME),
        LowerIntegerLayers(infos, target=target, expose_acc=expose_acc, report=report, func_name=FUNC_NAME),
    ]


def lowering_pipeline(target: tvm.target.Target, infos: dict[str, LayerInfo] | None = None, *,
                      expose_acc: bool = False, report: LoweringReport | None = None,
                      schedule_passes: Sequence[tvm.transform.Pass] = ()) -> tvm.transform.Sequential:
    """The passes that lower and schedule ``main`` of an imported fake-quant module for ``target``.

    ``infos`` (``weight_key`` -> LayerInfo) names the layers and gives their weight formats; ``expose_acc``
    appends every layer's int32 accumulators to the outputs; the passes write what they did into
    ``report`` when one is given (:func:`run_pipeline` does); ``schedule_passes`` run between the lowering
    and the default schedules (a kernel they schedule keeps its schedule)."""
    return tvm.transform.Sequential(
        [*lowering_passes(target, infos, expose_acc=expose_acc, report=report), *schedule_passes,
         ApplyKernelSchedules(target)],
        opt_level=0, name="tvm_lowbit.LoweringPipeline")


def run_pipeline(mod: tvm.IRModule, target: tvm.target.Target, infos: dict[str, LayerInfo] | None = None, *,
                 expose_acc: bool = False, schedule_passes: Sequence[tvm.transform.Pass] = ()
                 ) -> tuple[tvm.IRModule, LoweringReport]:
    """Run :func:`lowering_pipeline` on ``mod``; returns the lowered, scheduled module and the report."""
    report = LoweringReport()
    out = lowering_pipeline(target, infos, expose_acc=expose_acc, report=report, schedule_passes=schedule_passes)(mod)
    return out, report
